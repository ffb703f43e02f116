"""The preference stages on a tiny random Llama: each runs from a config and learns what it should."""

import json
from pathlib import Path

import pytest
import torch

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


def row_average_logprobs(model, ids_column, labels_column) -> torch.Tensor:
    """Each row's mean log-probability of its supervised tokens: minus the model's own loss on that row alone."""
    with torch.no_grad():
        as_row = lambda values: torch.tensor([[int(v) for v in values]])  # noqa: E731
        return torch.tensor([-model(input_ids=as_row(i), labels=as_row(y)).loss.item()
                             for i, y in zip(ids_column, labels_column)])


@pytest.mark.parametrize("variant", [{"pref_loss": "sigmoid"}, {"pref_loss": "ipo", "beta": 0.25},
                                     {"pref_loss": "hinge"}, {"label_smoothing": 0.1}, {"pref_ftx": 0.5},
                                     {"pref_loss": "orpo"}, {"pref_loss": "simpo", "simpo_gamma": 0.2}])
def test_every_dpo_variant_logs_the_reference_first_loss(tiny_model_dir, tmp_path, variant):
    """The first logged loss of a run over one batch holding every pair, against numbers computed without our
    trainer: the model's own per-row losses, and TRL's ORPO / SimPO terms. At step 1 a LoRA policy equals its
    reference, so the DPO margin is 0: sigmoid log 2, hinge 1, IPO (1 / (2 beta))^2."""
    import math

    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from tuneforge.train.prepare import build_model
    from tests.unit.train.test_trl_parity import stand_in

    config = stage_config(tiny_model_dir, tmp_path, {"stage": "dpo", **variant}, steps=1)
    config["train"].update(batch_size=20, logging_steps=1)  # 24 pairs, 4 held out: one batch holds them all
    result = train(config)
    first = logged(result.run_dir, "loss")[0]
    cfg = load_config(config)
    data = prepare(cfg).data.train.columns
    base = build_model(cfg, prepare(cfg).source).eval()  # LoRA freshly initialised: the base model's outputs
    chosen = row_average_logprobs(base, data["chosen_ids"], data["chosen_labels"])
    rejected = row_average_logprobs(base, data["rejected_ids"], data["rejected_labels"])
    m = cfg.method
    expected = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * m.beta)) ** 2}.get(m.pref_loss)
    if m.pref_loss == "orpo":
        ratio = ORPOTrainer.odds_ratio_loss(stand_in(beta=m.beta), chosen, rejected)[0]
        expected = (-chosen - ratio).mean().item()
    if m.pref_loss == "simpo":
        trainer = stand_in(alpha=0.0, loss_type="simpo", beta=m.beta, simpo_gamma=m.simpo_gamma, label_smoothing=0.0)
        expected = CPOTrainer.cpo_loss(trainer, chosen, rejected)[0].mean().item()
    if m.pref_ftx:
        expected += m.pref_ftx * (-chosen).mean().item()
    assert result.status == "completed" and first == pytest.approx(expected, abs=2e-4)


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


def test_a_ppo_run_scores_with_a_trained_reward_model_and_saves_its_adapter(tiny_model_dir, tmp_path):
    rm = train(stage_config(tiny_model_dir, tmp_path / "rm", {"stage": "rm"})).run_dir
    config = stage_config(tiny_model_dir, tmp_path, {"stage": "ppo", "reward_model": str(rm), "max_new_tokens": 4,
                                                     "kl_coef": 0.01, "ppo_epochs": 2}, steps=6, lr=2e-2)
    config["data"].update(dataset="pairs", val_size=0)
    result = train(config)
    assert result.status == "completed" and (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert result.metrics["steps"] == 6 and result.metrics["kl_last"] != 0  # the policy moved off its start
    assert {"reward", "kl", "policy_loss", "value_loss"} <= set(json.loads(
        (result.run_dir / "metrics.jsonl").read_text().splitlines()[-1]))


class DirectionReward:
    """A rule in place of a reward model: the reward of an answer is how far its last token's embedding points
    along a fixed direction (scaled to unit spread over the vocabulary). Every rollout carries signal, and the
    policy can reach it by turning its last hidden state, unlike a tiny reward model whose scores of a random
    model's answers are nearly flat."""

    def __init__(self, tokenizer, embeddings: torch.Tensor, seed: int):
        direction = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(seed))
        scores = embeddings.detach() @ direction
        self.by_token = ((scores - scores.mean()) / scores.std()).tolist()
        self.tokenizer, self.model = tokenizer, torch.nn.Identity()

    def score_ids(self, sequences):
        return [self.by_token[s[-1]] for s in sequences]


def expected_reward(model, prompts, by_token: torch.Tensor) -> float:
    """The policy's mean reward over its whole next-token distribution: no sampling noise."""
    with torch.no_grad():
        return sum((torch.softmax(model(input_ids=torch.tensor([list(p)])).logits[0, -1], -1) * by_token).sum().item()
                   for p in prompts) / len(prompts)


@pytest.mark.parametrize("seed", [1, 42])
def test_ppo_raises_the_expected_reward(tiny_model_dir, tmp_path, seed):
    from tuneforge.rundir import prepare_run_dir
    from tuneforge.train.ppo import run_ppo
    from tuneforge.train.prepare import build_model

    config = stage_config(tiny_model_dir, tmp_path, {"stage": "ppo", "reward_model": str(tmp_path / "unused"),
                                                     "max_new_tokens": 1, "kl_coef": 0.01, "ppo_epochs": 2},
                          steps=20, lr=2e-2)
    config["data"].update(dataset="pairs", val_size=0)
    config["train"].update(seed=seed, batch_size=8)
    cfg = load_config(config)
    prepared = prepare(cfg)
    run, _ = prepare_run_dir(cfg)
    model = build_model(cfg, prepared.source)
    reward = DirectionReward(prepared.tokenizer, model.get_input_embeddings().weight, seed)
    prompts, by_token = prepared.data.train.columns["prompt_ids"], torch.tensor(reward.by_token)
    before = expected_reward(model, prompts, by_token)
    result = run_ppo(cfg, model, prepared, run, reward=reward)
    assert result.status == "completed"
    # 8 samples a step of a unit-spread reward: the sampled means are too noisy to compare in 20 steps, the
    # expectation is not (six seeds tried: +0.07 to +0.13 from about 0)
    assert expected_reward(model.eval(), prompts, by_token) > before + 0.03
