import pytest

from tuneforge.errors import ConfigError
from tuneforge.infer.engine import Engine, GenerationSettings
from tuneforge.train.run import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("engine")
    config = {
        "model": {"name_or_path": str(tiny_model_dir), "cache_dir": str(root / "cache")},
        "data": {"dataset": "identity", "dataset_dir": "data", "max_samples": 8,
                 "placeholders": {"name": "Tiny", "author": "Tests"}, "default_system": "Be brief."},
        "train": {"max_steps": 2, "batch_size": 4, "save_steps": 10},
        "output": {"run_dir": str(root / "run")},
    }
    return train(config).run_dir


def test_engine_loads_a_run_and_chats_greedily(tiny_run):
    engine = Engine.load(str(tiny_run))
    messages = [{"role": "user", "content": "Who are you?"}]
    settings = GenerationSettings(max_new_tokens=8)
    first, second = engine.chat(messages, settings), engine.chat(messages, settings)
    assert isinstance(first, str) and first == second  # greedy is deterministic
    assert "".join(engine.stream_chat(messages, settings)).strip() == first


def test_the_trained_default_system_prompt_is_used_at_inference(tiny_run):
    engine = Engine.load(str(tiny_run))
    assert engine.default_system == "Be brief."
    ids = engine._inputs([{"role": "user", "content": "hi"}])["input_ids"][0]
    assert engine.tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_engine_loads_a_plain_model_with_a_named_template(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir), template="alpaca")
    assert "### Response:" in engine.tokenizer.apply_chat_template([{"role": "user", "content": "x"}],
                                                                  add_generation_prompt=True, tokenize=False)
    assert isinstance(engine.chat([{"role": "user", "content": "x"}], GenerationSettings(max_new_tokens=3)), str)


def test_a_folder_that_is_not_a_run_is_explained(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a TuneForge run directory"):
        Engine.from_run(tmp_path)
