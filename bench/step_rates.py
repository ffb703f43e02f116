"""Run a training command with the machine's float32 matmul rate read between its steps (used by train_speed.py).

    python bench/step_rates.py OUT.json MODULE [ARGS...]

runs `python -m MODULE ARGS...` in this process (`tuneforge train CONFIG`, `llamafactory.cli train CONFIG`) with
a callback added to every transformers Trainer it builds: at the first step boundary after each EVERY seconds of
training (environment variable STEP_RATES_EVERY, default 10) it times a few n x n float32 products, and at the end
it writes to OUT.json the readings (step, GFLOP/s, seconds the reading took), the duration of every step and the
seconds spent reading within the trainer's runtime (all but the last reading). The bench subtracts those seconds
from the trainer's runtime and weights the readings by the steps around them: on a shared machine whose speed
drifts by a fifth within a minute, a rate read minutes before or after a run says less about the machine the run
had than one read between its steps. Standard library, torch and transformers only, so that LLaMA-Factory's
virtual environment runs it too.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, median: bool = False) -> float:
    """The fastest of `repeats` float32 n x n products (the peak), or their median (the rate the machine sustains
    now: one fast reading can be a moment's burst)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * n ** 3 / (times[len(times) // 2] if median else times[0]) / 1e9


def step_rate_callback(out: Path, every: float, repeats: int = 5):
    from transformers import TrainerCallback

    class StepRates(TrainerCallback):
        def __init__(self):
            self.readings, self.steps, self.reading_seconds = [], [], 0.0
            self.last = self.begin = 0.0

        def read(self, step: int) -> None:
            start = time.perf_counter()
            rate = matmul_peak_gflops(repeats=repeats)
            spent = time.perf_counter() - start
            self.readings.append((step, rate, spent))
            self.reading_seconds += spent
            self.last = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.read(state.global_step)

        def on_step_begin(self, args, state, control, **kwargs):
            if time.perf_counter() - self.last >= every:
                self.read(state.global_step)
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self.begin)

        def on_train_end(self, args, state, control, **kwargs):
            within = self.reading_seconds  # the trainer's runtime ends before this callback
            self.read(state.global_step)
            out.write_text(json.dumps({"readings": self.readings, "steps": self.steps,
                                       "reading_seconds": within}))

    return StepRates()


def weighted_rate(record: dict) -> float:
    """The matmul rate the run had: each step's share of the training time times the mean of the readings just
    before and just after it."""
    readings, steps = record["readings"], record["steps"]
    if not steps:
        return max(r[1] for r in readings)
    total = weighted = 0.0
    for index, seconds in enumerate(steps):
        before = [r for r in readings if r[0] <= index][-1]
        after = next((r for r in readings if r[0] > index), readings[-1])
        weighted += seconds * (before[1] + after[1]) / 2
        total += seconds
    return weighted / total


def main() -> None:
    out, module, *argv = sys.argv[1:]
    from transformers import trainer_callback

    every = float(os.environ.get("STEP_RATES_EVERY", "10"))
    original = trainer_callback.CallbackHandler.__init__

    def with_rates(self, callbacks, *args, **kwargs):
        original(self, list(callbacks) + [step_rate_callback(Path(out), every)], *args, **kwargs)

    trainer_callback.CallbackHandler.__init__ = with_rates
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
