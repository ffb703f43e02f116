"""The base of every config section: strict (unknown keys and inf/nan refused), and the list parsers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    # inf and nan are never meant: learning_rate=inf trains to a model of NaNs
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _split_names(value):
    """Accept `a,b` or `[a, b]` for lists of names (the LLaMA-Factory spelling is a comma string)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _all_or_names(value):
    return value if value == "all" else _split_names(value)
