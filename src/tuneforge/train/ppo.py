"""Stage ppo: the policy writes answers to prompts, a reward model (a run of stage rm) scores them, and PPO
moves the policy towards higher reward while a KL penalty keeps it near where it started.

One step: sample answers for `train.batch_size` prompts -> log-probabilities under the policy and the reference
(the policy with its adapter off, or a frozen copy), values from a value head, rewards -> GAE -> `ppo_epochs`
clipped updates. Devices and mixed precision come from accelerate.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from tuneforge.data.pipeline import tokenizer_fingerprint
from tuneforge.data.template import stop_token_ids
from tuneforge.errors import ConfigError
from tuneforge.infer.reward import RewardModel
from tuneforge.model.heads import ValueHead
from tuneforge.rundir import RunDir
from tuneforge.train.callbacks import GracefulStop, plot_loss
from tuneforge.train.ppo_losses import gae, ppo_policy_loss, ppo_value_loss, token_rewards, whiten


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, T) prompt + answer, right-padded
    attention_mask: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, R) position predicting each answer token
    mask: torch.Tensor  # (B, R) 1 for real answer tokens
    answer_ids: torch.Tensor  # (B, R)
    logprobs: torch.Tensor  # (B, R) under the policy that sampled
    values: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,) reward model


def run_ppo(cfg, model, prepared, run: RunDir, ref_model=None, reward=None):
    """`reward`: anything with `tokenizer`, `model` and `score_ids(sequences) -> list[float]`; by default the
    reward model run of method.reward_model."""
    from tuneforge.train.run import RunResult

    m, t = cfg.method, cfg.train
    reward = reward or RewardModel.from_run(m.reward_model)
    if tokenizer_fingerprint(reward.tokenizer) != tokenizer_fingerprint(prepared.tokenizer):
        raise ConfigError(f"method.reward_model: {m.reward_model} uses another tokenizer than the policy; "
                          "train the reward model from the same base model")
    torch.manual_seed(t.seed)
    accelerator = Accelerator()
    value_head = ValueHead(model.config.hidden_size)
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    prompts = prepared.data.train.columns["prompt_ids"]
    steps = t.max_steps or math.ceil(len(prompts) * t.num_epochs / t.batch_size)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, int(t.warmup_ratio * steps), steps)
    model, value_head, optimizer = accelerator.prepare(model, value_head, optimizer)
    if ref_model is not None:
        ref_model.to(accelerator.device)
    reward.model.to(accelerator.device)
    tokenizer, stop = prepared.tokenizer, GracefulStop()
    stop_ids = stop_token_ids(tokenizer, prepared.template.stop) or [tokenizer.eos_token_id]
    order, rng = [], random.Random(t.seed)
    stop.on_train_begin(None, None, None)
    history = []
    for step in tqdm(range(1, steps + 1), desc="ppo", unit="step"):
        if len(order) < t.batch_size:
            order += rng.sample(range(len(prompts)), len(prompts))
        batch, order = [list(prompts[i]) for i in order[: t.batch_size]], order[t.batch_size:]
        clock = time.perf_counter()
        rollout = collect(accelerator.unwrap_model(model), value_head, ref_model, reward, batch, tokenizer,
                          stop_ids, m, accelerator.device)
        stats = update(model, value_head, optimizer, accelerator, rollout, m, params, t.max_grad_norm)
        scheduler.step()
        stats.update(step=step, learning_rate=scheduler.get_last_lr()[0],
                     seconds_per_step=round(time.perf_counter() - clock, 2))
        history.append(stats)
        if step % t.logging_steps == 0 or step == 1 or step == steps:
            _log(run, stats, cfg.output.plot_loss)
        if step % t.save_steps == 0:
            _save(accelerator.unwrap_model(model), tokenizer, run.checkpoints / f"checkpoint-{step}")
        if stop.requested:
            break
    stop.on_train_end(None, None, None)
    status = "interrupted" if stop.requested else "completed"
    _save(accelerator.unwrap_model(model), tokenizer, run.path / ("adapter" if cfg.method.adapter.type == "lora" else "model"))
    head = max(1, len(history) // 4)
    metrics = {"reward_first_quarter": sum(h["reward"] for h in history[:head]) / head,
               "reward_last_quarter": sum(h["reward"] for h in history[-head:]) / head,
               "kl_last": history[-1]["kl"], "steps": len(history)}
    run.update_meta(status=status, finished=time.strftime("%Y-%m-%d %H:%M:%S"), metrics=metrics,
                    global_step=len(history))
    return RunResult(run.path, status, metrics)


def _log(run: RunDir, stats: dict, plot: bool) -> None:
    with (run.path / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({**stats, "time": round(time.time(), 2)}) + "\n")
    tqdm.write(str({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}))
    if plot:
        plot_loss(run.path / "metrics.jsonl", run.path / "loss.png")


def _save(model, tokenizer, path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@torch.no_grad()
def collect(policy, value_head, ref_model, reward: RewardModel, prompts: list[list[int]], tokenizer,
            stop_ids: list[int], m, device) -> Rollout:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    left = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    left_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = policy.generate(input_ids=left, attention_mask=left_mask, do_sample=True, temperature=m.temperature,
                          top_p=m.top_p, top_k=None, max_new_tokens=m.max_new_tokens, eos_token_id=stop_ids,
                          pad_token_id=pad)
    answers = []
    for row in out[:, width:].tolist():
        end = next((k + 1 for k, tok in enumerate(row) if tok in stop_ids), len(row))  # keep the stop token
        answers.append(row[:end] or [stop_ids[0]])
    sequences = [p + a for p, a in zip(prompts, answers)]
    ids, attention, positions, mask, answer_ids = _layout(prompts, answers, pad, device)
    logprobs, values = answer_logprobs(policy, value_head, ids, attention, positions, mask, answer_ids)
    if ref_model is not None:
        ref_logprobs, _ = answer_logprobs(ref_model, None, ids, attention, positions, mask, answer_ids)
    else:
        with policy.disable_adapter():
            ref_logprobs, _ = answer_logprobs(policy, None, ids, attention, positions, mask, answer_ids)
    scores = torch.tensor(reward.score_ids(sequences), device=device)
    return Rollout(ids, attention, positions, mask, answer_ids, logprobs, values, ref_logprobs, scores)


def _layout(prompts, answers, pad, device):
    """Right-padded prompt+answer rows; for each answer token, the position whose logits predict it."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    longest = max(len(a) for a in answers)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    positions = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros((len(prompts), longest))
    answer_ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    for b, (p, a) in enumerate(zip(prompts, answers)):
        ids[b, : len(p) + len(a)] = torch.tensor(p + a)
        attention[b, : len(p) + len(a)] = 1
        positions[b, : len(a)] = torch.arange(len(p) - 1, len(p) - 1 + len(a))
        mask[b, : len(a)] = 1
        answer_ids[b, : len(a)] = torch.tensor(a)
    return ids.to(device), attention.to(device), positions.to(device), mask.to(device), answer_ids.to(device)


