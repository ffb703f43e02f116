"""`tuneforge check`: the memory estimate's terms follow the config, and --measure times real steps without
touching the run directory."""

import pytest

from tests.conftest import build_tiny_model
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.model.adapters import ParamCount
from tuneforge.train.check import check
from tuneforge.train.estimate import PROCESS_OVERHEAD, estimate_memory

PARAMS = ParamCount(trainable=1_000, total=100_000)


def _estimate(tiny_config, longest=100, share=0.5, **sections):
    for section, values in sections.items():
        tiny_config[section].update(values)
    return estimate_memory(load_config(tiny_config), build_tiny_model(600).config, PARAMS, longest, share)


def test_weights_gradients_and_adam_states_are_counted_in_float32(tiny_config):
    m = _estimate(tiny_config)
    assert (m.weights, m.gradients, m.optimizer, m.overhead) == (400_000, 4_000, 8_000, PROCESS_OVERHEAD)
    assert m.tokens == 4 * 100  # batch 4 of the longest row
    assert m.total == m.weights + m.gradients + m.optimizer + m.activations + m.overhead


def test_terms_follow_the_switches(tiny_config):
    base = _estimate(dict(tiny_config))
    assert _estimate(tiny_config, train={"optim": "sgd"}).optimizer == 0
    assert _estimate(tiny_config, longest=1000).tokens == 4 * 128  # sequences are cut at cutoff_len
    checkpointed = _estimate(tiny_config, train={"gradient_checkpointing": True})
    assert checkpointed.activations < base.activations
    tiny_config["train"]["gradient_checkpointing"] = False
    assert _estimate(tiny_config, train={"batch_size": 8}).activations == pytest.approx(2 * base.activations)


def test_preference_pairs_double_the_sequences(tiny_config):
    tiny_config["method"] = {"stage": "dpo", "adapter": {"type": "full"}}
    m = _estimate(tiny_config)
    assert m.tokens == 2 * 4 * 100
    assert m.weights == 2 * 400_000  # a frozen reference copy for full training


def test_check_measures_steps_in_a_throwaway_directory(tiny_config, tmp_path):
    result = check(tiny_config, measure_steps=2)
    assert result.measured.steps == 2 and result.measured.tokens_per_second > 0
    assert result.measured.peak_bytes > 0 and result.measured.epoch_seconds > 0
    assert "memory estimate: ~" in result.report and "the estimate is" in result.report
    assert not (tmp_path / "run").exists()


def test_cli_check_prints_the_estimate(tiny_config, tmp_path, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "memory estimate: ~" in out and "measured" not in out


def test_settings_that_are_allowed_but_not_meant_are_warned_about(tiny_config):
    from tuneforge.train.check import check

    report = check(tiny_config, ["train.learning_rate=1e9", "data.cutoff_len=4096"]).report
    assert "warning: train.learning_rate=1e+09 is far above what fine-tuning uses" in report
    assert "warning: data.cutoff_len=4096 is longer than the model's context (512 tokens)" in report
