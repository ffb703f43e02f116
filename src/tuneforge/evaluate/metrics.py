"""Metrics as pure functions: label classification, BLEU-4 / ROUGE (Chinese segmented by jieba), repetition.

BLEU and ROUGE are computed by the packages LLaMA-Factory scores with, called the way it calls them: nltk's
`sentence_bleu` on characters with `SmoothingFunction().method3`, and `rouge_chinese.Rouge` on jieba words.
"""

from __future__ import annotations

import re
from collections import Counter


def label_metrics(references: list[str], predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (rows: reference)."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    other = 0  # predictions outside the label set (free generation only)
    for ref, pred in zip(references, predictions):
        if pred in index:
            confusion[index[ref]][index[pred]] += 1
        else:
            other += 1
    per_class, f1s = {}, []
    for label, i in index.items():
        tp = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        actual = sum(confusion[i]) + sum(1 for r, p in zip(references, predictions) if r == label and p not in index)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
        f1s.append(f1)
    n = len(references)
    correct = sum(r == p for r, p in zip(references, predictions))
    return {"accuracy": correct / n if n else 0.0, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "per_class": per_class, "confusion_matrix": {"labels": labels, "matrix": confusion},
            "invalid_predictions": other, "samples": n}


def first_label_in(text: str, labels: list[str]) -> str | None:
    """The label that appears first in a generated text (the longer label wins a tie: '10' before '1')."""
    best = None
    for label in sorted(labels, key=len, reverse=True):
        pos = text.find(label)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, label)
    return best[1] if best else None


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(reference: str, hypothesis: str) -> float:
    """Sentence BLEU-4 over characters with nltk's NIST geometric smoothing (SmoothingFunction().method3)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return float(sentence_bleu([list(reference)], list(hypothesis), smoothing_function=SmoothingFunction().method3))


def words(text: str) -> list[str]:
    """jieba word segmentation (Chinese and mixed text), whitespace dropped."""
    import jieba

    jieba.setLogLevel(60)
    return [w for w in jieba.cut(text) if w.strip()]


def rouge_f1(reference: str, hypothesis: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of `rouge_chinese.Rouge` on jieba words; 0 when either side has no words."""
    from rouge_chinese import Rouge

    ref, hyp = " ".join(words(reference)), " ".join(words(hypothesis))
    if not ref or not hyp:
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    scores = Rouge().get_scores(hyp, ref)[0]
    return {k: scores[k]["f"] for k in ("rouge-1", "rouge-2", "rouge-l")}


def generation_metrics(references: list[str], predictions: list[str]) -> dict:
    """Mean BLEU-4 and ROUGE-1/2/L F1, in percent, over pairs."""
    sums = Counter()
    for ref, pred in zip(references, predictions):
        sums["bleu-4"] += bleu4(ref, pred)
        sums.update(rouge_f1(ref, pred))
    n = max(len(references), 1)
    return {k: round(100 * sums[k] / n, 4) for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")}


_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def repeats_itself(text: str, n: int = 4, times: int = 3) -> bool:
    """True when some word n-gram occurs `times` or more: the looping that over-training causes."""
    tokens = words(text) if re.search(r"[\u4e00-\u9fff]", text) else _WORD.findall(text)
    return any(c >= times for c in _ngrams(tokens, n).values())


def repetition_metrics(outputs: list[str], hit_limit: list[bool]) -> dict:
    n = max(len(outputs), 1)
    return {"repetitive_share": sum(repeats_itself(o) for o in outputs) / n,
            "hit_max_new_tokens_share": sum(hit_limit) / n, "samples": len(outputs)}
