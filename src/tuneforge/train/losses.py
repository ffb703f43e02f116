"""Loss functions: tensors in, tensors out, testable without a trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions t whose next token t+1 is supervised. Only there are logits needed."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def next_token_targets(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(N,) targets matching logits computed at the `keep` positions, in row-major order."""
    return labels[:, 1:][keep[:, :-1]]


def causal_lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of (N, V) logits against (N,) targets; the caller divides by the token count
    of the whole accumulated batch, so that accumulation does not change the loss."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")
