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


def test_forgetting_is_measured_without_the_task_system_prompt(tiny_run, tmp_path, monkeypatch):
    """A run whose adapter changes nothing gives identical base and tuned general figures, and the general rows are
    scored with their own system prompt (none here), not the run's "Be brief."; that one gets its own row."""
    import shutil

    from safetensors.torch import load_file, save_file

    import tuneforge.infer.engine as engine_module

    run = shutil.copytree(tiny_run, tmp_path / "zero")
    weights = run / "adapter" / "adapter_model.safetensors"
    save_file({k: v * 0 if "lora_B" in k else v for k, v in load_file(str(weights)).items()}, str(weights))
    rendered = []
    original = engine_module.encode_sft
    monkeypatch.setattr(engine_module, "encode_sft", lambda example, *a, **k: (
        rendered.append(example.messages), original(example, *a, **k))[1])
    config = open_run(run).config().model_dump(mode="json")
    config["output"]["run_dir"] = str(run)
    config["eval"] = {"dataset": [], "general_dataset": "identity", "general_samples": 4, "max_new_tokens": 8}
    general = run_eval(config)["general"]
    for key in ("answer_perplexity", "answer_perplexity_task_system_prompt", "repetitive_share"):
        assert general["base"][key] == pytest.approx(general["tuned"][key], rel=1e-6)
    plain = [m for m in rendered if m[0]["role"] != "system"]
    with_task_prompt = [m for m in rendered if m[0] == {"role": "system", "content": "Be brief."}]
    assert len(plain) == len(with_task_prompt) == 8  # 4 rows, base and tuned: without, then the labelled figure
    assert general["base"]["answer_perplexity"] != pytest.approx(general["base"]["answer_perplexity_task_system_prompt"])
