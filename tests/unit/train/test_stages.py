"""The preference stages on a tiny random Llama: each runs from a config and learns what it should."""

import json
from pathlib import Path

import pytest

from tests.conftest import write_preference_data
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.train.prepare import build_reference, prepare
from tuneforge.train.run import train


def toy_preferences(folder: Path, n: int = 24) -> Path:
    """A separable preference set: the chosen answer is always 'yes indeed', the rejected one 'no never'."""
    return write_preference_data(folder, [f"Question number {i}: do you agree?" for i in range(n)],
                                 "yes indeed", "no never")


def stage_config(tiny_model_dir, tmp_path, stage: dict, dataset: str = "pairs", steps: int = 30, lr: float = 5e-3):
    return {"model": {"name_or_path": str(tiny_model_dir), "cache_dir": str(tmp_path / "cache")},
            "data": {"dataset": dataset, "dataset_dir": str(toy_preferences(tmp_path / "d")), "cutoff_len": 64,
                     "val_size": 4},
            "method": {"adapter": {"type": "lora", "rank": 4, "alpha": 8}, **stage},
            "train": {"max_steps": steps, "batch_size": 4, "learning_rate": lr, "logging_steps": 5, "save_steps": 1000,
                      "eval_steps": steps, "lr_scheduler": "constant"},
            "output": {"run_dir": str(tmp_path / stage["stage"])}}


def logged(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_reward_model_separates_a_toy_preference_and_scores_with_predict(tiny_model_dir, tmp_path, capsys):
    result = train(stage_config(tiny_model_dir, tmp_path, {"stage": "rm"}))
    assert result.metrics["eval_rewards/accuracy"] == 1.0  # chance is 0.5
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["predict", str(result.run_dir), "--data", "pairs", "--dataset-dir", str(tmp_path / "d")]) == 0
    metrics = json.loads((result.run_dir / "predict" / "pairs" / "metrics.json").read_text())
    assert metrics["pairwise_accuracy"] == 1.0 and metrics["mean_margin"] > 0
    assert main(["chat", str(result.run_dir), "--prompt", "hi"]) == 2
    assert "is a reward model" in capsys.readouterr().err


def test_dpo_margin_grows(tiny_model_dir, tmp_path):
    result = train(stage_config(tiny_model_dir, tmp_path, {"stage": "dpo", "beta": 0.5}))
    margins = logged(result.run_dir, "rewards/margin")
    assert margins[-1] > margins[0] + 0.5 and result.metrics["eval_rewards/accuracy"] == 1.0


@pytest.mark.parametrize("variant", [{"pref_loss": "ipo"}, {"pref_loss": "hinge"}, {"pref_loss": "orpo"},
                                     {"pref_loss": "simpo", "simpo_gamma": 0.2}, {"pref_ftx": 0.5},
                                     {"label_smoothing": 0.1}])
def test_every_dpo_variant_trains(tiny_model_dir, tmp_path, variant):
    result = train(stage_config(tiny_model_dir, tmp_path, {"stage": "dpo", **variant}, steps=6))
    margins = logged(result.run_dir, "rewards/margin")
    assert result.status == "completed" and margins[-1] > margins[0]


def test_full_tuning_keeps_a_frozen_reference_and_lora_does_not(tiny_model_dir, tmp_path):
    lora = load_config(stage_config(tiny_model_dir, tmp_path, {"stage": "dpo"}))
    full = load_config(stage_config(tiny_model_dir, tmp_path, {"stage": "dpo", "adapter": {"type": "full"}}))
    orpo = load_config(stage_config(tiny_model_dir, tmp_path, {"stage": "dpo", "adapter": {"type": "full"},
                                                               "pref_loss": "orpo"}))
    source = prepare(lora).source
    assert build_reference(lora, source) is None and build_reference(orpo, source) is None
    ref = build_reference(full, source)
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    result = train(stage_config(tiny_model_dir, tmp_path, {"stage": "dpo", "adapter": {"type": "full"}}, steps=10,
                                lr=1e-3))
    margins = logged(result.run_dir, "rewards/margin")
    assert margins[-1] > margins[0]


def test_kto_separates_desirable_from_undesirable(tiny_model_dir, tmp_path):
    result = train(stage_config(tiny_model_dir, tmp_path, {"stage": "kto", "beta": 0.5}, dataset="kto"))
    desirable, undesirable = logged(result.run_dir, "rewards/desirable"), logged(result.run_dir, "rewards/undesirable")
    assert desirable[-1] - undesirable[-1] > desirable[0] - undesirable[0] + 0.5


def test_ppo_raises_the_reward_of_a_toy_reward_model(tiny_model_dir, tmp_path):
    rm = train(stage_config(tiny_model_dir, tmp_path / "rm", {"stage": "rm"})).run_dir
    config = stage_config(tiny_model_dir, tmp_path, {"stage": "ppo", "reward_model": str(rm), "max_new_tokens": 4,
                                                     "kl_coef": 0.01, "ppo_epochs": 2}, steps=25, lr=2e-2)
    config["data"].update(dataset="pairs", val_size=0)
    result = train(config)
    assert result.status == "completed" and (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert result.metrics["reward_last_quarter"] > result.metrics["reward_first_quarter"]
    assert {"reward", "kl", "policy_loss", "value_loss"} <= set(json.loads(
        (result.run_dir / "metrics.jsonl").read_text().splitlines()[-1]))
