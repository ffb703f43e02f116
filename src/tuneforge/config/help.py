"""Render the config schema as text (CLI help); the web UI derives its forms from the same schema."""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tuneforge.config.schema import TuneForgeConfig


def schema_help(model: type[BaseModel] = TuneForgeConfig, prefix: str = "") -> str:
    """One line per key: dotted name, default, description. Keys of one variant of a union are tagged [variant]."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        lines += _field_lines(f"{prefix}{name}", field, "")
    return "\n".join(lines)


def _field_lines(key: str, field: FieldInfo, tag: str) -> list[str]:
    variants = _models(field.annotation)
    if len(variants) > 1:
        default = None if not field.is_required() and field.get_default(call_default_factory=True) is None else ""
        return _union_lines(key, variants, tag, default)
    if variants:
        return [line for name, sub in variants[0].model_fields.items() for line in _field_lines(f"{key}.{name}", sub, tag)]
    default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
    return [f"  {key}  ({default}): {field.description or ''}{tag}"]


def _union_lines(key: str, variants: list[type[BaseModel]], tag: str, default: str | None) -> list[str]:
    """A discriminated union (method by stage, adapter by type, optimizer by name): its tag, shared keys once, the
    others tagged. `default` None: the whole section is optional and absent by default."""
    disc = next(k for k in ("stage", "type", "name") if all(k in v.model_fields for v in variants))
    names = [typing.get_args(v.model_fields[disc].annotation)[0] for v in variants]
    description = variants[0].model_fields[disc].description or ""
    shown = "none" if default is None else names[0]
    lines = [f"  {key}.{disc}  {' | '.join(names)} (default {shown}): {description}{tag}"]
    shared = set.intersection(*(set(v.model_fields) for v in variants)) - {disc}
    for name in (n for n in variants[0].model_fields if n in shared):
        lines += _field_lines(f"{key}.{name}", variants[0].model_fields[name], tag)
    for variant, value in zip(variants, names):
        for name, field in variant.model_fields.items():
            if name not in shared and name != disc:
                lines += _field_lines(f"{key}.{name}", field, f"{tag}   [{value}]")
    return lines


def _models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]
