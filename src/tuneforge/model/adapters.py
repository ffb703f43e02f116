"""Decide which weights train: LoRA adapters (PEFT), some layers (freeze), or everything (full)."""

from __future__ import annotations

import importlib.util
import types
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from tuneforge.config.schema import FreezeAdapter, FullAdapter, LlamaProAdapter, LoraAdapter
from tuneforge.errors import ConfigError, ModelError


@dataclass
class ParamCount:
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100 * self.trainable / max(self.total, 1)
        return f"trainable params {self.trainable:,} / {self.total:,} ({share:.2f}%)"


def count_params(model: nn.Module) -> ParamCount:
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParamCount(trainable, total)


def apply_adapter(model: nn.Module, adapter: LoraAdapter | FreezeAdapter | FullAdapter | LlamaProAdapter,
                  head: str | None = None, new_token_ids: list[int] = ()) -> nn.Module:
    """Set requires_grad (and wrap with PEFT for LoRA); returns the model to train. `head` names a new output
    layer (a reward model's `score`) that always trains in full. `new_token_ids`: rows of tokens added to the
    vocabulary, which must learn (LoRA trains those rows only; freeze trains the embedding matrices)."""
    if isinstance(adapter, LoraAdapter):
        return _apply_lora(model, adapter, head, list(new_token_ids))
    if isinstance(adapter, (FreezeAdapter, LlamaProAdapter)):
        _apply_freeze(model, adapter) if isinstance(adapter, FreezeAdapter) else _apply_llama_pro(model, adapter)
        if head:
            getattr(model, head).requires_grad_(True)
        if new_token_ids:
            for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
                if layer is not None:  # a reward model has a score head instead of an output embedding
                    layer.requires_grad_(True)
        return model
    model.requires_grad_(True)
    return model


def _apply_lora(model: nn.Module, adapter: LoraAdapter, head: str | None = None,
                new_token_ids: list[int] = ()) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if adapter.target_modules == "all" else adapter.target_modules
    if targets != "all-linear":
        linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        missing = [t for t in targets if t not in linear_names]
        if missing:
            raise ConfigError(f"method.adapter.target_modules: {missing} are not linear layers of this model; "
                              f"it has {sorted(linear_names)} (or use `all`)")
    layers = None
    if adapter.last_layers:
        prefix, stack = decoder_layers(model)
        if adapter.last_layers > len(stack):
            raise ConfigError(f"method.adapter.last_layers: {adapter.last_layers} but the model has {len(stack)} layers")
        layers = list(range(len(stack) - adapter.last_layers, len(stack)))
        if targets == "all-linear":  # PEFT takes a layer range only with explicit module names
            targets = sorted({n.rsplit(".", 1)[-1] for n, m in stack.named_modules() if isinstance(m, nn.Linear)})
    to_save = list(adapter.modules_to_save) + ([head] if head else [])
    if targets == "all-linear" and head:  # the head is trained in full, not adapted
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, nn.Linear) and n.split(".")[0] not in (head, "lm_head")})
    loftq = None
    if adapter.init == "loftq":
        from peft import LoftQConfig

        loftq = LoftQConfig(loftq_bits=adapter.loftq_bits, loftq_iter=adapter.loftq_iter)
    config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                        target_modules=targets, modules_to_save=to_save or None,
                        layers_to_transform=layers, layers_pattern=prefix.rsplit(".", 1)[-1] if layers else None,
                        use_dora=adapter.dora, use_rslora=adapter.rslora,
                        init_lora_weights=True if adapter.init == "default" else adapter.init, loftq_config=loftq or {},
                        trainable_token_indices=list(new_token_ids) or None,
                        task_type="SEQ_CLS" if head else "CAUSAL_LM")
    return get_peft_model(model, config)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the largest ModuleList in the model, with its qualified name."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError("method.adapter: freeze needs a model with a list of decoder layers; this model has none")
    return max(lists, key=lambda item: len(item[1]))


