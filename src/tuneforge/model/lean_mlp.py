"""Gated MLPs that keep two tensors less for backpropagation.

A Llama-style MLP computes down(act(gate(x)) * up(x)). Autograd keeps four tensors of the intermediate width per
token for it: gate(x) (for act's gradient), act(gate(x)) and up(x) (for the product's), and the product (the input
of down's adapter or weight). Both act(gate(x)) and the product are cheap to compute again from gate(x) and up(x)
(two elementwise passes, no matrix product), so `GatedProduct` keeps gate(x) and up(x) only and recomputes the
activation in its backward pass with the same kernels autograd would use, and the tensor that down_proj saves is
packed as a recipe (saved-tensor hooks) and recomputed when down's backward asks for it. The gradients are bitwise
the same, and half of the MLP's saved activations (for SmolLM2-135M LoRA, about a third of all the activations
training keeps) is not held. Applied while training to the MLP classes listed in `LEAN_MLPS` whose activation is
SiLU or tanh-approximated GELU; other models (and MLPs replaced by other kernels, such as Liger's) are left as they
are. Under gradient checkpointing (or any other saved-tensor hooks already in force) the product is saved as usual:
those hooks decide what is kept.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
LEAN_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP", "Olmo2MLP",
             "Olmo3MLP", "GraniteMLP", "CohereMLP", "Ministral3MLP", "SmolLM3MLP"}


class GatedProduct(torch.autograd.Function):
    """act(gate) * up, keeping gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
        ctx.kind = kind
        ctx.save_for_backward(gate, up)
        return _act(gate, kind) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad * _act(gate, ctx.kind)
        if ctx.needs_input_grad[0]:
            grad_act = grad * up
            if ctx.kind == "silu":
                grad_gate = torch.ops.aten.silu_backward(grad_act, gate)
            else:
                grad_gate = torch.ops.aten.gelu_backward(grad_act, gate, approximate="tanh")
        return grad_gate, grad_up, None


def _act(x: torch.Tensor, kind: str) -> torch.Tensor:
    return F.silu(x) if kind == "silu" else F.gelu(x, approximate="tanh")


def activation_kind(act) -> str | None:
    """'silu' or 'gelu_tanh' for the activation modules whose arithmetic GatedProduct repeats exactly, else None."""
    if isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return "silu"
    inner = getattr(act, "act", None)
    if type(act).__name__ in ("GELUTanh", "PytorchGELUTanh") and isinstance(inner, functools.partial) and \
            inner.func is F.gelu and inner.keywords == {"approximate": "tanh"}:
        return "gelu_tanh"
    return None


class _RecomputedProduct:
    """Stands for the product (or a view of it) in down_proj's saved tensors: gate and up, which GatedProduct keeps
    anyway, and the view's geometry."""

    __slots__ = ("gate", "up", "kind", "size", "stride", "offset")

    def __init__(self, gate, up, kind, saved: torch.Tensor):
        self.gate, self.up, self.kind = gate, up, kind
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()

    def tensor(self) -> torch.Tensor:
        return (_act(self.gate, self.kind) * self.up).as_strided(self.size, self.stride, self.offset)


def observing(pack):
    """Marks a saved-tensor pack hook that only looks at the tensors it is given and keeps them as they are (a
    measurement): lean MLPs still recompute their product under it, and pass it every other tensor."""
    pack.observes_only = True
    return pack


def _recompute_hooks(gate: torch.Tensor, up: torch.Tensor, kind: str, product: torch.Tensor, outer):
    # autograd keeps both hooks with every tensor they packed: they must not hold the product itself
    storage = product.untyped_storage()
    pointer, nbytes, dtype, device = storage.data_ptr(), storage.nbytes(), product.dtype, product.device
    outer_pack, outer_unpack = outer or (lambda t: t, lambda t: t)

    def pack(saved: torch.Tensor):
        if saved.dtype == dtype and saved.device == device:
            other = saved.untyped_storage()
            if other.data_ptr() == pointer and other.nbytes() == nbytes:
                return _RecomputedProduct(gate, up, kind, saved)
        return outer_pack(saved)

    def unpack(packed):
        return packed.tensor() if isinstance(packed, _RecomputedProduct) else outer_unpack(packed)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _lean_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = GatedProduct.apply(gate, up, self._lean_kind)
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if not product.requires_grad or (outer is not None and not getattr(outer[0], "observes_only", False)):
        return self.down_proj(product)  # checkpointing or offloading hooks decide what is kept
    with _recompute_hooks(gate.detach(), up.detach(), self._lean_kind, product, outer):
        return self.down_proj(product)


def lean_mlps(model) -> int:
    """Make the model's known gated MLPs keep gate and up only; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ not in LEAN_MLPS or not all(
                hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        kind = activation_kind(module.act_fn)
        if kind is None:
            continue
        module._lean_kind = kind
        module.forward = types.MethodType(_lean_forward, module)
        changed += 1
    return changed
