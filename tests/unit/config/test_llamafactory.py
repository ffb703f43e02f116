"""LLaMA-Factory configs, unchanged: translated with LLaMA-Factory's behaviour where defaults differ, every key
accounted for, and each stage's example config trained for a few steps."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import LLAMAFACTORY_DATA, REPO
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.config.llamafactory import is_llamafactory, key_table, translate
from tuneforge.errors import ConfigError

EXAMPLES = REPO / "tests" / "assets" / "llamafactory_configs"


def lf(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))


def test_the_lora_sft_example_becomes_this_config():
    result = translate(lf("llama3_lora_sft.yaml"))
    assert result.config == {
        "model": {"name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "trust_remote_code": True,
                  "template": "llamafactory:llama3"},
        "data": {"overlong": "split", "dataset": ["identity", "alpaca_en_demo"], "cutoff_len": 2048, "max_samples": 1000,
                 "overwrite_cache": True, "preprocessing_num_workers": 16},
        "method": {"stage": "sft", "adapter": {"type": "lora", "alpha": 16, "target_modules": "all", "rank": 8}},
        "train": {"gradient_checkpointing": True, "lr_scheduler": "cosine", "dataloader_num_workers": 4,
                  "logging_steps": 10, "save_steps": 500, "batch_size": 1, "gradient_accumulation_steps": 8,
                  "learning_rate": 1e-4, "num_epochs": 3.0, "warmup_ratio": 0.1, "group_by_length": False},
        "output": {"run_dir": "saves/llama3-8b/lora/sft", "plot_loss": True, "overwrite": True}}
    assert any(n.startswith("gradient checkpointing on") for n in result.notes)
    assert {i.split(":")[0] for i in result.ignored} == {"do_train", "save_only_model", "bf16", "ddp_timeout"}


def test_llamafactory_defaults_that_differ_are_kept_and_said():
    result = translate({"model_name_or_path": "m", "dataset": "identity", "lora_rank": 32})
    config = load_config(result.config)
    assert config.data.cutoff_len == 2048 and config.train.learning_rate == 5e-5 and config.train.batch_size == 8
    assert config.train.lr_scheduler == "linear" and config.train.group_by_length is False
    assert config.method.adapter.alpha == 64 and config.train.gradient_checkpointing is True
    assert any("lora_alpha: 64 (2 x lora_rank" in n for n in result.notes)
    off = translate({"model_name_or_path": "m", "dataset": "identity", "disable_gradient_checkpointing": True,
                     "lora_alpha": 8})
    assert "gradient_checkpointing" not in off.config["train"] and off.config["method"]["adapter"]["alpha"] == 8
    ppo = translate({"model_name_or_path": "m", "dataset": "identity", "stage": "ppo", "reward_model": "runs/rm"})
    assert ppo.config["method"] | {} == {"stage": "ppo", "adapter": ppo.config["method"]["adapter"], "ppo_epochs": 4,
                                         "temperature": 0.95, "top_p": 0.7, "max_new_tokens": 1024,
                                         "reward_model": "runs/rm"}
    assert any("top_k: 50 is not applied" in n for n in ppo.notes)
    galore = translate({"model_name_or_path": "m", "dataset": "identity", "finetuning_type": "full",
                        "use_galore": True, "galore_rank": 8, "galore_target": "mlp,self_attn"})
    assert galore.config["method"]["adapter"]["optimizer"] == {
        "name": "galore", "rank": 8, "update_interval": 200, "scale": 2.0, "layerwise": False,
        "target_modules": ["mlp", "self_attn"]}
    assert load_config(galore.config).method.adapter.optimizer.scale == 2.0


def test_every_key_is_accounted_for_in_one_message():
    raw = {"model_name_or_path": "m", "dataset": "identity", "preserve_thinking": True, "shift_attn": True,
           "finetuning_type": "oft", "lora_rnak": 8, "pref_loss": "kto_pair", "stage": "dpo",
           "mix_strategy": "interleave_under", "use_muon": False, "rope_scaling": "linear"}
    with pytest.raises(ConfigError) as info:
        translate(raw, "lf.yaml")
    problems = info.value.problems
    assert problems == [
        "lf.yaml: finetuning_type: 'oft' is not supported; use lora, freeze or full",
        "lf.yaml: pref_loss: kto_pair is not supported; use stage kto with KTO data",
        "lf.yaml: preserve_thinking: True: keeping earlier thoughts is not supported yet",
        "lf.yaml: shift_attn: True: LongLoRA's shifted attention is not supported",
        "lf.yaml: lora_rnak: not a LLaMA-Factory key TuneForge knows",
        "lf.yaml: rope_scaling: 'linear': RoPE scaling for longer contexts is not supported yet"]  # use_muon: false is LLaMA-Factory's default: fine


def test_engine_and_thinking_keys_carry_over():
    cfg = translate({"model_name_or_path": "m", "dataset": "identity", "deepspeed": "examples/deepspeed/ds_z3.json",
                     "stage": "sft"}, "lf.yaml").config
    assert cfg["train"]["deepspeed"] == "examples/deepspeed/ds_z3.json"
    cfg = translate({"model_name_or_path": "m", "dataset": "identity", "fsdp": "full_shard auto_wrap",
                     "fsdp_config": "fsdp.json"}, "lf.yaml").config
    assert cfg["train"]["fsdp"] == "full_shard auto_wrap" and cfg["train"]["fsdp_config"] == "fsdp.json"
    cfg = translate({"model_name_or_path": "m", "dataset": "identity", "template": "qwen3",
                     "enable_thinking": False}, "lf.yaml").config
    assert cfg["data"]["enable_thinking"] is False and cfg["model"]["template"] == "llamafactory:qwen3"


def test_the_key_table_is_consistent_with_the_schema():
    """Every TuneForge key the table writes exists in the schema (a renamed key would otherwise fail only at run)."""
    from tuneforge.config.help import schema_help

    known = {line.split()[0] for line in schema_help().splitlines()}
    table = key_table()
    targets = set(table["direct"].values())
    assert not targets - known, targets - known
    overlap = set(table["direct"]) & (set(table["cosmetic"]) | set(table["unsupported"]))
    assert not overlap, overlap


def test_overrides_work_in_either_spelling(tmp_path):
    path = tmp_path / "lf.yaml"
    path.write_text((EXAMPLES / "llama3_lora_sft.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    config = load_config(path, ["lora_rank=16", "train.learning_rate=3e-4", "cutoff_len=512"])
    assert config.method.adapter.rank == 16 and config.method.adapter.alpha == 32  # alpha follows LF's rule
    assert config.train.learning_rate == 3e-4 and config.data.cutoff_len == 512
    assert is_llamafactory(yaml.safe_load(path.read_text())) and not is_llamafactory({"model": {}, "data": {}})


def test_convert_prints_and_writes_the_translation(tmp_path, capsys):
    source = EXAMPLES / "llama3_lora_dpo.yaml"
    assert main(["convert", str(source)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# TuneForge config translated from a LLaMA-Factory config")
    assert "LLaMA-Factory behaviour kept" in printed and "pref_loss: sigmoid" in printed
    out = tmp_path / "tf.yaml"
    assert main(["convert", str(source), "pref_beta=0.2", "--out", str(out)]) == 0
    written = load_config(out)
    assert written.method.stage == "dpo" and written.method.beta == 0.2 and written.data.cutoff_len == 2048
    assert main(["convert", str(source), "--out", str(out)]) == 2  # never overwrites
    assert main(["convert", str(REPO / "examples" / "quickstart.yaml")]) == 2
    assert "not a flat LLaMA-Factory config" in capsys.readouterr().err


STAGES = ["llama3_lora_sft.yaml", "llama3_full_sft.yaml", "llama3_freeze_sft.yaml", "llama3_lora_pretrain.yaml",
          "llama3_lora_dpo.yaml", "llama3_lora_kto.yaml"]


@pytest.mark.parametrize("name", STAGES)
def test_each_example_trains_a_few_steps_with_only_machine_overrides(name, tmp_path, tiny_model_dir):
    from tuneforge.train.run import train

    run = tmp_path / "out"
    result = train(EXAMPLES / name, [f"model_name_or_path={tiny_model_dir}", f"output_dir={run}",
                                     f"dataset_dir={LLAMAFACTORY_DATA}", "max_steps=2", "max_samples=16",
                                     "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
                                     f"model.cache_dir={tmp_path / 'cache'}"])
    assert result.status == "completed"
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["gradient_checkpointing"] is True and saved["train"]["max_steps"] == 2
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(loss == loss for loss in losses)


def test_reward_then_ppo_examples(tmp_path, tiny_model_dir):
    from tuneforge.train.run import train

    common = [f"model_name_or_path={tiny_model_dir}", f"dataset_dir={LLAMAFACTORY_DATA}", "max_steps=2",
              "max_samples=8", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
              f"model.cache_dir={tmp_path / 'cache'}"]
    reward = train(EXAMPLES / "llama3_lora_reward.yaml", common + [f"output_dir={tmp_path / 'reward'}"])
    assert reward.status == "completed"
    ppo = train(EXAMPLES / "llama3_lora_ppo.yaml", common + [f"output_dir={tmp_path / 'ppo'}",
                                                             f"reward_model={tmp_path / 'reward'}",
                                                             "max_new_tokens=8"])
    assert ppo.status == "completed"
    saved = yaml.safe_load((tmp_path / "ppo" / "config.yaml").read_text(encoding="utf-8"))["method"]
    assert saved["ppo_epochs"] == 4 and saved["temperature"] == 0.95 and saved["top_p"] == 0.9
