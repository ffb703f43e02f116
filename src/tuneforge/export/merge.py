"""Merge a run's adapter into its base model and save a self-contained Hugging Face folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tuneforge.errors import ConfigError
from tuneforge.infer.engine import Engine
from tuneforge.rundir import open_run


def merged_model(run_dir: str | Path):
    """(model, tokenizer, engine) with LoRA/DoRA weights folded into the base weights."""
    engine = Engine.from_run(run_dir)
    model = engine.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model, engine.tokenizer, engine


SHARD_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]I?B|B)?$", re.IGNORECASE)


def check_out_folder(out: Path) -> None:
    """Exports go into a new or empty folder, checked before any weight is loaded."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a new folder (the export writes several files)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; choose a new folder so nothing is overwritten")


def save_hf(run_dir: str | Path, out_dir: str | Path, max_shard_size: str = "2GB") -> Path:
    """Safetensors shards, tokenizer with the trained chat template, generation config, model card."""
    if not SHARD_SIZE.match(str(max_shard_size).strip()):
        raise ConfigError(f"--max-shard-size {max_shard_size!r}: expected a size such as 2GB, 500MB or 4GiB")
    run = open_run(run_dir)
    out = Path(out_dir)
    check_out_folder(out)
    model, tokenizer, engine = merged_model(run.path)
    model.generation_config.eos_token_id = engine.stop_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(model_card(run), encoding="utf-8")
    return out


def save_merged(model: str, adapters: list[str], out_dir: str | Path, template: str = "auto",
                max_shard_size: str = "5GB", trust_remote_code: bool = False) -> Path:
    """A base model with saved adapters merged in (LLaMA-Factory's merge config), as a Hugging Face folder."""
    from tuneforge.config import ModelConfig

    if not SHARD_SIZE.match(str(max_shard_size).strip()):
        raise ConfigError(f"export size {max_shard_size!r}: expected a size such as 5GB")
    out = Path(out_dir)
    check_out_folder(out)
    engine = Engine.from_model(ModelConfig(name_or_path=model, adapters=adapters, template=template,
                                           trust_remote_code=trust_remote_code))
    engine.model.generation_config.eos_token_id = engine.stop_ids
    engine.model.generation_config.pad_token_id = engine.tokenizer.pad_token_id
    engine.model.save_pretrained(out, max_shard_size=max_shard_size)
    engine.tokenizer.save_pretrained(out)
    names = ", ".join(f"`{a}`" for a in adapters) or "none"
    (out / "README.md").write_text(f"# {out.name}\n\nMerged with TuneForge: base model `{model}`, adapters merged in "
                                   f"order: {names}; chat template: {template}.\n", encoding="utf-8")
    return out


def model_card(run) -> str:
    cfg, meta = run.config(), run.meta()
    adapter = cfg.method.adapter
    lines = [f"# {run.path.name}", "",
             "Fine-tuned with TuneForge; merged weights in safetensors, ready for transformers.", "",
             f"- base model: `{cfg.model.name_or_path}`",
             f"- stage: {cfg.method.stage}; method: {adapter.type}"
             + (f" (rank {adapter.rank}, alpha {adapter.alpha}, merged into the weights)" if adapter.type == "lora" else ""),
             f"- data: {', '.join(cfg.data.dataset)} (cutoff {cfg.data.cutoff_len} tokens)",
             f"- chat template: {meta.get('template')}; stop: {', '.join(meta.get('stop') or [])}"]
    if cfg.data.default_system:
        lines.append(f"- system prompt used in training: {cfg.data.default_system}")
    metrics = meta.get("metrics") or {}
    if metrics:
        lines.append(f"- training: {metrics.get('epoch', '?')} epochs, final train loss "
                     f"{metrics.get('train_loss', float('nan')):.4f}, {metrics.get('train_runtime', 0):.0f} s")
    evaluation = run.path / "eval.json"
    if evaluation.is_file():
        report = json.loads(evaluation.read_text(encoding="utf-8"))
        for dataset, by_model in report.get("datasets", {}).items():
            for name, m in by_model.items():
                if "accuracy" in m:
                    lines.append(f"- {dataset} ({name}): accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}")
    return "\n".join(lines) + "\n"
