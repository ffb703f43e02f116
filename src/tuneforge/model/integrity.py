"""Weight files checked before they are trusted: a truncated download or a half-copied file is named as such,
before any training, instead of surfacing later as a traceback from deep inside a loader.

Only headers are read: a safetensors header and its tensors' byte ranges against the file's length; a GGUF
file's header and every tensor's extent against the file's length.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tuneforge.errors import ModelError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
HINT = "hint: download or copy it again (a partial download or a full disk leaves such files)"


def verify_safetensors(path: str | Path) -> None:
    path = Path(path)
    size = path.stat().st_size
    problem = _safetensors_problem(path, size)
    if problem:
        raise ModelError(f"{path}: {problem}. {HINT}")


def _safetensors_problem(path: Path, size: int) -> str | None:
    if size < 8:
        return f"not a safetensors file ({size} bytes)"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            return f"truncated or not a safetensors file (its header claims {header_len} bytes, the file has {size})"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, ValueError):
            return "corrupt safetensors header"
    if not isinstance(header, dict):
        return "corrupt safetensors header"
    data = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            count = 1
            for n in entry["shape"]:
                count *= n
            expected = count * DTYPE_BYTES.get(entry["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            return f"corrupt safetensors header (entry {name!r})"
        if end > data:
            return f"truncated: tensor {name!r} ends at byte {end} of the data, which has only {data}"
        if expected and end - begin != expected:
            return f"corrupt: tensor {name!r} should take {expected} bytes, its range holds {end - begin}"
    return None


def verify_weight_folder(folder: str | Path) -> None:
    """Every safetensors file of a model or adapter folder."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        verify_safetensors(path)


def verify_gguf(path: str | Path) -> None:
    import gguf

    path = Path(path)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader fails in many ways on a cut file: all mean the same to a user
        raise ModelError(f"{path}: truncated or not a GGUF file ({type(exc).__name__}: {str(exc)[:120]}). "
                         f"{HINT}") from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ModelError(f"{path}: truncated: tensor {tensor.name!r} ends at byte {end}, the file has {size}. "
                             f"{HINT}")
