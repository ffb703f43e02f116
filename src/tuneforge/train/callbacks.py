"""Trainer callbacks: metrics.jsonl, loss.png, and a graceful stop on Ctrl-C that saves a checkpoint."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from transformers import TrainerCallback


class MetricsCallback(TrainerCallback):
    """Append every log event to metrics.jsonl and redraw loss.png (at most every `plot_every_s` seconds)."""

    def __init__(self, run_dir: Path, plot: bool = True, plot_every_s: float = 20.0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.plot_path = Path(run_dir) / "loss.png"
        self.plot, self.plot_every_s, self._last_plot = plot, plot_every_s, 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "time": round(time.time(), 2), **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.plot and time.monotonic() - self._last_plot > self.plot_every_s:
            plot_loss(self.path, self.plot_path)
            self._last_plot = time.monotonic()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.plot and self.path.is_file():
            plot_loss(self.path, self.plot_path)


def plot_loss(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train.append((rec["step"], rec["loss"]))
        if "eval_loss" in rec:
            evals.append((rec["step"], rec["eval_loss"]))
    if not train and not evals:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)


class GracefulStop(TrainerCallback):
    """First Ctrl-C (or SIGTERM): finish the current step, save a checkpoint, stop. Second Ctrl-C: abort."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\ntuneforge: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a web UI worker): no signal handling there
                pass

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
