"""Faults a long run meets, injected on purpose: SIGKILL at random moments (one of them in the middle of a
checkpoint save), a full disk while saving, running out of memory. Each ends with nothing finished lost and,
after `train.resume_from_checkpoint=auto`, with the loss trajectory of an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_preference_data
from tuneforge.errors import TrainingError
from tuneforge.train.run import train

pytestmark = pytest.mark.slow
STEPS = 12
TOLERANCE = 1e-5  # losses after a resume against the uninterrupted run (measured: equal to the printed digits)


def config(tiny_model_dir: Path, root: Path, stage: str) -> dict:
    cfg = {"model": {"name_or_path": str(tiny_model_dir), "cache_dir": str(root / "cache")},
           "data": {"dataset": "identity", "dataset_dir": str(REPO / "data"), "cutoff_len": 96, "max_samples": 32,
                    "placeholders": {"name": "Tiny", "author": "Tests"}},
           "method": {"stage": "sft", "adapter": {"type": "lora", "rank": 4, "alpha": 8, "dropout": 0.1}},
           "train": {"max_steps": STEPS, "batch_size": 4, "learning_rate": 2e-3, "logging_steps": 1, "save_steps": 2,
                     "save_total_limit": 20, "group_by_length": False},
           "output": {"run_dir": str(root / "run")}}
    if stage == "dpo":
        folder = write_preference_data(root / "prefs", [f"Question {i}?" for i in range(32)], "yes indeed", "no never")
        cfg["data"].update(dataset="pairs", dataset_dir=str(folder), cutoff_len=64)
        cfg["method"] = {"stage": "dpo", "beta": 0.5, "adapter": cfg["method"]["adapter"]}
    return cfg


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# The child process: tuneforge's own CLI, each optimizer step made 0.2 s slower so that a kill at a random
# moment lands mid-training; with TUNEFORGE_TEST_SLOW_SAVE the completion marker is written two seconds late, so
# that a kill lands inside a checkpoint save for certain (a stand-in for a slow disk).
CHILD = textwrap.dedent("""
    import os, sys, time
    import tuneforge.train.trainer as trainer
    step = trainer.TuneForgeTrainer.training_step
    def slow_step(self, *args, **kwargs):
        time.sleep(0.2)
        return step(self, *args, **kwargs)
    trainer.TuneForgeTrainer.training_step = slow_step
    if os.environ.get("TUNEFORGE_TEST_SLOW_SAVE"):
        import tuneforge.rundir as rundir
        original = rundir.mark_checkpoint_complete
        def slow(folder, step):
            time.sleep(2)
            original(folder, step)
        trainer.mark_checkpoint_complete = slow
    from tuneforge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def start_child(config_path: Path, slow_save: bool = False) -> subprocess.Popen:
    env = {**os.environ, **({"TUNEFORGE_TEST_SLOW_SAVE": "1"} if slow_save else {})}
    return subprocess.Popen([sys.executable, "-c", CHILD, "train", str(config_path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(condition, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def kill_and_resume(cfg: dict, root: Path, rng: random.Random, during_save: bool) -> tuple[int, Path]:
    """Kill a training process with SIGKILL, then resume in-process; returns the step resumed from."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    child = start_child(path, slow_save=during_save)
    checkpoints = Path(cfg["output"]["run_dir"]) / "checkpoints"
    try:
        if during_save:
            target = rng.choice([4, 6, 8])
            wait_for(lambda: (checkpoints / ".partial" / f"checkpoint-{target}").is_dir())
        else:
            first = rng.choice([2, 4, 6])
            wait_for(lambda: (checkpoints / f"checkpoint-{first}").is_dir())
            time.sleep(rng.uniform(0, 1.2))  # 0 to 6 more steps
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = train(path, ["train.resume_from_checkpoint=auto"])
    assert resumed.status == "completed"
    return int(Path(json.loads((resumed.run_dir / "run.json").read_text())["resumed_from"]).name.split("-")[1]), \
        resumed.run_dir


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sigkill_at_random_moments_then_resume_reproduces_the_uninterrupted_losses(tiny_model_dir, tmp_path, stage):
    reference = losses(train(config(tiny_model_dir, tmp_path / "whole", stage)).run_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))
    trials = [(seed, False) for seed in (0, 1)] + [(2, True)]  # two kills at random times, one inside a save
    report = []
    for seed, during_save in trials:
        root = tmp_path / f"kill-{seed}"
        step, run_dir = kill_and_resume(config(tiny_model_dir, root, stage), root, random.Random(seed), during_save)
        if during_save:
            assert not (run_dir / "checkpoints" / ".partial").exists()
        again = losses(run_dir)
        assert sorted(again) == list(range(1, STEPS + 1))  # every step logged once
        assert step < STEPS, "killed after the last checkpoint: nothing was left to resume"
        worst = max(abs(again[s] - reference[s]) for s in range(step + 1, STEPS + 1))
        report.append((seed, during_save, step, worst))
        assert worst <= TOLERANCE, report
    print(f"\n{stage}: (seed, killed during a save, resumed from step, max |loss difference| after it): {report}")


def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_one_and_says_so(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    import torch

    import tuneforge.train.trainer as trainer_module

    cfg = config(tiny_model_dir, tmp_path, "sft")
    cfg["train"]["max_steps"] = 6
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(TrainingError, match=r"the disk filled up while saving checkpoint-4 .* the earlier checkpoints "
                                            r"are intact \(newest: .*checkpoint-2\). hint: free some space"):
        train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]  # no partial save left behind
    assert (checkpoints / "checkpoint-2" / "tuneforge_checkpoint.json").is_file()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
    assert train(cfg, ["train.resume_from_checkpoint=auto"]).status == "completed"
    assert trainer_module.TuneForgeTrainer  # the trainer module stayed importable with the patch undone


def test_running_out_of_memory_names_the_switches_that_help(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    import tuneforge.train.trainer as trainer_module

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer_module.TuneForgeTrainer, "compute_loss", no_memory)
    with pytest.raises(TrainingError, match=r"ran out of memory at step 1 \(OutOfMemoryError\). hint: lower "
                                            r"train.batch_size \(now 4; .* lower data.cutoff_len \(now 96\), set "
                                            r"train.gradient_checkpointing=true, or use LoRA .*tuneforge check CONFIG"):
        train(config(tiny_model_dir, tmp_path, "sft"))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_a_full_disk_while_saving_the_final_weights_is_explained_and_resume_saves_them(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    import tuneforge.train.run as run_module

    cfg = config(tiny_model_dir, tmp_path, "sft")
    cfg["train"]["max_steps"] = 4
    real = run_module.save_weights

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_module, "save_weights", full_disk)
    with pytest.raises(TrainingError, match=r"the disk filled up while saving the trained weights .* the checkpoints "
                                            r"are intact \(newest: .*checkpoint-4\)"):
        train(cfg)
    monkeypatch.setattr(run_module, "save_weights", real)
    resumed = train(cfg, ["train.resume_from_checkpoint=auto"])
    assert resumed.status == "completed" and (resumed.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((resumed.run_dir / "run.json").read_text())["global_step"] == 4
