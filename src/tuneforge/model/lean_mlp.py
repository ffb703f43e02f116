"""Gated MLPs and decoder layers that keep less for backpropagation, with bitwise the same gradients.

A Llama-style MLP computes down(act(gate(x)) * up(x)). Autograd keeps four tensors of the intermediate width per
token for it: gate(x) (for act's gradient), act(gate(x)) and up(x) (for the product's), and the product (the input
of down's adapter or weight). Both act(gate(x)) and the product are cheap to compute again from gate(x) and up(x)
(two elementwise passes, no matrix product), so `GatedProduct` keeps gate(x) and up(x) only and recomputes the
activation in its backward pass with the same kernels autograd would use, and the tensor that down_proj saves is
packed as a recipe (saved-tensor hooks) and recomputed when down's backward asks for it. The gradients are bitwise
the same, and half of the MLP's saved activations (for SmolLM2-135M LoRA, about a third of all the activations
training keeps) is not held. Applied while training to the MLP classes listed in `LEAN_MLPS` whose activation is
SiLU or tanh-approximated GELU; other models (and MLPs replaced by other kernels, such as Liger's) are left as they
are.

`lean_norms` does the same for the RMSNorms of those models' decoder layers: the projections after a norm keep its
output, which the norm's input (kept by the norm itself) gives again, so a layer-wide scope packs the output as a
recipe and the backward pass recomputes it (once, however many projections saved it). For float32 norms of the
two known forms (Llama's `weight * x * r` and Gemma's `x * r * (1 + weight)`, r = rsqrt(mean(x^2) + eps)) the norm
also runs as one autograd step (`ScaledNorm`): the same forward bits, the output recomputed from the kept r with
two passes, and a backward pass of five passes over the activations where autograd's chain of seven steps takes
about nine; its gradients equal autograd's up to rounding (float32 sums in another order), not bit for bit.

Under gradient checkpointing (or any other saved-tensor hooks already in force) nothing is packed as a recipe:
those hooks decide what is kept.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
import weakref

import torch
import torch.nn.functional as F

# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
LEAN_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP", "Olmo2MLP",
             "Olmo3MLP", "GraniteMLP", "CohereMLP", "Ministral3MLP", "SmolLM3MLP"}


class GatedProduct(torch.autograd.Function):
    """act(gate) * up, keeping gate and up only. `shared` is a list into which the recomputed product's recipe
    puts act(gate) when it runs first (down_proj's backward comes before this one), so that the activation is
    computed once; the gradients are written over temporaries the backward pass owns."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kind: str, shared: list | None = None) -> torch.Tensor:
        ctx.kind, ctx.shared = kind, shared
        ctx.save_for_backward(gate, up)
        return _act(gate, kind) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        act = ctx.shared.pop() if ctx.shared else None
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = act.mul_(grad) if act is not None else grad * _act(gate, ctx.kind)
        if ctx.needs_input_grad[0]:
            grad_act = grad * up
            if ctx.kind == "silu":
                grad_gate = torch.ops.aten.silu_backward.grad_input(grad_act, gate, grad_input=grad_act)
            else:
                grad_gate = torch.ops.aten.gelu_backward.grad_input(grad_act, gate, approximate="tanh",
                                                                    grad_input=grad_act)
        return grad_gate, grad_up, None, None


class ScaledNorm(torch.autograd.Function):
    """x * r * scale with r = rsqrt(mean(x^2, last axis) + eps), float32: an RMSNorm whose scale is its weight
    (Llama) or 1 + weight (Gemma). Keeps x, scale and r (one number per token); `kept` receives r for the
    recipe that recomputes the output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, eps: float, kept: list | None = None) -> torch.Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # the models' own steps: the same bits
        ctx.save_for_backward(x, scale, r)
        if kept is not None:
            kept.append(r)
        return _scaled(x, r, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale, r = ctx.saved_tensors
        grad_x = grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * (x * r)).reshape(-1, x.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            # d(x r)/dx applied to u = grad * scale: r u - x r^3 mean(u x)
            u = grad * scale
            coef = (u * x).sum(-1, keepdim=True).mul_(r.pow(3)).div_(x.shape[-1])
            grad_x = u.mul_(r).addcmul_(x, coef, value=-1)
        return grad_x, grad_scale, None, None


def _scaled(x: torch.Tensor, r: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The norm's output from its input and r: ScaledNorm's forward and the recipe that recomputes it."""
    return (x * r).mul_(scale)


# RMSNorm classes whose forward is, for float32 input and weight, weight * (x * r) (eps `variance_epsilon`) or
# (x * r) * (1 + weight) (eps `eps`); checked against each class's own forward in tests/unit/model/test_lean_mlp.py
SCALED_NORMS = {name + "RMSNorm": "weight" for name in ("Llama", "Mistral", "Qwen2", "Qwen3", "Granite", "SmolLM3",
                                                         "Ministral3", "Olmo2", "Olmo3")}
SCALED_NORMS.update({name + "RMSNorm": "one_plus_weight" for name in ("Gemma", "Gemma2", "Gemma3")})


def _norm_scale(norm) -> tuple[torch.Tensor, float] | None:
    """The scale and eps with which ScaledNorm computes this norm exactly, or None to run its own forward."""
    form = SCALED_NORMS.get(type(norm).__name__)
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon" if form == "weight" else "eps", None)
    if form is None or not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or \
            not isinstance(eps, float):
        return None
    return (weight if form == "weight" else 1.0 + weight), eps


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


class _Recipe:
    """How to compute a tensor again from tensors autograd keeps anyway; computed once per backward pass, however
    many saved views stand for it, and dropped with the last of them."""

    __slots__ = ("fn", "args", "value", "__weakref__")

    def __init__(self, fn, args):
        self.fn, self.args, self.value = fn, args, None

    def tensor(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn(*self.args)
        return self.value


class _Packed:
    """A saved tensor (or view) that a recipe stands for: the recipe and the view's geometry."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _Recipe, saved: torch.Tensor):
        self.recipe, self.size, self.stride = recipe, saved.size(), saved.stride()
        self.offset = saved.storage_offset()

    def tensor(self) -> torch.Tensor:
        return self.recipe.tensor().as_strided(self.size, self.stride, self.offset)


def observing(pack):
    """Marks a saved-tensor pack hook that only looks at the tensors it is given and keeps them as they are (a
    measurement): lean modules still recompute under it, and pass it every other tensor."""
    pack.observes_only = True
    return pack


_scopes = threading.local()


class _Scope:
    """Saved-tensor hooks that pack a registered tensor (found by its storage) as its recipe. The registry is
    emptied when the scope closes: autograd keeps both hooks with every tensor they packed, so they must not hold
    a registered tensor or its inputs after the forward pass."""

    def __init__(self, outer):
        entries: dict[int, tuple] = {}
        outer_pack, outer_unpack = outer or (lambda t: t, lambda t: t)

        def pack(saved: torch.Tensor):
            try:
                storage = saved.untyped_storage()
                entry = entries.get(storage.data_ptr())
            except (RuntimeError, NotImplementedError):  # tensors without a plain storage
                entry = None
            if entry is not None:
                ref, nbytes, recipe = entry
                live = ref()  # alive, so its storage has not been freed and reused by another tensor
                if live is not None and storage.nbytes() == nbytes and saved.dtype == live.dtype and \
                        saved.device == live.device:
                    return _Packed(recipe, saved)
            return outer_pack(saved)

        def unpack(packed):
            return packed.tensor() if isinstance(packed, _Packed) else outer_unpack(packed)

        self.entries, self.hooks = entries, torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def register(self, tensor: torch.Tensor, fn, *args) -> None:
        storage = tensor.untyped_storage()
        self.entries[storage.data_ptr()] = (weakref.ref(tensor), storage.nbytes(), _Recipe(fn, args))

    def __enter__(self):
        self.hooks.__enter__()
        stack = getattr(_scopes, "stack", None) or []
        _scopes.stack = stack + [self]
        return self

    def __exit__(self, *exc):
        _scopes.stack = _scopes.stack[:-1]
        self.entries.clear()
        return self.hooks.__exit__(*exc)


def _open_scope(needs_grad: bool) -> _Scope | None:
    """A new scope, or None where nothing is kept for backward or other hooks (gradient checkpointing, offloading)
    decide what is kept."""
    if not needs_grad or torch.compiler.is_compiling():  # torch.compile traces its own graph
        return None
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if outer is not None and not getattr(outer[0], "observes_only", False):
        return None
    return _Scope(outer)


def _current_scope() -> _Scope | None:
    stack = getattr(_scopes, "stack", None)
    if not stack or torch.compiler.is_compiling():
        return None
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return stack[-1] if top is not None and top[0] is stack[-1].hooks.pack_hook else None


def _product(gate, up, kind, shared: list):
    act = _act(gate, kind)
    shared.append(act)  # for GatedProduct's backward
    return act * up


def _lean_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    scope = _current_scope() if torch.is_grad_enabled() else None  # the decoder layer's
    own = _open_scope(torch.is_grad_enabled()) if scope is None else None
    shared = [] if scope or own else None
    product = GatedProduct.apply(gate, up, self._lean_kind, shared)
    with own or contextlib.nullcontext():
        if scope or own:
            (scope or own).register(product, _product, gate.detach(), up.detach(), self._lean_kind, shared)
        return self.down_proj(product)


def _lean_norm_forward(self, x):
    scope = _current_scope() if torch.is_grad_enabled() else None
    fused = _norm_scale(self) if x.dtype == torch.float32 and torch.is_grad_enabled() else None
    if fused is None:
        out = type(self).forward(self, x)
        if scope is not None:  # the input may need no gradient (frozen embeddings) while an adapter keeps the output
            scope.register(out, functools.partial(type(self).forward, self), x.detach())
        return out
    scale, eps = fused
    kept = [] if scope is not None else None
    out = ScaledNorm.apply(x, scale, eps, kept)
    if scope is not None:
        scope.register(out, _scaled, x.detach(), kept[0], scale.detach())
    return out


def _scoped_layer_forward(self, *args, **kwargs):
    scope = _open_scope(torch.is_grad_enabled())
    if scope is None:
        return self._lean_inner_forward(*args, **kwargs)
    with scope:
        return self._lean_inner_forward(*args, **kwargs)


def lean_norms(model) -> int:
    """Make the decoder layers of the model types in `lean_mlp.LEAN_MLPS`'s families recompute their RMSNorms'
    outputs (the projections' inputs) in the backward pass instead of keeping them, float32 norms of the known forms
    as one fused step (`ScaledNorm`); returns how many layers were changed. Not for weights sharded across
    processes (DeepSpeed ZeRO-3, FSDP): the norm's weight must be whole when backward recomputes."""
    changed = 0
    for layer in model.modules():
        name = type(layer).__name__
        if not name.endswith("DecoderLayer") or name.replace("DecoderLayer", "MLP") not in LEAN_MLPS:
            continue
        norms = [child for child_name, child in layer.named_children()
                 if child_name.endswith("layernorm") and type(child).__name__.endswith("RMSNorm")]
        if not norms:
            continue
        for norm in norms:
            norm.forward = types.MethodType(_lean_norm_forward, norm)
        layer._lean_inner_forward = layer.forward
        layer.forward = types.MethodType(_scoped_layer_forward, layer)
        changed += 1
    return changed


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
