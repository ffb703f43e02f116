"""How far the labels of a label data set can be matched: a careful reading vs the labels vs the models.

    python bench/label_agreement.py --reading bench/data/reviews_zh_dev_reading.jsonl \
        runs/reviews_zh_lora/eval/tuned/reviews_zh_dev/predictions.jsonl

A reading file has one line per row read: {"id": row index in --data, "judgement": label, "confident": bool};
"confident": false marks neutral, mixed or unclear rows. The share of rows where a careful reader agrees with
the labels bounds the accuracy that reading the text well can reach; a model above it has learnt the labels'
quirks, not the task. Each predictions file (from `tuneforge predict` or `tuneforge eval`, rows in --data
order) is compared with the labels on the rows read, with the reader, and with the labels on all rows.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _share(hits: list[bool]) -> str:
    """Share with its binomial standard error, e.g. '0.915 ± 0.020 (183/200)'."""
    n, k = len(hits), sum(hits)
    if not n:
        return "-"
    p = k / n
    return f"{p:.3f} ± {math.sqrt(p * (1 - p) / n):.3f} ({k}/{n})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="*", help="predictions.jsonl files of models on --data")
    parser.add_argument("--data", default="data/reviews_zh_dev.jsonl", help="rows with a 'label' field")
    parser.add_argument("--reading", required=True, help="a careful reading of some rows (see above)")
    args = parser.parse_args()

    labels = [str(row["label"]) for row in _read_jsonl(args.data)]
    reading = {int(r["id"]): (str(r["judgement"]), bool(r["confident"])) for r in _read_jsonl(args.reading)}
    read = sorted(reading)
    confident = [i for i in read if reading[i][1]]

    print(f"\n{args.reading}: {len(read)} of {len(labels)} rows of {args.data} read, {len(confident)} confidently")
    table = [("reader vs labels, rows read", _share([reading[i][0] == labels[i] for i in read])),
             ("reader vs labels, confident rows", _share([reading[i][0] == labels[i] for i in confident]))]
    for path in args.predictions:
        predicted = [str(row["prediction"]) for row in _read_jsonl(path)]
        if len(predicted) != len(labels):
            raise SystemExit(f"{path}: {len(predicted)} predictions for {len(labels)} rows of {args.data}")
        if not set(predicted) & set(labels):
            raise SystemExit(f"{path}: predictions {sorted(set(predicted))[:4]} share no value with the labels "
                             f"{sorted(set(labels))[:4]} of {args.data}; predict with the data's own labels")
        name = Path(path).parent.as_posix()
        table += [(f"{name}: vs labels, rows read", _share([predicted[i] == labels[i] for i in read])),
                  (f"{name}: vs reader, rows read", _share([predicted[i] == reading[i][0] for i in read])),
                  (f"{name}: vs labels, all rows", _share([p == t for p, t in zip(predicted, labels)]))]
    width = max(len(name) for name, _ in table) + 2
    for name, value in table:
        print(f"{name:<{width}}{value}")


if __name__ == "__main__":
    main()
