"""Which training process this is, from the launcher's environment (torchrun / accelerate launch set RANK,
LOCAL_RANK and WORLD_SIZE); one process when they are absent."""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes shared files: rank 0, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def launched() -> bool:
    """Started by torchrun / accelerate launch (they set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ
