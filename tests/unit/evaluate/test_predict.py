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


def test_scoring_predicts_the_highest_scoring_label_and_counts_it(tiny_run, tmp_path):
    engine = Engine.load(str(tiny_run))
    prompts, references = label_rows(tmp_path)
    result = predict(engine, prompts, references, batch_size=5, progress=False)
    m = result.metrics
    assert m["mode"] == "score" and m["samples"] == 12 and m["samples_per_second"] > 0
    for row in result.rows:
        assert row["prediction"] == max(row["scores"], key=row["scores"].get)
    assert m["accuracy"] == pytest.approx(sum(r["prediction"] == r["label"] for r in result.rows) / 12)
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) == 12


def test_generation_reports_text_metrics_and_label_accuracy(tiny_run, tmp_path):
    engine = Engine.load(str(tiny_run))
    prompts, references = label_rows(tmp_path)
    result = predict(engine, prompts, references, mode="generate", batch_size=4,
                     settings=GenerationSettings(max_new_tokens=3), progress=False)
    m = result.metrics
    assert m["mode"] == "generate" and {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "repetitive_share"} <= set(m)
    assert m["labels"]["samples"] == 12
    assert all("label_found" in r and "hit_max_new_tokens" in r for r in result.rows)


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
