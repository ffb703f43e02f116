"""Every distributed engine against one device, on the same global batch (a check for a machine with GPUs; this
project's CI has none, so there it runs with --cpu, where FSDP is skipped: accelerate builds it for GPUs only).

    pip install 'tuneforge[deepspeed]'
    python bench/distributed_gpu_check.py --processes auto --steps 8
    python bench/distributed_gpu_check.py --cpu --processes 2 --engines ddp,zero2    # what runs on CPUs

Trains the same SFT of the embedded SmolLM2 (LoRA by default, `--method full` for full training) on the identity
data once on one device with the global batch, then with each engine in N processes with the global batch split
among them: DDP, DeepSpeed ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload (examples/deepspeed/), FSDP2 full_shard and
FSDP2 with offload. Prints per engine: the losses step by step, the largest relative difference from the
one-device losses, the largest difference of the saved weights, and seconds. Each run is a plain
`tuneforge train` command, printed before it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ENGINES = {
    "ddp": [],
    "zero2": [f"train.deepspeed={REPO / 'examples/deepspeed/ds_z2.json'}"],
    "zero3": [f"train.deepspeed={REPO / 'examples/deepspeed/ds_z3.json'}"],
    "zero3_offload": [f"train.deepspeed={REPO / 'examples/deepspeed/ds_z3_offload.json'}"],
    "fsdp": ["train.fsdp=full_shard auto_wrap"],
    "fsdp_offload": ["train.fsdp=full_shard auto_wrap offload"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(root: Path, args, batch: int) -> Path:
    config = {
        "model": {"name_or_path": args.model},
        "data": {"dataset": "identity", "max_samples": 64, "cutoff_len": 256,
                 "placeholders": {"name": "TuneForge Assistant", "author": "the TuneForge team"}},
        "method": {"stage": "sft", "adapter": {"type": args.method, **({"rank": 8, "alpha": 16}
                                                                     if args.method == "lora" else {})}},
        "train": {"max_steps": args.steps, "batch_size": batch, "learning_rate": 2e-4 if args.method == "lora"
                  else 1e-5, "logging_steps": 1, "save_steps": 10 ** 6, "group_by_length": False, "seed": 7},
    }
    path = root / f"config-batch{batch}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run(config: Path, out: Path, extra: list[str]) -> tuple[int, float, str]:
    command = [sys.executable, "-m", "tuneforge.cli", "train", str(config), f"output.run_dir={out}", *extra]
    print("$", " ".join(command), flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    clock = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return done.returncode, time.perf_counter() - clock, " | ".join(tail)


def losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if "loss" in json.loads(line)]


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    found = {}
    for file in sorted((run_dir / "adapter").glob("*.safetensors")) + sorted((run_dir / "model").glob("*.safetensors")):
        found.update(load_file(str(file)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="rows per process")
    parser.add_argument("--processes", default="auto", help="processes per engine run (auto: one per GPU)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--cpu", action="store_true", help="no GPU here: skip FSDP (GPUs only)")
    parser.add_argument("--keep", help="folder to keep the runs in (default: a temporary one)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.cpu:
        parser.error("no CUDA GPU here; run with --cpu to check the engines that run on CPUs")
    n = torch.cuda.device_count() if args.processes == "auto" else int(args.processes)
    n = max(n, 2)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'} x {n} processes; "
          f"{args.method} SFT of {args.model}, {args.steps} steps, global batch {args.batch * n}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tuneforge-engines-") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        code, seconds, tail = run(write_config(root, args, args.batch * n), root / "one-device", [])
        if code:
            sys.exit(f"the one-device run failed: {tail}")
        reference, reference_weights = losses(root / "one-device"), weights(root / "one-device")
        rows = [("one device", 1, reference, 0.0, 0.0, seconds, "ok")]
        for engine in engines:
            if engine.startswith("fsdp") and not torch.cuda.is_available():
                rows.append((engine, n, [], float("nan"), float("nan"), 0.0, "skipped: FSDP needs GPUs"))
                continue
            out = root / engine
            code, seconds, tail = run(write_config(root, args, args.batch), out,
                                      [f"distributed.nproc_per_node={n}", f"distributed.master_port={free_port()}",
                                       *ENGINES[engine]])
            got = losses(out)
            if code or len(got) != len(reference):
                rows.append((engine, n, got, float("nan"), float("nan"), seconds, f"failed: {tail}"))
                continue
            loss_diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, reference))
            trained = weights(out)
            weight_diff = max(float((trained[k].float() - reference_weights[k].float()).abs().max())
                              for k in reference_weights) if trained.keys() == reference_weights.keys() else float("inf")
            rows.append((engine, n, got, loss_diff, weight_diff, seconds, "ok"))
    print()
    print(f"{'engine':<14} {'procs':>5} {'max rel. loss diff':>18} {'max weight diff':>15} {'seconds':>8}  losses / status")
    for engine, procs, got, loss_diff, weight_diff, seconds, status in rows:
        shown = ", ".join(f"{x:.5f}" for x in got) if status == "ok" else status
        print(f"{engine:<14} {procs:>5} {loss_diff:>18.2e} {weight_diff:>15.2e} {seconds:>8.1f}  {shown}")


if __name__ == "__main__":
    main()
