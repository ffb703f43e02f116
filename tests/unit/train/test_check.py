"""`tuneforge check`: the memory estimate's terms follow the config, and --measure times real steps without
touching the run directory."""

import pytest

from tests.conftest import build_tiny_model, saved_tensor_bytes
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
    # gradients at the peak: the blocks' arrive while their activations are freed, half of them are counted (the
    # tiny model's 1,000 trainable weights all sit in its blocks)
    assert (m.weights, m.gradients, m.optimizer, m.overhead) == (400_000, 2_000, 8_000, PROCESS_OVERHEAD)
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


def test_a_frozen_head_keeps_a_vocabulary_slice_not_the_logits(tiny_config):
    """LoRA's loss takes one pass over the frozen head (tuneforge.model.scoring): no (tokens x vocabulary) logits
    and the last block's MLP at the supervised positions only. A trained head (modules_to_save) or a preference
    stage keeps the logits."""
    from tuneforge.train.estimate import activation_slack

    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=50_000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    assert config.architectures is None  # the model type decides where the config names no class

    def activations(**adapter):
        cfg = load_config(tiny_config)
        cfg.method.adapter = cfg.method.adapter.model_copy(update=adapter)
        return estimate_memory(cfg, config, PARAMS, 100, 0.25).activations

    tokens = 4 * 100
    slice_rows = (4 << 20) // (64 * 4)  # 16,384 rows of 64 floats: 4 MiB
    single, trained_head = activations(), activations(modules_to_save=["lm_head"])
    expected = tokens * 0.25 * (50_000 - slice_rows) * 3 * 4 + tokens * 2 * 128 * activation_slack() * 0.75 * 4
    assert trained_head - single == pytest.approx(expected, abs=8)
    tiny_config["method"] = {"stage": "dpo", "adapter": {"type": "lora"}}
    dpo = estimate_memory(load_config(tiny_config), config, PARAMS, 100, 0.25)
    assert dpo.activations > 2 * single  # chosen and rejected rows, with their logits


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


def _saved_floats_per_token_and_block(config, lora: bool, tokens: int = 32) -> float:
    """What autograd really keeps: saved tensors (parameters excluded, shared storages once) of a two-block model
    minus a one-block model, per token."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.model.lean_mlp import lean_mlps, lean_norms

    kept = []
    for layers in (1, 2):
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = ["full_attention"] * layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        lean_mlps(model)  # as training builds it
        lean_norms(model)
        if lora:
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                     lora_dropout=0.0))
        else:
            model.get_input_embeddings().weight.requires_grad_(False)
        kept.append(saved_tensor_bytes(model.train(), torch.randint(0, 100, (1, tokens))))
    return (kept[1] - kept[0]) / tokens / 4


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_activation_term_is_what_autograd_saves(kind, lora):
    """The activation term per token and block against the tensors autograd keeps for these architectures
    (queries, keys and values of different widths, so that each dimension's coefficient is checked)."""
    from transformers import AutoConfig

    from tuneforge.train.estimate import saved_per_token

    config = AutoConfig.for_model(kind, hidden_size=192, intermediate_size=320, num_attention_heads=6,
                                  num_key_value_heads=2, head_dim=48, vocab_size=100)
    config._attn_implementation = "sdpa"
    measured = _saved_floats_per_token_and_block(config, lora)
    assert saved_per_token(config, trains_weights=not lora, lora_rank=8 if lora else 0) == pytest.approx(
        measured, rel=0.02)


def test_check_names_the_switch_that_makes_a_run_fit(tiny_config):
    from tuneforge.train.check import FIT_SHARE, estimate_for, fitting_switch
    from tuneforge.train.prepare import prepare

    tiny_config["method"] = {"stage": "sft", "adapter": {"type": "full"}}
    cfg = load_config(tiny_config)
    prepared = prepare(cfg)
    full = estimate_for(cfg, prepared)
    checkpointed = estimate_for(load_config(cfg, ["train.gradient_checkpointing=true"]), prepared)
    assert checkpointed.total < full.total
    switch, estimate = fitting_switch(cfg, prepared, int(checkpointed.total / FIT_SHARE) + 1)
    assert switch == "train.gradient_checkpointing=true" and estimate.total == checkpointed.total
    switch, estimate = fitting_switch(cfg, prepared, int(checkpointed.total / FIT_SHARE) - 1)
    assert switch.startswith("train.gradient_checkpointing=true train.batch_size=2 ")  # same effective batch
    assert estimate.total < checkpointed.total
    lora = estimate_for(load_config(cfg, ["method.adapter.type=lora"]), prepared)
    smallest = min(lora.total, estimate.total)
    assert fitting_switch(cfg, prepared, 1) is None  # nothing fits in one byte
    assert fitting_switch(cfg, prepared, int(smallest / FIT_SHARE) + 1) is not None


def test_switch_halves_only_even_batches(tiny_config):
    """Halving a batch of 3 with doubled accumulation would not keep the effective batch: no such switch."""
    from tuneforge.train.check import FIT_SHARE, estimate_for, fitting_switch
    from tuneforge.train.prepare import prepare

    tiny_config["method"] = {"stage": "sft", "adapter": {"type": "full"}}
    cfg = load_config(tiny_config, ["train.batch_size=3"])
    prepared = prepare(cfg)
    checkpointed = estimate_for(load_config(cfg, ["train.gradient_checkpointing=true"]), prepared)
    switch, _ = fitting_switch(cfg, prepared, int(checkpointed.total / FIT_SHARE) - 1)
    assert "train.batch_size" not in switch and "method.adapter.type=lora" in switch


def test_train_turns_checkpointing_on_when_the_estimate_does_not_fit(tiny_config, monkeypatch, capsys):
    from tuneforge.train import check as check_module
    from tuneforge.train import estimate, run
    from tuneforge.train.check import estimate_for
    from tuneforge.train.prepare import prepare

    cfg = load_config(tiny_config)
    prepared = prepare(cfg)
    needed = estimate_for(load_config(cfg, ["train.gradient_checkpointing=true"]), prepared).total
    assert needed < estimate_for(cfg, prepared).total
    monkeypatch.setattr(check_module, "FIT_SHARE", 1.0)  # the tiny model's activations are far below 5% of it
    monkeypatch.setattr(estimate, "available_memory", lambda: (needed, "available RAM"))
    run.fit_memory(cfg, prepared)
    assert cfg.train.gradient_checkpointing
    assert "gradient checkpointing turned on" in capsys.readouterr().out
    explicit = load_config(tiny_config, ["train.gradient_checkpointing=false"])
    run.fit_memory(explicit, prepared)  # the user said no: a warning with the switch, nothing changed
    assert not explicit.train.gradient_checkpointing
    out = capsys.readouterr().out
    assert "warning: the estimated peak" in out and "train.gradient_checkpointing=true" in out
