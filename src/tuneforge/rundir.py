"""A run directory holds everything needed to continue or use a run:

    runs/<name>/config.yaml   resolved config       run.json     status, base model, template, results
                adapter/      LoRA weights (or model/ for freeze and full), with the tokenizer
                metrics.jsonl loss.png               checkpoints/ checkpoint-<step>/ (newest K kept)

Nothing finished is lost: a new run goes into the folder in two steps. `plan_run` checks, changing nothing,
that the folder may be used (no foreign files, no live run, a complete checkpoint to resume from); the caller then
validates the model and trainer, and only `start_run` touches the folder. Overwriting moves the old run aside as
`<name>.prev`, which is deleted once the new run completes (`finish_run`) and kept if it does not.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.config import TuneForgeConfig, dump_config, load_config
from tuneforge.errors import ConfigError
from tuneforge.ranks import is_main, world_size

META = "run.json"
CHECKPOINT_DONE = "tuneforge_checkpoint.json"  # written last into a checkpoint: it is complete
# Everything TuneForge writes into a run directory; anything else there is the user's and is never deleted.
OWN_ENTRIES = {META, META + ".tmp", "config.yaml", "adapter", "model", "metrics.jsonl", "metrics.jsonl.tmp",
               "loss.png", "loss.tmp.png", "checkpoints", "adapter_init", "adapted_base.safetensors", "eval.json",
               "eval", "predict", "stacked_adapters"}


@dataclass
class RunDir:
    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def weights(self) -> Path:
        """adapter/ for LoRA runs, model/ for freeze and full runs."""
        return self.path / ("adapter" if (self.path / "adapter").is_dir() else "model")

    def meta(self) -> dict:
        f = self.path / META
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

    def update_meta(self, **fields) -> None:
        if not is_main():  # several training processes: rank 0 keeps run.json
            return
        meta = {**self.meta(), **fields}
        tmp = self.path / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        tmp.replace(self.path / META)

    def config(self) -> TuneForgeConfig:
        return load_config(self.path / "config.yaml")

    def status(self) -> str:
        """The recorded status, except that a run recorded as running whose process is gone is `crashed`."""
        meta = self.meta()
        status = meta.get("status", "unknown")
        if status == "running" and meta.get("host") == socket.gethostname() and not process_alive(meta.get("pid")):
            return "crashed"
        return status


def process_alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def open_run(path: str | Path) -> RunDir:
    run = RunDir(Path(path))
    if not (run.path / META).is_file() or not (run.path / "config.yaml").is_file():
        raise ConfigError(f"{run.path}: not a TuneForge run directory (no run.json/config.yaml). "
                          "hint: train one first with `tuneforge train CONFIG`")
    return run


def mark_checkpoint_complete(folder: Path, step: int) -> None:
    (Path(folder) / CHECKPOINT_DONE).write_text(json.dumps({"step": step, "time": time.time()}), encoding="utf-8")


def _step(folder: Path) -> int | None:
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if folder.name.startswith("checkpoint-") and tail.isdigit() else None


def ppo_rng_file() -> str:
    """The file with this process's random state in a PPO checkpoint (one per process when several train)."""
    return f"rng_state_{os.environ.get('RANK', '0')}.pth" if world_size() > 1 else "rng_state.pth"


def checkpoint_problems(folder: Path) -> list[str]:
    """What a checkpoint lacks to be resumed from exactly (empty when it is complete)."""
    folder = Path(folder)
    if not folder.is_dir():
        return ["it is not a folder"]
    names = {p.name for p in folder.iterdir()}
    if "ppo_state.json" in names or "trainable.safetensors" in names:  # a PPO checkpoint
        needed = ["trainable.safetensors", "ppo_state.json", "optimizer.pt", "scheduler.pt", ppo_rng_file()]
        states = sorted(n for n in names if n.startswith("rng_state"))
        if ppo_rng_file() not in names and states:
            return [f"it was written by {len(states) if states != ['rng_state.pth'] else 1} training process(es), "
                    f"this run has {world_size()}; resume with the same distributed.nproc_per_node"]
    else:
        weights = {"adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json"}
        needed = ["trainer_state.json", "optimizer.pt", "scheduler.pt"]
        if not names & weights:
            needed.append("the weights (adapter_model.safetensors or model.safetensors)")
    problems = [f"no {n}" for n in needed if n not in names]
    if CHECKPOINT_DONE not in names:
        problems.append("no completion marker (its save was cut short)")
    return problems


