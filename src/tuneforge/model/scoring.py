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
import weakref

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


# Causal LM classes whose logits are exactly their output layer's product, soft-capped where the config says so
# (final_logit_softcapping: Gemma 2 and 3); the single-pass loss below may stand in for their head.
PLAIN_HEADS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
               "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "SmolLM3ForCausalLM",
               "Phi3ForCausalLM"}
SOFTCAPPED_HEADS = {"Gemma2ForCausalLM", "Gemma3ForCausalLM"}


def frozen_plain_head(model: nn.Module) -> tuple[torch.Tensor, float | None] | None:
    """(weight, soft cap) of the model's output layer when the single-pass loss can replace it: a known model
    class, a bias-free float32 linear layer that does not train (LoRA, freeze) and that nothing hooks. Else None."""
    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    name = type(base).__name__
    head = base.get_output_embeddings() if name in PLAIN_HEADS else None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad or \
            head.weight.dtype != torch.float32 or head._forward_hooks or head._forward_pre_hooks or \
            "forward" in head.__dict__:
        return None
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap and name not in SOFTCAPPED_HEADS:
        return None
    return head.weight, (float(cap) if cap else None)


def _head_pass(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float | None,
               with_grad: bool, slice_bytes: int = 4 << 20) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of the logits hidden @ weight^T (soft-capped: cap * tanh(z / cap)) against `targets`,
    and its gradient with respect to `hidden`, in one pass over the weight: slices of the vocabulary small
    enough to stay in the CPU's cache give their logits, a running log-sum-exp (online softmax) and a running
    sum of exp(logit) x weight row, which becomes the gradient at the end. The usual path reads the whole weight
    twice (the logits, then their gradient times the weight) and keeps the (K, V) logits; for Gemma 3's 262,144 x
    640 head at 24 supervised tokens that was 260 ms of a 2.4 s training step, this is about 160 ms."""
    k, width = hidden.shape
    rows = max(1, slice_bytes // (width * weight.element_size()))
    top = hidden.new_full((k, 1), float("-inf"))
    total = hidden.new_zeros(k, 1)
    acc = hidden.new_zeros(k, width) if with_grad else None
    for start in range(0, weight.shape[0], rows):
        w = weight[start:start + rows]
        z = hidden @ w.t()  # (K, rows)
        if cap:
            z = torch.tanh(z.div_(cap))
            slope = 1 - z * z  # d(cap * tanh(z / cap)) / dz
            z = z.mul_(cap)
        new_top = torch.maximum(top, z.amax(1, keepdim=True))
        rescale = torch.exp(top - new_top)
        e = z.sub_(new_top).exp_()
        total = total.mul_(rescale).add_(e.sum(1, keepdim=True))
        if with_grad:
            acc.mul_(rescale).addmm_(e.mul_(slope) if cap else e, w)
        top = new_top
    w_t = weight[targets]  # (K, H)
    z_t = (hidden * w_t).sum(1)
    if cap:
        t = torch.tanh(z_t / cap)
        z_t, slope_t = t * cap, 1 - t * t
    loss = (top.squeeze(1) + total.log().squeeze(1) - z_t).sum()
    if not with_grad:
        return loss, None
    grad = acc.div_(total).sub_(w_t * slope_t[:, None] if cap else w_t)
    return loss, grad


class _HeadCrossEntropy(torch.autograd.Function):
    """`_head_pass` as an autograd function of the hidden states (the head's weight does not train)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, cap, slice_bytes):
        loss, grad = _head_pass(hidden, weight, targets, cap, ctx.needs_input_grad[0], slice_bytes)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       cap: float | None = None, slice_bytes: int = 4 << 20) -> torch.Tensor:
    """Summed cross-entropy of the (K, H) hidden states through a frozen (V, H) output layer against (K,)
    targets, without building the (K, V) logits (see `_head_pass`; the weight is read in slices of about
    `slice_bytes`)."""
    return _HeadCrossEntropy.apply(hidden, weight, targets, cap, slice_bytes)


@contextlib.contextmanager
def head_skipped(model: nn.Module, keep: torch.Tensor):
    """Within the block the model's output layer does not compute: its logits are empty, and the list the block
    yields receives the final hidden states at `keep` (a (B, T) bool mask: (K, H), row-major). The empty logits
    are a view of the hidden states, so that DistributedDataParallel, looking for unused weights from the
    model's outputs, finds every weight of the body in use."""
    head = unwrap(model).get_output_embeddings()
    seen = []

    def skip(x):
        seen.append(_pick(x, keep))
        return x[..., :0]

    head.forward = skip
    try:
        yield seen
    finally:
        del head.forward


