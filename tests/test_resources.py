"""Running out of memory or disk, and two runs writing one OUT: a clear message, and no OUT, no
temporary directory, no lock file left behind. Limits are set with setrlimit in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compresscli.core.errors import CheckpointError, ResourceError
from compresscli.core.resources import explain_out_of_memory
from compresscli.io.safetensors import atomic_directory, output_lock

MAGNITUDE = "stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5}\n"

# Runs `compress ARGS` under an address-space limit (MiB above what the imports take) or a file-size
# limit (MiB; SIGXFSZ ignored so that writing past it fails with EFBIG instead of killing the process).
LIMITED_RUN = """
import resource, signal, sys
import compresscli.cli, compresscli.engine.whole_model, transformers.models.bert.modeling_bert
kind, mib = sys.argv[1], int(sys.argv[2])
if kind == "memory":
    size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + mib * 2**20, resource.RLIM_INFINITY))
else:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (mib * 2**20, resource.RLIM_INFINITY))
sys.argv = ["compress", *sys.argv[3:]]
compresscli.cli.main()
"""


def _limited_run(tmp_path: Path, kind: str, mib: int) -> subprocess.CompletedProcess:
    recipe = tmp_path / "magnitude.yaml"
    recipe.write_text(MAGNITUDE)
    return subprocess.run([sys.executable, "-c", LIMITED_RUN, kind, str(mib), "run", "ref:minilm", "--recipe",
                           str(recipe), "--no-eval", "--out", str(tmp_path / "runs" / "out")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _left_behind(tmp_path: Path) -> list[str]:
    runs = tmp_path / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.exists() else []


@pytest.mark.parametrize("mib", [100, 400])  # the first fails while loading, the second while compressing
def test_running_out_of_memory_says_what_to_lower_and_leaves_nothing(tmp_path, mib):
    proc = _limited_run(tmp_path, "memory", mib)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "ran out of memory" in last and "lower --batch-size" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _left_behind(tmp_path) == []


def test_a_full_disk_says_what_to_free_and_leaves_nothing(tmp_path):
    proc = _limited_run(tmp_path, "disk", 10)  # the output is ~75 MB
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "writing" in last and "File too large" in last and "free disk space" in last, proc.stderr
    assert _left_behind(tmp_path) == []


def test_a_second_run_writing_the_same_out_fails_at_once(tmp_path):
    out = tmp_path / "runs" / "out"
    with output_lock(out):  # a first run, still writing
        proc = subprocess.run([sys.executable, "-m", "compresscli", "run", "ref:minilm", "--recipe", "magnitude-50",
                               "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1
        assert f"another run is writing {out} right now" in proc.stderr
        assert not out.exists()
    assert _left_behind(tmp_path) == []  # the lock file goes with its holder


def test_atomic_directory_publishes_whole_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-killed"  # what a run killed outright (SIGKILL) leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with output_lock(out), atomic_directory(out) as tmp:  # a run locks OUT first, then saves (re-entrant)
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    with pytest.raises(CheckpointError, match="already exists"):
        with atomic_directory(out):
            pass
    with pytest.raises(RuntimeError), atomic_directory(out, force=True) as tmp:
        (tmp / "c").write_text("c")
        raise RuntimeError("a failure mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == ["a"]


def test_only_out_of_memory_errors_are_explained():
    with pytest.raises(ResourceError, match="ran out of memory"), explain_out_of_memory("x", "lower it"):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(ResourceError), explain_out_of_memory("x", "lower it"):
        raise MemoryError()
    with pytest.raises(RuntimeError, match="shape mismatch"), explain_out_of_memory("x", "lower it"):
        raise RuntimeError("shape mismatch")
