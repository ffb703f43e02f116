"""Every label and message of the web UI in English and Chinese (webui/strings.yaml; config help texts in Chinese
in webui/help_zh.yaml, their English being the schema's own descriptions).

Components are created through `Texts.add`, which remembers which of their properties carry which text, so that
switching the language in the page relabels all of them in one event."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

LANGUAGES = {"English": "en", "中文": "zh"}


@lru_cache(maxsize=1)
def strings() -> dict[str, dict[str, str]]:
    return yaml.safe_load(resources.files("tuneforge.webui").joinpath("strings.yaml").read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def help_zh() -> dict[str, str]:
    return yaml.safe_load(resources.files("tuneforge.webui").joinpath("help_zh.yaml").read_text(encoding="utf-8"))


def text(key: str, lang: str = "en", **values: Any) -> str:
    entry = strings()[key]
    return entry.get(lang, entry["en"]).format(**values)


def field_help(key: str, english: str, lang: str) -> str:
    return help_zh().get(key, english) if lang == "zh" else english


class Texts:
    def __init__(self):
        self.registered: list[tuple[Any, dict[str, tuple[str, str | None]]]] = []

    def add(self, component, **texts):
        """Register `component` with the properties that carry texts: prop=key (a strings.yaml key), or
        prop=("config", dotted key, english) for a config field's help."""
        self.registered.append((component, {prop: (spec if isinstance(spec, tuple) else ("ui", spec, None))
                                            for prop, spec in texts.items()}))
        return component

    def initial(self, key: str) -> str:
        return text(key, "en")

    def updates(self, lang: str) -> list:
        import gradio as gr

        out = []
        for component, props in self.registered:
            values = {}
            for prop, (kind, key, english) in props.items():
                values[prop] = field_help(key, english, lang) if kind == "config" else text(key, lang)
            out.append(gr.update(**values))
        return out

    @property
    def components(self) -> list:
        return [component for component, _ in self.registered]
