"""LLaMA-Pro block expansion: new decoder blocks that start as the identity, trained while the rest stays frozen.

The L blocks are split into `new_layers` equal groups; after the last block of each group a copy of that block
is inserted with the projections that write into the residual stream (attention `o_proj`, MLP `down_proj`)
set to zero. Each new block then adds nothing, so the expanded model computes exactly what the original did,
and training only the new blocks adds knowledge without overwriting the old weights. The result is a plain
model with L + new_layers blocks (config.num_hidden_layers and, where present, config.layer_types updated), saved
and loaded like any other.
"""

from __future__ import annotations

import copy

from torch import nn

from tuneforge.errors import ConfigError

RESIDUAL_WRITERS = ("o_proj", "down_proj")  # the last linear layer of attention and of the MLP


def apply_block_expansion(model: nn.Module, new_layers: int) -> list[int]:
    """Insert identity-initialised blocks in place; returns the indices of the new blocks in the expanded stack."""
    from tuneforge.model.adapters import decoder_layers

    prefix, layers = decoder_layers(model)
    n = len(layers)
    if new_layers > n or n % new_layers:
        raise ConfigError(f"method.adapter.new_layers: {new_layers} must divide the model's {n} decoder layers "
                          f"(one new block after each of new_layers equal groups); try one of "
                          f"{[d for d in range(1, n + 1) if n % d == 0]}")
    group = n // new_layers
    expanded, new_indices, types = [], [], getattr(model.config, "layer_types", None)
    expanded_types = []
    for i, layer in enumerate(layers):
        expanded.append(layer)
        expanded_types.append(types[i] if types else None)
        if (i + 1) % group == 0:
            expanded.append(_identity_copy(layer))
            expanded_types.append(types[i] if types else None)
            new_indices.append(len(expanded) - 1)
    for index, layer in enumerate(expanded):  # the KV cache addresses layers by these indices
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    setattr(parent, prefix.rsplit(".", 1)[-1], nn.ModuleList(expanded))
    model.config.num_hidden_layers = len(expanded)
    if types:
        model.config.layer_types = expanded_types
    return new_indices


def _identity_copy(layer: nn.Module) -> nn.Module:
    block = copy.deepcopy(layer)
    zeroed = 0
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in RESIDUAL_WRITERS:
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            zeroed += 1
    if zeroed != len(RESIDUAL_WRITERS):
        raise ConfigError(f"method.adapter: llama_pro needs decoder blocks whose attention and MLP end in "
                          f"{' and '.join(RESIDUAL_WRITERS)} (Llama, Qwen, Mistral, Gemma families); this model's "
                          f"blocks have {sorted({n.rsplit('.', 1)[-1] for n, m in block.named_modules() if isinstance(m, nn.Linear)})}")
    return block
