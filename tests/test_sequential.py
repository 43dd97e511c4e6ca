"""The block-by-block engine computes what the whole-model path computes, on every family, and refuses
what it cannot do before doing any work."""
import json

import pytest
import torch
from torch import nn

from compresscli.engine.activations import ActivationStore
from compresscli.engine.skeleton_forward import BlockStreamer
from compresscli.io.checkpoint import load_checkpoint
from compresscli.core.errors import CompressError, RecipeError
from compresscli.core.resources import current_rss
from compresscli.engine.options import RunOptions
from compresscli.engine.run import compress_source
from compresscli.engine.recipe import parse_recipe
from compresscli.io.safetensors import TensorIndex
from compresscli.io.source import open_source
from compresscli.engine.block_reader import stream_outputs

MAGNITUDE = "stages:\n  - method: magnitude\n    targets: [mlp, attention]\n    params: {sparsity: 0.6, scope: layer}\n"
ACTIVATION = "stages:\n  - method: condensed\n    targets: [mlp]\n    params: {sparsity: 0.5, score: activation}\n"


def run(path, text, out, **options):
    options = {"calibration_examples": 16, "eval_examples": 16, **options}
    return compress_source(open_source(path), parse_recipe(text), out, RunOptions(**options), force=True)


def same_files(a, b) -> bool:
    a, b = TensorIndex.of_directory(a), TensorIndex.of_directory(b)
    return set(a.names()) == set(b.names()) and all(torch.equal(a.read([k])[k], b.read([k])[k]) for k in a.names())


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "neox"])
@pytest.mark.parametrize("text, block_inputs", [(MAGNITUDE, "compressed"), (ACTIVATION, "original")],
                         ids=["magnitude", "activation-scores"])
