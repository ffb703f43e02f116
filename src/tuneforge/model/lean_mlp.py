"""Gated MLPs that keep one tensor less for backpropagation.

A Llama-style MLP computes down(act(gate(x)) * up(x)). Autograd keeps four tensors of the intermediate width per
token for it: gate(x) (for act's gradient), act(gate(x)) and up(x) (for the product's), and the product (the input
of down's adapter or weight). act(gate(x)) is cheap to compute again from gate(x), so `GatedProduct` keeps gate(x)
and up(x) and recomputes the activation in the backward pass with the same kernels autograd would use: the
gradients are bitwise the same, and a quarter of the MLP's saved activations (for SmolLM2-135M, 15% of all the
activations training keeps) is not held. Applied while training to the MLP classes listed in `LEAN_MLPS` whose
activation is SiLU or tanh-approximated GELU; other models (and MLPs replaced by other kernels, such as Liger's)
are left as they are.
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


def _lean_forward(self, x):
    return self.down_proj(GatedProduct.apply(self.gate_proj(x), self.up_proj(x), self._lean_kind))


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
