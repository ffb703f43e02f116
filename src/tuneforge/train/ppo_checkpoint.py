"""PPO checkpoints: everything needed to continue a run exactly where it stopped.

checkpoint-<step>/ holds `trainable.safetensors` (the policy's trainable weights and the value head),
`optimizer.pt` and `scheduler.pt` (state dicts, read back with `weights_only=True`), `rng_state.pth` (torch's
random state; `rng_state_<rank>.pth`, one per process, when several processes train) and `ppo_state.json` (step, the remaining prompt order, the prompt sampler's state, the reward/KL
history). It is written under a temporary name and renamed into place when complete, so a kill during the
save never leaves a half-written checkpoint behind the newest name.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneforge.errors import ConfigError
from tuneforge.ranks import is_main
from tuneforge.rundir import mark_checkpoint_complete, ppo_rng_file
from tuneforge.train.distributed import barrier

WEIGHTS, STATE = "trainable.safetensors", "ppo_state.json"
VALUE_PREFIX = "value_head."


@dataclass
class PPOState:
    step: int = 0
    order: list[int] = field(default_factory=list)  # prompt indices still to visit in this pass
    rng: random.Random = field(default_factory=random.Random)  # shuffles the next pass
    history: list[dict] = field(default_factory=list)  # reward and kl of every step so far


def _trainable(model, value_head) -> dict[str, torch.Tensor]:
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    tensors.update({VALUE_PREFIX + n: p.detach().contiguous() for n, p in value_head.named_parameters()})
    return tensors


def save_ppo_checkpoint(folder: Path, state: PPOState, model, value_head, optimizer, scheduler, keep: int) -> Path:
    """Called by every process: each writes its random state, rank 0 everything else (the weights and optimizer
    state are the same in every process)."""
    target = Path(folder) / f"checkpoint-{state.step}"
    partial = target.with_name(target.name + ".tmp")
    if is_main():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, partial / ppo_rng_file())
    barrier()
    if not is_main():
        return target
    save_file(_trainable(model, value_head), str(partial / WEIGHTS))
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(scheduler.state_dict(), partial / "scheduler.pt")
    version, internal, gauss = state.rng.getstate()
    (partial / STATE).write_text(json.dumps({"step": state.step, "order": state.order, "history": state.history,
                                             "rng": [version, list(internal), gauss]}), encoding="utf-8")
    mark_checkpoint_complete(partial, state.step)  # last: the checkpoint is complete
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    _rotate(Path(folder), keep)
    return target


def _rotate(folder: Path, keep: int) -> None:
    done = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                  key=lambda p: int(p.name.split("-")[-1]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_ppo_checkpoint(folder: str | Path, model, value_head, optimizer, scheduler) -> PPOState:
    folder = Path(folder)
    missing = [name for name in (WEIGHTS, STATE, "optimizer.pt", "scheduler.pt", ppo_rng_file())
               if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"train.resume_from_checkpoint: {folder} is not a complete PPO checkpoint (missing "
                          f"{', '.join(missing)}). hint: point it at another checkpoint, or start afresh")
    tensors = load_file(str(folder / WEIGHTS))
    values = {k[len(VALUE_PREFIX):]: v for k, v in tensors.items() if k.startswith(VALUE_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(VALUE_PREFIX)}
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise ConfigError(f"train.resume_from_checkpoint: {folder} was written for other trainable weights than this "
                          "config trains (a changed adapter or method?). hint: resume with the config it was saved with")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            named[name].copy_(tensor)
    value_head.load_state_dict(values)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = torch.load(folder / ppo_rng_file(), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    saved = json.loads((folder / STATE).read_text(encoding="utf-8"))
    sampler = random.Random()
    version, internal, gauss = saved["rng"]
    sampler.setstate((version, tuple(internal), gauss))
    return PPOState(saved["step"], saved["order"], sampler, saved["history"])
