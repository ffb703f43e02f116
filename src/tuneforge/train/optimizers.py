"""Memory-efficient full-parameter optimizers: GaLore and APOLLO through transformers' optimizer integration,
BAdam through its package's BlockOptimizer around the Trainer's AdamW."""

from __future__ import annotations

import importlib.util
import warnings

from torch import nn

from tuneforge.config.schema import ApolloOptimizer, BadamOptimizer, GaloreOptimizer
from tuneforge.errors import ConfigError

PACKAGES = {"galore": ("galore_torch", "galore-torch"), "apollo": ("apollo_torch", "apollo-torch"),
            "badam": ("badam", "badam")}


def check_optimizer_installed(optimizer) -> None:
    """A missing package is a config error before any loading, with the command that installs it."""
    if optimizer is None:
        return
    module, package = PACKAGES[optimizer.name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"method.adapter.optimizer.name: {optimizer.name} needs the {package} package. "
                          f"hint: pip install {package}")


def low_rank_training_args(optimizer, model: nn.Module) -> dict:
    """TrainingArguments entries (optim, optim_target_modules, optim_args) for GaLore / APOLLO; {} otherwise."""
    if not isinstance(optimizer, (GaloreOptimizer, ApolloOptimizer)):
        return {}
    from tuneforge.model.adapters import decoder_layers

    _, layers = decoder_layers(model)
    block_linears = sorted({n.rsplit(".", 1)[-1] for n, m in layers.named_modules() if isinstance(m, nn.Linear)})
    targets = block_linears if optimizer.target_modules == "all" else optimizer.target_modules
    unknown = sorted(set(targets) - set(block_linears))
    if unknown:
        raise ConfigError(f"method.adapter.optimizer.target_modules: {unknown} are not linear layers of the decoder "
                          f"blocks; they have {block_linears}")
    options = {"rank": optimizer.rank, "update_proj_gap": optimizer.update_interval, "scale": optimizer.scale}
    if isinstance(optimizer, ApolloOptimizer):
        options["proj"] = "random"
    name = f"{optimizer.name}_adamw" + ("_layerwise" if optimizer.layerwise else "")
    return {"optim": name, "optim_target_modules": targets,
            "optim_args": ",".join(f"{k}={v}" for k, v in options.items())}


def build_block_optimizer(model: nn.Module, base_optimizer, optimizer: BadamOptimizer):
    """BAdam: the base optimizer only ever holds state for the decoder block whose turn it is; the other
    parameters have requires_grad switched off by BlockOptimizer, so their gradients are not even computed."""
    from badam import BlockOptimizer

    from tuneforge.model.adapters import decoder_layers

    prefix, layers = decoder_layers(model)
    blocks = [[f"{prefix}.{i}."] for i in range(len(layers))]
    with warnings.catch_warnings():  # it warns about float32 weights, which are what a CPU trains in
        warnings.simplefilter("ignore", UserWarning)
        return BlockOptimizer(base_optimizer=base_optimizer, named_parameters_list=list(model.named_parameters()),
                              block_prefix_list=blocks, switch_block_every=optimizer.switch_every,
                              switch_mode=optimizer.switch_mode, verbose=0)
