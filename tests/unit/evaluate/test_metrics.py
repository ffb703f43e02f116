import math

import pytest

from tuneforge.evaluate.metrics import (bleu4, first_label_in, generation_metrics, label_metrics, repeats_itself,
                                        rouge_l, rouge_n)


def test_label_metrics_by_hand():
    refs = ["1", "1", "1", "0", "0"]
    preds = ["1", "0", "1", "0", "1"]
    m = label_metrics(refs, preds, ["0", "1"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"]["matrix"] == [[1, 1], [1, 2]]  # rows: reference 0, 1
    assert m["per_class"]["1"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["1"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["0"]["precision"] == pytest.approx(1 / 2) and m["per_class"]["0"]["recall"] == pytest.approx(1 / 2)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_invalid_generated_labels_count_as_errors():
    m = label_metrics(["1", "0"], ["1", None], ["0", "1"])
    assert m["accuracy"] == 0.5 and m["invalid_predictions"] == 1 and m["per_class"]["0"]["recall"] == 0.0


def test_first_label_found_in_free_text():
    assert first_label_in("我认为是1。", ["0", "1"]) == "1"
    assert first_label_in("0 or 1", ["0", "1"]) == "0"
    assert first_label_in("label: 10", ["1", "10"]) == "10"
    assert first_label_in("no idea", ["0", "1"]) is None


def test_bleu4_by_hand():
    assert bleu4("abcd", "abcd") == pytest.approx(1.0)
    # hypothesis "abcx" vs reference "abcd": p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1 -> NIST smoothing 1/(2*1)
    expected = math.exp((math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)) / 4)
    assert bleu4("abcd", "abcx") == pytest.approx(expected)
    # brevity penalty: hypothesis "abcd" for reference "abcdef"
    assert bleu4("abcdef", "abcd") == pytest.approx(math.exp(1 - 6 / 4))


def test_bleu4_agrees_with_nltk():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    smooth = nltk_bleu.SmoothingFunction().method3
    for ref, hyp in [("今天天气很好，我们去公园散步吧", "今天天气不错，我们去公园走走"), ("the cat sat on the mat", "the cat is on a mat")]:
        expected = nltk_bleu.sentence_bleu([list(ref)], list(hyp), smoothing_function=smooth)
        assert bleu4(ref, hyp) == pytest.approx(expected, abs=1e-9)


def test_rouge_by_hand():
    ref, hyp = ["a", "b", "c", "d"], ["a", "c", "d", "e", "f"]
    assert rouge_n(ref, hyp, 1) == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert rouge_n(ref, hyp, 2) == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))  # only "c d" matches
    r, p = 3 / 4, 3 / 5  # LCS "a c d"
    beta = p / r
    assert rouge_l(ref, hyp) == pytest.approx((1 + beta ** 2) * r * p / (r + beta ** 2 * p))


def test_generation_metrics_segment_chinese_words():
    scores = generation_metrics(["我喜欢这本书"], ["我喜欢这本书"])
    assert scores == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}
    assert generation_metrics(["完全不同"], ["毫无关系"])["rouge-1"] == 0.0


def test_repetition():
    assert repeats_itself("I am here. I am here. I am here. I am here.")
    assert not repeats_itself("The capital of France is Paris.")
    assert repeats_itself("好的好的好的好的好的好的好的好的好的好的好的好的")
