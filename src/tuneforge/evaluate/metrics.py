"""Metrics as pure functions: label classification, BLEU-4 / ROUGE (Chinese segmented by jieba), repetition.

Definitions follow what LLaMA-Factory reports: BLEU-4 on characters with NIST geometric smoothing
(nltk's SmoothingFunction().method3); ROUGE-1/2/L F1 on jieba words, ROUGE-L with the `rouge` package's
beta = P/R weighting. ROUGE-N counts clipped n-gram matches (standard ROUGE).
"""

from __future__ import annotations

import math
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
    """Sentence BLEU-4 over characters, uniform weights, NIST geometric smoothing of zero-match orders."""
    ref, hyp = list(reference), list(hypothesis)
    if not hyp or not ref:
        return 0.0
    log_precisions, zero_orders = [], 0
    for n in range(1, 5):
        hyp_grams, ref_grams = _ngrams(hyp, n), _ngrams(ref, n)
        total = sum(hyp_grams.values())
        if total == 0:  # hypothesis shorter than n: BLEU is 0 without a smoothing that invents counts
            return 0.0
        matches = sum(min(c, ref_grams[g]) for g, c in hyp_grams.items())
        if matches == 0:
            zero_orders += 1
            log_precisions.append(math.log(1 / (2 ** zero_orders * total)))
        else:
            log_precisions.append(math.log(matches / total))
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(sum(log_precisions) / 4)


def words(text: str) -> list[str]:
    """jieba word segmentation (Chinese and mixed text), whitespace dropped."""
    import jieba

    jieba.setLogLevel(60)
    return [w for w in jieba.cut(text) if w.strip()]


def rouge_n(reference: list[str], hypothesis: list[str], n: int) -> float:
    ref, hyp = _ngrams(reference, n), _ngrams(hypothesis, n)
    overlap = sum(min(c, ref[g]) for g, c in hyp.items())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(hyp.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(reference: list[str], hypothesis: list[str]) -> float:
    if not reference or not hypothesis:
        return 0.0
    lcs = _lcs(reference, hypothesis)
    if lcs == 0:
        return 0.0
    recall, precision = lcs / len(reference), lcs / len(hypothesis)
    beta = precision / recall
    return (1 + beta ** 2) * recall * precision / (recall + beta ** 2 * precision)


def generation_metrics(references: list[str], predictions: list[str]) -> dict:
    """Mean BLEU-4 and ROUGE-1/2/L F1, in percent, over pairs."""
    sums = Counter()
    for ref, pred in zip(references, predictions):
        ref_words, pred_words = words(ref), words(pred)
        sums["bleu-4"] += bleu4(ref, pred)
        sums["rouge-1"] += rouge_n(ref_words, pred_words, 1)
        sums["rouge-2"] += rouge_n(ref_words, pred_words, 2)
        sums["rouge-l"] += rouge_l(ref_words, pred_words)
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
