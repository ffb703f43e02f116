"""QLoRA and LoftQ check for a machine with a CUDA GPU and bitsandbytes (not a test: this project's CI has no GPU).

    pip install 'tuneforge[quant]' && python bench/qlora_gpu_check.py --steps 20

Trains the same LoRA SFT of the embedded SmolLM2 on the identity data four times: with the base weights in
bf16/fp32, in 8 bits, in 4 bits (nf4, double quantization), and with a LoftQ start (nf4-quantized base weights,
the adapter initialised on the quantization error); prints peak GPU memory, final training loss and the answer
to "Who are you?" of each run (reloaded from its run directory) side by side.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from tuneforge.infer.engine import Engine, GenerationSettings
from tuneforge.train.run import train


def run_one(root: Path, label: str, bits: int | None, init: str, steps: int) -> tuple[float, float, str]:
    config = {
        "model": {"name_or_path": "smollm2-135m-instruct", "quantization_bit": bits},
        "data": {"dataset": "identity", "placeholders": {"name": "TuneForge Assistant", "author": "the TuneForge team"}},
        "method": {"stage": "sft", "adapter": {"type": "lora", "rank": 8, "alpha": 16, "init": init}},
        "train": {"max_steps": steps, "batch_size": 4, "learning_rate": 2e-4, "logging_steps": 5, "save_steps": steps},
        "output": {"run_dir": str(root / label.replace(" ", "-"))},
    }
    torch.cuda.reset_peak_memory_stats()
    result = train(config)
    peak = torch.cuda.max_memory_allocated() / 2**20
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    answer = Engine.load(str(result.run_dir)).chat([{"role": "user", "content": "Who are you?"}],
                                                   GenerationSettings(max_new_tokens=32, temperature=0.0))
    return peak, losses[-1], answer.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("qlora_gpu_check: no CUDA GPU here; run it on a machine with one")
    runs = [("full", None, "default"), ("8-bit", 8, "default"), ("4-bit", 4, "default"), ("LoftQ 4-bit", None, "loftq")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(label, *run_one(Path(tmp), label, bits, init, args.steps)) for label, bits, init in runs]
    print(f"\n{'base weights':<14}{'peak GPU MiB':>14}{'final loss':>12}  answer")
    for label, peak, loss, answer in rows:
        print(f"{label:<14}{peak:>14.0f}{loss:>12.3f}  {answer[:60]}")


if __name__ == "__main__":
    main()