def _last_layer_parts(model: nn.Module) -> list[nn.Module]:
    """The position-wise parts of the model's last decoder layer that need to run only where a loss is taken: its
    MLP (a known one, lean_mlp.LEAN_MLPS) and its attention's query and output projections (keys and values are
    needed everywhere). Only for an unmodified layer of a `PLAIN_HEADS` model, whose output reaches nothing but
    the final norm and the head, and that does not run its forward again in backward (gradient checkpointing).
    Else none."""
    from tuneforge.model.adapters import decoder_layers
    from tuneforge.model.lean_mlp import LEAN_MLPS

    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if type(base).__name__ not in PLAIN_HEADS:
        return []
    layer = decoder_layers(base)[1][-1]
    mlp = getattr(layer, "mlp", None)
    name = type(mlp).__name__
    if name not in LEAN_MLPS or type(layer).__name__ != name.replace("MLP", "DecoderLayer") or \
            getattr(layer, "gradient_checkpointing", False):
        return []
    attention = getattr(layer, "self_attn", None)
    projections = [getattr(attention, n, None) for n in ("q_proj", "o_proj")]
    return [mlp] + (projections if all(isinstance(p, nn.Module) for p in projections) else [])


@contextlib.contextmanager
def last_layer_sees_only(model: nn.Module, keep: torch.Tensor):
    """Within the block the last decoder layer's MLP and its attention's query and output projections compute
    only at `keep` ((B, T) bool), zeros elsewhere. They work token by token, and that layer's output feeds only
    the final norm and the head, which look at `keep` alone; a query of zeros elsewhere only changes attention
    outputs that the output projection then skips. So the loss and every gradient are the same, for about
    1/layers of the model's work at the other positions."""
    parts = _last_layer_parts(model)
    saved = [(part, part.__dict__.get("forward")) for part in parts]  # an instance's own forward, if any

    def sees_only(inner):
        def forward(x):
            if x.dim() != 3 or x.shape[:2] != keep.shape:
                return inner(x)
            picked = inner(x[keep])
            return picked.new_zeros(*keep.shape, picked.shape[-1]).index_put((keep,), picked)
        return forward

    for part, own in saved:
        part.forward = sees_only(own or part.forward)
    try:
        yield
    finally:
        for part, own in saved:
            if own is not None:
                part.forward = own
            else:
                del part.forward


_LAYOUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (its decoder layers, its dropouts)


def _prefix_shareable(model: nn.Module, length: int) -> bool:
    """Whether a training batch's shared prompt may run once (`shared_prefix_length`): a model called directly
    (no DistributedDataParallel, DeepSpeed or compile wrapper) of a `PLAIN_HEADS` class with its own decoder
    layers (not Mixture-of-Depths), no gradient checkpointing, no dropout (one mask for all rows would correlate
    them), no attention soft-capping and no sliding window shorter than the rows (`length` tokens)."""
    from tuneforge.model.adapters import decoder_layers

    if unwrap(model) is not model:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if name not in PLAIN_HEADS:
        return False
    known = _LAYOUT.get(model)
    if known is None:  # the model's structure, looked up once: its modules do not change while it trains
        layers = decoder_layers(base)[1]
        layer_class = name.replace("ForCausalLM", "DecoderLayer")
        own = all(type(layer).__name__ == layer_class for layer in layers)
        known = _LAYOUT[model] = (layers if own else None, [m for m in model.modules() if isinstance(m, nn.Dropout)])
    layers, dropouts = known
    if layers is None or any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        return False
    config = base.config
    if any(float(getattr(config, key, 0) or 0) > 0 for key in ("attention_dropout", "hidden_dropout", "dropout")):
        return False
    window = getattr(config, "sliding_window", None)
    if getattr(config, "attn_logit_softcapping", None) or (window is not None and window < length):
        return False
    return not any(m.p > 0 and m.training for m in dropouts)


def shared_prefix_length(model: nn.Module, labels: torch.Tensor, inputs: dict) -> int:
    """How many leading tokens every row of a training batch shares and no loss reads (the template's header,
    a system prompt, one instruction for a whole classification data set), when computing them once is exact
    and worth it; else 0. The shared part ends before the first position whose next token is supervised, so
    its logits are never needed and its hidden states, causal, do not depend on what follows. Rows padded on
    the right only, with no loss read at padding."""
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if set(inputs) - {"input_ids", "attention_mask"} or ids is None or mask is None or ids.dim() != 2 or \
            ids.shape[0] < 2 or not torch.is_grad_enabled():
        return 0
    real = mask.bool()
    if bool((real[:, 1:] > real[:, :-1]).any() or (labels[~real] != IGNORE).any()):
        return 0  # padding inside a row or a loss read at padding: the one-row layout would drop a position
    same = ((ids == ids[:1]).all(0) & real.all(0)).int()
    supervised = (labels != IGNORE).any(0).nonzero()
    first = int(supervised[0]) if len(supervised) else ids.shape[1]
    length = min(int(same.cumprod(0).sum()), first - 1)
    if length * (ids.shape[0] - 1) < 8 or not _prefix_shareable(model, ids.shape[1]):  # too few to pay
        return 0
    return length


SHARED_PROMPT_ATTENTION = "tuneforge_shared_prompt"


