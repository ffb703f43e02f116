import pytest

from tuneforge.evaluate.metrics import (bleu4, first_label_in, generation_metrics, label_metrics, repeats_itself,
                                        rouge_f1)


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


# Everyday pairs plus the edge cases where hand-written BLEU/ROUGE used to go wrong: answers shorter than four
# characters, no overlap at all, an empty side, mixed English and Chinese.
PAIRS = [("好评", "好评"), ("好评", "差评"), ("完全不同", "毫无关系"), ("今天天气很好，我们去公园散步吧", "今天天气不错，我们去公园走走"),
         ("the cat sat on the mat", "the cat is on a mat"), ("这款手机的电池续航很长，拍照效果也不错", "手机电池很耐用，拍照也好"),
         ("1", "1"), ("abc", "xyz"), ("物流很快，包装完好，five stars", "物流快，包装好"), ("有内容", ""), ("", "有内容")]


def reference_scores(ref: str, hyp: str) -> dict:
    """What LLaMA-Factory's ComputeSimilarity computes for one pair, with nltk and rouge_chinese themselves."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hyp_words, ref_words = list(jieba.cut(hyp)), list(jieba.cut(ref))
    if len(" ".join(hyp_words).split()) == 0 or len(" ".join(ref_words).split()) == 0:
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        scores = Rouge().get_scores(" ".join(hyp_words), " ".join(ref_words))[0]
        rouge = {k: v["f"] for k, v in scores.items()}
    bleu = sentence_bleu([list(ref)], list(hyp), smoothing_function=SmoothingFunction().method3)
    return {"bleu-4": bleu, **rouge}


@pytest.mark.parametrize("ref, hyp", PAIRS)
def test_bleu_and_rouge_equal_the_packages_llamafactory_scores_with(ref, hyp):
    expected = reference_scores(ref, hyp)
    got = generation_metrics([ref], [hyp])
    assert got == pytest.approx({k: round(100 * v, 4) for k, v in expected.items()}, abs=1e-9)


def test_pinned_values_of_the_short_and_disjoint_cases():
    assert bleu4("好评", "好评") == pytest.approx(0.5946035575, abs=1e-9)  # nltk method3 on a 2-character answer
    assert bleu4("abc", "xyz") == 0.0  # no unigram in common
    assert rouge_f1("今天天气很好，我们去公园散步吧", "今天天气不错，我们去公园走走")["rouge-l"] > 0.5
    assert rouge_f1("有内容", "") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_generation_metrics_average_over_pairs():
    refs, hyps = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    per_pair = [reference_scores(r, h) for r, h in PAIRS]
    expected = {k: round(100 * sum(s[k] for s in per_pair) / len(PAIRS), 4) for k in per_pair[0]}
    assert generation_metrics(refs, hyps) == pytest.approx(expected, abs=1e-9)
    assert generation_metrics(["我喜欢这本书"], ["我喜欢这本书"]) == {"bleu-4": 100.0, "rouge-1": 100.0,
                                                                    "rouge-2": 100.0, "rouge-l": 100.0}


def test_repetition():
    assert repeats_itself("I am here. I am here. I am here. I am here.")
    assert not repeats_itself("The capital of France is Paris.")
    assert repeats_itself("好的好的好的好的好的好的好的好的好的好的好的好的")
