"""PPO pieces as pure functions: per-token rewards with a KL penalty, GAE, clipped policy and value losses.

Shapes: (B, T) over response tokens, with `mask` (B, T) marking real (non-padding) response tokens.
"""

from __future__ import annotations

import torch


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -kl_coef (log pi - log ref) at every token, plus the reward model's score at the last token.
    Returns rewards (B, T) and the per-sequence KL estimate (B,) for the logs: the sum over tokens of
    k3 = ref/pi - 1 - log(ref/pi), unbiased like the log-ratio but never negative on a single sample."""
    log_ratio = (logprobs - ref_logprobs) * mask  # (B, T)
    rewards = -kl_coef * log_ratio
    last = mask.sum(1).long() - 1  # (B,)
    rewards[torch.arange(rewards.shape[0]), last] += scores
    k3 = (torch.expm1(-log_ratio) + log_ratio) * mask
    return rewards * mask, k3.sum(1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation backwards over time; returns advantages and returns (B, T)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = values[:, t] * m
    return advantages, advantages + values


def whiten(x: torch.Tensor, mask: torch.Tensor, total=list) -> torch.Tensor:
    """(x - mean) / std over the real tokens. `total` sums a list of floats over every training process (the
    whole batch's statistics when each process holds a shard of it; the default: this process's tokens only)."""
    count, summed = total([float(mask.sum()), float((x * mask).sum())])
    mean = summed / count
    (squares,) = total([float((((x - mean) * mask) ** 2).sum())])
    return (x - mean) * torch.rsqrt(torch.tensor(squares / count + 1e-8, dtype=x.dtype)) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float, count: float | None = None) -> torch.Tensor:
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1 - c, 1 + c)), r = pi / pi_old. `count`: the
    number of tokens to divide by (default: this batch's; with several processes, the mean count per process, so
    that averaging the processes' gradients gives the mean over every token)."""
    ratio = torch.exp(logprobs - old_logprobs)
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    return (loss * mask).sum() / (mask.sum() if count is None else count)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float, count: float | None = None) -> torch.Tensor:
    """Clipped value loss: 0.5 mean of max((v - R)^2, (v_clipped - R)^2); `count` as in ppo_policy_loss."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / (mask.sum() if count is None else count)
