"""Preference stages on SmolLM2-135M-Instruct through the real CLI, each with a learning signal to check.

A toy separable preference set (the preferred answer to every question is "Yes.") makes the signal clear
in a few CPU steps; the example configs run the same stages on LLaMA-Factory's demo data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_preference_data
from tests.e2e.test_embedded_models import needs_smollm2, tuneforge

pytestmark = [pytest.mark.e2e, pytest.mark.slow, needs_smollm2]
THINGS = ["an apple", "a banana", "a cherry", "a grape", "a lemon", "a mango", "an orange", "a pear", "a plum",
          "a peach", "a melon", "a kiwi", "a lime", "a fig", "a date", "an apricot"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    prompts = [f"Is {t} a fruit? Answer in one word." for t in THINGS]
    return write_preference_data(tmp_path_factory.mktemp("toy"), prompts, "Yes.", "No.", kto_prompts=prompts * 2)


def run_stage(example: str, toy: Path, run: Path, *overrides: str) -> list[dict]:
    tuneforge("train", f"examples/{example}.yaml", f"data.dataset_dir={toy}", "data.max_samples=null",
              "data.val_size=4", f"output.run_dir={run}", "train.logging_steps=1", *overrides)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reward_run(toy, tmp_path_factory) -> tuple[Path, list[dict]]:
    run = tmp_path_factory.mktemp("rm") / "rm"
    logs = run_stage("rm_smollm2", toy, run, "data.dataset=pairs", "train.max_steps=12", "train.batch_size=4",
                     "train.learning_rate=1e-3", "train.eval_steps=12")
    return run, logs


def test_reward_model_learns_the_toy_preference(reward_run):
    run, logs = reward_run
    accuracy = [r["eval_rewards/accuracy"] for r in logs if "eval_rewards/accuracy" in r]
    assert accuracy[-1] > 0.5  # chance is 0.5; four held-out pairs


def test_dpo_margin_grows(toy, tmp_path):
    logs = run_stage("dpo_smollm2", toy, tmp_path / "dpo", "data.dataset=pairs", "train.max_steps=10",
                     "train.batch_size=4", "train.learning_rate=5e-4")
    margins = [r["rewards/margin"] for r in logs if "rewards/margin" in r and "loss" in r]
    assert margins[-1] > margins[0]


def test_kto_margin_grows(toy, tmp_path):
    logs = run_stage("kto_smollm2", toy, tmp_path / "kto", "data.dataset=kto", "train.max_steps=10",
                     "train.batch_size=4", "train.learning_rate=5e-4")
    train = [r for r in logs if "loss" in r and "rewards/desirable" in r and "rewards/undesirable" in r]
    gap = lambda r: r["rewards/desirable"] - r["rewards/undesirable"]  # noqa: E731
    assert gap(train[-1]) > gap(train[0])


def test_ppo_mean_reward_rises(reward_run, toy, tmp_path):
    # Two-token answers: the reward model's verdict hinges on the first word ("Yes" or not), so the policy has
    # one clear thing to learn. With six tokens SmolLM2's samples ramble and the 12-step trend was within noise
    # (one clean-clone run: 0.99 in the first quarter, 0.97 in the last); with two it rose in every seed tried.
    rm, _ = reward_run
    run = tmp_path / "ppo"
    tuneforge("train", "examples/ppo_smollm2.yaml", f"data.dataset_dir={toy}", "data.dataset=pairs",
              "data.max_samples=null", f"method.reward_model={rm}", "method.max_new_tokens=2",
              "train.max_steps=12", "train.batch_size=8", "train.learning_rate=1e-3", f"output.run_dir={run}")
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "completed"
    assert meta["metrics"]["reward_last_quarter"] > meta["metrics"]["reward_first_quarter"]
