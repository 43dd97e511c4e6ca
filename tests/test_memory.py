"""Peak memory: predicted before a run, measured during it, and a budget the run keeps or refuses."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compresscli.core.resources import PeakMemory
from conftest import run_cli, write_recipe

LAYER_MAGNITUDE = "stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5, scope: layer}\n"


def test_peak_memory_sees_an_allocation():
    peak = PeakMemory()
    before = peak.peak()
    block = torch.ones(64 * 1024**2 // 4)  # 64 MiB, touched
    assert peak.peak() - before >= 60 * 1024**2
    del block


@pytest.mark.parametrize("mode", ["--whole-model", "--sequential"])
def test_prediction_is_within_25_percent_on_minilm(tmp_path, mode):
    """A fresh process, so the measured peak is the run's alone (the CLI reports both)."""
    recipe = write_recipe(tmp_path / "r.yaml", LAYER_MAGNITUDE)
    proc = subprocess.run([sys.executable, "-m", "compresscli", "run", "ref:minilm", "--recipe", str(recipe),
                           "--out", str(tmp_path / "out"), "--eval-examples", "32", "--json", mode],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    execution = json.loads(proc.stdout)["report"]["execution"]
    assert execution["mode"] == mode[2:]
    assert execution["predicted_peak_bytes"] == pytest.approx(execution["peak_rss_bytes"], rel=0.25)


def test_a_run_that_cannot_fit_is_refused_before_any_work(capsys, tmp_path, minilm_dir):
    recipe = write_recipe(tmp_path / "r.yaml", LAYER_MAGNITUDE)
    started = time.time()
    code, _, stderr = run_cli(capsys, "run", str(minilm_dir), "--recipe", str(recipe), "--out", str(tmp_path / "out"),
                              "--max-memory", "300MB")
    assert code == 1 and "needs about" in stderr and "--max-memory" in stderr
    assert time.time() - started < 30 and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"]  # no temporary directory either


def test_a_tight_budget_switches_to_block_by_block(capsys, tmp_path, minilm_dir):
    recipe = write_recipe(tmp_path / "r.yaml", LAYER_MAGNITUDE)
    code, stdout, _ = run_cli(capsys, "run", str(minilm_dir), "--recipe", str(recipe), "--dry-run", "--json")
    memory = json.loads(stdout)["memory"]
    assert memory["sequential"] < memory["whole_model"]
    budget = (memory["sequential"] + memory["whole_model"]) // 2
    code, stdout, _ = run_cli(capsys, "run", str(minilm_dir), "--recipe", str(recipe), "--dry-run", "--json",
                              "--max-memory", str(budget))
    plan = json.loads(stdout)
    assert code == 0 and plan["mode"] == "sequential" and plan["stages"][0]["bytes_after"] < plan["stages"][0]["bytes_before"]
    code, stdout, _ = run_cli(capsys, "run", str(minilm_dir), "--recipe", "magnitude-50", "--dry-run", "--json",
                              "--max-memory", str(budget))
    assert code == 1  # global magnitude and finetune cannot run block by block, and the whole model does not fit


LAZY_CHECK = """
import json, sys, torch
from compresscli.core.resources import PeakMemory, current_rss
from compresscli.io.source import open_source
from compresscli.engine.block_reader import stream_outputs
from compresscli.io.checkpoint import load_checkpoint
source = open_source(sys.argv[1])
before = current_rss()
peak = PeakMemory()
ids = torch.randint(1000, 30000, (1, 8))
(logits,) = stream_outputs(source, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
streamed = peak.peak() - before
model = load_checkpoint(sys.argv[1]).model
with torch.no_grad():
    model(input_ids=ids)
print(json.dumps({"streamed": streamed, "whole": peak.peak() - before, "finite": bool(torch.isfinite(logits).all())}))
"""


@pytest.mark.slow
def test_lazy_reading_never_holds_the_whole_file(tmp_path):
    """A generated ~1 GB bf16 Llama: streamed block by block the run holds a small part of it; loaded
    whole it holds it once (no second copy, no random initialisation)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import scale

    scale.CONFIGS["1gb"] = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                                num_key_value_heads=12)
    path = scale.generate("1gb", shard_bytes=256 * 1024**2)
    size = scale.checkpoint_bytes(path)
    assert 0.9e9 < size < 1.3e9
    proc = subprocess.run([sys.executable, "-c", LAZY_CHECK, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["finite"] and result["streamed"] < 0.35 * size
    assert result["whole"] < 1.3 * size
