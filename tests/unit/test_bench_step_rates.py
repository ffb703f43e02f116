"""bench/step_rates.py: the matmul rate read between a Trainer's steps, and the step-weighted rate the bench divides
by (the bench itself is not a test; this checks its bookkeeping)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.conftest import REPO


@pytest.fixture(scope="module")
def step_rates():
    spec = importlib.util.spec_from_file_location("step_rates", REPO / "bench" / "step_rates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_step_is_weighted_by_its_time_and_the_readings_around_it(step_rates):
    record = {"readings": [(0, 100.0, 1.0), (2, 60.0, 1.0), (3, 80.0, 1.0)], "steps": [1.0, 3.0, 4.0]}
    # steps 0 and 1 lie between the readings at 0 and 2 (mean 80), step 2 between those at 2 and 3 (mean 70)
    assert step_rates.weighted_rate(record) == pytest.approx((1 * 80 + 3 * 80 + 4 * 70) / 8)
    assert step_rates.weighted_rate({"readings": [(0, 90.0, 1.0), (0, 110.0, 1.0)], "steps": []}) == 110.0


def test_a_trainer_run_records_every_step_and_the_reading_time_inside_its_runtime(step_rates, tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}

    rows = [{"x": torch.randn(4), "labels": torch.tensor(1.0)} for _ in range(12)]
    out = tmp_path / "rates.json"
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, num_train_epochs=1,
                             save_strategy="no", report_to="none", use_cpu=True, logging_steps=100)
    # every=0: a reading before each step; small products keep the test fast
    callback = step_rates.step_rate_callback(out, every=0.0, repeats=1)
    full_size = step_rates.matmul_peak_gflops
    monkeypatch.setattr(step_rates, "matmul_peak_gflops", lambda repeats=1: full_size(n=64, repeats=repeats))
    result = Trainer(model=Tiny(), args=args, train_dataset=rows, callbacks=[callback]).train()
    record = json.loads(out.read_text())
    assert len(record["steps"]) == result.global_step == 6
    # one reading as training begins, one before every step, one at the end (outside the runtime)
    assert [r[0] for r in record["readings"]] == [0, 0, 1, 2, 3, 4, 5, 6]
    assert all(r[1] > 0 for r in record["readings"])
    assert record["reading_seconds"] == pytest.approx(sum(r[2] for r in record["readings"][:-1]))
    assert record["reading_seconds"] < result.metrics["train_runtime"]
