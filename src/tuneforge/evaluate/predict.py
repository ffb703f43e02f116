"""Run a model over a data set: label scoring or free generation, then the matching metrics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data.convert import Example
from tuneforge.errors import DataError
from tuneforge.evaluate.metrics import first_label_in, generation_metrics, label_metrics, repetition_metrics
from tuneforge.infer.engine import Engine, GenerationSettings

MAX_LABELS = 20
MAX_LABEL_CHARS = 32


@dataclass
class Prediction:
    rows: list[dict]
    metrics: dict


def split_answers(examples: list[Example], where: str) -> tuple[list[list[dict]], list[str]]:
    """Prompts (every turn before the last answer) and reference answers."""
    usable = [e for e in examples if e.messages and e.messages[-1]["role"] == "assistant"]
    if not usable:
        raise DataError(f"{where}: no row ends with an answer to compare predictions with")
    return [e.messages[:-1] for e in usable], [e.messages[-1]["content"].strip() for e in usable]


def detect_labels(references: list[str]) -> list[str] | None:
    """A small set of short distinct answers (e.g. 0/1, positive/negative) makes a label task."""
    distinct = sorted(set(references))
    if 2 <= len(distinct) <= MAX_LABELS and all(len(r) <= MAX_LABEL_CHARS for r in distinct) \
            and len(references) >= 2 * len(distinct):
        return distinct
    return None


def predict(engine: Engine, prompts: list[list[dict]], references: list[str], mode: str = "auto",
            labels: list[str] | None = None, batch_size: int = 16,
            settings: GenerationSettings | None = None, progress: bool = True) -> Prediction:
    labels = labels or detect_labels(references)
    if mode == "auto":
        mode = "score" if labels else "generate"
    if mode == "score" and not labels:
        raise DataError("mode score needs labels: the answers are not a small label set; declare labels or use generate")
    if labels:
        unknown = sorted(set(references) - set(labels))
        if unknown:
            raise DataError(f"references {unknown[:5]} are not among the labels {labels}")
    start = time.perf_counter()
    if mode == "score":
        scores = engine.score_labels(prompts, labels, batch_size=batch_size, progress=progress)
        predictions = [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]
        rows = [{"prompt": p[-1]["content"], "label": r, "prediction": y, "scores": dict(zip(labels, s))}
                for p, r, y, s in zip(prompts, references, predictions, scores)]
        metrics = label_metrics(references, predictions, labels)
    else:
        settings = settings or GenerationSettings(max_new_tokens=64)
        outputs = engine.generate_batch(prompts, settings, batch_size=batch_size, progress=progress)
        rows = [{"prompt": p[-1]["content"], "label": r, "prediction": o.text, "hit_max_new_tokens": o.hit_limit}
                for p, r, o in zip(prompts, references, outputs)]
        metrics = {**generation_metrics(references, [o.text for o in outputs]),
                   **repetition_metrics([o.text for o in outputs], [o.hit_limit for o in outputs])}
        if labels:
            found = [first_label_in(o.text, labels) for o in outputs]
            for row, label in zip(rows, found):
                row["label_found"] = label
            metrics["labels"] = label_metrics(references, found, labels)
    seconds = time.perf_counter() - start
    metrics.update(mode=mode, samples=len(rows), seconds=round(seconds, 2),
                   samples_per_second=round(len(rows) / max(seconds, 1e-9), 3))
    return Prediction(rows, metrics)


def predict_rewards(reward, examples: list[Example], batch_size: int = 8) -> Prediction:
    """A reward model's scores: for preference pairs, both answers and the pairwise accuracy; for other data,
    the reward of each row's answer."""
    start = time.perf_counter()
    pairs = [e for e in examples if e.chosen is not None and e.rejected is not None]
    if pairs:
        prompt = lambda e: e.messages if e.messages[-1]["role"] != "assistant" else e.messages[:-1]  # noqa: E731
        chosen = reward.score([prompt(e) + [{"role": "assistant", "content": e.chosen}] for e in pairs], batch_size)
        rejected = reward.score([prompt(e) + [{"role": "assistant", "content": e.rejected}] for e in pairs], batch_size)
        rows = [{"prompt": prompt(e)[-1]["content"], "chosen_reward": c, "rejected_reward": r}
                for e, c, r in zip(pairs, chosen, rejected)]
        metrics = {"mode": "reward", "pairwise_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(pairs),
                   "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)}
    else:
        answered = [e for e in examples if e.messages and e.messages[-1]["role"] == "assistant"]
        scores = reward.score([e.messages for e in answered], batch_size)
        rows = [{"prompt": e.messages[-2]["content"], "answer": e.messages[-1]["content"], "reward": s}
                for e, s in zip(answered, scores)]
        metrics = {"mode": "reward", "mean_reward": sum(scores) / max(len(scores), 1)}
    seconds = time.perf_counter() - start
    metrics.update(samples=len(rows), seconds=round(seconds, 2), samples_per_second=round(len(rows) / max(seconds, 1e-9), 3))
    return Prediction(rows, metrics)


def save_prediction(result: Prediction, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    return out_dir


def summary(metrics: dict) -> str:
    if metrics["mode"] == "reward":
        if "pairwise_accuracy" in metrics:
            return (f"pairwise accuracy {metrics['pairwise_accuracy']:.4f}, mean margin {metrics['mean_margin']:.4f} "
                    f"({metrics['samples']} pairs, reward model)")
        return f"mean reward {metrics['mean_reward']:.4f} ({metrics['samples']} rows, reward model)"
    if metrics["mode"] == "score":
        return (f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
                f"({metrics['samples']} rows, {metrics['samples_per_second']} rows/s, label scoring)")
    text = (f"BLEU-4 {metrics['bleu-4']:.2f}, ROUGE-1 {metrics['rouge-1']:.2f}, ROUGE-2 {metrics['rouge-2']:.2f}, "
            f"ROUGE-L {metrics['rouge-l']:.2f}")
    if "labels" in metrics:
        text += f", accuracy {metrics['labels']['accuracy']:.4f} (first label in the answer)"
    return text + f" ({metrics['samples']} rows, {metrics['samples_per_second']} rows/s, generation)"
