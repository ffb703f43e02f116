"""Mixture-of-Depths (Raposo et al. 2024): chosen decoder layers process only the top `capacity` share of tokens.

In a routed layer a linear router scores every token; the top k = max(1, int(capacity * T)) tokens of each
sequence run through the layer (kept in their original order, so causal attention among them stays causal) and
all others skip it unchanged. A processed token gets `h + sigmoid(score) * (layer(h) - h)`: the layer's residual
update scaled by the router weight, which is what gives the router a gradient.

Contracts and limits:
- Top-k over the sequence is non-causal: whether a token is processed depends on the scores of later tokens.
  The paper's remedy (a small causal predictor trained to imitate the top-k decision) is not implemented, so a
  model routes a sequence the same way only when it sees the whole sequence at once.
- No KV cache: skipped tokens leave no cache entries, so cached decoding cannot route consistently. Conversion
  sets `use_cache=False` in the config and generation config, and a routed layer given a cache raises ModelError;
  generate with `use_cache=False` (each step re-runs the full sequence, routed as in training).
- Padding counts as tokens: k is taken from the padded length and padding may be selected, so a padded row is
  routed like its unpadded self only at capacity 1.0. Rows without padding are unaffected by their batch.
- Layers keep their parameter names (the router is a submodule `mod_router` of the layer, and the layer's class
  becomes a subclass with a routed forward), so a plain `from_pretrained` of a saved model loads every original
  weight; `load_mixture_of_depths` then re-converts it from `config.tuneforge_mixture_of_depths` and loads routers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import ConfigError, ModelError

CONFIG_KEY = "tuneforge_mixture_of_depths"
ROUTER = "mod_router"
# model_type -> these share the call `layer(hidden, attention_mask=, position_ids=, position_embeddings=(cos, sin),
# cache=, ...)` in transformers 5.x; gemma3_text is Gemma3ForCausalLM (the multimodal `gemma3` nests its layers).
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


class RoutedLayer(nn.Module):
    """Mixin placed before a decoder layer's own class; `forward` routes, `super().forward` is the layer."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ModelError("a Mixture-of-Depths layer got a KV cache; skipped tokens have no cache entries, so "
                             "these models run and generate with use_cache=False")
        _, seq, dim = hidden_states.shape  # (B, T, D)
        scores = getattr(self, ROUTER)(hidden_states).squeeze(-1)  # (B, T)
        k = max(1, int(self.mod_capacity * seq))
        idx = scores.topk(k, dim=1).indices.sort(dim=1).values  # (B, k), ascending keeps causal order
        kwargs["attention_mask"] = _gather_mask(kwargs.get("attention_mask"), idx, seq)
        for name in ("position_ids", "position_embeddings"):
            kwargs[name] = _gather_tokens(kwargs.get(name), idx, seq)
        picked = _gather_tokens(hidden_states, idx, seq)  # (B, k, D)
        out = super().forward(picked, **kwargs)
        out = out[0] if isinstance(out, tuple) else out  # older layers returned (hidden, ...)
        weight = torch.sigmoid(scores.gather(1, idx)).unsqueeze(-1).to(out.dtype)  # (B, k, 1)
        routed = picked + weight * (out - picked)  # (B, k, D)
        return hidden_states.scatter(1, idx.unsqueeze(-1).expand(-1, -1, dim), routed)  # (B, T, D)


