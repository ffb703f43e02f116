"""Distributed engines: the shipped DeepSpeed and accelerate configs validate with those packages' own readers, a
wrong or impossible engine setting is refused before anything loads, and the per-device memory estimate shards
and offloads the parts each engine shards and offloads."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.train.engines import check_engine, engine_of, per_device, suggestion
from tuneforge.train.estimate import GIB, MemoryEstimate

DEEPSPEED = REPO / "examples" / "deepspeed"
ACCELERATE = REPO / "examples" / "accelerate"


def cfg(tiny_config, **train):
    raw = {**tiny_config, "train": {**tiny_config.get("train", {}), **train}}
    return load_config(raw)


@pytest.mark.parametrize("name, stage, offload", [("ds_z2", 2, False), ("ds_z2_offload", 2, True),
                                                  ("ds_z3", 3, False), ("ds_z3_offload", 3, True)])
def test_shipped_deepspeed_configs_validate_with_deepspeed(tiny_config, name, stage, offload):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    path = DEEPSPEED / f"{name}.json"
    zero = DeepSpeedZeroConfig(**json.loads(path.read_text())["zero_optimization"])  # DeepSpeed's own model
    assert zero.stage == stage
    engine = engine_of(cfg(tiny_config, deepspeed=str(path)).train)
    assert (engine.shards, engine.offload_optimizer) == (stage, offload)
    assert engine.offload_weights == (offload and stage == 3)
    assert check_engine(cfg(tiny_config, deepspeed=str(path))) == engine  # installed here: accepted


@pytest.mark.parametrize("name", ["fsdp", "fsdp_offload", "fsdp1", "ddp_2nodes"])
def test_shipped_accelerate_configs_load_with_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))
    assert config.distributed_type.value == ("MULTI_GPU" if name == "ddp_2nodes" else "FSDP")
    if name.startswith("fsdp"):
        assert config.fsdp_config["fsdp_version"] == (1 if name == "fsdp1" else 2)
        assert config.fsdp_config["fsdp_offload_params"] == (name == "fsdp_offload")


def test_engine_settings_are_checked_before_loading(tiny_config, tmp_path, monkeypatch):
    def refused(**train):
        with pytest.raises(ConfigError) as info:
            check_engine(cfg(tiny_config, **train))
        return str(info.value)

    assert "is not a file" in refused(deepspeed=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{stage: 2")
    assert "not valid JSON" in refused(deepspeed=str(tmp_path / "bad.json"))
    assert "FSDP needs GPUs" in refused(fsdp="full_shard auto_wrap")  # this machine has none
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with an FSDP config, on CPUs
    assert "accelerate builds for GPUs only" in refused()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    import importlib

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError()) if name == "deepspeed" else real(name, *a))
    assert "pip install deepspeed" in refused(deepspeed=str(DEEPSPEED / "ds_z2.json"))
    monkeypatch.setattr(importlib, "import_module", real)
    ppo = {**tiny_config, "method": {"stage": "ppo", "reward_model": "runs/rm"},
           "train": {"deepspeed": str(DEEPSPEED / "ds_z2.json")}}
    with pytest.raises(ConfigError, match="stage ppo trains with DDP only"):
        check_engine(load_config(ppo))


def test_schema_refuses_two_engines_and_unknown_fsdp_words(tiny_config):
    with pytest.raises(ConfigError, match="choose one engine"):
        cfg(tiny_config, deepspeed=str(DEEPSPEED / "ds_z2.json"), fsdp="full_shard")
    with pytest.raises(ConfigError, match="unknown FSDP option 'fullshard'"):
        cfg(tiny_config, fsdp="fullshard auto_wrap")
    with pytest.raises(ConfigError, match="say how to shard"):
        cfg(tiny_config, fsdp="auto_wrap")


def test_per_device_estimate_shards_and_offloads_what_each_engine_does(tiny_config):
    memory = MemoryEstimate(weights=8 * GIB, gradients=4 * GIB, optimizer=8 * GIB, activations=2 * GIB,
                            overhead=GIB, tokens=1024)
    engine = lambda **train: engine_of(cfg(tiny_config, **train).train)  # noqa: E731
    ddp = per_device(memory, engine(), 4)
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (8 * GIB, 8 * GIB, 8 * GIB)  # + DDP's buckets
    z2 = per_device(memory, engine(deepspeed=str(DEEPSPEED / "ds_z2.json")), 4)
    assert (z2.weights, z2.gradients, z2.optimizer, z2.offloaded) == (8 * GIB, GIB, 2 * GIB, 0)
    z3 = per_device(memory, engine(deepspeed=str(DEEPSPEED / "ds_z3.json")), 4)
    assert (z3.weights, z3.gradients, z3.optimizer) == (2 * GIB, GIB, 2 * GIB)
    off = per_device(memory, engine(deepspeed=str(DEEPSPEED / "ds_z3_offload.json")), 4)
    assert (off.weights, off.optimizer, off.offloaded) == (0, 0, 4 * GIB)
    fsdp = per_device(memory, engine(fsdp="shard_grad_op auto_wrap"), 4)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (8 * GIB, GIB, 2 * GIB)
    assert "per process (DeepSpeed ZeRO-3 + offload, 4 processes)" in str(off) and "offloaded" in str(off)
    # 4 GPUs with 15 GiB each: DDP needs 27 GiB, ZeRO-2 14 GiB: the first that fits is suggested
    assert ddp.total == 27 * GIB and z2.total == 14 * GIB
    assert suggestion(memory, 4, 15 * GIB, shared=False).startswith("train.deepspeed=examples/deepspeed/ds_z2.json")
    assert suggestion(memory, 4, 8 * GIB, shared=False).startswith("train.deepspeed=examples/deepspeed/ds_z3.json")
    assert suggestion(memory, 4, 3 * GIB, shared=False) is None


def test_check_reports_the_estimate_per_process_for_the_engine(tiny_config):
    from tuneforge.train.check import check

    raw = {**tiny_config, "train": {**tiny_config.get("train", {}), "deepspeed": str(DEEPSPEED / "ds_z3.json")},
           "distributed": {"nproc_per_node": 2}}
    report = check(raw).report
    assert "with DeepSpeed ZeRO-3: ~" in report and "per process (DeepSpeed ZeRO-3, 2 processes)" in report
    assert "the 2 processes on this machine share its memory" in report
