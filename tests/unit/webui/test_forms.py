"""Forms derived from the config schema: every key has a field, and form -> config -> form round trips."""

from pathlib import Path

import pytest

from tests.conftest import REPO
from tuneforge.config import load_config
from tuneforge.config.help import schema_help
from tuneforge.errors import ConfigError
from tuneforge.webui.forms import OFF, config_from_form, form_from_config, overrides_from_form, schema_fields

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_every_config_key_has_a_form_field():
    help_keys = {line.split()[0] for line in schema_help().splitlines()}
    form_keys = {f.key for f in schema_fields()}
    switches = {f.key for f in schema_fields() if f.choices == [OFF, "on"]}  # optional sections (help lists inside)
    assert help_keys == form_keys - switches


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_round_trips_through_the_form(example: Path):
    cfg = load_config(example)
    values = form_from_config(cfg)
    assert config_from_form(values) == cfg


@pytest.mark.parametrize("overrides", [
    ["method.stage=dpo", "method.pref_loss=simpo", "method.beta=2.5"],
    ["method.adapter.type=full", "method.adapter.optimizer.name=galore", "method.adapter.optimizer.scale=0.5"],
    ["method.adapter.type=freeze", "method.adapter.trainable_layers=-3", "method.adapter.extra_modules=embed_tokens"],
    ["model.mixture_of_depths.capacity=0.25", "method.adapter.type=full"],
    ["model.quantization_bit=4", "data.placeholders={name: Bot, author: Me}", "data.max_samples=10"],
    ["method.stage=kto", "method.desirable_weight=1.5"],
])
def test_variants_round_trip(overrides):
    cfg = load_config({"model": {"name_or_path": "smollm2-135m-instruct"}, "data": {"dataset": "identity"}}, overrides)
    assert config_from_form(form_from_config(cfg)) == cfg


def test_only_changed_active_keys_become_overrides():
    cfg = load_config({"model": {"name_or_path": "m"}, "data": {"dataset": "identity"}})
    values = form_from_config(cfg)
    assert overrides_from_form(values) == ["model.name_or_path=m", "data.dataset=identity"]
    values.update({"method.stage": "dpo", "method.beta": "0.3", "method.kl_coef": "9", "train.learning_rate": "2e-4"})
    assert overrides_from_form(values) == ["model.name_or_path=m", "data.dataset=identity", "method.stage=dpo",
                                           "method.beta=0.3", "train.learning_rate=2e-4"]  # kl_coef: ppo only


def test_bad_form_values_are_named_by_key():
    values = form_from_config(load_config({"model": {"name_or_path": "m"}, "data": {"dataset": "identity"}}))
    values.update({"train.batch_size": "four", "train.learning_rate": "inf"})
    with pytest.raises(ConfigError) as info:
        config_from_form(values)
    text = info.value.render()
    assert "train.batch_size" in text and "train.learning_rate: Input should be a finite number" in text


def test_every_text_exists_in_english_and_chinese_and_every_key_has_chinese_help():
    import re

    from tuneforge.webui.texts import help_zh, strings

    assert all(set(entry) == {"en", "zh"} for entry in strings().values())
    used = set()
    for path in (REPO / "src" / "tuneforge" / "webui").glob("*.py"):
        source = path.read_text(encoding="utf-8")
        used |= set(re.findall(r'(?:initial|text)\("([a-z_]+)"', source))
        used |= set(re.findall(r'(?:label|info|value)="([a-z_]+)"\)', source))
    used |= {f"section_{s}" for s in ("model", "data", "method", "train", "output", "eval")}
    assert used - set(strings()) == set()
    assert {f.key for f in schema_fields()} - set(help_zh()) == set()
