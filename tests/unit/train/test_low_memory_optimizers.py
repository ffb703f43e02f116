"""GaLore, APOLLO and BAdam full-parameter training on a tiny model: the optimizer is the one asked for, the
right weights move, and the saved model holds the trained weights."""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.rundir import prepare_run_dir
from tuneforge.train.prepare import build_model, prepare
from tuneforge.train.run import build_trainer, save_weights


def _full(tiny_config, optimizer: dict, steps: int, **train):
    tiny_config["method"]["adapter"] = {"type": "full", "optimizer": optimizer}
    tiny_config["train"].update(max_steps=steps, learning_rate=1e-2, lr_scheduler="constant", save_steps=100, **train)
    return load_config(tiny_config)


def _train(cfg):
    prepared = prepare(cfg)
    run, _ = prepare_run_dir(cfg)
    model = build_model(cfg, prepared.source)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, _ = build_trainer(cfg, model, prepared, run)
    trainer.train()
    saved = load_file(str(save_weights(trainer, prepared, run, cfg) / "model.safetensors"))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])}
    for name, p in model.named_parameters():
        if name in saved:
            assert torch.equal(saved[name], p.detach()), name
    return trainer, moved, start


@pytest.mark.parametrize("name, package", [("galore", "galore_torch"), ("apollo", "apollo_torch")])
def test_low_rank_optimizers_project_the_block_weights_and_train_everything(tiny_config, name, package):
    cfg = _full(tiny_config, {"name": name, "rank": 4, "update_interval": 1}, steps=2)
    trainer, moved, start = _train(cfg)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(inner).__module__.startswith(package + ".")
    projected = [g for g in inner.param_groups if "rank" in g]
    assert len(projected) == 1 and projected[0]["rank"] == 4
    assert len(projected[0]["params"]) == 7 * 2  # q, k, v, o, gate, up, down in each of 2 blocks
    assert moved == set(start)  # full training: every parameter moved


def test_galore_layerwise_cannot_accumulate_gradients(tiny_config):
    tiny_config["train"]["gradient_accumulation_steps"] = 2
    with pytest.raises(ConfigError, match="layerwise .* cannot accumulate"):
        _full(tiny_config, {"name": "galore", "layerwise": True}, steps=1)


def test_galore_targets_must_be_block_linears(tiny_config):
    cfg = _full(tiny_config, {"name": "galore", "target_modules": "q_proj,wq"}, steps=1)
    prepared = prepare(cfg)
    run, _ = prepare_run_dir(cfg)
    with pytest.raises(ConfigError, match=r"\['wq'\] are not linear layers"):
        build_trainer(cfg, build_model(cfg, prepared.source), prepared, run)


def test_badam_trains_one_block_at_a_time(tiny_config):
    cfg = _full(tiny_config, {"name": "badam", "switch_every": 1, "switch_mode": "ascending"}, steps=1)
    _, moved, _ = _train(cfg)
    assert moved and all(n.startswith("model.layers.0.") for n in moved)  # block 0 only, embeddings frozen
    assert len(moved) == len([n for n in _names(cfg) if n.startswith("model.layers.0.")])

    tiny_config["output"]["run_dir"] += "-2"
    _, moved, _ = _train(_full(tiny_config, {"name": "badam", "switch_every": 1}, steps=2))
    assert {n.split(".")[2] for n in moved} == {"0", "1"}  # the second step trained block 1
    assert not any("embed_tokens" in n or n.startswith("model.norm") for n in moved)


def _names(cfg):
    return [n for n, _ in build_model(cfg, prepare(cfg).source).named_parameters()]


def test_a_missing_optimizer_package_is_a_config_error(tiny_config, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "badam" else real(name, *a))
    with pytest.raises(ConfigError, match="badam needs the badam package. hint: pip install badam"):
        prepare(_full(tiny_config, {"name": "badam"}, steps=1))


def test_low_memory_optimizers_are_not_for_ppo(tiny_config):
    tiny_config["method"] = {"stage": "ppo", "reward_model": "runs/rm", "adapter": {"type": "full",
                             "optimizer": {"name": "galore"}}}
    with pytest.raises(ConfigError, match="not available for stage ppo"):
        load_config(tiny_config)
