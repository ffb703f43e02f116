"""TuneForge: beginner-first fine-tuning of large language models.

Python API:
    tuneforge.train("examples/quickstart.yaml", ["train.num_epochs=1"])
    tuneforge.check("examples/quickstart.yaml")
    tuneforge.Engine.load("runs/quickstart").chat([{"role": "user", "content": "Who are you?"}])
"""

from __future__ import annotations

__version__ = "0.1.0"

from tuneforge.model.patches import quiet_bitsandbytes_cpu_notice  # noqa: E402 (before anything imports PEFT)

quiet_bitsandbytes_cpu_notice()

__all__ = ["Engine", "check", "load_config", "train"]


def __getattr__(name):  # lazy: `import tuneforge` stays fast and torch-free until something runs
    if name == "train":
        from tuneforge.train.run import train

        return train
    if name == "check":
        from tuneforge.train.check import check

        return check
    if name == "Engine":
        from tuneforge.infer.engine import Engine

        return Engine
    if name == "load_config":
        from tuneforge.config import load_config

        return load_config
    raise AttributeError(name)
