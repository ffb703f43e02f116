"""Export a run to GGUF in several types, load each back with transformers' GGUF reader, compare logits.

    python bench/gguf_roundtrip.py runs/quickstart --types f16,q8_0,q4_0

Prints, per type, the file size, the largest and mean absolute logit difference against the merged
model, and how often the next-token argmax agrees, over a few prompts.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tuneforge.export.export import _source_pre
from tuneforge.export.gguf_writer import write_gguf
from tuneforge.export.merge import merged_model
from tuneforge.rundir import open_run

PROMPTS = ["Who are you?", "Write one sentence about the sea.", "这条评论是好评还是差评：质量很好，物流也快。",
           "List three prime numbers."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--types", default="f16,q8_0")
    args = parser.parse_args()

    model, tokenizer, engine = merged_model(args.run_dir)
    model.eval()
    batch = [torch.tensor([engine.prompt_ids([{"role": "user", "content": p}])]) for p in PROMPTS]
    with torch.no_grad():
        reference = [model(input_ids=ids).logits[0] for ids in batch]
    print(f"{'type':<6}{'size MB':>9}{'max |dlogit|':>14}{'mean |dlogit|':>15}{'argmax agree':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types.split(","):
            path = Path(tmp) / f"m-{qtype}.gguf"
            write_gguf(model, tokenizer, path, qtype, pre_tokenizer=_source_pre(open_run(args.run_dir)))
            loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()
            diffs, agree, total = [], 0, 0
            with torch.no_grad():
                for ids, ref in zip(batch, reference):
                    got = loaded(input_ids=ids).logits[0]
                    diffs.append((got - ref).abs())
                    agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                    total += ref.shape[0]
            d = torch.cat([x.flatten() for x in diffs])
            print(f"{qtype:<6}{path.stat().st_size / 2**20:>9.1f}{d.max().item():>14.4f}{d.mean().item():>15.5f}"
                  f"{agree / total:>14.3f}")
            path.unlink()


if __name__ == "__main__":
    main()
