"""A run directory holds everything needed to continue or use a run:

    runs/<name>/config.yaml   resolved config       run.json     status, base model, template, results
                adapter/      LoRA weights (or model/ for freeze and full), with the tokenizer
                metrics.jsonl loss.png               checkpoints/ checkpoint-<step>/ (newest K kept)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from tuneforge.config import TuneForgeConfig, dump_config, load_config
from tuneforge.errors import ConfigError

META = "run.json"


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
        meta = {**self.meta(), **fields}
        tmp = self.path / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        tmp.replace(self.path / META)

    def config(self) -> TuneForgeConfig:
        return load_config(self.path / "config.yaml")


def open_run(path: str | Path) -> RunDir:
    run = RunDir(Path(path))
    if not (run.path / META).is_file() or not (run.path / "config.yaml").is_file():
        raise ConfigError(f"{run.path}: not a TuneForge run directory (no run.json/config.yaml). "
                          "hint: train one first with `tuneforge train CONFIG`")
    return run


def prepare_run_dir(cfg: TuneForgeConfig) -> tuple[RunDir, str | None]:
    """Create or reuse the run directory; return it with the checkpoint to resume from (if any)."""
    run = RunDir(Path(cfg.output.run_dir))
    resume = cfg.train.resume_from_checkpoint
    checkpoint = None
    if resume == "auto":
        checkpoint = get_last_checkpoint(str(run.checkpoints)) if run.checkpoints.is_dir() else None
        if checkpoint is None:
            print(f"tuneforge: no checkpoint in {run.checkpoints}; starting from the beginning", flush=True)
    elif resume:
        if not Path(resume).is_dir():
            raise ConfigError(f"train.resume_from_checkpoint: {resume} is not a checkpoint folder. "
                              f"hint: use auto to take the newest one in {run.checkpoints}")
        checkpoint = resume
    if checkpoint is None and run.path.exists() and any(run.path.iterdir()):
        _clear_for_new_run(run, cfg)
    run.path.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        _trim_metrics(run, checkpoint)
    (run.path / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    run.update_meta(status="running", started=time.strftime("%Y-%m-%d %H:%M:%S"), resumed_from=checkpoint)
    return run, checkpoint


def _trim_metrics(run: RunDir, checkpoint: str) -> None:
    """Drop the records logged after the checkpoint a run resumes from: those steps run again and log again."""
    metrics = run.path / "metrics.jsonl"
    step = Path(checkpoint).name.rsplit("-", 1)[-1]
    if not metrics.is_file() or not step.isdigit():
        return
    kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= int(step)]
    tmp = metrics.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(metrics)


def _clear_for_new_run(run: RunDir, cfg: TuneForgeConfig) -> None:
    if not (run.path / META).is_file():
        raise ConfigError(f"output.run_dir: {run.path} exists and is not a TuneForge run directory; "
                          "choose an empty or new folder")
    if not cfg.output.overwrite:
        status = run.meta().get("status", "unknown")
        raise ConfigError(f"output.run_dir: {run.path} already holds a run (status: {status}). hint: set "
                          "output.overwrite=true to replace it, train.resume_from_checkpoint=auto to continue it, "
                          "or choose another output.run_dir")
    shutil.rmtree(run.path)
