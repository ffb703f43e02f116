"""Saved LoRA adapters on top of a base model (model.adapters, LLaMA-Factory's adapter_name_or_path): merged into
the base in order, the last one optionally kept as the adapter that trains further (SFT, then DPO on one adapter)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.rundir import META

ADAPTER_CONFIG = "adapter_config.json"


def adapter_folders(adapters: list[str], base: str | None = None) -> list[Path]:
    """The adapter folder of each entry: a run directory's adapter/, or a folder holding adapter_config.json.
    `base`: the configured base model, compared with what each run was trained on (a mismatch is an error)."""
    folders = []
    for i, entry in enumerate(adapters):
        path = Path(entry).expanduser()
        if (path / META).is_file():
            folder = path / "adapter"
            if not (folder / ADAPTER_CONFIG).is_file():
                raise ConfigError(f"model.adapters[{i}]: {entry} is a run without a LoRA adapter (it trained "
                                  f"{'all weights' if (path / 'model').is_dir() else 'nothing yet'}); give it as "
                                  "model.name_or_path instead" if (path / "model").is_dir() else
                                  f"model.adapters[{i}]: {entry} has no saved adapter yet")
            _same_base(path, base, i)
        elif (path / ADAPTER_CONFIG).is_file():
            folder = path
        else:
            raise ConfigError(f"model.adapters[{i}]: {entry} is neither a run directory nor an adapter folder "
                              f"(no {META} or {ADAPTER_CONFIG})")
        folders.append(folder)
    return folders


def _same_base(run: Path, base: str | None, index: int) -> None:
    if base is None:
        return
    import yaml

    trained_on = (yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}).get("model", {})
    theirs = trained_on.get("name_or_path")
    if theirs and _name(theirs) != _name(base):
        raise ConfigError(f"model.adapters[{index}]: {run} was trained on {theirs}, not on model.name_or_path "
                          f"{base}; an adapter only fits the base it was trained on")
    if trained_on.get("adapters"):
        raise ConfigError(f"model.adapters[{index}]: {run} itself stacks adapters ({trained_on['adapters']}); "
                          "list those before it in model.adapters")


def _name(value: str) -> str:
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def merge_adapters(model: nn.Module, folders: list[Path]) -> nn.Module:
    """The base with each adapter merged into its weights, in order."""
    from peft import PeftModel

    for folder in folders:
        if model.device.type == "meta":  # shapes only (parameter counts): merging changes no shape
            continue
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return model


def continue_adapter(model: nn.Module, folder: Path) -> nn.Module:
    """The model wrapped with a saved adapter whose weights train further (its rank and targets are its own)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if model.device.type == "meta":
        return get_peft_model(model, LoraConfig.from_pretrained(str(folder)))
    return PeftModel.from_pretrained(model, str(folder), is_trainable=True)


def adapter_rank(folder: Path) -> int:
    return int(json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("r", 0))
