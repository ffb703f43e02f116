"""PPO's value head: a scalar per token on top of the policy's last hidden state."""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """PPO's critic: a linear map from the policy's last hidden state to a value per token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T)
        return self.linear(hidden.float()).squeeze(-1)