def _gather_tokens(x, idx: torch.Tensor, seq: int):
    """Take the selected tokens from a (B or 1, T, ...) tensor, or from each tensor of a tuple (cos, sin)."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(_gather_tokens(t, idx, seq) for t in x)
    if x.dim() < 2 or x.shape[1] != seq:
        raise ModelError(f"Mixture-of-Depths cannot select tokens from a tensor of shape {tuple(x.shape)}; "
                         f"expected (batch, {seq}, ...)")
    x = x.expand(idx.shape[0], *x.shape[1:])  # position ids / rotary tables come with batch 1
    return x.gather(1, idx.view(*idx.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


def _gather_mask(mask, idx: torch.Tensor, seq: int):
    """(B, H, T, T) -> (B, H, k, k): selected queries against selected keys; a 2-D padding mask (B, T) -> (B, k)."""
    if mask is None or (torch.is_tensor(mask) and mask.dim() == 2):
        return _gather_tokens(mask, idx, seq)
    if not torch.is_tensor(mask) or mask.dim() != 4 or mask.shape[-1] != seq:
        raise ModelError(f"Mixture-of-Depths needs a 4-D (batch, heads, {seq}, {seq}) attention mask or none; got "
                         f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}. hint: load the model with "
                         f"attn_implementation='sdpa' or 'eager'")
    b, k = idx.shape
    mask = mask.expand(b, *mask.shape[1:])
    rows = mask.gather(2, idx[:, None, :, None].expand(-1, mask.shape[1], -1, seq))  # (B, H, k, T)
    return rows.gather(3, idx[:, None, None, :].expand(-1, mask.shape[1], k, -1))  # (B, H, k, k)


def apply_mixture_of_depths(model: nn.Module, capacity: float, layers: list[int] | None = None) -> list[int]:
    """Route the given decoder layers (default 1, 3, 5, ...) in place; returns the routed layer indices and
    records them with the capacity in `model.config` so a saved model can be re-converted on load."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ConfigError(f"Mixture-of-Depths: model type {model_type!r} is not supported; "
                          f"supported: {', '.join(SUPPORTED)}")
    stack = model.get_decoder().layers
    chosen = list(range(1, len(stack), 2)) if layers is None else list(layers)
    problems = []
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not 0 < capacity <= 1:
        problems.append(f"capacity is {capacity!r}; expected a share of tokens in (0, 1], e.g. 0.125 or 0.5")
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(stack)]
    if bad:
        problems.append(f"layers {bad} do not exist; the model has {len(stack)} layers (0..{len(stack) - 1})")
    if not chosen or len(set(chosen)) != len(chosen):
        problems.append(f"layers is {chosen}; expected distinct layer indices, at least one")
    done = [i for i in chosen if i not in bad and isinstance(stack[i], RoutedLayer)]
    if done:
        problems.append(f"layers {done} are already routed")
    if problems:
        raise ConfigError(*[f"Mixture-of-Depths: {p}" for p in problems])
    for i in sorted(chosen):
        _route(stack[i], model.config.hidden_size, float(capacity), getattr(model.config, "initializer_range", 0.02))
    setattr(model.config, CONFIG_KEY, {"capacity": float(capacity), "layers": sorted(chosen)})
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = False
    return sorted(chosen)


_ROUTED_CLASSES: dict[type, type] = {}


def _route(layer: nn.Module, hidden: int, capacity: float, std: float) -> None:
    base = type(layer)
    if base not in _ROUTED_CLASSES:  # one subclass per layer class, so isinstance checks and hooks still match
        _ROUTED_CLASSES[base] = type(f"Routed{base.__name__}", (RoutedLayer, base), {"__module__": __name__})
    ref = next(layer.parameters())
    router = nn.Linear(hidden, 1, bias=False, device=ref.device, dtype=ref.dtype)
    # Small random weights, not zeros: every token starts near sigmoid 0.5 (none saturated, all get gradient), and
    # top-k is decided by content from the first step rather than by topk's tie order (a fixed position pattern).
    nn.init.normal_(router.weight, std=std)
    layer.add_module(ROUTER, router)
    layer.mod_capacity = capacity
    layer.__class__ = _ROUTED_CLASSES[base]


def load_mixture_of_depths(model: nn.Module, folder: str | Path) -> list[int]:
    """Re-convert a model loaded from `folder` if its config records a conversion, and load the routers' weights
    from the folder's safetensors files; returns the routed layer indices, [] for a plain model."""
    from safetensors import safe_open

    entry = getattr(model.config, CONFIG_KEY, None)
    if not entry:
        return []
    layers = apply_mixture_of_depths(model, entry["capacity"], entry["layers"])
    wanted = {name: p for name, p in model.named_parameters() if f".{ROUTER}." in name}
    found = set()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in wanted.keys() & set(f.keys()):
                with torch.no_grad():
                    wanted[name].copy_(f.get_tensor(name))
                found.add(name)
    if missing := sorted(wanted.keys() - found):
        raise ModelError(f"{folder}: config.json records Mixture-of-Depths layers {layers} but the safetensors "
                         f"files lack the router weights {missing}; save the converted model with save_pretrained")
    return layers
