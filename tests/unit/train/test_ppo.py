"""PPO rollouts against full forward passes and the sampling distribution; exact resume from a checkpoint."""

import copy
import json

import pytest
import torch

from tests.unit.train.test_stages import DirectionReward, stage_config
from tuneforge.config import load_config
from tuneforge.model.heads import ValueHead
from tuneforge.train.ppo import Sampler, _layout, answer_logprobs, collect
from tuneforge.train.prepare import build_model, prepare


def ppo_setup(tiny_model_dir, tmp_path, **method):
    config = stage_config(tiny_model_dir, tmp_path, {"stage": "ppo", "reward_model": str(tmp_path / "unused"),
                                                     "max_new_tokens": 5, "kl_coef": 0.05, "ppo_epochs": 2,
                                                     **method}, steps=6, lr=2e-2)
    config["data"].update(dataset="pairs", val_size=0)
    config["train"].update(batch_size=4, save_steps=3, logging_steps=1)
    return config


def test_answer_logprobs_line_up_with_a_full_forward(tiny_model_dir, tmp_path):
    cfg = load_config(ppo_setup(tiny_model_dir, tmp_path))
    model = build_model(cfg, prepare(cfg).source).eval()
    prompts, answers = [[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 2]]
    ids, attention, positions, mask, answer_ids = _layout(prompts, answers, pad=0, device="cpu")
    with torch.no_grad():
        got, _ = answer_logprobs(model, None, ids, attention, positions, mask, answer_ids, temperature=0.7)
        for b, (p, a) in enumerate(zip(prompts, answers)):
            logits = model(input_ids=torch.tensor([p + a])).logits[0] / 0.7
            expected = [torch.log_softmax(logits[len(p) - 1 + j], -1)[t].item() for j, t in enumerate(a)]
            assert got[b, : len(a)].tolist() == pytest.approx(expected, abs=1e-5)
            assert got[b, len(a):].abs().sum() == 0  # padding contributes nothing


def test_old_logprobs_are_those_of_the_sampling_distribution(tiny_model_dir, tmp_path):
    """Rollouts at temperature 0.7: the logged old log-probabilities equal the log-probabilities of the
    distribution each token was sampled from (generate's own processed scores), even when the model's saved
    generation config asks for a repetition penalty and a minimum length."""
    cfg = load_config(ppo_setup(tiny_model_dir, tmp_path, temperature=0.7))
    prepared = prepare(cfg)
    model = build_model(cfg, prepared.source).eval()
    model.generation_config.repetition_penalty = 3.0  # would reshape the distribution if it leaked into sampling
    model.generation_config.min_new_tokens = 4
    reward = DirectionReward(prepared.tokenizer, model.get_input_embeddings().weight, 0)
    sampler = Sampler(prepared.tokenizer, [prepared.tokenizer.convert_tokens_to_ids("<|im_end|>")], cfg.method)
    scores = []
    original = model.generate

    def spy(**kwargs):
        out = original(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, 1))  # (B, new tokens, V) after temperature and top-p
        return out.sequences

    model.generate = spy
    prompts = [list(p) for p in prepared.data.train.columns["prompt_ids"][:4]]
    torch.manual_seed(0)
    rollout = collect(model, ValueHead(model.config.hidden_size), None, reward, prompts, sampler, "cpu")
    expected = torch.log_softmax(scores[0], -1).gather(2, rollout.answer_ids[..., None]).squeeze(-1) * rollout.mask
    torch.testing.assert_close(rollout.logprobs, expected, rtol=1e-4, atol=1e-4)
    assert model.generation_config.repetition_penalty == 3.0  # the model's own settings are back afterwards


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_interrupted_ppo_run_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import tuneforge.train.ppo as ppo
    from tuneforge.train.run import train

    def run(folder, steps_before_stop=None, **train_settings):
        config = ppo_setup(tiny_model_dir, folder)
        config["train"].update(train_settings)
        prepared_cfg = load_config(config)
        model = build_model(prepared_cfg, prepare(prepared_cfg).source)
        reward = DirectionReward(prepare(prepared_cfg).tokenizer, model.get_input_embeddings().weight, 0)
        monkeypatch.setattr(ppo.RewardModel, "from_run", lambda path: reward)
        return train(config)

    whole = run(tmp_path / "whole")
    assert whole.status == "completed" and [m["step"] for m in metrics(whole.run_dir)] == [1, 2, 3, 4, 5, 6]

    stops = []
    original_update = ppo.update

    def update_then_ctrl_c(*args, **kwargs):  # Ctrl-C arrives during step 4
        stats = original_update(*args, **kwargs)
        stops.append(1)
        if len(stops) == 4:
            import signal
            signal.raise_signal(signal.SIGINT)
        return stats

    monkeypatch.setattr(ppo, "update", update_then_ctrl_c)
    broken = run(tmp_path / "broken")
    assert broken.status == "interrupted" and (broken.run_dir / "checkpoints" / "checkpoint-4").is_dir()
    saved_optimizer = torch.load(broken.run_dir / "checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    monkeypatch.setattr(ppo, "update", original_update)

    loaded = {}
    original_load = ppo.load_ppo_checkpoint

    def spy_load(folder, model, value_head, optimizer, scheduler):
        state = original_load(folder, model, value_head, optimizer, scheduler)
        loaded.update(step=state.step, optimizer=copy.deepcopy(optimizer.state_dict()))  # before steps 5, 6
        return state

    monkeypatch.setattr(ppo, "load_ppo_checkpoint", spy_load)
    resumed = run(tmp_path / "broken", resume_from_checkpoint="auto")
    assert resumed.status == "completed" and loaded["step"] == 4
    for k, state in saved_optimizer["state"].items():
        torch.testing.assert_close(loaded["optimizer"]["state"][k]["exp_avg"], state["exp_avg"])
    steps = [m["step"] for m in metrics(resumed.run_dir)]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 logged once, after the resume
    for a, b in zip(metrics(whole.run_dir), metrics(resumed.run_dir)):
        for key in ("loss", "policy_loss", "value_loss", "reward", "kl"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    adapter = lambda run: load_file(str(run.run_dir / "adapter" / "adapter_model.safetensors"))  # noqa: E731
    for name, tensor in adapter(whole).items():
        torch.testing.assert_close(adapter(resumed)[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_ppo_run_whose_loss_becomes_nan_stops_as_failed(tiny_model_dir, tmp_path, monkeypatch):
    import tuneforge.train.ppo as ppo
    from tuneforge.errors import TrainingError
    from tuneforge.train.run import train

    config = ppo_setup(tiny_model_dir, tmp_path)
    cfg = load_config(config)
    model = build_model(cfg, prepare(cfg).source)
    reward = DirectionReward(prepare(cfg).tokenizer, model.get_input_embeddings().weight, 0)
    monkeypatch.setattr(ppo.RewardModel, "from_run", lambda path: reward)
    original = ppo.ppo_policy_loss
    monkeypatch.setattr(ppo, "ppo_policy_loss", lambda *a, **k: original(*a, **k) * float("nan"))
    # two optimizer steps (ppo_epochs) per PPO step: the fourth skipped one comes in PPO step 2
    with pytest.raises(TrainingError, match=r"NaN or infinite for 4 optimizer steps in a row \(up to step 2"):
        train(config)
    meta = json.loads((tmp_path / "ppo" / "run.json").read_text())
    assert meta["status"] == "failed" and not (tmp_path / "ppo" / "adapter").exists()
