"""Speed switches leave the numbers alone: the same first training losses with and without each of them, and
GPU-only kernels refused on a machine without a GPU before anything loads."""

import json

import pytest
import torch

from tuneforge.errors import ConfigError
from tuneforge.train.prepare import prepare
from tuneforge.config import load_config
from tuneforge.train.run import train


def _losses(tiny_config, tmp_path, name: str, **switches) -> list[float]:
    cfg = json.loads(json.dumps(tiny_config))
    cfg["output"]["run_dir"] = str(tmp_path / name)
    # SGD: Adam turns rounding-level gradient differences into full-size steps for near-zero gradients
    cfg["train"].update(max_steps=3, learning_rate=1e-2, lr_scheduler="constant", optim="sgd")
    for key, value in switches.items():
        section, field = key.split("__")
        cfg[section][field] = value
    run = train(cfg).run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("switches", [
    {"train__gradient_checkpointing": True},
    {"model__attention": "eager"},
])
def test_switches_give_the_same_losses(tiny_config, tmp_path, switches):
    plain = _losses(tiny_config, tmp_path, "plain")
    switched = _losses(tiny_config, tmp_path, "switched", **switches)
    assert switched == pytest.approx(plain, rel=1e-4)  # float32 rounding differs in recomputation and kernels


@pytest.mark.slow
def test_torch_compile_gives_the_same_losses(tiny_config, tmp_path):
    # one batch of 4 rows, seen at every step: one sequence length, so the graphs compile once (each new length
    # costs minutes of compilation on a CPU); a learning rate that moves the loss well beyond the tolerance
    same = {"data__max_samples": 4, "train__learning_rate": 1.0}
    plain = _losses(tiny_config, tmp_path, "plain", **same)
    compiled = _losses(tiny_config, tmp_path, "compiled", train__torch_compile=True, **same)
    assert plain[-1] < plain[0] * 0.99, plain
    assert compiled == pytest.approx(plain, rel=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("key, value, message", [
    ("attention", "flash_attention_2", "model.attention: flash_attention_2 needs a CUDA GPU"),
    ("liger_kernel", True, "train.liger_kernel needs a CUDA GPU"),
])
def test_gpu_kernels_are_refused_without_a_gpu(tiny_config, key, value, message):
    tiny_config["model" if key == "attention" else "train"][key] = value
    with pytest.raises(ConfigError, match=message):
        prepare(load_config(tiny_config))
