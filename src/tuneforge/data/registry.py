"""The data set registry: a `dataset_info.json` with LLaMA-Factory's schema, read unchanged.

A data set name resolves to a `DatasetSpec`: where the rows come from (a file or folder under the
registry's folder, or a hub repository) and how their columns and role tags map onto conversations.
A path to a data file also works as a name: its format is then detected from its rows.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuneforge.errors import DataError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")


class Columns(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = None
    messages: str | None = "conversations"
    system: str | None = None
    tools: str | None = None
    images: str | None = None
    videos: str | None = None
    audios: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    kto_tag: str | None = None


class Tags(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"


class DatasetSpec(BaseModel):
    """One entry of dataset_info.json (LLaMA-Factory's keys, including those TuneForge cannot serve)."""

    model_config = ConfigDict(extra="forbid")
    name: str = ""
    base_dir: str = "."
    file_name: str | None = None
    hf_hub_url: str | None = None
    ms_hub_url: str | None = None
    om_hub_url: str | None = None
    script_url: str | None = None
    cloud_file_name: str | None = None
    formatting: Literal["alpaca", "sharegpt", "openai"] = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = Field(None, ge=1)
    columns: Columns = Field(default_factory=Columns)
    tags: Tags = Field(default_factory=Tags)

    @model_validator(mode="before")
    @classmethod
    def _openai_defaults(cls, entry):
        """`formatting: openai` is sharegpt with OpenAI's message keys: a `messages` column of {role, content}
        (assistant `tool_calls`, `tool` results), unless the entry maps them otherwise."""
        if isinstance(entry, dict) and entry.get("formatting") == "openai":
            entry = dict(entry)
            entry["columns"] = {"messages": "messages", **(entry.get("columns") or {})}
            entry["tags"] = {**OPENAI_TAGS, **(entry.get("tags") or {})}
        return entry

    @property
    def is_chat(self) -> bool:
        return self.formatting in ("sharegpt", "openai")

    @property
    def path(self) -> Path | None:
        return Path(self.base_dir) / self.file_name if self.file_name else None

    @property
    def is_text_only(self) -> bool:
        """Plain-text data (pre-training): only a prompt column is mapped, as in c4_demo and wiki_demo."""
        c = self.columns
        return self.formatting == "alpaca" and c.prompt == "text" and "response" not in c.model_fields_set


class Registry(Mapping):
    """The entries of one dataset_info.json, each validated when it is used: a malformed entry is reported (all
    its problems at once) only by the runs that use it, and does not block the others."""

    def __init__(self, info: Path, raw: dict):
        self.info, self.raw, self._specs = info, raw, {}

    def __getitem__(self, name: str) -> DatasetSpec:
        if name not in self._specs:
            entry = self.raw[name]
            if not isinstance(entry, dict):
                raise DataError(f"{self.info}: {name}: expected an object with file_name or hf_hub_url")
            try:
                self._specs[name] = DatasetSpec.model_validate({**entry, "name": name,
                                                                 "base_dir": str(self.info.parent)})
            except ValidationError as exc:
                raise DataError(*[f"{self.info}: {name}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                                  for err in exc.errors()]) from None
        return self._specs[name]

    def __iter__(self):
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


def load_registry(dataset_dir: str | Path) -> Registry:
    """`<dataset_dir>/dataset_info.json` (relative folders are taken from the working directory, as
    LLaMA-Factory takes them)."""
    info = Path(dataset_dir) / "dataset_info.json"
    if not info.is_file():
        raise DataError(
            f"{info.absolute()}: no dataset_info.json here. hint: set data.dataset_dir to the folder that holds it "
            "(a relative folder is taken from the working directory), or name a data file directly in data.dataset"
        )
    try:
        raw = json.loads(info.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{info} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{info}: not UTF-8 text. hint: save it as UTF-8") from None
    if not isinstance(raw, dict):
        raise DataError(f"{info}: expected an object mapping data set names to their descriptions")
    return Registry(info, raw)


def resolve_dataset(name: str, dataset_dir: str | Path) -> DatasetSpec:
    """A registry name, or a path to a data file whose format is detected from its first row."""
    candidate = Path(name)
    if candidate.suffix in DATA_SUFFIXES and candidate.exists():
        return spec_for_file(candidate)
    registry = load_registry(dataset_dir)
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=3)
    hint = f" did you mean {', '.join(close)}?" if close else ""
    raise DataError(
        f"data set {name!r} is not in {registry.info.absolute()}.{hint} "
        "hint: add an entry for it there, or give the path of a .json/.jsonl/.csv/.parquet/.txt file"
    )


def outside_reason(spec: DatasetSpec) -> str | None:
    """Why a registered file lies outside the registry's folder (an absolute path, `..`, or a symlink leading
    out), or None when it is inside. Bare file paths named in data.dataset are checked against that folder too."""
    path = spec.path
    if path is None:
        return None
    root = Path(spec.base_dir).resolve()
    files = [path]
    if path.is_dir():
        files += [p for p in path.rglob("*") if p.is_file() or p.is_symlink()]
    for f in files:
        resolved = f.resolve()
        if resolved != root and root not in resolved.parents:
            how = "a symlink out of" if f.is_symlink() or any(p.is_symlink() for p in f.parents) else "outside"
            return f"{f} is {how} the data folder {root} (it resolves to {resolved})"
    return None


def spec_for_file(path: Path) -> DatasetSpec:
    """Build a registry entry for a bare file: alpaca, sharegpt (from/value) or OpenAI messages (role/content)."""
    from tuneforge.data.readers import first_row

    row = first_row(path) if path.suffix != ".txt" else {"text": ""}
    base = {"name": str(path), "base_dir": str(path.parent), "file_name": path.name}
    if "text" in row and "instruction" not in row:
        answer = next((k for k in ("label", "output", "answer", "response") if k in row), None)
        columns = {"prompt": "text", **({"response": answer} if answer else {})}
        return DatasetSpec.model_validate({**base, "columns": columns})
    for key in ("messages", "conversations"):
        turns = row.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            if "role" in turns[0]:
                return DatasetSpec.model_validate({**base, "formatting": "sharegpt", "columns": {"messages": key},
                                                   "tags": OPENAI_TAGS})
            return DatasetSpec.model_validate({**base, "formatting": "sharegpt", "columns": {"messages": key}})
    columns = {k: k for k in ("system", "history") if k in row}
    return DatasetSpec.model_validate({**base, "columns": columns})


OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
