"""Web UI forms derived from the config schema: one field per config key, never a hand-kept list.

A form holds a value per dotted key (`train.learning_rate`). Variants of the schema (the method by `stage`, the
adapter by `type`, the low-memory optimizer by `name`, optional sections such as Mixture-of-Depths) have a
selector field, and the keys of a variant are active only while it is selected. A form becomes a config through
the very path the command line takes: its non-default values are `key=value` overrides of a minimal config,
validated by the same pydantic model (`load_config`).
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tuneforge.config import TuneForgeConfig, load_config

OFF = "none"  # the selector value of an optional section that is absent


@dataclass
class FormField:
    key: str  # dotted config key
    kind: str  # bool | choice | text
    description: str
    choices: list[str] | None = None
    required: bool = False
    # selector key -> {selector value: default of this key under that variant}; empty for keys always present
    defaults: dict[str, Any] = field(default_factory=dict)
    conditions: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (selector key, values) all needed
    section: str = ""

    @property
    def default(self) -> Any:
        return self.defaults.get("", None)


def schema_fields(model: type[BaseModel] = TuneForgeConfig) -> list[FormField]:
    """Every key of the schema in order, variants' keys merged by name (a key shared by several variants is one
    field whose default may differ per variant)."""
    found: dict[str, FormField] = {}
    for name, info in model.model_fields.items():
        _walk(name, info, [], found, section=name)
    return list(found.values())


def _models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _optional(info: FieldInfo) -> bool:
    return not info.is_required() and info.get_default(call_default_factory=True) is None


def _walk(key: str, info: FieldInfo, conditions: list, found: dict, section: str, variant: str = "") -> None:
    models = _models(info.annotation)
    if len(models) > 1 or (models and _optional(info)):
        _walk_variants(key, info, models, conditions, found, section)
        return
    if models:
        for name, sub in models[0].model_fields.items():
            _walk(f"{key}.{name}", sub, conditions, found, section, variant)
        return
    _add(found, key, info, conditions, section, variant)


def _walk_variants(key: str, info: FieldInfo, models: list, conditions: list, found: dict, section: str) -> None:
    tag = next((k for k in ("stage", "type", "name") if all(k in m.model_fields for m in models)), None)
    if tag is None:  # an optional section of one model: a switch
        selector, values = key, [OFF, "on"]
    else:
        selector = f"{key}.{tag}"
        values = ([OFF] if _optional(info) else []) + [typing.get_args(m.model_fields[tag].annotation)[0] for m in models]
    default = OFF if _optional(info) else values[0]
    description = (models[0].model_fields[tag].description if tag else info.description) or ""
    _merge(found, FormField(selector, "choice", description, [str(v) for v in values], defaults={"": default},
                            section=section), conditions)
    for m, value in zip(models, values[-len(models):]):
        inner = conditions + [(selector, (str(value),))]
        for name, sub in m.model_fields.items():
            if name != tag:
                _walk(f"{key}.{name}", sub, inner, found, section, variant=f"{selector}={value}")


def _add(found: dict, key: str, info: FieldInfo, conditions: list, section: str, variant: str) -> None:
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    kind, choices = _kind(info.annotation)
    f = FormField(key, kind, info.description or "", choices, info.is_required(),
                  defaults={(variant or ""): default}, section=section)
    _merge(found, f, conditions)


def _merge(found: dict, f: FormField, conditions: list) -> None:
    """Add a field, or widen an existing one: a key met under several variants is active under any of them."""
    existing = found.setdefault(f.key, f)
    if existing is f:
        f.conditions = [(s, tuple(v)) for s, v in conditions]
        return
    existing.defaults.update(f.defaults)
    allowed = dict(existing.conditions)
    for selector, values in conditions:
        allowed[selector] = tuple(dict.fromkeys(allowed.get(selector, ()) + tuple(values)))
    existing.conditions = list(allowed.items())


def _kind(annotation) -> tuple[str, list[str] | None]:
    if annotation is bool:
        return "bool", None
    literals = [a for a in _flatten(annotation) if typing.get_origin(a) is typing.Literal]
    others = [a for a in _flatten(annotation) if typing.get_origin(a) is not typing.Literal and a is not type(None)]
    if literals and not others:
        optional = type(None) in _flatten(annotation)
        return "choice", ([OFF] if optional else []) + [str(v) for lit in literals for v in typing.get_args(lit)]
    return "text", None


def _flatten(annotation) -> list:
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [a for arg in typing.get_args(annotation) for a in _flatten(arg)]
    return [annotation]


def field_default(f: FormField, values: dict[str, Any]) -> Any:
    """The default of a field under the variants selected in `values`."""
    for selector, _ in reversed(f.conditions):
        variant = f"{selector}={values.get(selector)}"
        if variant in f.defaults:
            return f.defaults[variant]
    return f.defaults.get("", next(iter(f.defaults.values()), None))


def active(f: FormField, values: dict[str, Any]) -> bool:
    return all(str(values.get(selector)) in allowed for selector, allowed in f.conditions)


def to_text(value: Any) -> str:
    """How a value is shown in a text field: YAML-like, as on the command line (`a,b` for lists)."""
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False) if value else ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # 32, not 32.0
    return str(value)


def normalise(f: FormField, value: Any, default: Any = None) -> Any:
    """A form value as a comparable config value (text parsed as YAML, as overrides are; `a,b` for lists)."""
    if f.kind == "bool":
        return bool(value)
    if f.kind == "choice":
        return None if value in (None, OFF) else str(value)
    text = "" if value is None else str(value).strip()
    if text == "":
        return None
    if isinstance(default, list) and not text.startswith("["):
        return [_scalar(part.strip()) for part in text.split(",") if part.strip()]
    return _scalar(text)


def _scalar(text: str) -> Any:
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return parsed


def overrides_from_form(values: dict[str, Any], fields: list[FormField] | None = None) -> list[str]:
    """`key=value` overrides for every active field that differs from its default (and every required one)."""
    fields = fields or schema_fields()
    out = []
    for f in fields:
        if not active(f, values) or f.key not in values:
            continue
        default = field_default(f, values)
        value = normalise(f, values[f.key], default)
        comparable = default if f.kind != "choice" else (None if default in (None, OFF) else str(default))
        if f.kind == "text" and isinstance(default, (list, dict)) and value is None:
            value = type(default)()
        if value == comparable and not f.required:
            continue
        if f.kind == "choice" and value is None:
            continue  # an optional value or section left off
        if f.kind == "choice" and f.choices == [OFF, "on"]:
            out.append(f"{f.key}={{}}")  # an optional section switched on: its keys follow (defaults otherwise)
            continue
        out.append(f"{f.key}={_override_text(f, values[f.key])}")
    return out


def _override_text(f: FormField, value: Any) -> str:
    if f.kind == "bool":
        return "true" if value else "false"
    return str(value).strip()


def config_from_form(values: dict[str, Any]) -> TuneForgeConfig:
    """The validated config a form describes (ConfigError naming each bad key otherwise)."""
    overrides = overrides_from_form(values)
    required = {o.split("=", 1)[0] for o in overrides}
    base: dict[str, Any] = {"model": {}, "data": {}}
    if "model.name_or_path" not in required:
        base["model"]["name_or_path"] = ""
    return load_config(base, overrides)


def form_from_config(cfg: TuneForgeConfig, fields: list[FormField] | None = None) -> dict[str, Any]:
    """The form values showing a config (keys of unselected variants keep their defaults)."""
    fields = fields or schema_fields()
    flat = _flatten_config(cfg.model_dump(mode="json"))
    values: dict[str, Any] = {}
    for f in fields:  # selectors first fix which variant's defaults apply
        if f.kind == "choice" and f.key in flat:
            values[f.key] = str(flat[f.key])
    for f in fields:
        if f.kind == "choice" and f.choices == [OFF, "on"]:
            present = any(k.startswith(f.key + ".") for k in flat) and flat.get(f.key) is not None
            values[f.key] = "on" if present else OFF
        elif f.kind == "choice" and OFF in (f.choices or []) and f.key not in flat:
            values[f.key] = OFF
        elif f.key in flat:
            values[f.key] = _shown(f, flat[f.key])
        else:
            values[f.key] = _shown(f, field_default(f, values))
    return values


def _shown(f: FormField, value: Any) -> Any:
    if f.kind == "text":
        return to_text(value)
    if f.kind == "choice":
        return OFF if value is None else str(value)
    return bool(value)


def _flatten_config(raw: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "placeholders":
            flat[dotted] = value
            flat.update(_flatten_config(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_yaml(cfg: TuneForgeConfig) -> str:
    from tuneforge.config import dump_config

    return dump_config(cfg)
