"""Which distributed engine a run trains with (plain DDP, DeepSpeed ZeRO-1/2/3 with or without CPU offload, PyTorch
FSDP), all through the Trainer and accelerate: what each needs, validated before anything loads, and what it does
to the memory one device needs.

Measured on CPUs with two processes (gloo): DeepSpeed ZeRO-2 and ZeRO-3, with and without offload, train and save
as one process does. accelerate builds FSDP only for GPUs (on CPUs it would quietly fall back to DDP), so FSDP
without a GPU is refused here.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from tuneforge.errors import ConfigError

EXAMPLES = "examples/deepspeed"


@dataclass(frozen=True)
class Engine:
    name: str  # for people: "DDP", "DeepSpeed ZeRO-3 + offload", "FSDP full_shard"
    shards: int = 0  # 0: every device holds everything; 1: optimizer states; 2: + gradients; 3: + weights
    offload_optimizer: bool = False  # optimizer states (and their update) in CPU memory
    offload_weights: bool = False


def engine_of(train) -> Engine:
    """The engine `train.deepspeed` / `train.fsdp` ask for (DDP when neither is set)."""
    if train.deepspeed:
        zero = read_deepspeed(train.deepspeed).get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        optimizer = _offloaded(zero.get("offload_optimizer"))
        weights = _offloaded(zero.get("offload_param")) and stage == 3
        label = f"DeepSpeed ZeRO-{stage}" + (" + offload" if optimizer or weights else "")
        return Engine(label, stage, optimizer, weights)
    if train.fsdp:
        words = set(train.fsdp.split())
        shards = 3 if words & {"full_shard", "hybrid_shard"} else 2 if words & {"shard_grad_op",
                                                                                "hybrid_shard_zero2"} else 0
        offload = "offload" in words
        return Engine(f"FSDP {train.fsdp}", shards, offload, offload)
    return Engine("DDP")


def _offloaded(section) -> bool:
    return isinstance(section, dict) and section.get("device", "none") not in ("none", None)


def read_deepspeed(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"train.deepspeed: {path} is not a file. hint: use one of {EXAMPLES}/ds_z2.json, "
                          "ds_z2_offload.json, ds_z3.json or ds_z3_offload.json from TuneForge's repository, or "
                          "your own DeepSpeed JSON")
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"train.deepspeed: {path} is not valid JSON ({exc}). hint: start from "
                          f"{EXAMPLES}/ds_z2.json") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"train.deepspeed: {path} holds no settings object. hint: start from {EXAMPLES}/ds_z2.json")
    return settings


def check_engine(cfg) -> Engine:
    """Everything the chosen engine needs, said before any weights load."""
    import torch

    engine, t = engine_of(cfg.train), cfg.train
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.cuda.is_available():
        raise ConfigError("accelerate launch: its config asks for FSDP, which accelerate builds for GPUs only (on "
                          "CPUs it would train as plain DDP and shard nothing). hint: on CPUs use DeepSpeed "
                          f"(train.deepspeed={EXAMPLES}/ds_z3.json) or a config without FSDP")
    if engine.name == "DDP":
        return engine
    switch = "train.deepspeed" if t.deepspeed else "train.fsdp"
    if cfg.method.stage == "ppo":
        raise ConfigError(f"{switch}: stage ppo trains with DDP only (its rollouts are generated outside the "
                          f"Trainer). hint: unset {switch}; several processes still work (distributed.nproc_per_node)")
    optimizer = getattr(cfg.method.adapter, "optimizer", None)
    if optimizer is not None:
        raise ConfigError(f"{switch}: {optimizer.name} manages its own optimizer states and does not combine with "
                          f"{engine.name}. hint: unset {switch}, or use AdamW")
    if cfg.model.quantization_bit and engine.shards == 3:
        raise ConfigError(f"{switch}: {engine.name} shards weights, which does not work with a quantized base "
                          "(model.quantization_bit). hint: use ZeRO-2 (examples/deepspeed/ds_z2.json) for QLoRA")
    if t.deepspeed:
        try:
            importlib.import_module("deepspeed")
        except ImportError:
            raise ConfigError("train.deepspeed: the deepspeed package is not installed. hint: pip install deepspeed "
                              "(it compiles its kernels on first use; on GPUs it needs the CUDA toolkit)") from None
    elif not torch.cuda.is_available():
        raise ConfigError("train.fsdp: FSDP needs GPUs (accelerate builds it for CUDA devices only; on CPUs it would "
                          "train as plain DDP and shard nothing). hint: on CPUs use DeepSpeed, e.g. "
                          f"train.deepspeed={EXAMPLES}/ds_z3.json, or unset train.fsdp")
    return engine


def per_device(memory, engine: Engine, processes: int):
    """The estimate for one device when `processes` train together with `engine`: sharded parts divided among
    them, offloaded parts moved to `memory.offloaded` (CPU memory), DDP's gradient buckets added."""
    n = max(processes, 1)
    weights, gradients, optimizer, offloaded = memory.weights, memory.gradients, memory.optimizer, 0
    if engine.name == "DDP" and n > 1:
        gradients *= 2  # DDP all-reduces through buckets as large as the gradients
    if engine.shards >= 1:
        optimizer /= n
    if engine.shards >= 2:
        gradients /= n
    if engine.shards >= 3:
        weights /= n
    if engine.offload_optimizer:
        offloaded += optimizer
        optimizer = 0
    if engine.offload_weights:
        offloaded += weights
        weights = 0
    return replace(memory, weights=int(weights), gradients=int(gradients), optimizer=int(optimizer),
                   offloaded=int(offloaded), engine=f"{engine.name}, {n} process{'es' if n > 1 else ''}")


CANDIDATES = [(Engine("DeepSpeed ZeRO-2", 2), f"train.deepspeed={EXAMPLES}/ds_z2.json"),
              (Engine("DeepSpeed ZeRO-3", 3), f"train.deepspeed={EXAMPLES}/ds_z3.json"),
              (Engine("DeepSpeed ZeRO-3 + offload", 3, True, True), f"train.deepspeed={EXAMPLES}/ds_z3_offload.json")]


def suggestion(memory, processes: int, free: int, shared: bool) -> str | None:
    """The first engine switch whose estimate fits `free` bytes, or None. `shared`: the processes share that
    memory (CPUs of one machine), so their estimates add up."""
    for engine, switch in CANDIDATES:
        estimate = per_device(memory, engine, processes)
        need = (estimate.total + estimate.offloaded) * processes if shared else estimate.total
        if need <= free:
            return f"{switch} ({engine.name}: ~{estimate.total / 1024 ** 3:.2f} GiB per process)"
    return None
