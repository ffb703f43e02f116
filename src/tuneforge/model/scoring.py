"""Log-probabilities and rewards out of a model, computed only where they are needed; one place for every caller
(the SFT and preference losses, PPO, label scoring, perplexity, reward models).

The model is always called as given, through whatever wraps it (PEFT, DistributedDataParallel, torch.compile),
so gradients stay synchronised. Its output layer is made to see only the hidden states at the wanted positions
by a forward pre-hook, rather than through `logits_to_keep`, whose tensor forms differ between transformers
versions (before 5.2x a (B, T) mask or (B, R) index tensor silently indexed the wrong axes).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions t whose next token t+1 is supervised. Only there are logits needed."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def next_token_targets(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(K,) targets matching logits computed at the `keep` positions, in row-major order."""
    return labels[:, 1:][keep[:, :-1]]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers (PEFT models are kept: they delegate)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _pick(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states at `keep`: a (B, T) bool mask gives (K, H) in row-major order, (B, R) positions
    give (B, R, H)."""
    if keep.dtype == torch.bool:
        return hidden[keep]
    return torch.take_along_dim(hidden, keep[..., None], dim=1)


@contextlib.contextmanager
def head_sees_only(model: nn.Module, keep: torch.Tensor):
    """Within the block, the model's output layer projects only the hidden states at `keep` (see `_pick`):
    no (B, T, V) logits are built. Element-wise steps after the head (Gemma's soft-capping) still apply.
    Yields a list that receives the final hidden states the head saw (the kept positions, after the last norm)."""
    head = unwrap(model).get_output_embeddings()
    seen = []

    def pick(_module, args):
        seen.append(_pick(args[0], keep))
        return (seen[-1], *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield seen
    finally:
        handle.remove()


def forward_at(model: nn.Module, keep: torch.Tensor, **inputs):
    """The model's outputs with `logits` only at `keep` ((K, V) for a bool mask, (B, R, V) for positions), and
    the final hidden states at those positions ((K, H) or (B, R, H))."""
    with head_sees_only(model, keep) as seen:
        outputs = model(**inputs, use_cache=False)
    return outputs, seen[-1]


def supervised_logits(model: nn.Module, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (K, V) at the positions that predict supervised tokens, and those tokens (K,), row-major."""
    keep = next_token_mask(labels)  # (B, T)
    return forward_at(model, keep, **inputs)[0].logits, next_token_targets(labels, keep)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) under softmax(logits / temperature), computed in float32; shape of `targets`."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    return torch.log_softmax(scaled, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's supervised tokens, (N,), and their counts, (N,)."""
    logits, targets = supervised_logits(model, labels, input_ids=input_ids, attention_mask=attention_mask)
    logps = token_logprobs(logits, targets)  # (K,)
    rows = next_token_mask(labels).nonzero(as_tuple=True)[0]  # (K,) the row of each supervised token
    n = labels.shape[0]
    sums = torch.zeros(n, device=logps.device, dtype=logps.dtype).index_add(0, rows, logps)
    return sums, torch.bincount(rows, minlength=n).to(sums.dtype)


def causal_lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of (K, V) logits against (K,) targets; the caller divides by the token count of the
    whole accumulated batch, so that accumulation does not change the loss."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


@contextlib.contextmanager
def _capture_output(module: nn.Module):
    captured = []
    handle = module.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def last_token_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) reward of a sequence-classification model at each row's last real token (right padding).

    The model's own pooling picks the last token that differs from the pad token, which is wrong when the pad
    token is also the end-of-turn token that ends every row; so the score layer's output for every position is
    taken from inside the (possibly wrapped) call and read at the last position the attention mask allows."""
    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    score = getattr(base, "score", None)
    if score is None:
        raise ValueError(f"{type(base).__name__} has no `score` layer; reward models need a ForSequenceClassification class")
    with _capture_output(score) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    scores = captured[-1]  # (N, T, 1)
    last = attention_mask.sum(1) - 1  # (N,)
    return scores[torch.arange(scores.shape[0], device=scores.device), last, 0].float()


def _cache_argument(model: nn.Module) -> str:
    """transformers renamed forward's `past_key_values` to `cache` during 5.x; pass whichever this one takes."""
    inner = unwrap(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def continuations_after_shared_prompts(model: nn.Module, prompts: list[list[int]], continuations: list[list[int]],
                                       pad_id: int) -> torch.Tensor:
    """(B, L) summed log-probabilities of each of L continuations after each of B prompts.

    Each prompt is read once (left-padded, with its key/value cache), then all B x L continuations in one
    short pass over copies of that cache: L continuations cost about one prompt pass instead of L."""
    from tuneforge.data.collate import pad_left, pad_right

    device = next(model.parameters()).device
    ids, mask = pad_left(prompts, pad_id)  # (B, W)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    last = torch.full((len(prompts), 1), ids.shape[1] - 1, device=device)
    with head_sees_only(model, last):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    first = torch.log_softmax(out.logits[:, 0].float(), dim=-1)  # (B, V): the first continuation token
    n = len(continuations)
    cont, cont_mask = pad_right([c for _ in prompts for c in continuations], pad_id)  # (B * L, C)
    cont, cont_mask = cont.to(device), cont_mask.to(device)
    scores = first.repeat_interleave(n, 0).gather(1, cont[:, :1]).squeeze(1)  # (B * L,)
    if cont.shape[1] > 1:
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        cache.batch_repeat_interleave(n)
        width = cont.shape[1]
        attention = torch.cat([mask.repeat_interleave(n, 0), cont_mask], dim=1)
        steps = positions[:, -1:].repeat_interleave(n, 0) + 1 + torch.arange(width, device=device)
        predicting = torch.arange(width - 1, device=device).expand(cont.shape[0], -1)  # token j predicts j + 1
        with head_sees_only(model, predicting):
            rest = model(input_ids=cont, attention_mask=attention, position_ids=steps, use_cache=True,
                         **{_cache_argument(model): cache}).logits  # (B * L, C - 1, V)
        scores = scores + (token_logprobs(rest, cont[:, 1:]) * cont_mask[:, 1:]).sum(1)
    return scores.view(len(prompts), n)
