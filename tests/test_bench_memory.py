"""`compress bench`'s memory readings: resident bytes added by loading and the forward's peak, each
checkpoint in a fresh process (compresscli.commands.bench.measure_memory)."""
import json

import pytest
from safetensors.torch import save_file

from compresscli.commands import bench as speed
from compresscli.io.checkpoint import load_checkpoint
from compresscli.commands.bench import compare_checkpoints, measure_memory, render_markdown
from conftest import tiny_timm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A timm ViT of about 100 KB on disk."""
    directory = tmp_path_factory.mktemp("tiny")
    model = tiny_timm(num_classes=5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 5,
              "model_args": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
              "pretrained_cfg": {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3}}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def tiny_bench(tiny_dir):
    """bench's result for the tiny ViT against itself (each reading starts a process: done once)."""
    ckpt = load_checkpoint(tiny_dir)
    return ckpt, compare_checkpoints(ckpt, ckpt, batch_sizes=(3, 2), warmup=0, repeats=1, threads=1)


def test_loading_a_bigger_checkpoint_adds_more_resident_memory(tiny_bench):
    """MiniLM's 91 MB of weights against a ~100 KB ViT: a reading that ignored the model (a constant, the
    libraries' own imports, weights memory-mapped but never counted) could not tell them apart."""
    tiny = tiny_bench[1]["memory"]["original"]
    minilm_ckpt = load_checkpoint("ref:minilm")
    minilm = measure_memory(minilm_ckpt, threads=1)
    assert "note" not in tiny and "note" not in minilm
    assert 0 < tiny["load_bytes"] < 20e6
    assert minilm["load_bytes"] > tiny["load_bytes"] + 0.8 * minilm_ckpt.file_bytes
    # the forward's peak follows the activations: 32 x 128 tokens hold an MLP intermediate of 25 MB alone
    wide = measure_memory(minilm_ckpt, batch_size=32, seq_len=128, threads=1)
    assert wide["forward_peak_bytes"] > minilm["forward_peak_bytes"] + 20e6


def test_bench_result_carries_memory_beside_latency(tiny_bench, monkeypatch):
    ckpt, result = tiny_bench
    assert json.loads(json.dumps(result)) == result
    memory = result["memory"]
    assert memory["batch"] == 2 and memory["device"] == "cpu"
    for name in ("original", "compressed"):
        assert memory[name]["file_bytes"] == ckpt.file_bytes and memory[name]["load_bytes"] > 0
    text = render_markdown(result)
    assert "resident MB added by loading" in text and "peak MB during the forward" in text

    monkeypatch.setattr(speed.os.path, "exists", lambda path: False)  # a system with no /proc
    result = compare_checkpoints(ckpt, ckpt, batch_sizes=(1,), warmup=0, repeats=1, threads=1)
    assert result["memory"]["original"]["load_bytes"] is None
    assert "original: not measured (no /proc)" in render_markdown(result)
