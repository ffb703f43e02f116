"""Each workaround in model/patches.py: it still works, and it is still needed (these fail once upstream changes)."""

import subprocess
import sys

import pytest

from tuneforge.model.patches import BITSANDBYTES_NOTICE


def import_output(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_bitsandbytes_cpu_notice_is_quiet_and_still_needed():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():  # bitsandbytes looks for that kernel, and prints the notice, only on such CPUs
        pytest.skip("this CPU lacks AVX512-BF16: bitsandbytes prints no notice here")
    # upstream still prints it when imported on its own (when this fails, drop the patch and this test)
    assert BITSANDBYTES_NOTICE in import_output("import bitsandbytes")
    # through tuneforge (which PEFT-importing commands go through) it is gone, and the CLI is quiet
    assert BITSANDBYTES_NOTICE not in import_output("import tuneforge, peft, bitsandbytes")
    assert BITSANDBYTES_NOTICE not in import_output("from tuneforge.cli import main; main(['env'])")
