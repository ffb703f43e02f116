"""Render the config schema as text (CLI help); the web UI derives its forms from the same schema."""

from __future__ import annotations

import typing

from pydantic import BaseModel

from tuneforge.config.schema import FreezeAdapter, FullAdapter, LoraAdapter, TuneForgeConfig

ADAPTERS = {"lora": LoraAdapter, "freeze": FreezeAdapter, "full": FullAdapter}


def schema_help(model: type[BaseModel] = TuneForgeConfig, prefix: str = "") -> str:
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _nested_model(field.annotation)
        if key == "method.adapter":  # a discriminated union: list each variant's keys, tagged
            lines.append(f"  {key}.type  lora | freeze | full (default lora): {field.description}")
            for tag, cls in ADAPTERS.items():
                lines += [f"{line}   [{tag}]" for line in schema_help(cls, f"{key}.").splitlines()
                          if not line.strip().startswith(f"{key}.type")]
            continue
        if nested is not None:
            lines.append(schema_help(nested, f"{key}."))
            continue
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        lines.append(f"  {key}  ({default}): {field.description or ''}")
    return "\n".join(line for line in lines if line)


def _nested_model(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return args[0] if len(args) == 1 else None
