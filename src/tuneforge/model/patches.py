"""Workarounds for other libraries, each with where it comes from, a version guard, and a test that fails once
upstream no longer needs it (tests/unit/model/test_patches.py). Nothing here edits another library's code."""

from __future__ import annotations

import logging
from importlib import metadata

# bitsandbytes 0.50 logs "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"
# when it is imported on a machine without the optional `kernels` package, and PEFT imports it whenever it is
# installed (galore-torch and apollo-torch need it), so every TuneForge command printed it, 4-bit or not.
# Source: bitsandbytes/backends/cpu/ops.py (logger.warning at import).
BITSANDBYTES_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
BITSANDBYTES_VERSIONS = ("0.49", "0.50")  # the releases seen to print it


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_bitsandbytes_cpu_notice() -> bool:
    """Drop that one notice (other bitsandbytes messages still show). Returns whether the filter was installed."""
    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return False
    if not version.startswith(BITSANDBYTES_VERSIONS):
        return False
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(BITSANDBYTES_NOTICE))
    return True
