"""Read raw rows from files, folders or hubs, each tagged with where it came from (for error messages)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tuneforge.data.registry import DATA_SUFFIXES, DatasetSpec
from tuneforge.errors import DataError


@dataclass
class RawRow:
    source: str  # file path or hub id
    number: int  # 1-based row (JSON array index, JSONL/CSV/TXT line)
    data: Any  # a dict of columns for well-formed rows; the converter reports anything else

    @property
    def where(self) -> str:
        return f"{self.source} row {self.number}"


def read_rows(spec: DatasetSpec, hub: str = "huggingface") -> list[RawRow]:
    """All rows of one registered data set, before conversion."""
    unsupported = [k for k in ("script_url", "cloud_file_name", "om_hub_url") if getattr(spec, k)]
    if spec.hf_hub_url or spec.ms_hub_url:
        use_ms = spec.ms_hub_url and (hub == "modelscope" or not spec.hf_hub_url)
        return _read_modelscope(spec) if use_ms else _read_hf_hub(spec)
    if spec.file_name is None:
        what = f" ({', '.join(unsupported)} is not supported)" if unsupported else ""
        raise DataError(f"data set {spec.name!r}: no file_name or hf_hub_url/ms_hub_url{what}. "
                        "hint: download the data and point file_name at it")
    path = spec.path
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"data set {spec.name!r}: folder {path} holds no {'/'.join(DATA_SUFFIXES)} files")
        return [row for f in files for row in read_file(f)]
    if not path.is_file():
        raise DataError(f"data set {spec.name!r}: file {path} does not exist. "
                        "hint: file_name is relative to the folder of dataset_info.json (data.dataset_dir)")
    return read_file(path)


def iter_rows(spec: DatasetSpec, hub: str = "huggingface") -> Iterator[RawRow]:
    """The rows of one registered data set, read as they are needed (data.streaming): line by line for JSON lines,
    CSV and text, file by file in a folder, and through datasets' streaming mode for hub data sets."""
    if spec.hf_hub_url and not (spec.ms_hub_url and hub == "modelscope"):
        yield from _read_hf_hub(spec, streaming=True)
        return
    if spec.hf_hub_url or spec.ms_hub_url or spec.file_name is None or not spec.path.is_dir():
        if spec.file_name is not None and spec.path.is_file():
            yield from _read_lazily(spec.path)
        else:
            yield from read_rows(spec, hub)  # ModelScope, or the error read_rows gives
        return
    for f in sorted(p for p in spec.path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()):
        yield from _read_lazily(f)


def _read_lazily(path: Path) -> Iterator[RawRow]:
    if path.suffix in (".jsonl", ".csv", ".txt"):
        reader = {".jsonl": _read_jsonl, ".csv": _read_csv, ".txt": _read_txt}[path.suffix]
        try:
            yield from reader(path)
        except UnicodeDecodeError:
            read_file(path)  # raises the error that names the byte and line
            raise
    else:  # JSON arrays, parquet and arrow files are read whole, one file at a time
        yield from read_file(path)


def read_file(path: Path) -> list[RawRow]:
    reader = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet,
              ".txt": _read_txt, ".arrow": _read_arrow}.get(path.suffix)
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(DATA_SUFFIXES)}")
    try:
        return list(reader(path))
    except UnicodeDecodeError:
        raw = path.read_bytes()
        bad = _first_invalid_utf8(raw)
        line = raw[:bad].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (byte {raw[bad]:#04x} at line {line}). "
                        "hint: save it as UTF-8 (e.g. iconv -f gbk -t utf-8 in.jsonl > out.jsonl)") from None


def _first_invalid_utf8(raw: bytes) -> int:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return 0


def first_row(path: Path) -> dict[str, Any]:
    rows = read_file(path)
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return rows[0].data


def _read_json(path: Path) -> Iterator[RawRow]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Extra data"):  # JSON lines saved as .json: accepted, as datasets does
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path} line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict):
        # {"data": [...]} and column-oriented {"col": [...], ...} layouts
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists:
            data = lists[0]
        elif lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            data = [dict(zip(data, values)) for values in zip(*data.values())]
        else:
            raise DataError(f"{path}: expected a JSON array of row objects")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of row objects")
    for i, row in enumerate(data, 1):
        yield RawRow(str(path), i, row)


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with path.open(encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {i} column {exc.colno}: not valid JSON ({exc.msg}). "
                                "hint: JSON lines need one complete object per line") from None
            yield RawRow(str(path), i, row)


def _read_csv(path: Path) -> Iterator[RawRow]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        for i, row in enumerate(csv.DictReader(f), 1):
            yield RawRow(str(path), i, dict(row))


def _read_txt(path: Path) -> Iterator[RawRow]:
    with path.open(encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            yield RawRow(str(path), i, {"text": line.rstrip("\n")})


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
        yield RawRow(str(path), i, row)


def _read_arrow(path: Path) -> Iterator[RawRow]:
    from datasets import Dataset

    for i, row in enumerate(Dataset.from_file(str(path)), 1):
        yield RawRow(str(path), i, row)


def _read_hf_hub(spec: DatasetSpec, streaming: bool = False) -> list[RawRow] | Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.hf_hub_url, name=spec.subset, split=spec.split, data_dir=spec.folder,
                                   streaming=streaming)
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise DataError(
            f"data set {spec.name!r}: could not load {spec.hf_hub_url!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc)[:200]}). hint: check the network (HF_ENDPOINT for a mirror), "
            "or download the files and register them with file_name"
        ) from None
    rows = (RawRow(f"hf://{spec.hf_hub_url}", i, row) for i, row in enumerate(ds, 1))
    return rows if streaming else list(rows)


def _read_modelscope(spec: DatasetSpec) -> list[RawRow]:
    try:
        from modelscope import MsDataset
    except ImportError:
        raise DataError(f"data set {spec.name!r} comes from ModelScope ({spec.ms_hub_url}), which needs the "
                        "modelscope package. hint: pip install 'tuneforge[modelscope]'") from None
    try:
        ds = MsDataset.load(spec.ms_hub_url, subset_name=spec.subset, split=spec.split, data_dir=spec.folder)
        if hasattr(ds, "to_hf_dataset"):
            ds = ds.to_hf_dataset()
    except Exception as exc:
        raise DataError(f"data set {spec.name!r}: could not load {spec.ms_hub_url!r} from ModelScope "
                        f"({type(exc).__name__}: {str(exc)[:200]}). hint: check the network or use file_name") from None
    return [RawRow(f"modelscope://{spec.ms_hub_url}", i, row) for i, row in enumerate(ds, 1)]
