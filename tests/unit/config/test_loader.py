from pathlib import Path

import pytest

from tuneforge.config import TuneForgeConfig, dump_config, load_config
from tuneforge.config.help import schema_help
from tuneforge.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
BASE = {"model": {"name_or_path": "m"}, "data": {"dataset": "identity"}}


def problems(raw, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(raw, list(overrides))
    return info.value.problems


def test_unknown_key_suggests_the_close_one():
    assert problems({**BASE, "train": {"lerning_rate": 1}}) == [
        "config: train.lerning_rate: unknown key; did you mean 'learning_rate'?"]


def test_every_problem_is_reported_at_once():
    raw = {"model": {"name_or_path": "m", "templat": "x"}, "data": {"dataset": "a", "cutoff_len": 2},
           "method": {"stage": "rlhf"}, "bogus": 1}
    found = problems(raw)
    assert len(found) == 4
    assert "config: model.templat: unknown key; did you mean 'template'?" in found
    assert "config: data.cutoff_len: Input should be greater than or equal to 8 (given 2)" in found
    assert "config: method.stage: 'rlhf' is not one of sft | pt | rm | dpo | kto | ppo" in found
    assert any(p.startswith("config: bogus: unknown key; expected one of model, data") for p in found)


def test_adapter_errors_name_the_yaml_path_not_the_union_tag():
    found = problems({**BASE, "method": {"adapter": {"type": "lora", "rnk": 4}}})
    assert found == ["config: method.adapter.rnk: unknown key; did you mean 'rank'?"]


def test_stage_options_belong_to_their_stage():
    assert problems({**BASE, "method": {"stage": "sft", "beta": 0.1}})[0].startswith(
        "config: method.beta: unknown key; expected one of")
    cfg = load_config({**BASE, "method": {"stage": "dpo", "beta": 0.2, "pref_loss": "simpo"}})
    assert cfg.method.beta == 0.2 and cfg.method.adapter.type == "lora"
    assert problems({**BASE, "method": {"stage": "ppo"}}) == ["config: method.reward_model: required key is missing"]


def test_missing_section_is_reported():
    assert problems({"model": {"name_or_path": "m"}}) == ["config: data: required key is missing"]


def test_overrides_parse_yaml_scalars_and_create_sections():
    cfg = load_config(BASE, ["train.learning_rate=1e-4", "train.num_epochs=2", "data.dataset=a,b",
                             "method.adapter.type=freeze", "method.adapter.trainable_layers=-3",
                             "train.report_to=[tensorboard]"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.num_epochs == 2
    assert cfg.data.dataset == ["a", "b"]
    assert cfg.method.adapter.type == "freeze" and cfg.method.adapter.trainable_layers == -3
    assert cfg.train.report_to == ["tensorboard"]


def test_switching_variant_on_the_command_line_drops_the_old_variants_keys(capsys):
    base = {**BASE, "method": {"stage": "dpo", "beta": 0.2, "adapter": {"type": "lora", "rank": 4, "alpha": 8}}}
    cfg = load_config(base, ["method.adapter.type=full", "method.stage=sft"])
    assert cfg.method.stage == "sft" and cfg.method.adapter.type == "full"
    err = capsys.readouterr().err
    assert "method.adapter.type=full: dropped rank, alpha" in err and "method.stage=sft: dropped beta" in err
    assert load_config(base, ["method.adapter.rank=16"]).method.adapter.rank == 16  # no switch, nothing dropped


def test_malformed_override():
    assert problems(BASE, ["train.learning_rate"]) == [
        "override 'train.learning_rate': expected key=value, e.g. train.learning_rate=1e-4"]


def test_invalid_combination_is_rejected():
    found = problems({**BASE, "method": {"stage": "pt"}, "data": {"dataset": "c4_demo", "train_on_prompt": True}})
    assert len(found) == 1 and "train_on_prompt and data.mask_history apply to sft only" in found[0]


def test_a_flat_llamafactory_config_is_translated_and_what_it_lacks_is_named():
    found = problems({"model_name_or_path": "x", "stage": "sft", "finetuning_type": "lora"})
    assert found == ["config: dataset: required: the data set names from dataset_info.json, e.g. dataset: identity"]


def test_a_config_mixing_sections_and_flat_keys_gets_the_hint():
    found = problems({**BASE, "lora_rank": 8})
    assert any("looks like a flat LLaMA-Factory config" in p for p in found)


def test_yaml_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_dump_round_trips():
    cfg = load_config(BASE, ["method.adapter.rank=4"])
    assert load_config(__import__("yaml").safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_validates(path):
    assert isinstance(load_config(path), TuneForgeConfig)


def test_schema_help_lists_documented_keys_of_every_adapter():
    text = schema_help()
    assert "data.cutoff_len  (default 1024): Maximum tokens per training sequence" in text
    assert "method.adapter.rank  (default 8): LoRA rank r.   [lora]" in text
    assert "method.adapter.trainable_layers" in text and "[freeze]" in text
    assert "model.name_or_path  (required)" in text
