"""`tuneforge export RUN_DIR --out DIR [--format hf|gguf]`."""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import ConfigError
from tuneforge.export.gguf_writer import TYPES, write_gguf
from tuneforge.export.merge import check_out_folder, merged_model, model_card, save_hf
from tuneforge.export.ollama import write_modelfile
from tuneforge.model.runs import run_base_model
from tuneforge.model.loader import CONVERTED_MARKER
from tuneforge.rundir import open_run


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str = "hf", gguf_type: str = "q8_0",
               max_shard_size: str = "2GB") -> Path:
    if fmt == "hf":
        return save_hf(run_dir, out_dir, max_shard_size)
    if fmt != "gguf":
        raise ConfigError(f"--format {fmt!r}: expected hf or gguf")
    if gguf_type not in TYPES:  # before the merge, which takes a while
        raise ConfigError(f"--gguf-type {gguf_type!r}: expected one of {', '.join(TYPES)}")
    run = open_run(run_dir)
    out = Path(out_dir)
    check_out_folder(out)
    model, tokenizer, engine = merged_model(run.path)
    name = f"{run.path.name}-{gguf_type}.gguf"
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_gguf(model, tokenizer, out / name, gguf_type, name=run.path.name, pre_tokenizer=_source_pre(run))
    except BaseException:  # nothing half-written is left behind
        (out / name).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    write_modelfile(out, name, tokenizer, engine.stop, engine.default_system)
    (out / "README.md").write_text(model_card(run), encoding="utf-8")
    return out / name


def _source_pre(run) -> str | None:
    """The pre-tokenizer name of the GGUF the base model came from, so the round trip keeps its split rules."""
    import json

    import gguf

    marker = Path(run_base_model(run)) / CONVERTED_MARKER
    if not marker.is_file():
        return None
    source = Path(json.loads(marker.read_text())["gguf"])
    if not source.is_file():
        return None
    field = gguf.GGUFReader(source).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[field.data[0]]).decode() if field else None
