"""Seconds per AdamW step over all weights of a model: transformers' optimizers side by side, one invocation.

    python bench/optimizer_step.py --model smollm2-135m-instruct --optims adamw_torch,adamw_torch_fused

The step is what full training adds per optimizer step on top of forward and backward (LoRA's few weights make
it negligible there). Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import Trainer, TrainingArguments

from tuneforge.config import ModelConfig
from tuneforge.model.loader import load_model, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or path as model.name_or_path")
    parser.add_argument("--optims", default="adamw_torch,adamw_torch_fused", help="transformers optimizer names")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one untimed step")
    args = parser.parse_args()

    model = load_model(resolve_model(ModelConfig(name_or_path=args.model)))
    params = sum(p.numel() for p in model.parameters())
    results = []
    for name in args.optims.split(","):
        trainer = Trainer(model=model, args=TrainingArguments(output_dir="/tmp/tuneforge-bench", optim=name,
                                                              report_to=[]))
        optimizer = trainer.create_optimizer()
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()  # the first step allocates the moments
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        results.append((name, (time.perf_counter() - start) / args.steps))
    print(f"\n{args.model}: {params / 1e6:.0f}M weights, {torch.get_num_threads()} threads")
    print(f"{'optim':<22}{'s/step':>8}{'vs first':>10}")
    for name, seconds in results:
        print(f"{name:<22}{seconds:>8.3f}{results[0][1] / seconds:>9.1f}x")


if __name__ == "__main__":
    main()
