"""`compress bench --decode` on a compressed bf16 Llama (tiny, with the real MiniLM tokenizer): it times
generation and prefill for both models, and names the path every compressed layer took, in --json and in
the table."""
from __future__ import annotations

import json

import torch

from compresscli.engine.options import RunOptions
from compresscli.engine.recipe import parse_recipe
from compresscli.engine.whole_model import run_recipe
from compresscli.io.checkpoint import load_checkpoint
from compresscli.kernels import cpu
from conftest import run_cli, tiny_text_configs, write_tiny_text_model

RECIPE = "stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5, scope: layer}\n"


def test_bench_decode_names_every_layers_path(tmp_path, capsys, minilm_dir):
    source = write_tiny_text_model(tiny_text_configs()["llama"], tmp_path / "llama", minilm_dir, torch.bfloat16)
    out = tmp_path / "out"
    run_recipe(load_checkpoint(str(source)), parse_recipe(RECIPE), out, RunOptions(evaluate=False))
    args = ("bench", str(out), "--decode", "--threads", "1", "--steps", "2", "--prefill-tokens", "8",
            "--batch-sizes", "1,2")
    code, stdout, stderr = run_cli(capsys, *args, "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    compressed = result["models"]["compressed"]
    assert [d["batch"] for d in compressed["decode"]] == [1, 2]
    mlp_layers = {name for name in compressed["decode"][0]["layer_paths"] if ".mlp." in name}
    assert len(mlp_layers) == 9  # 3 blocks x gate, up, down: every compressed layer names its path
    expected = "cpu" if cpu.available() else "dense"
    assert set(compressed["decode"][0]["layer_paths"].values()) == {expected}
    assert compressed["pytorch_decoded_layers"] == ([] if cpu.available() else sorted(mlp_layers))
    assert sum(compressed["prefill"]["paths"].values()) == 9
    assert result["read_bandwidth_bytes_per_s"] > 0 and 0 < compressed["share_of_limit"]
    assert compressed["tensor_bytes"] < result["models"]["original"]["tensor_bytes"]
    assert set(result["speedup"]) == {"decode_batch_1", "decode_batch_2", "prefill"}
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 0, stderr
    assert f"batch 1: {expected} x9" in stdout and "bytes limit" in stdout
