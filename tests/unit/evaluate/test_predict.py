import json

import pytest

from tests.conftest import write_label_data
from tuneforge.cli import main
from tuneforge.config import DataConfig
from tuneforge.data.pipeline import load_examples
from tuneforge.errors import DataError
from tuneforge.evaluate.predict import detect_labels, predict, split_answers
from tuneforge.infer.engine import Engine, GenerationSettings


def label_rows(tmp_path):
    folder = write_label_data(tmp_path / "d")
    spec, conversion = load_examples("labels", DataConfig(dataset=["labels"], dataset_dir=str(folder)))
    return split_answers(conversion.examples, spec.name)


def test_label_sets_are_detected_only_when_small_and_repeated():
    assert detect_labels(["1", "0", "1", "0"]) == ["0", "1"]
    assert detect_labels(["a long free-form answer", "another one", "a third", "x"]) is None
    assert detect_labels(["1", "0"]) is None  # every answer distinct: not a label task


@pytest.fixture(scope="module")
def label_run(tiny_model_dir, tmp_path_factory):
    """The tiny model trained on the label rows (great -> 1, awful -> 0) until it answers them right."""
    from tuneforge.train.run import train

    root = tmp_path_factory.mktemp("label-run")
    folder = write_label_data(root / "d")
    return train({"model": {"name_or_path": str(tiny_model_dir), "cache_dir": str(root / "cache")},
                  "data": {"dataset": "labels", "dataset_dir": str(folder), "cutoff_len": 64},
                  "method": {"adapter": {"type": "full"}},
                  "train": {"max_steps": 60, "batch_size": 12, "learning_rate": 1e-2, "save_steps": 1000,
                            "lr_scheduler": "constant", "logging_steps": 60},
                  "output": {"run_dir": str(root / "run")}}).run_dir


def test_scoring_a_model_that_learned_the_labels(label_run, tmp_path):
    engine = Engine.load(str(label_run))
    prompts, references = label_rows(tmp_path)
    result = predict(engine, prompts, references, batch_size=5, progress=False)
    m = result.metrics
    assert m["mode"] == "score" and m["samples"] == 12
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["confusion_matrix"]["matrix"] == [[6, 0], [0, 6]]
    assert [r["prediction"] for r in result.rows] == references


def test_scoring_an_untrained_model_counts_its_mistakes(tiny_run, tmp_path):
    """Scores are the label's log-probability under a full forward pass; the metrics count what was predicted."""
    import torch

    engine = Engine.load(str(tiny_run))
    prompts, references = label_rows(tmp_path)
    result = predict(engine, prompts, references, batch_size=5, progress=False)
    label_ids = engine.label_ids(["0", "1"])
    for prompt, row in zip(prompts, result.rows):
        ids = engine.prompt_ids(prompt)
        for label, continuation in zip(["0", "1"], label_ids):
            with torch.no_grad():
                logp = torch.log_softmax(engine.model(input_ids=torch.tensor([ids + continuation])).logits[0], -1)
            expected = sum(logp[len(ids) + j - 1, t].item() for j, t in enumerate(continuation))
            assert row["scores"][label] == pytest.approx(expected, abs=1e-4)
    predicted = [max(("0", "1"), key=r["scores"].get) for r in result.rows]
    pairs = list(zip(references, predicted))
    matrix = [[pairs.count((a, b)) for b in ("0", "1")] for a in ("0", "1")]
    assert result.metrics["confusion_matrix"]["matrix"] == matrix
    assert result.metrics["accuracy"] == (matrix[0][0] + matrix[1][1]) / 12


def test_generation_of_a_model_that_learned_the_labels(label_run, tmp_path):
    from tuneforge.evaluate.metrics import bleu4

    engine = Engine.load(str(label_run))
    prompts, references = label_rows(tmp_path)
    result = predict(engine, prompts, references, mode="generate", batch_size=4,
                     settings=GenerationSettings(max_new_tokens=3), progress=False)
    m = result.metrics
    assert [r["prediction"] for r in result.rows] == references and m["labels"]["accuracy"] == 1.0
    assert m["rouge-1"] == m["rouge-l"] == 100.0 and m["bleu-4"] == pytest.approx(100 * bleu4("1", "1"), abs=1e-4)
    assert m["repetitive_share"] == 0.0 and not any(r["hit_max_new_tokens"] for r in result.rows)


def test_references_outside_the_declared_labels_are_an_error(tiny_run, tmp_path):
    engine = Engine.load(str(tiny_run))
    prompts, references = label_rows(tmp_path)
    with pytest.raises(DataError, match=r"references \['0'\] are not among the labels \['1', '2'\]"):
        predict(engine, prompts, references, labels=["1", "2"], progress=False)


def test_cli_predict_writes_predictions_and_metrics(tiny_run, tmp_path, capsys):
    folder = write_label_data(tmp_path / "d")
    out = tmp_path / "out"
    assert main(["predict", str(tiny_run), "--data", "labels", "--dataset-dir", str(folder), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"prompt", "label", "prediction", "scores"}
    assert json.loads((out / "metrics.json").read_text())["mode"] == "score"
    assert "accuracy" in capsys.readouterr().out


def test_cli_predict_on_a_bare_file_defaults_into_the_run(tiny_run, tmp_path):
    folder = write_label_data(tmp_path / "d")
    assert main(["predict", str(tiny_run), "--data", str(folder / "labels.jsonl"), "--max-samples", "4"]) == 0
    assert (tiny_run / "predict" / "labels" / "metrics.json").is_file()
