"""YAML file + dotted `key=value` overrides -> validated TuneForgeConfig, or one ConfigError listing every problem."""

from __future__ import annotations

import copy
import difflib
import sys
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ValidationError

from tuneforge.config.llamafactory import apply_flat_overrides, is_llamafactory, translate
from tuneforge.config.schema import TuneForgeConfig
from tuneforge.errors import ConfigError

LLAMAFACTORY_KEYS = {"model_name_or_path", "finetuning_type", "stage", "do_train", "lora_rank"}


def load_config(source: str | Path | Mapping[str, Any] | TuneForgeConfig, overrides: list[str] = ()) -> TuneForgeConfig:
    """Read a config from a YAML path, a dict or an existing config, apply `a.b=value` overrides, validate."""
    if isinstance(source, TuneForgeConfig):
        raw, where = source.model_dump(mode="json"), "config"
    elif isinstance(source, Mapping):
        raw, where = copy.deepcopy(dict(source)), "config"  # overrides must not change the caller's dict
    else:
        raw, where = read_yaml(Path(source)), str(source)
    if is_llamafactory(raw):  # a LLaMA-Factory config: translated, its own spelling of overrides first
        raw, overrides = apply_flat_overrides(raw, list(overrides))
        translation = translate(raw, where)
        announce(translation, where)
        raw = translation.config
    raw = apply_overrides(raw, overrides)
    return validate_config(raw, where, overrides)


def announce(translation, where: str) -> None:
    """One line on what the translation kept from LLaMA-Factory, one on what it ignored (stderr; rank 0 only)."""
    from tuneforge.ranks import is_main

    if not is_main():
        return
    kept = f", keeping its behaviour where TuneForge's defaults differ ({len(translation.notes)} places)" \
        if translation.notes else ""
    print(f"tuneforge: {where} is a LLaMA-Factory config: translated{kept}; `tuneforge convert {where}` shows the "
          "result", file=sys.stderr)
    if translation.ignored:
        print(f"tuneforge: warning: {where}: ignored " + "; ".join(translation.ignored), file=sys.stderr)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key written twice in one mapping (YAML would silently keep the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the YAML config file itself (e.g. {path / 'config.yaml'})")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file. hint: see examples/ for ready-made configs.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is fine
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at position {exc.start}). "
                          "hint: save the file as UTF-8") from None
    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise ConfigError(f"{path}: uses YAML aliases (*name), which configs do not need (and which can expand "
                              "into huge documents). hint: write the values out")
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, method, train, output)")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`train.learning_rate=1e-4` sets raw['train']['learning_rate']; values are parsed as YAML scalars/lists."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected key=value, e.g. train.learning_rate=1e-4")
            continue
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            node[parts[-1]] = text
        if parts[-1] in ("type", "stage"):
            _drop_keys_of_other_variants(raw, parts)
    if problems:
        raise ConfigError(*problems)
    return raw


def _drop_keys_of_other_variants(raw: dict, parts: list[str]) -> None:
    """`method.adapter.type=full` on the command line switches variant: the YAML's lora keys (rank, alpha, ...)
    no longer apply, so they are dropped, with a note, instead of failing as unknown keys."""
    model: type[BaseModel] | None = TuneForgeConfig
    node = raw
    for part in parts[:-1]:
        field = model.model_fields.get(part) if model else None
        node = node.get(part) if isinstance(node, dict) else None
        candidates = _models_in(field.annotation) if field else []
        if not isinstance(node, dict) or not candidates:
            return
        tag = next((node[k] for k in ("type", "stage") if k in node), None)
        model = next((c for c in candidates if tag in _tags(c)), candidates[0])
    dropped = [key for key in node if key not in model.model_fields]
    for key in dropped:
        del node[key]
    if dropped:
        print(f"tuneforge: {'.'.join(parts)}={node[parts[-1]]}: dropped {', '.join(dropped)} "
              "(they belong to the variant it replaces)", file=sys.stderr)


def validate_config(raw: dict[str, Any], where: str = "config", overrides: list[str] = ()) -> TuneForgeConfig:
    try:
        return TuneForgeConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err, _source_of(err, where, overrides)) for err in exc.errors()]
        if LLAMAFACTORY_KEYS & set(raw):
            problems.append(
                f"{where}: this looks like a flat LLaMA-Factory config; TuneForge uses sections "
                "(model:, data:, method:, train:, output:). hint: see examples/quickstart.yaml"
            )
        raise ConfigError(*problems) from None


def _source_of(err: dict, where: str, overrides: list[str]) -> str:
    """Where a bad value came from: the command-line override that set it, else the file."""
    _, shown = _walk([str(p) for p in err["loc"]][:-1])
    path = ".".join(shown + [str(err["loc"][-1])]) if err["loc"] else ""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if path == key or path.startswith(key + ".") or key.startswith(path + "."):
            return f"override {item!r}"
    return where


def _describe(err: dict, where: str) -> str:
    loc = [str(p) for p in err["loc"]]
    owner, shown_loc = _walk(loc[:-1])
    path = ".".join(shown_loc + loc[-1:]) or "(top level)"
    if err["type"] == "extra_forbidden":
        msg = f"{where}: {path}: unknown key"
        if owner is not None:
            close = difflib.get_close_matches(loc[-1], list(owner.model_fields), n=1, cutoff=0.6)
            msg += f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(owner.model_fields)}"
        return msg
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        disc = str(ctx.get("discriminator", "type")).strip("'")
        expected = str(ctx.get("expected_tags", "")).replace("'", "").replace(", ", " | ")
        return f"{where}: {path}.{disc}: {ctx.get('tag')!r} is not one of {expected}"
    if err["type"] == "missing":
        return f"{where}: {path}: required key is missing"
    given = err.get("input")
    shown = "" if isinstance(given, (dict, list)) else f" (given {given!r})"
    return f"{where}: {path}: {err['msg'].removeprefix('Value error, ')}{shown}"


def _walk(loc: list[str]) -> tuple[type[BaseModel] | None, list[str]]:
    """The model class owning the keys at `loc` (following discriminated unions by their tag), and `loc` as the
    user wrote it (pydantic inserts the union tag, e.g. method.adapter.lora.rank, which is not a YAML key)."""
    model: type[BaseModel] | None = TuneForgeConfig
    shown: list[str] = []
    i = 0
    while i < len(loc):
        shown.append(loc[i])
        field = model.model_fields.get(loc[i]) if model else None
        candidates = _models_in(field.annotation) if field else []
        if len(candidates) > 1 and i + 1 < len(loc):
            tag = loc[i + 1]
            chosen = [c for c in candidates if tag in _tags(c)]
            model, i = (chosen[0] if chosen else None), i + 2
            continue
        model, i = (candidates[0] if candidates else None), i + 1
    return model, shown


def _tags(model: type[BaseModel]) -> set:
    """The discriminator values a union member answers to (its `type` or `stage`)."""
    return {model.model_fields[k].default for k in ("type", "stage") if k in model.model_fields}


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out += _models_in(arg)
    return out


def dump_config(cfg: TuneForgeConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