def _apply_freeze(model: nn.Module, adapter: FreezeAdapter) -> None:
    prefix, layers = decoder_layers(model)
    n = len(layers)
    if abs(adapter.trainable_layers) > n:
        raise ConfigError(f"method.adapter.trainable_layers: {adapter.trainable_layers} but the model has {n} layers")
    chosen = range(n - adapter.trainable_layers, n) if adapter.trainable_layers > 0 else range(-adapter.trainable_layers)
    model.requires_grad_(False)
    wanted = adapter.trainable_modules
    matched_modules = set()
    for i in chosen:
        for name, p in layers[i].named_parameters():
            parts = name.split(".")
            hit = wanted == "all" or any(w in parts for w in wanted)
            if hit:
                p.requires_grad_(True)
                matched_modules.update(w for w in (wanted if wanted != "all" else []) if w in parts)
    if wanted != "all" and set(wanted) - matched_modules:
        names = sorted({n.split(".")[0] for n, _ in layers[0].named_parameters()} |
                       {c for n, _ in layers[0].named_parameters() for c in n.split(".")[:2]})
        raise ConfigError(f"method.adapter.trainable_modules: {sorted(set(wanted) - matched_modules)} match nothing "
                          f"in the decoder layers ({prefix}.N); their submodules are {names}")
    _train_extra_modules(model, adapter.extra_modules)


def _apply_llama_pro(model: nn.Module, adapter: LlamaProAdapter) -> None:
    from tuneforge.model.expand import apply_block_expansion

    new = apply_block_expansion(model, adapter.new_layers)
    model.requires_grad_(False)
    _, layers = decoder_layers(model)
    for i in new:
        layers[i].requires_grad_(True)
    _train_extra_modules(model, adapter.extra_modules)


def _train_extra_modules(model: nn.Module, names: list[str]) -> None:
    for extra in names:
        params = [p for name, p in model.named_parameters() if extra in name.split(".")]
        if not params:
            raise ConfigError(f"method.adapter.extra_modules: {extra!r} matches no module outside the layers")
        for p in params:
            p.requires_grad_(True)


