"""Stage ppo: the policy writes answers to prompts, a reward model (a run of stage rm) scores them, and PPO
moves the policy towards higher reward while a KL penalty keeps it near where it started.

One step: sample answers for `train.batch_size` prompts -> log-probabilities under the policy and the reference
(the policy with its adapter off, or a frozen copy), values from a value head, rewards -> GAE -> `ppo_epochs`
clipped updates. Log-probabilities are those of the sampling distribution, softmax(logits / temperature), for the
policy, the old policy and the reference alike (as TRL computes them). Devices come from accelerate.
Checkpoints hold everything needed to continue exactly: trainable weights, value head, optimizer, schedule,
step, prompt order and random states (`ppo_checkpoint.py`).

With several processes (torchrun / accelerate launch), each process writes answers for its own `batch_size`
prompts of the step's global batch, the policy and value head are wrapped in the Trainer's DDP by accelerate (their
gradients averaged), and the statistics that span the batch are taken over every process: advantage whitening,
the token counts the losses divide by, and the logged reward, KL and losses. Rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import GenerationConfig, get_scheduler

from tuneforge.data.collate import pad_left, pad_right
from tuneforge.data.pipeline import tokenizer_fingerprint
from tuneforge.data.template import stop_token_ids
from tuneforge.errors import ConfigError
from tuneforge.model.heads import ValueHead
from tuneforge.model.reward import RewardModel
from tuneforge.model.scoring import forward_at, token_logprobs, unwrap
from tuneforge.ranks import is_main
from tuneforge.rundir import RunDir
from tuneforge.train.callbacks import GracefulStop, NonFiniteGuard, plot_loss, stop_if_diverged
from tuneforge.train.ppo_checkpoint import PPOState, load_ppo_checkpoint, save_ppo_checkpoint
from tuneforge.train.distributed import all_sum
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


def run_ppo(cfg, model, prepared, run: RunDir, ref_model=None, reward=None, checkpoint: str | None = None):
    """`reward`: anything with `tokenizer`, `model` and `score_ids(sequences) -> list[float]`; by default the
    reward model run of method.reward_model. `checkpoint`: a checkpoint folder of this run to continue from."""
    from tuneforge.train.run import RunResult

    m, t = cfg.method, cfg.train
    reward = reward or RewardModel.from_run(m.reward_model)
    if tokenizer_fingerprint(reward.tokenizer) != tokenizer_fingerprint(prepared.tokenizer):
        raise ConfigError(f"method.reward_model: {m.reward_model} uses another tokenizer than the policy; "
                          "train the reward model from the same base model")
    accelerator = Accelerator()
    rank, processes = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(t.seed + rank)  # each process samples its own answers
    value_head = ValueHead(model.config.hidden_size)
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    prompts = prepared.data.train.columns["prompt_ids"]
    steps = t.max_steps or math.ceil(len(prompts) * t.num_epochs / t.batch_size)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, math.ceil(t.warmup_ratio * steps), steps)
    model, value_head, optimizer = accelerator.prepare(model, value_head, optimizer)
    if ref_model is not None:
        ref_model.to(accelerator.device)
    reward.model.to(accelerator.device)
    state = PPOState(rng=random.Random(t.seed))  # the same prompt order in every process
    if checkpoint:
        state = load_ppo_checkpoint(checkpoint, accelerator.unwrap_model(model), accelerator.unwrap_model(value_head),
                                    optimizer, scheduler)
        if is_main():
            print(f"tuneforge: ppo continues after step {state.step} from {checkpoint}", flush=True)
    guard = NonFiniteGuard(t.non_finite_patience)
    guard.attach(params, optimizer)
    tokenizer, stop = prepared.tokenizer, GracefulStop()
    sampler = Sampler(tokenizer, stop_token_ids(tokenizer, prepared.template.stop) or [tokenizer.eos_token_id], m)
    stop.on_train_begin(None, None, None)
    width = t.batch_size * processes  # the step's global batch; this process takes its share
    for step in tqdm(range(state.step + 1, steps + 1), desc="ppo", unit="step", initial=state.step, total=steps,
                     disable=not is_main()):
        while len(state.order) < width:
            state.order += state.rng.sample(range(len(prompts)), len(prompts))
        mine = state.order[rank * t.batch_size: (rank + 1) * t.batch_size]
        batch, state.order = [list(prompts[i]) for i in mine], state.order[width:]
        clock = time.perf_counter()
        rollout = collect(accelerator.unwrap_model(model), value_head, ref_model, reward, batch, sampler,
                          accelerator.device)
        stats = update(model, value_head, optimizer, accelerator, rollout, m, params, t.max_grad_norm)
        scheduler.step()
        state.step = step
        stats.update(step=step, learning_rate=scheduler.get_last_lr()[0],
                     seconds_per_step=round(time.perf_counter() - clock, 2))
        state.history.append({k: stats[k] for k in ("reward", "kl")})
        if is_main() and (step % t.logging_steps == 0 or step == 1 or step == steps):
            _log(run, stats, cfg.output.plot_loss)
        if guard.check(step):
            break
        stopping = stop.sync()
        if step % t.save_steps == 0 or stopping:
            save_ppo_checkpoint(run.checkpoints, state, accelerator.unwrap_model(model),
                                accelerator.unwrap_model(value_head), optimizer, scheduler, t.save_total_limit)
        if stopping:
            break
    stop.on_train_end(None, None, None)
    stop_if_diverged(guard, run, cfg)
    status = "interrupted" if stop.requested else "completed"
    policy = accelerator.unwrap_model(model)
    target = run.path / ("adapter" if cfg.method.adapter.type == "lora" else "model")
    if is_main():
        policy.save_pretrained(target)
        tokenizer.save_pretrained(target)
    accelerator.wait_for_everyone()
    history = state.history or [{"reward": float("nan"), "kl": float("nan")}]
    head = max(1, len(history) // 4)
    metrics = {"reward_first_quarter": sum(h["reward"] for h in history[:head]) / head,
               "reward_last_quarter": sum(h["reward"] for h in history[-head:]) / head,
               "kl_last": history[-1]["kl"], "steps": state.step}
    run.update_meta(status=status, finished=time.strftime("%Y-%m-%d %H:%M:%S"), metrics=metrics,
                    global_step=state.step)
    if status == "interrupted":
        print(f"tuneforge: interrupted at step {state.step}; continue with "
              f"`tuneforge train {run.path / 'config.yaml'} train.resume_from_checkpoint=auto`", flush=True)
    return RunResult(run.path, status, metrics)


def _log(run: RunDir, stats: dict, plot: bool) -> None:
    with (run.path / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({**stats, "time": round(time.time(), 2)}) + "\n")
    tqdm.write(str({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}))
    if plot:
        plot_loss(run.path / "metrics.jsonl", run.path / "loss.png")


class Sampler:
    """Samples rollouts from softmax(logits / temperature) with top-p, and nothing else: the model's own saved
    generation settings (repetition_penalty, min_length, top_k, ...) are kept out, because the PPO ratio and KL
    assume that this is the distribution the answers came from."""

    def __init__(self, tokenizer, stop_ids: list[int], m):
        self.stop_ids = stop_ids
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.temperature = m.temperature
        self.config = GenerationConfig(do_sample=True, temperature=m.temperature, top_p=m.top_p, top_k=0,
                                       max_new_tokens=m.max_new_tokens, eos_token_id=stop_ids, pad_token_id=self.pad)

    @torch.no_grad()
    def sample(self, policy, prompts: list[list[int]], device) -> list[list[int]]:
        """One answer per prompt, ending with its stop token where it stopped."""
        left, left_mask = pad_left(prompts, self.pad)
        width = left.shape[1]
        with _neutral_generation_config(policy):
            out = policy.generate(input_ids=left.to(device), attention_mask=left_mask.to(device),
                                  generation_config=self.config)
        answers = []
        for row in out[:, width:].tolist():
            end = next((k + 1 for k, tok in enumerate(row) if tok in self.stop_ids), len(row))  # keep the stop token
            answers.append(row[:end] or [self.stop_ids[0]])
        return answers


@contextlib.contextmanager
def _neutral_generation_config(model):
    """generate() fills every setting left unset in the config it is given from the model's own generation
    config; for the duration of sampling that is a blank one."""
    inner = unwrap(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.no_grad()
def collect(policy, value_head, ref_model, reward, prompts: list[list[int]], sampler: Sampler, device) -> Rollout:
    answers = sampler.sample(policy, prompts, device)
    sequences = [p + a for p, a in zip(prompts, answers)]
    ids, attention, positions, mask, answer_ids = _layout(prompts, answers, sampler.pad, device)
    temperature = sampler.temperature
    logprobs, values = answer_logprobs(policy, value_head, ids, attention, positions, mask, answer_ids, temperature)
    if ref_model is not None:
        ref_logprobs, _ = answer_logprobs(ref_model, None, ids, attention, positions, mask, answer_ids, temperature)
    else:
        with policy.disable_adapter():
            ref_logprobs, _ = answer_logprobs(policy, None, ids, attention, positions, mask, answer_ids, temperature)
    scores = torch.tensor(reward.score_ids(sequences), device=device)
    return Rollout(ids, attention, positions, mask, answer_ids, logprobs, values, ref_logprobs, scores)


def _layout(prompts, answers, pad, device):
    """Right-padded prompt+answer rows; for each answer token, the position whose logits predict it."""
    ids, attention = pad_right([p + a for p, a in zip(prompts, answers)], pad)
    answer_ids, mask = pad_right(answers, pad)  # (B, R)
    starts = torch.tensor([len(p) - 1 for p in prompts])[:, None]  # (B, 1) the position predicting answer token 0
    positions = (starts + torch.arange(answer_ids.shape[1])[None, :]) * mask  # (B, R); padding points at 0
    return ids.to(device), attention.to(device), positions.to(device), mask.float().to(device), answer_ids.to(device)


def answer_logprobs(model, value_head, ids, attention, positions, mask, answer_ids, temperature: float = 1.0):
    """(B, R) log-probabilities of the answer tokens under softmax(logits / temperature), and values (B, R) from
    the final hidden states when a value head is given."""
    out, hidden = forward_at(model, positions, input_ids=ids, attention_mask=attention)  # (B, R, V), (B, R, H)
    logprobs = token_logprobs(out.logits, answer_ids, temperature) * mask
    return logprobs, (value_head(hidden) * mask if value_head is not None else None)


def update(model, value_head, optimizer, accelerator, r: Rollout, m, params, max_grad_norm) -> dict:
    """`ppo_epochs` clipped updates on one rollout. With several processes, each holds a shard of the step's
    batch: whitening uses every process's tokens, and each loss divides by the mean token count per process, so
    the gradients DDP averages are those of the mean over all tokens."""
    rewards, kl = token_rewards(r.scores, r.logprobs, r.ref_logprobs, r.mask, m.kl_coef)
    advantages, returns = gae(rewards, r.values, r.mask, m.gamma, m.lam)
    advantages = whiten(advantages, r.mask, total=all_sum)
    processes = accelerator.num_processes
    (tokens,) = all_sum([float(r.mask.sum())])
    for _ in range(m.ppo_epochs):
        logprobs, values = answer_logprobs(model, value_head, r.input_ids, r.attention_mask, r.positions, r.mask,
                                           r.answer_ids, m.temperature)
        policy_loss = ppo_policy_loss(logprobs, r.logprobs, advantages, r.mask, m.clip_range, tokens / processes)
        value_loss = ppo_value_loss(values, r.values, returns, r.mask, m.value_clip, tokens / processes)
        loss = policy_loss + m.vf_coef * value_loss
        accelerator.backward(loss)
        if max_grad_norm:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    rows = len(r.scores)
    totals = all_sum([loss.item(), policy_loss.item(), value_loss.item(), float(r.scores.sum()), float(kl.sum()),
                      float(r.mask.sum()), rows])
    loss_, policy_, value_, reward, kl_sum, answer, rows = totals
    return {"loss": loss_ / processes, "policy_loss": policy_ / processes, "value_loss": value_ / processes,
            "reward": reward / rows, "kl": kl_sum / rows, "answer_tokens": answer / rows}
