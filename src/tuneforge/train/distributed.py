"""More than one process: training under torchrun or `accelerate launch` (the Trainer's own DDP), never a
home-made layer. Rank 0 writes the run directory (config, run.json, metrics, plots, weights, checkpoints' shared
files); every rank trains on its shard of each batch. `tuneforge train` relaunches itself under torchrun when the
config asks for more than one process (`distributed.*`) and it was not started by a launcher already."""

from __future__ import annotations

import contextlib
import sys

from tuneforge.ranks import is_main, launched, world_size


def init_processes() -> None:
    """Join the process group early (gloo on CPUs, nccl on GPUs), so that data preparation can take turns."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # accelerate asks to be told: CPUs only (gloo)


def _group():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    if dist := _group():
        dist.barrier()


def _device():
    import torch

    dist = _group()
    return torch.device("cuda", torch.cuda.current_device()) if dist and dist.get_backend() == "nccl" else "cpu"


def any_rank(flag: bool) -> bool:
    """True on every process when it is true on one of them (a stop request must end the same step everywhere)."""
    dist = _group()
    if dist is None:
        return flag
    import torch

    value = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_sum(values: list[float]) -> list[float]:
    """The element-wise sum of `values` over every process (the values themselves with one process)."""
    dist = _group()
    if dist is None:
        return list(values)
    import torch

    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it fills the tokenized-data cache), then the others (they read it)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def processes_per_node(value) -> int:
    if value == "auto":
        import torch

        return max(torch.cuda.device_count(), 1)
    return int(value)


def relaunch_command(cfg, argv: list[str]) -> list[str] | None:
    """The torchrun command that runs `tuneforge ARGV` in several processes (or in one, for DeepSpeed, which
    expects a launcher), or None when this process should train itself (one process asked for, or already started
    by a launcher)."""
    if launched():
        return None
    distributed = cfg.distributed
    n = processes_per_node(distributed.nproc_per_node)
    if n <= 1 and distributed.nnodes <= 1 and not cfg.train.deepspeed:
        return None
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--nnodes={distributed.nnodes}",
            f"--node_rank={distributed.node_rank}", f"--master_addr={distributed.master_addr}",
            f"--master_port={distributed.master_port}", "-m", "tuneforge.cli", *argv]
