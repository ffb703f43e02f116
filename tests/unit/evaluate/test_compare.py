import json

import pytest

from tests.conftest import write_label_data
from tuneforge.config import ModelConfig
from tuneforge.evaluate.compare import run_eval
from tuneforge.infer.engine import Engine
from tuneforge.rundir import open_run


def test_eval_puts_base_and_tuned_side_by_side(tiny_run, tmp_path, capsys):
    folder = write_label_data(tmp_path / "d")
    config = open_run(tiny_run).config().model_dump(mode="json")
    config["data"]["dataset_dir"] = str(folder)
    config["eval"] = {"dataset": ["labels"], "general_dataset": "identity", "general_samples": 4, "max_new_tokens": 8,
                      "batch_size": 4}
    report = run_eval(config)
    by_model = report["datasets"]["labels"]
    assert set(by_model) == {"base", "tuned"} and by_model["tuned"]["mode"] == "score"
    general = report["general"]
    assert set(general) == {"base", "tuned"} and general["base"]["answer_perplexity"] > 1
    assert general["base"]["answer_perplexity"] != general["tuned"]["answer_perplexity"]
    assert json.loads((tiny_run / "eval.json").read_text())["datasets"]["labels"]["base"] == by_model["base"]
    table = capsys.readouterr().out
    assert "labels accuracy" in table and "identity answer_perplexity" in table and "change" in table


def test_adapter_off_is_exactly_the_base_model(tiny_run):
    tuned = Engine.load(str(tiny_run))
    base_model = open_run(tiny_run).meta()["base_model"]
    fresh = Engine.from_model(ModelConfig(name_or_path=base_model))
    fresh.tokenizer, fresh.default_system = tuned.tokenizer, tuned.default_system
    conversation = [[{"role": "user", "content": "Who are you?"}]]
    with tuned.without_adapter().active() as off:
        adapter_off = off.score_labels(conversation, ["1", "0"])
    assert adapter_off[0] == pytest.approx(fresh.score_labels(conversation, ["1", "0"])[0], abs=1e-5)
    assert tuned.score_labels(conversation, ["1", "0"])[0] != pytest.approx(adapter_off[0], abs=1e-5)
