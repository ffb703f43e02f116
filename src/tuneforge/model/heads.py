"""Scalar heads on a transformer: rewards at the last real token (reward models), values per token (PPO)."""

from __future__ import annotations

import torch
from torch import nn


def backbone_and_score(model):
    """The transformer body and the scoring layer of a (possibly PEFT-wrapped) sequence-classification model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    score = getattr(base, "score", None)
    if score is None:
        raise ValueError(f"{type(base).__name__} has no `score` layer; reward models need a ForSequenceClassification class")
    return base.base_model, score


def last_token_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) score at each row's last real token (right padding), independent of which token is the pad."""
    body, score = backbone_and_score(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (N, T, H)
    last = attention_mask.sum(1) - 1
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, H)
    return score(picked).squeeze(-1).float()


class ValueHead(nn.Module):
    """PPO's critic: a linear map from the policy's last hidden state to a value per token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T)
        return self.linear(hidden.float()).squeeze(-1)
