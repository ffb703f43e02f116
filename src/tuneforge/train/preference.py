"""Preference and reward losses as pure functions: tensors in, tensors out.

Conventions: `*_logps` are per-sequence sums of answer-token log-probabilities, shape (B,); `*_avg` are the
same divided by the answer length. `ref_*` come from the frozen reference model. Every function returns the
per-example loss (B,); callers average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO and its variants on the log-ratio margin h = (pi_c - ref_c) - (pi_r - ref_r).

    sigmoid (DPO): -log sigmoid(beta h), optionally with label smoothing eps (conservative DPO):
        -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    hinge (SLiC): max(0, 1 - beta h)
    ipo: (h - 1 / (2 beta))^2; pass length-averaged log-probabilities, as IPO defines h per token.
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    if kind == "hinge":
        return torch.relu(1 - beta * margin)
    if kind == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {kind!r}")


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO: no reference model; length-averaged log-probabilities with a target margin gamma.
    -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), z = beta (avg_c - avg_r) - gamma."""
    z = beta * (chosen_avg - rejected_avg) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, chosen_nll: torch.Tensor,
              beta: float) -> torch.Tensor:
    """ORPO: supervised NLL on the chosen answer plus beta times the odds-ratio penalty
    -log sigmoid(log odds(c) - log odds(r)), with odds(y) = p / (1 - p) and p = exp(avg log-prob)."""
    log_odds = (chosen_avg - rejected_avg) - (torch.log1p(-torch.exp(chosen_avg)) - torch.log1p(-torch.exp(rejected_avg)))
    return chosen_nll - beta * F.logsigmoid(log_odds)


def pair_losses(m, chosen: torch.Tensor, rejected: torch.Tensor, chosen_count: torch.Tensor,
                rejected_count: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                ref_rejected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The configured preference loss (method.pref_loss) of a batch of pairs from summed answer log-probabilities
    and answer lengths, plus the rewards logged for each side (as TRL logs them: beta times the summed log-ratio
    for the DPO family, beta times the average log-probability for ORPO and SimPO). Returns (B,) tensors."""
    chosen_avg, rejected_avg = chosen / chosen_count.clamp(min=1), rejected / rejected_count.clamp(min=1)
    kind, beta = m.pref_loss, m.beta
    if kind in ("sigmoid", "hinge", "ipo"):
        if kind == "ipo":  # IPO's margin is per token
            losses = dpo_loss(chosen_avg, rejected_avg, ref_chosen / chosen_count.clamp(min=1),
                              ref_rejected / rejected_count.clamp(min=1), beta, "ipo")
        else:
            losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, kind, m.label_smoothing)
        chosen_reward, rejected_reward = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    elif kind == "orpo":
        losses = orpo_loss(chosen_avg, rejected_avg, -chosen_avg, beta)
        chosen_reward, rejected_reward = beta * chosen_avg, beta * rejected_avg
    else:
        losses = simpo_loss(chosen_avg, rejected_avg, beta, m.simpo_gamma, m.label_smoothing)
        chosen_reward, rejected_reward = beta * chosen_avg, beta * rejected_avg
    if m.pref_ftx > 0 and kind != "orpo":  # ORPO already holds the SFT term
        losses = losses + m.pref_ftx * -chosen_avg
    return losses, chosen_reward.detach(), rejected_reward.detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO: a desirable answer should gain reward over the reference point kl, an undesirable one lose.
    reward = pi - ref; desirable: w_d (1 - sigmoid(beta (reward - kl))); undesirable: w_u (1 - sigmoid(beta (kl - reward))).
    `kl` is the (detached, non-negative) batch estimate of KL(policy || reference)."""
    reward = policy_logps - ref_logps
    kl = kl.detach().clamp(min=0)
    gain = desirable_weight * (1 - torch.sigmoid(beta * (reward - kl)))
    loss = undesirable_weight * (1 - torch.sigmoid(beta * (kl - reward)))
    return torch.where(desirable, gain, loss)


def pairwise_reward_loss(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry reward modelling: -log sigmoid(r_c - r_r)."""
    return -F.logsigmoid(chosen_reward - rejected_reward)
