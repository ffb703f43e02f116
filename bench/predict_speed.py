"""Label scoring vs free generation on the same model and rows, in one invocation.

    python bench/predict_speed.py runs/reviews_zh_lora --data reviews_zh_dev --samples 200

Prints rows/s and accuracy of both modes and their ratio. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse

from tuneforge.config import DataConfig
from tuneforge.data.pipeline import load_examples
from tuneforge.evaluate.predict import predict, split_answers
from tuneforge.infer.engine import Engine, GenerationSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="run directory or model")
    parser.add_argument("--data", default="reviews_zh_dev")
    parser.add_argument("--dataset-dir", default="data")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8, help="generation budget (labels are short)")
    args = parser.parse_args()

    engine = Engine.load(args.target)
    spec, conversion = load_examples(args.data, DataConfig(dataset=[args.data], dataset_dir=args.dataset_dir),
                                     args.samples)
    prompts, references = split_answers(conversion.examples, spec.name)
    scored = predict(engine, prompts, references, mode="score", batch_size=args.batch_size)
    generated = predict(engine, prompts, references, mode="generate", batch_size=args.batch_size,
                        settings=GenerationSettings(max_new_tokens=args.max_new_tokens))
    gen_accuracy = generated.metrics["labels"]["accuracy"] if "labels" in generated.metrics else float("nan")
    rows = [("label scoring", scored.metrics["samples_per_second"], scored.metrics["accuracy"]),
            (f"generation (max {args.max_new_tokens} tokens)", generated.metrics["samples_per_second"], gen_accuracy)]
    print(f"\n{args.target} on {len(prompts)} rows of {spec.name}, batch {args.batch_size}")
    print(f"{'mode':<28}{'rows/s':>10}{'accuracy':>10}")
    for name, speed, accuracy in rows:
        print(f"{name:<28}{speed:>10.2f}{accuracy:>10.4f}")
    print(f"scoring / generation speed: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