def test_sequential_writes_what_the_whole_model_path_writes(tiny_text_dirs, tmp_path, family, text, block_inputs):
    seq = run(tiny_text_dirs[family], text, tmp_path / "seq", sequential=True, block_inputs=block_inputs)
    whole = run(tiny_text_dirs[family], text, tmp_path / "whole", sequential=False)
    assert (seq.mode, whole.mode) == ("sequential", "whole-model")
    assert same_files(tmp_path / "seq", tmp_path / "whole")
    values = [v for r in (seq, whole) for m in r.report["eval"]["metrics"] for v in (m["original"], m["compressed"])]
    assert values[:len(values) // 2] == pytest.approx(values[len(values) // 2:], rel=1e-5)
    assert seq.report["reload"]["max_abs_diff"] == 0.0 and seq.report["execution"]["units"] == 3


def test_block_inputs_from_the_compressed_blocks_change_what_later_blocks_see(tiny_text_dirs, tmp_path):
    original = run(tiny_text_dirs["llama"], ACTIVATION, tmp_path / "o", sequential=True, block_inputs="original",
                   evaluate=False)
    carried = run(tiny_text_dirs["llama"], ACTIVATION, tmp_path / "c", sequential=True, evaluate=False)
    a, b = TensorIndex.of_directory(tmp_path / "o"), TensorIndex.of_directory(tmp_path / "c")
    first, last = "model.layers.0.mlp.up_proj.indices", "model.layers.2.mlp.up_proj.indices"
    assert torch.equal(a.read([first])[first], b.read([first])[first])  # block 0 reads the same embeddings
    assert not torch.equal(a.read([last])[last], b.read([last])[last])
    assert original.report["execution"]["block_inputs"] == "original"
    assert carried.report["execution"]["block_inputs"] == "compressed"


def test_real_minilm_block_by_block_equals_whole_model(minilm_dir, tmp_path):
    seq = run(minilm_dir, MAGNITUDE, tmp_path / "seq", sequential=True, evaluate=False)
    run(minilm_dir, MAGNITUDE, tmp_path / "whole", sequential=False, evaluate=False)
    assert same_files(tmp_path / "seq", tmp_path / "whole")
    stats = seq.stages[0].stats["per_unit"]
    assert len(stats) == 6 and all(s["sparsity"] == pytest.approx(0.6, abs=1e-3) for s in stats)
    assert seq.stages[0].bytes_after < 0.7 * seq.stages[0].bytes_before


def test_fips_reconstruction_block_by_block_reaches_the_same_loss(minilm_dir, tmp_path):
    """Groups train independently (separate parameters, elementwise AdamW, the same chunk order), so one
    group at a time reaches the per-block losses of all groups at once, when both see the original inputs."""
    text = "stages:\n  - method: fips\n    targets: [mlp]\n    params: {budget: 0.4, steps: 4, batch_size: 8}\n"
    seq = run(minilm_dir, text, tmp_path / "seq", sequential=True, block_inputs="original", evaluate=False)
    whole = run(minilm_dir, text, tmp_path / "whole", sequential=False, evaluate=False)
    per_unit = [u["reconstruction"] for u in seq.stages[0].stats["per_unit"]]
    joint = whole.stages[0].stats["reconstruction"]
    assert len(per_unit) == 2 and seq.report["execution"]["units"] == 2  # two groups of three blocks
    assert sum((u["final_block_loss"] for u in per_unit), []) == pytest.approx(joint["final_block_loss"], rel=1e-3)
    assert sum(u["final_loss"] for u in per_unit) == pytest.approx(joint["final_loss"], rel=1e-3)


@pytest.mark.parametrize("params, needle", [
    ("{method: magnitude, params: {sparsity: 0.5}}", "scope: block"),
    ("{method: magnitude, params: {sparsity: 0.5, scope: layer, score: snip}}", "score: magnitude"),
    ("{method: rps, targets: [mlp], params: {compression: 4}}", "scope: block"),
    ("{method: ltr, params: {sparsity: 0.5}}", "scope: block"),
    ("{method: magnitude, params: {scope: layer}}, {method: finetune}", "drop the stage"),
])
def test_whole_model_stages_are_refused_before_any_work(minilm_dir, tmp_path, params, needle):
    with pytest.raises(RecipeError, match=needle):
        run(minilm_dir, f"stages: [{params}]", tmp_path / "out", sequential=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_targets_outside_the_blocks_are_refused_by_name(minilm_dir, tmp_path):
    text = "stages:\n  - method: rps\n    targets: [linear]\n    params: {scope: block}\n"
    with pytest.raises(RecipeError, match="pooler.dense, outside the repeated blocks.*ignore"):
        run(minilm_dir, text, tmp_path / "out", sequential=True)


def test_block_scopes_of_magnitude_and_rps(tiny_text_dirs, tmp_path):
    text = ("stages:\n  - method: magnitude\n    targets: [attention]\n    params: {sparsity: 0.5, scope: block}\n"
            "  - method: rps\n    targets: [mlp]\n    params: {compression: 2, scope: block}\n")
    seq = run(tiny_text_dirs["llama"], text, tmp_path / "seq", sequential=True, evaluate=False)
    run(tiny_text_dirs["llama"], text, tmp_path / "whole", sequential=False, evaluate=False)
    assert same_files(tmp_path / "seq", tmp_path / "whole")
    for unit in seq.stages[0].stats["per_unit"]:  # one threshold per block: exactly half of each block kept
        assert unit["kept"] * 2 == unit["weights"]
    names = TensorIndex.of_directory(tmp_path / "seq").names()
    assert {f"shared.rps.model.layers.{i}.0.memory" for i in range(3)} <= set(names)


def test_stream_outputs_equal_the_loaded_model(tiny_text_dirs):
    model = load_checkpoint(tiny_text_dirs["gpt2"]).model
    batch = {"input_ids": torch.randint(0, 30522, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    (streamed,) = stream_outputs(open_source(tiny_text_dirs["gpt2"]), [batch])
    with torch.no_grad():
        assert torch.allclose(streamed, model(**batch).logits, atol=1e-5)


def test_activations_spill_to_disk_and_come_back(tmp_path):
    store = ActivationStore(budget_bytes=100, spill_parent=tmp_path)
    small, large = torch.ones(4), torch.randn(64, 8)
    store.put("small", small)
    store.put("large", large)
    assert store.resident_bytes == 16 and store.spilled_bytes == large.numel() * 4
    assert torch.equal(store.get("large"), large) and len(list(tmp_path.iterdir())) == 1
    store.close()
    assert not list(tmp_path.iterdir())


class _Scaled(nn.Module):
    """Blocks whose container's owner rescales the hidden state between blocks: not streamable."""

    def __init__(self, scale_between: bool):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.scale_between = scale_between

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            x = x * 2 if self.scale_between else x
        return x


@pytest.mark.parametrize("scale_between", [False, True])
def test_a_model_that_changes_the_hidden_state_between_blocks_is_refused(scale_between):
    model = _Scaled(scale_between).eval()
    streamer = BlockStreamer(model, model.blocks, ["blocks.0", "blocks.1", "blocks.2"],
                             lambda m, batch: m(batch["x"]), torch.device("cpu"))
    batch = {"x": torch.randn(2, 4)}
    if scale_between:
        with pytest.raises(CompressError, match="changes the hidden state between blocks.0 and blocks.1"):
            streamer.capture(batch)
        return
    chunk = streamer.capture(batch)
    hidden = chunk.hidden
    for i, block in enumerate(model.blocks):
        hidden = streamer.run_block(block, i, chunk, hidden)
    with torch.no_grad():
        assert torch.allclose(streamer.finish(batch, hidden), model(batch["x"]))


def test_report_records_how_the_run_went(tiny_text_dirs, tmp_path):
    budget = current_rss() + 2 * 1024**3  # the prediction counts from this process's RSS, which grows as tests run
    result = run(tiny_text_dirs["llama"], MAGNITUDE, tmp_path / "o", sequential=True, max_memory=budget)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    execution = report["execution"]
    assert execution["mode"] == "sequential" and execution["budget_bytes"] == budget
    assert execution["peak_rss_bytes"] > 0 and execution["predicted_peak_bytes"] == result.prediction.sequential
