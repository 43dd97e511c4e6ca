"""benchmarks/gpu_check.py, the one command run on a lent GPU machine: its dry run on the CPU (slow), and the
table it derives from kernel timings."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compresscli.kernels import cuda_paths

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timing(layout, density, batch, path, ms):
    return {"layout": layout, "structure": f"{layout} {density}", "density": density, "batch": batch, "path": path,
            "ms": ms, "cublas_ms": 1.0}


def test_the_measured_table_keeps_each_kernel_up_to_where_it_stops_beating_decode():
    timings = []
    for batch in (1, 2, 4, 8, 16):
        timings += [_timing("row_sparse", 0.5, batch, "triton_gemv", 0.1 * batch),  # wins up to 8
                    _timing("row_sparse", 0.5, batch, "triton_decode", 1.0),
                    _timing("row_sparse", 0.05, batch, "triton_gemv", 0.05 * batch),  # wins up to 16
                    _timing("row_sparse", 0.05, batch, "triton_decode", 1.0),
                    _timing("condensed", 0.1, batch, "triton_gemv", 0.2 * batch),  # wins up to 4
                    _timing("condensed", 0.1, batch, "triton_tiled", 5.0),  # never
                    _timing("condensed", 0.1, batch, "triton_decode", 1.0)]
    table = _gpu_check().measured_table(timings, "a GPU")
    assert table["measured_on"] == "a GPU"
    assert table["row_sparse"] == [[8, 0.5, "triton_gemv"], [16, 0.05, "triton_gemv"], [None, 1.0, "triton_decode"]]
    assert table["condensed"] == [[4, 0.1, "triton_gemv"], [None, 1.0, "triton_decode"]]
    cuda_paths.check_table(table, "test")


def test_the_quantized_rows_take_the_fastest_path_at_each_batch():
    timings = []
    for batch in (1, 2, 4, 8, 16, 32):
        for structure, scale in (("int8 per row", 1.0), ("int4 g128", 0.5)):
            for path, ms in (("triton_gemv", 0.1 * batch + 0.05), ("triton_tiled", 0.8), ("dense", 1.0 + 0.01 * batch)):
                timings.append({**_timing("quantized", 1.0, batch, path, ms * scale), "structure": structure})
    gpu_check = _gpu_check()
    assert gpu_check.quantized_rows(timings) == [[4, 1.0, "triton_gemv"], [None, 1.0, "triton_tiled"]]
    dense_wins = [{**t, "ms": 0.01} if t["path"] == "dense" and t["batch"] == 32 else t for t in timings]
    assert gpu_check.quantized_rows(dense_wins) == [[4, 1.0, "triton_gemv"], [16, 1.0, "triton_tiled"],
                                                    [None, 1.0, "dense"]]
    assert gpu_check.quantized_rows([]) == cuda_paths.DESIGN_TABLE["quantized"]
    cuda_paths.check_table({**gpu_check.measured_table(timings, "a GPU")}, "test")


@pytest.mark.slow
def test_the_dry_run_exercises_every_part_on_the_cpu(tmp_path):
    models = ROOT / ".gpu-check"
    if not (models / "minilm-fp16" / "model.safetensors").is_file():
        models = tmp_path / "models"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--prepare", "--models",
                        str(models)], check=True, cwd=ROOT, timeout=300)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--models",
                           str(models), "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert all(p["status"] == "ok" for p in results["parts"].values()), results["parts"]
    assert len(results["runs"]) == 7 and len(results["loads"]) == 7 and results["kernels"]
    assert {r["backend"] for r in results["runs"]} == {None, "gloo"}  # the --nproc 1 run went through torchrun
    cuda_paths.check_table(json.loads((tmp_path / "out" / "cuda_table.json").read_text()), "the dry run's")
    assert "## Kernels" in (tmp_path / "out" / "gpu_check.md").read_text()