def upcast_trainable(model: nn.Module) -> None:
    """Mixed precision keeps half-precision weights frozen and trainable ones in float32 for stable updates."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def column_major_lora_up(model: nn.Module) -> int:
    """Store each LoRA B matrix (out x rank) column-major, the same values in another memory layout. Autograd
    computes a weight's gradient in the weight's own layout: for a row-major B that is grad_out^T @ h, an
    (out x tokens) @ (tokens x rank) product that the CPU's BLAS runs at a few GFLOP/s (5.8 ms for Gemma 3's gate
    projection at 1,176 tokens); column-major it is h^T @ grad_out, transposed (0.63 ms). Gemma 3 LoRA's forward
    and backward ran 8% faster. Returns how many matrices changed layout."""
    changed = 0
    for module in model.modules():
        ups = getattr(module, "lora_B", None)
        if not isinstance(ups, nn.ModuleDict):
            continue
        for up in ups.values():
            w = getattr(up, "weight", None)
            if isinstance(up, nn.Linear) and w is not None and w.dim() == 2 and w.is_contiguous():
                up.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
                changed += 1
    return changed


def sparse_tied_embedding_grads(model: nn.Module) -> bool:
    """When the input embedding trains and shares its weight with the output layer (Gemma 3, SmolLM2, Qwen2.5 up
    to 3B), let the lookup's gradient be sparse: it then adds its few rows into the dense gradient the output
    layer already made, instead of first building a dense (vocabulary x hidden) gradient of its own (671 MB for
    Gemma 3) to add in. The same gradient values; Gemma 3 full training (240 rows) peaked at 6.53-6.73 GiB instead
    of 7.11. A gradient left sparse (a batch where the output layer contributed none) is made dense as it lands, so
    the optimizer and gradient clipping see dense gradients as before. One process only (DistributedDataParallel
    treats a sparse embedding's gradient differently); returns whether it applied."""
    from tuneforge.ranks import world_size

    try:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    except (NotImplementedError, AttributeError):  # a model class that does not say where its embeddings are
        return False
    weight = getattr(emb, "weight", None)
    if (world_size() > 1 or not isinstance(emb, nn.Embedding) or head is None or weight is None
            or getattr(head, "weight", None) is not weight or not weight.requires_grad or emb.sparse
            or emb.max_norm is not None):
        return False
    emb.sparse = True

    def dense(param: torch.Tensor) -> None:
        if param.grad is not None and param.grad.is_sparse:
            param.grad = param.grad.to_dense()

    weight.register_post_accumulate_grad_hook(dense)
    return True


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA Linear forward, base(x) + B(A(dropout(x))) * scaling, with the adapter's product added into
    the base projection's output in place by one matrix product (addmm_): no (tokens x out) temporaries for the
    product, its scaling and the sum, in forward or backward. Anything else (merged or disabled adapters, several
    active adapters, DoRA and other variants, per-call adapter names, autocast, hooks on the base layer) takes
    PEFT's own path."""
    base = self.base_layer
    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] in self.lora_variant
            or active[0] not in self.lora_A or type(base) is not nn.Linear or base._forward_hooks
            or base._forward_pre_hooks or torch.is_autocast_enabled(x.device.type)):
        return self._peft_forward(x, *args, **kwargs)
    name = active[0]
    up = self.lora_B[name]
    if x.dtype != up.weight.dtype or base.weight.dtype != x.dtype:
        return self._peft_forward(x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    out = base(flat)  # a fresh (tokens x out) tensor that nothing keeps for backward
    group = self.__dict__.get("_shared_input")
    down = group.down(self, name, x, flat) if group is not None else None
    if down is None:
        down = self.lora_A[name](self.lora_dropout[name](flat))
    out.addmm_(down, up.weight.t(), alpha=self.scaling[name])
    return out.view(*x.shape[:-1], out.shape[-1])


class _SharedInput:
    """LoRA layers of one block that read the same input (an attention's query, key and value projections; an
    MLP's gate and up projections). The first of them called computes every member's down-projection A(x) in
    one product with the members' A matrices stacked, and each member takes its columns: one pass over x and
    one product (and, backward, one for A's gradient and one for x's) instead of one per member; the products
    of rank-8 matrices are too small to run fast alone. Only without LoRA dropout (each member would draw its
    own mask) and for the same tensor x (same object, unchanged since): a member called on anything else
    computes its own."""

    def __init__(self, members: list):
        self.members = members
        self.source = None  # weakref to the x of the last shared product
        self.version = self.adapter = self.stacked = None
        self.first, self.ends, self.taken = 0, [], set()

    def down(self, member, name: str, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor | None:
        at = self.members.index(member)
        hit = (self.stacked is not None and self.adapter == name and self.source() is x
               and self.version == x._version and self.first <= at and at not in self.taken)
        if not hit:
            # stack this member and those after it: a member called on another tensor (the last layer's query
            # sees only the supervised rows) leaves its successors sharing theirs, and nothing is kept for it
            self.stacked = self.source = None
            weights = []
            for m in self.members[at:]:
                a = m.lora_A[name] if name in m.lora_A else None
                if (a is None or type(a) is not nn.Linear or a.bias is not None or m.active_adapters != [name]
                        or not isinstance(m.lora_dropout[name], nn.Identity) or a.weight.dtype != flat.dtype):
                    return None
                weights.append(a.weight)
            if len(weights) == 1:  # the last member alone: its own product, nothing to share
                return None
            self.stacked = torch.nn.functional.linear(flat, torch.cat(weights))
            self.source, self.version, self.adapter, self.taken = weakref.ref(x), x._version, name, set()
            self.first, self.ends = at, [0]
            for w in weights:
                self.ends.append(self.ends[-1] + w.shape[0])
        k = at - self.first
        part = self.stacked[:, self.ends[k]:self.ends[k + 1]]
        self.taken.add(at)
        if len(self.taken) == len(self.members) - self.first:  # every member has its part: nothing to keep
            self.stacked = self.source = None
        return part


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings called on the same tensor


def share_lora_inputs(model: nn.Module) -> int:
    """Group the LoRA layers that read the same input (`_SharedInput`, `SHARED_INPUTS`) in every module that holds
    them; layers already fused in place (`fused_lora_forward`) use the group. Returns how many groups."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    groups = 0
    for module in model.modules():
        for names in SHARED_INPUTS:
            members = [getattr(module, n, None) for n in names]
            if all(type(m) is LoraLinear and "_shared_input" not in m.__dict__ for m in members):
                group = _SharedInput(members)
                for m in members:
                    m._shared_input = group
                groups += 1
    return groups


def fused_lora_forward(model: nn.Module) -> int:
    """Make PEFT's LoRA Linear layers add their product into the base output in place (`_fused_lora_forward`):
    the same sum, computed with fewer passes over (tokens x out) tensors (Gemma 3 LoRA: 3 of the 7 such passes
    per projection and step). Returns how many layers changed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_lora_forward, module)
            changed += 1
    return changed


def check_loftq() -> None:
    """PEFT computes LoftQ with bitsandbytes on a CUDA device (and needs scipy for its settings)."""
    packages = [p for p in ("bitsandbytes", "scipy") if importlib.util.find_spec(p) is None]
    lacking = f"{' and '.join(packages)} (pip install 'tuneforge[quant]')" if packages else (
        None if torch.cuda.is_available() else "a CUDA GPU")
    if lacking:
        raise ConfigError(f"method.adapter.init: loftq quantizes the base weights with bitsandbytes on a CUDA GPU "
                          f"(PEFT's LoftQ); this machine lacks {lacking}. hint: run it on a GPU machine, or use "
                          "init: pissa (also a start fitted to the weights)")


ADAPTED_BASE = "adapted_base.safetensors"  # in a run directory: LoftQ's quantized weights under the adapter


def quantizes_base(adapter) -> bool:
    """LoftQ replaces the adapted layers' weights, once at the start, with their quantized values."""
    return isinstance(adapter, LoraAdapter) and adapter.init == "loftq"


def save_adapted_base(model: nn.Module, path) -> None:
    """The base weights under the LoRA layers (LoftQ's quantized ones), named as in the plain base model."""
    from safetensors.torch import save_file

    prefix = "base_model.model."
    tensors = {f"{name.removeprefix(prefix)}.weight": module.base_layer.weight.detach().cpu().contiguous()
               for name, module in model.named_modules() if hasattr(module, "base_layer") and hasattr(module, "lora_A")}
    save_file(tensors, str(path))


def load_adapted_base(model: nn.Module, path) -> None:
    """Put the weights of `save_adapted_base` back into a freshly loaded base model."""
    from safetensors.torch import load_file

    unknown = model.load_state_dict(load_file(str(path)), strict=False).unexpected_keys
    if unknown:
        raise ModelError(f"{path}: weights {unknown[:3]} are not in the base model; was the run trained on another?")


def moves_base_weights(adapter) -> bool:
    """PiSSA / OLoRA initialisation subtracts the adapter's start from the base weights."""
    return isinstance(adapter, LoraAdapter) and adapter.init in ("pissa", "olora")


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float) -> list[dict]:
    """LoRA+ optimizer groups: LoRA's B matrices (and B embeddings) at lr * ratio, all else trainable at lr.
    Biases and norms get no weight decay, as in the Trainer's own grouping."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        fast = "lora_B" in name or "lora_embedding_B" in name
        decay = 0.0 if p.ndim < 2 else weight_decay
        groups.setdefault((lr * ratio if fast else lr, decay), []).append(p)
    return [{"params": params, "lr": g_lr, "weight_decay": decay} for (g_lr, decay), params in groups.items()]