def _shared_prompt_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             tuneforge_shared_prompt=None, **kwargs):
    """Attention over the one-row layout of `_one_row_after_shared_prompt`: (1, heads, P + R, d) tensors holding
    the shared prompt's P positions, then the R positions that run of B rows of S (`index`: where they lie in
    the rows, None when all of them run). The prompt attends causally to itself; each row to the whole prompt
    and causally to its own real tokens. Rows are laid out (B, heads, S, d) for that, skipped positions zero.
    Returns (1, P + R, heads, d), as transformers' attention functions do."""
    prompt, rows, allowed, index = tuneforge_shared_prompt
    heads, dim = query.shape[1], query.shape[3]
    width = allowed.shape[-2]
    gqa = heads != key.shape[1]

    def split(t):  # (1, h, P + R, d) -> (1, h, P, d), (B, h, S, d)
        rest = t[0, :, prompt:]
        if index is not None:
            rest = rest.new_zeros(rest.shape[0], rows * width, rest.shape[2]).index_copy(1, index, rest)
        return t[:, :, :prompt], rest.unflatten(1, (rows, width)).transpose(0, 1)

    (q0, q1), (k0, k1), (v0, v1) = split(query), split(key), split(value)
    head = F.scaled_dot_product_attention(q0, k0, v0, is_causal=True, scale=scaling, enable_gqa=gqa)
    keys = torch.cat([k0.expand(rows, -1, -1, -1), k1], dim=2)
    values = torch.cat([v0.expand(rows, -1, -1, -1), v1], dim=2)
    tail = F.scaled_dot_product_attention(q1, keys, values, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
    tail = tail.transpose(1, 2).reshape(rows * width, heads, dim)
    if index is not None:
        tail = tail.index_select(0, index)
    return torch.cat([head[0].transpose(0, 1), tail])[None], None


def _register_shared_prompt_attention() -> None:
    from transformers import AttentionInterface

    if SHARED_PROMPT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SHARED_PROMPT_ATTENTION, _shared_prompt_attention)


def _one_row_after_shared_prompt(length: int, inputs: dict, labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The batch as one row: the shared `length` tokens once, then every row's remaining real tokens (padding
    does not run), with each row's positions continuing the prompt's and the attention layout
    (`_shared_prompt_attention`). Position-wise layers, most of the work, see the prompt once and no padding;
    the labels follow the same layout (the position before each row's part predicts nothing: the part's first
    token is never supervised)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows, total = ids.shape
    width, device = total - length, ids.device
    real = mask[:, length:].bool()
    runs = real.reshape(-1)
    index = None if bool(runs.all()) else runs.nonzero().squeeze(1)

    def rest(t):  # (B, T) -> the positions that run after the prompt, row after row
        t = t[:, length:].reshape(-1)
        return t if index is None else t[index]

    steps = torch.arange(total, device=device)
    flat = torch.cat([ids[0, :length], rest(ids)])[None]
    positions = torch.cat([steps[:length], rest(steps.expand(rows, -1))])[None]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = torch.cat([torch.ones(rows, width, length, dtype=torch.bool, device=device),
                         causal[None] & real[:, None, :]], dim=2)[:, None]  # (B, 1, S, P + S)
    flat_labels = torch.cat([labels.new_full((length,), IGNORE), rest(labels)])[None]
    return {"input_ids": flat, "position_ids": positions, "use_cache": False,
            "tuneforge_shared_prompt": (length, rows, allowed, index)}, flat_labels


@contextlib.contextmanager
def _attention_implementation(model: nn.Module, name: str):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    before = config._attn_implementation_internal
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = before


def supervised_loss_sum(model: nn.Module, labels: torch.Tensor, shared: int | None = None,
                        **inputs) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the supervised next tokens and how many there are. Where the output layer does not
    train (`frozen_plain_head`) and gradients are wanted, the loss comes from the single-pass
    `head_cross_entropy`, with the last layer's position-wise parts computed at the supervised positions only
    (`last_layer_sees_only`); otherwise from the logits at the supervised positions. A prompt that every row of
    the batch starts with runs once (`shared`: its length, `shared_prefix_length` when not given)."""
    shared = shared_prefix_length(model, labels, inputs) if shared is None else shared
    layout = contextlib.nullcontext()
    if shared:
        _register_shared_prompt_attention()
        inputs, labels = _one_row_after_shared_prompt(shared, inputs, labels)
        layout = _attention_implementation(model, SHARED_PROMPT_ATTENTION)
    else:
        inputs = {**inputs, "use_cache": False}
    keep = next_token_mask(labels)
    targets = next_token_targets(labels, keep)
    plain = frozen_plain_head(model) if torch.is_grad_enabled() else None
    if plain is None:
        with layout, head_sees_only(model, keep):
            logits = model(**inputs).logits
        return causal_lm_loss_sum(logits, targets), targets.numel()
    weight, cap = plain
    with layout, head_skipped(model, keep) as seen, last_layer_sees_only(model, keep):
        model(**inputs)
    return head_cross_entropy(seen[-1], weight, targets, cap), targets.numel()


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
