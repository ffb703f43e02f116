"""`tuneforge env`: what is installed, which device trains, which embedded models are available."""

from __future__ import annotations

import importlib.metadata as md
import platform

import torch

from tuneforge.allocator import describe as describe_allocator
from tuneforge.model.embedded import embedded_models, installed
from tuneforge.model.loader import default_cache_dir


def describe_environment() -> str:
    lines = [f"python {platform.python_version()} on {platform.platform()}"]
    for pkg in ("tuneforge", "torch", "transformers", "peft", "accelerate", "datasets", "gguf", "pydantic"):
        try:
            lines.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            lines.append(f"{pkg} (not installed)")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"device: cuda x{torch.cuda.device_count()} ({names}); bf16 {torch.cuda.is_bf16_supported()}")
    else:
        lines.append(f"device: cpu ({torch.get_num_threads()} threads), float32")
    lines.append(describe_allocator())
    lines.append(f"cache: {default_cache_dir()}")
    lines.append("embedded models:")
    for name, entry in embedded_models().items():
        state = "installed" if installed(name) else f"not installed ({entry['install']})"
        lines.append(f"  {name}: {entry['description']}; licence {entry['licence']}; {state}")
    return "\n".join(lines)
