"""The CLI restarts itself with tcmalloc/jemalloc preloaded (a third less peak memory in training on CPUs)."""

import os
import subprocess
import sys

import pytest

from tuneforge import allocator


def test_tcmalloc_is_preferred_to_jemalloc(tmp_path):
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert allocator.find_library({}, dirs=(str(tmp_path),)) == str(tmp_path / "libjemalloc.so.2")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert allocator.find_library({}, dirs=(str(tmp_path),)) == str(tmp_path / "libtcmalloc_minimal.so.4")
    assert allocator.find_library({}, dirs=(str(tmp_path / "none"),)) is None


def test_the_environment_variable_chooses(tmp_path, capsys):
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    dirs = (str(tmp_path),)
    assert allocator.find_library({allocator.ENV: "system"}, dirs=dirs) is None
    own = tmp_path / "libmine.so"
    own.write_bytes(b"")
    assert allocator.find_library({allocator.ENV: str(own)}, dirs=dirs) == str(own)
    assert allocator.find_library({allocator.ENV: str(tmp_path / "missing.so")}, dirs=dirs) is None
    assert "is not a file; using the system allocator" in capsys.readouterr().err


def test_preload_environment_keeps_other_preloads_and_marks_the_restart():
    env = allocator.preload_environment({"LD_PRELOAD": "/x/libother.so:/lib/libtcmalloc_minimal.so.4"},
                                        "/lib/libtcmalloc_minimal.so.4")
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4 /x/libother.so"
    assert env[allocator.ACTIVE] == "/lib/libtcmalloc_minimal.so.4"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40


def test_loaded_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 fe:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.loaded(maps) is None
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 00000000 fe:01 2 "
                    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n")
    assert allocator.loaded(maps).endswith("libtcmalloc_minimal.so.4.5.10")
    assert allocator.loaded(tmp_path / "absent") is None


def _env_output(**extra) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ACTIVE, allocator.ENV)}
    env.update(extra)
    result = subprocess.run([sys.executable, "-m", "tuneforge", "env"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD restart is Linux only")
def test_the_cli_runs_on_the_installed_allocator():
    library = allocator.find_library({})
    if library is None:
        pytest.skip("no tcmalloc/jemalloc installed (Debian: apt-get install libtcmalloc-minimal4); .ci/run "
                    "installs it")
    line = next(x for x in _env_output().splitlines() if x.startswith("memory allocator:"))
    assert "preloaded by the tuneforge command" in line
    assert os.path.basename(library).split(".so")[0] in line
    off = next(x for x in _env_output(TUNEFORGE_ALLOCATOR="system").splitlines() if x.startswith("memory allocator"))
    assert off == "memory allocator: the system's malloc"
