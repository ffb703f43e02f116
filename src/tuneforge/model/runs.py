"""The trained weights of a run directory: its base model (found again where the cache lost it) plus adapter/,
or its full model/."""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import ModelError
from tuneforge.model.adapters import ADAPTED_BASE, load_adapted_base
from tuneforge.model.integrity import verify_weight_folder
from tuneforge.model.loader import fit_vocabulary, load_model, load_tokenizer, resolve_dtype, resolve_model


def run_base_model(run) -> str:
    """The base model folder a run was trained on; converted or downloaded again where the cache lost it."""
    base = run.meta().get("base_model")
    if base and Path(base).is_dir():
        return base
    return resolve_model(run.config().model).path


def run_stacked_adapters(cfg) -> list:
    """The adapters a run was trained on top of (merged into its base): all of model.adapters with new_adapter,
    else all but the last (the run's own adapter/ is that one, trained further)."""
    from tuneforge.model.stacking import adapter_folders

    folders = adapter_folders(cfg.model.adapters)
    return folders if getattr(cfg.method.adapter, "new_adapter", False) else folders[:-1]


def load_run_weights(run, reward: bool = False):
    """The trained model of a run directory and its tokenizer: base + adapter/ (not merged), or model/.
    `reward` loads the body with its one-output score head (runs of stage rm)."""
    cfg = run.config()
    weights = run.weights
    if not weights.is_dir():
        raise ModelError(f"{run.path}: no adapter/ or model/ folder; the run has not saved weights yet")
    verify_weight_folder(weights)
    from tuneforge.model.stacking import merge_adapters

    base = run_base_model(run)
    tokenizer = load_tokenizer(str(weights), cfg.model.trust_remote_code)
    dtype = resolve_dtype(cfg.model.dtype)
    if weights.name == "adapter":
        from peft import PeftModel

        model = load_model(base, dtype, cfg.model.trust_remote_code, reward=reward)
        fit_vocabulary(model, tokenizer, mean_init=False)  # model.new_special_tokens: the adapter holds their rows
        if (run.path / ADAPTED_BASE).is_file():  # LoftQ: the quantized weights the adapter was trained on
            load_adapted_base(model, run.path / ADAPTED_BASE)
        model = merge_adapters(model, run_stacked_adapters(cfg))
        return PeftModel.from_pretrained(model, str(weights)), tokenizer
    return load_model(str(weights), dtype, cfg.model.trust_remote_code, reward=reward), tokenizer
