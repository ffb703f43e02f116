"""Saved adapters on a base model (model.adapters, LLaMA-Factory's adapter_name_or_path): SFT then DPO on one adapter,
a new adapter on merged ones, and chat/predict with a base model plus adapters."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.conftest import REPO
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.infer.engine import Engine


def run_config(tiny_model_dir, root, name, **sections):
    config = {"model": {"name_or_path": str(tiny_model_dir), "cache_dir": str(root / "cache")},
              "data": {"dataset": "identity", "dataset_dir": str(REPO / "data"), "max_samples": 8,
                       "placeholders": {"name": "Tiny", "author": "Tests"}},
              "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "save_steps": 100,
                        "group_by_length": False},
              "output": {"run_dir": str(root / name)}}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return config


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir):
    from tuneforge.train.run import train

    root = tmp_path_factory.mktemp("stack")
    return train(run_config(tiny_model_dir, root, "sft", method={"adapter": {"type": "lora", "rank": 4}})).run_dir


def adapter_weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def logits(engine, text="Who are you?"):
    ids = torch.tensor([engine.prompt_ids([{"role": "user", "content": text}])])
    with torch.no_grad():
        return engine.model(input_ids=ids).logits[0]


def test_sft_then_dpo_trains_the_same_adapter_further(sft_run, tiny_model_dir, tmp_path):
    from tuneforge.train.run import train

    dpo = train(run_config(tiny_model_dir, tmp_path, "dpo", model={"adapters": [str(sft_run)]},
                           method={"stage": "dpo", "adapter": {"type": "lora", "rank": 16}},
                           data={"dataset": "dpo_en_demo", "placeholders": {}},
                           train={"max_steps": 2, "learning_rate": 1e-3})).run_dir
    before, after = adapter_weights(sft_run), adapter_weights(dpo)
    assert before.keys() == after.keys()  # the SFT adapter itself, with its rank 4 (rank 16 above is not used)
    assert all(after[k].shape == before[k].shape for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before)  # and it learned
    assert json.loads((dpo / "adapter" / "adapter_config.json").read_text())["r"] == 4
    # the run loads as base + its adapter (nothing merged: the adapter it continued is its own)
    tuned = Engine.load(str(dpo))
    assert tuned.model.peft_config["default"].r == 4 and tuned.chat([{"role": "user", "content": "hi"}]) is not None


def test_a_new_adapter_on_merged_ones_loads_back_exactly(sft_run, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from tuneforge.model.loader import load_model
    from tuneforge.train.run import train

    import shutil

    source = tmp_path / "sft-copy"  # the run keeps its own copy of what it was stacked on
    shutil.copytree(sft_run, source)
    run = train(run_config(tiny_model_dir, tmp_path, "stacked", model={"adapters": [str(source)]},
                           method={"adapter": {"type": "lora", "rank": 2, "new_adapter": True}},
                           train={"max_steps": 2})).run_dir
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 2
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["adapters"]
    assert saved == [str((run / "stacked_adapters" / "0").resolve())]
    shutil.rmtree(source)
    engine = Engine.load(str(run))
    # by hand: base, SFT adapter merged, then the new adapter
    base = load_model(str(tiny_model_dir), torch.float32, False)
    merged = PeftModel.from_pretrained(base, str(sft_run / "adapter")).merge_and_unload()
    manual = PeftModel.from_pretrained(merged, str(run / "adapter")).eval()
    ids = torch.tensor([engine.prompt_ids([{"role": "user", "content": "Who are you?"}])])
    with torch.no_grad():
        assert torch.allclose(engine.model(input_ids=ids).logits, manual(input_ids=ids).logits, atol=1e-5)


def test_a_base_model_with_adapters_chats_like_the_run(sft_run, tiny_model_dir, tmp_path, capsys):
    run_engine = Engine.load(str(sft_run))
    stacked = Engine.load(str(tiny_model_dir), adapters=[str(sft_run)])
    assert torch.allclose(logits(run_engine), logits(stacked), atol=1e-5)
    lf = tmp_path / "infer.yaml"  # LLaMA-Factory's inference config
    lf.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(sft_run),
                                  "template": "chatml", "infer_backend": "huggingface"}))
    assert main(["chat", str(sft_run), "--prompt", "Who are you?", "--max-new-tokens", "8"]) == 0
    from_run = capsys.readouterr().out
    assert main(["chat", str(lf), "--prompt", "Who are you?", "--max-new-tokens", "8"]) == 0
    from_lf = capsys.readouterr().out
    assert main(["chat", str(tiny_model_dir), "--adapter", str(sft_run), "--template", "chatml", "--prompt",
                 "Who are you?", "--max-new-tokens", "8"]) == 0
    assert from_run == from_lf == capsys.readouterr().out


def test_bad_adapter_lists_are_refused(sft_run, tiny_model_dir, tmp_path):
    base = run_config(tiny_model_dir, tmp_path, "x")
    with pytest.raises(ConfigError, match="continue with method.adapter.type lora"):
        load_config({**base, "model": {**base["model"], "adapters": [str(sft_run)]}, "method": {"adapter": {"type": "full"}}})
    with pytest.raises(ConfigError, match="method.adapter.new_adapter applies with model.adapters"):
        load_config({**base, "method": {"adapter": {"type": "lora", "new_adapter": True}}})
    from tuneforge.model.stacking import adapter_folders

    with pytest.raises(ConfigError, match=r"model.adapters\[0\]: .* is neither a run directory nor an adapter folder"):
        adapter_folders([str(tmp_path)])
    with pytest.raises(ConfigError, match="was trained on .* an adapter only fits the base it was trained on"):
        adapter_folders([str(sft_run)], base="some/other-model")
    assert adapter_folders([str(sft_run), str(sft_run / "adapter")]) == [sft_run / "adapter"] * 2


def test_llamafactory_sft_then_dpo_on_one_adapter(sft_run, tiny_model_dir, tmp_path):
    from tests.conftest import LLAMAFACTORY_DATA
    from tuneforge.train.run import train

    dpo = train(REPO / "tests" / "assets" / "llamafactory_configs" / "llama3_lora_dpo.yaml",
                [f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={sft_run}", f"output_dir={tmp_path / 'd'}",
                 f"dataset_dir={LLAMAFACTORY_DATA}", "max_steps=1", "max_samples=4", "per_device_train_batch_size=2",
                 "gradient_accumulation_steps=1", f"model.cache_dir={tmp_path / 'cache'}"])
    assert dpo.status == "completed" and adapter_weights(dpo.run_dir).keys() == adapter_weights(sft_run).keys()


def test_llamafactory_merge_config_exports_the_merged_model(sft_run, tiny_model_dir, tmp_path):
    from tuneforge.model.loader import load_model

    out = tmp_path / "merged"
    lf = tmp_path / "merge.yaml"  # LLaMA-Factory's export config
    lf.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(sft_run),
                                  "template": "chatml", "trust_remote_code": True, "export_dir": str(out),
                                  "export_size": 5, "export_device": "cpu", "export_legacy_format": False}))
    assert main(["export", str(lf)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = load_model(str(out), torch.float32, False)
    ids = torch.tensor([Engine.load(str(sft_run)).prompt_ids([{"role": "user", "content": "Who are you?"}])])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, Engine.load(str(sft_run)).model(input_ids=ids).logits,
                              atol=1e-5)
    assert main(["export", str(lf)]) == 2  # the folder is not empty now: never overwritten
