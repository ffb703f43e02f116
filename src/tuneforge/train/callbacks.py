"""Trainer callbacks: metrics.jsonl, loss.png, and a graceful stop on Ctrl-C that saves a checkpoint."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from tuneforge.errors import TrainingError
from tuneforge.ranks import is_main
from tuneforge.rundir import newest_complete_checkpoint
from tuneforge.train.distributed import any_rank


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
        if is_main():
            print("\ntuneforge: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a web UI worker): no signal handling there
                pass

    def sync(self) -> bool:
        """Whether to stop now; with several processes, every one stops after the same step when one was asked."""
        self.requested = any_rank(self.requested)
        return self.requested

    def on_step_end(self, args, state, control, **kwargs):
        if self.sync():
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class NonFiniteGuard(TrainerCallback):
    """Keeps NaN and inf out of a run. An optimizer step whose gradients are not finite is skipped (its gradients
    dropped); after `patience` such steps in a row, or as soon as a weight is not finite, the run stops without
    saving the broken state, and `failure` says at which step and why."""

    def __init__(self, patience: int):
        self.patience = patience
        self.skipped = 0  # consecutive optimizer steps skipped
        self.step = 0
        self.failure: str | None = None
        self._params: list = []

    def attach(self, params: list, optimizer) -> None:
        self._params = list(params)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        if hasattr(inner, "register_step_pre_hook"):  # not DeepSpeed's: its engine keeps the gradients itself
            inner.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer, args, kwargs) -> None:
        self.drop_non_finite_gradients()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.attach([p for p in model.parameters() if p.requires_grad], optimizer)
        self.step = state.global_step

    def drop_non_finite_gradients(self) -> bool:
        """Before an optimizer step: drop every gradient when one is NaN or inf (optimizers skip parameters
        without a gradient). Returns True when the step may go ahead."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads and all_finite(grads):
            self.skipped = 0
            return True
        for p in self._params:
            p.grad = None
        self.skipped += 1
        return False

    def check(self, step: int) -> str | None:
        """After an optimizer step: the reason to stop, if there is one."""
        self.step = step
        if self.skipped > self.patience:
            self.failure = (f"the loss or gradients were NaN or infinite for {self.skipped} optimizer steps in a row "
                            f"(up to step {step}; train.non_finite_patience={self.patience})")
        elif self._params and not all_finite(self._params):
            self.failure = f"the weights became NaN or infinite at step {step}"
        return self.failure

    def on_step_end(self, args, state, control, **kwargs):
        if self.check(state.global_step):
            control.should_save = False  # never a checkpoint of broken weights
            control.should_training_stop = True


def all_finite(tensors) -> bool:
    """True when no element of the tensors is NaN or infinite (a norm is finite exactly then)."""
    import torch

    norms = torch._foreach_norm([t.detach() for t in tensors])
    return bool(torch.isfinite(torch.stack(norms)).all())


def stop_if_diverged(guard: NonFiniteGuard, run, cfg) -> None:
    """A run stopped by NaN or inf is marked failed with its reason; its broken weights are not saved."""
    if not guard.failure:
        return
    run.update_meta(status="failed", finished=time.strftime("%Y-%m-%d %H:%M:%S"), error=guard.failure,
                    global_step=guard.step)
    newest, _ = newest_complete_checkpoint(run)
    last = f"the last good checkpoint is {newest}" if newest else "no checkpoint was written before"
    raise TrainingError(f"{run.path}: {guard.failure}; the run stopped and saved nothing from that step on; {last}. "
                        f"hint: lower train.learning_rate (now {cfg.train.learning_rate:g}), keep "
                        f"train.max_grad_norm on (now {cfg.train.max_grad_norm:g}), or check the data for extreme rows")