def answer_logprobs(model, value_head, ids, attention, positions, mask, answer_ids):
    """(B, R) log-probabilities of the answer tokens, and values (B, R) when a value head is given."""
    out = model(input_ids=ids, attention_mask=attention, output_hidden_states=value_head is not None, use_cache=False,
                logits_to_keep=positions)  # logits only where answer tokens are predicted: (B, R, V)
    logprobs = torch.log_softmax(out.logits.float(), dim=-1).gather(2, answer_ids[..., None]).squeeze(-1) * mask
    if value_head is None:
        return logprobs, None
    hidden = torch.gather(out.hidden_states[-1], 1, positions[..., None].expand(-1, -1, out.hidden_states[-1].shape[-1]))
    return logprobs, value_head(hidden) * mask


def update(model, value_head, optimizer, accelerator, r: Rollout, m, params, max_grad_norm) -> dict:
    rewards, kl = token_rewards(r.scores, r.logprobs, r.ref_logprobs, r.mask, m.kl_coef)
    advantages, returns = gae(rewards, r.values, r.mask, m.gamma, m.lam)
    advantages = whiten(advantages, r.mask)
    for _ in range(m.ppo_epochs):
        logprobs, values = answer_logprobs(model, value_head, r.input_ids, r.attention_mask, r.positions, r.mask,
                                           r.answer_ids)
        policy_loss = ppo_policy_loss(logprobs, r.logprobs, advantages, r.mask, m.clip_range)
        value_loss = ppo_value_loss(values, r.values, returns, r.mask, m.value_clip)
        loss = policy_loss + m.vf_coef * value_loss
        accelerator.backward(loss)
        if max_grad_norm:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    return {"loss": loss.item(), "policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
            "reward": float(r.scores.mean()), "kl": float(kl.mean()), "answer_tokens": float(r.mask.sum(1).mean())}