def newest_complete_checkpoint(run: RunDir, allow_missing_optimizer: bool = False) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that can be resumed from, and a note for each newer one that was skipped."""
    found = sorted((p for p in run.checkpoints.glob("checkpoint-*") if _step(p) is not None), key=_step, reverse=True)
    skipped = []
    for folder in found:
        problems = [p for p in checkpoint_problems(folder)
                    if not (allow_missing_optimizer and p in ("no optimizer.pt", "no scheduler.pt"))]
        if not problems:
            return folder, skipped
        skipped.append(f"{folder.name} ({', '.join(problems)})")
    return None, skipped


@dataclass
class RunPlan:
    run: RunDir
    checkpoint: str | None = None  # the checkpoint to resume from
    replaces: bool = False  # an existing run is moved aside to <name>.prev when the new one starts
    notes: list[str] = field(default_factory=list)

    @property
    def previous(self) -> Path:
        return self.run.path.with_name(self.run.path.name + ".prev")


def plan_run(cfg: TuneForgeConfig) -> RunPlan:
    """Decide how output.run_dir is used, without changing anything; every refusal says what to do instead."""
    t, run = cfg.train, RunDir(Path(cfg.output.run_dir))
    plan = RunPlan(run)
    if run.path.exists() and not run.path.is_dir():
        raise ConfigError(f"output.run_dir: {run.path} is a file, not a folder; choose a folder")
    occupied = run.path.is_dir() and any(run.path.iterdir())
    if occupied and not (run.path / META).is_file():
        raise ConfigError(f"output.run_dir: {run.path} exists and is not a TuneForge run directory; "
                          "choose an empty or new folder")
    status = run.status() if occupied else None
    if status == "running":
        meta = run.meta()
        raise ConfigError(f"output.run_dir: {run.path} is in use by a training process that is still running "
                          f"(pid {meta.get('pid')} on {meta.get('host')}); wait for it, stop it, or choose another "
                          "output.run_dir")
    if t.resume_from_checkpoint == "auto" and not occupied:
        plan.notes.append(f"nothing to resume in {run.path} yet; starting from the beginning")
    elif t.resume_from_checkpoint:
        plan.checkpoint = _resume_point(plan, t.resume_from_checkpoint, t.resume_without_optimizer_state)
        return plan
    if occupied:
        if not cfg.output.overwrite:
            raise ConfigError(_occupied_message(run, status, t.resume_without_optimizer_state))
        foreign = sorted(p.name for p in run.path.iterdir() if p.name not in OWN_ENTRIES)
        if foreign:
            raise ConfigError(f"output.run_dir: {run.path} also holds files TuneForge did not write "
                              f"({', '.join(foreign[:8])}); overwriting would delete them. hint: move them "
                              "elsewhere, or choose another output.run_dir")
        if plan.previous.exists():
            raise ConfigError(f"output.run_dir: {plan.previous} holds the run an earlier overwrite replaced, and that "
                              f"overwrite did not complete. hint: rename or delete {plan.previous} (after copying "
                              "what you need from it), then train again")
        plan.replaces = True
    return plan


def _resume_point(plan: RunPlan, resume: str, allow_missing_optimizer: bool) -> str:
    if resume == "auto":
        checkpoint, skipped = newest_complete_checkpoint(plan.run, allow_missing_optimizer)
        if skipped:
            plan.notes.append(f"skipped incomplete checkpoints: {'; '.join(skipped)}")
        if checkpoint is None:
            raise ConfigError(f"train.resume_from_checkpoint=auto: {plan.run.checkpoints} has no complete checkpoint"
                              + (f" (skipped {'; '.join(skipped)})" if skipped else "")
                              + ". hint: start again with output.overwrite=true (and without resume_from_checkpoint)")
        return str(checkpoint)
    problems = [p for p in checkpoint_problems(Path(resume))
                if not (allow_missing_optimizer and p in ("no optimizer.pt", "no scheduler.pt"))]
    if problems:
        optimizer_only = set(problems) <= {"no optimizer.pt", "no scheduler.pt"}
        hint = ("set train.resume_without_optimizer_state=true to continue with a fresh optimizer" if optimizer_only
                else f"use auto to take the newest complete checkpoint in {plan.run.checkpoints}")
        raise ConfigError(f"train.resume_from_checkpoint: {resume} cannot be resumed from exactly "
                          f"({', '.join(problems)}). hint: {hint}")
    return resume


def _occupied_message(run: RunDir, status: str, allow_missing_optimizer: bool) -> str:
    checkpoint, _ = newest_complete_checkpoint(run, allow_missing_optimizer)
    step = run.meta().get("global_step")
    where = f" at step {step}" if step and status != "completed" else ""
    resume = (f"continue it from {checkpoint.name} with train.resume_from_checkpoint=auto, " if checkpoint
              and status != "completed" else "")
    return (f"output.run_dir: {run.path} already holds a run (status: {status}{where}). hint: {resume}start again "
            "with output.overwrite=true (the old run is kept as .prev until the new one completes), or choose "
            "another output.run_dir")


def start_run(plan: RunPlan, cfg: TuneForgeConfig) -> RunDir:
    """Make the folder the new run's: move a replaced run aside, write config.yaml and run.json (with this
    process's id and host, so that a crash shows), trim metrics logged after the resumed checkpoint."""
    run = plan.run
    if not is_main():  # several training processes: rank 0 prepares the folder (the others wait for it)
        return run
    if plan.replaces:
        run.path.rename(plan.previous)
        print(f"tuneforge: the previous run is kept in {plan.previous} until this one completes", flush=True)
    run.path.mkdir(parents=True, exist_ok=True)
    if plan.checkpoint is not None:
        _trim_metrics(run, plan.checkpoint)
    (run.path / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    run.update_meta(status="running", started=time.strftime("%Y-%m-%d %H:%M:%S"), resumed_from=plan.checkpoint,
                    pid=os.getpid(), host=socket.gethostname())
    return run


def finish_run(plan: RunPlan) -> None:
    """The run completed: the one it replaced (now, or in an overwrite it resumed) can go."""
    if is_main() and (plan.previous / META).is_file():
        shutil.rmtree(plan.previous)


def prepare_run_dir(cfg: TuneForgeConfig) -> tuple[RunDir, str | None]:
    """Plan and start in one go (for callers with nothing to validate in between)."""
    plan = plan_run(cfg)
    for note in plan.notes:
        print(f"tuneforge: {note}", flush=True)
    return start_run(plan, cfg), plan.checkpoint


def _trim_metrics(run: RunDir, checkpoint: str) -> None:
    """Drop the records logged after the checkpoint a run resumes from: those steps run again and log again."""
    metrics = run.path / "metrics.jsonl"
    step = _step(Path(checkpoint))
    if not metrics.is_file() or step is None:
        return
    kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = metrics.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(metrics)
