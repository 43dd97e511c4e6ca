"""Round trips through the file format on every model family we support, plus strict loading."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from compresscli import MagnitudeConfig, compress_, load
from compresscli.io.checkpoint import load_checkpoint
from compresscli.core.errors import CheckpointError
from compresscli.engine.options import RunOptions
from compresscli.engine.whole_model import run_recipe
from compresscli.engine.recipe import parse_recipe

RECIPE = "stages:\n  - method: magnitude\n    targets: [mlp, attention]\n    params: {sparsity: 0.6}\n"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_hf_dirs):
    root = tmp_path_factory.mktemp("out")
    result = {}
    for name, path in tiny_hf_dirs.items():
        ckpt = load_checkpoint(path)
        run = run_recipe(ckpt, parse_recipe(RECIPE), root / name, RunOptions(evaluate=False))
        result[name] = (root / name, run.model)
    return result


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_round_trip_is_exact(outputs, name):
    """The training form reloads bit for bit; the inference form computes the same up to summation order."""
    out, model = outputs[name]
    ids = torch.randint(0, 99, (2, 9))
    a = model.eval()(input_ids=ids)
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(load(out, trainable=True)(input_ids=ids), key))
    torch.testing.assert_close(getattr(load(out)(input_ids=ids), key), getattr(a, key), rtol=1e-5, atol=1e-5)


def test_tied_weights_are_stored_once(outputs):
    out, _ = outputs["gpt2"]
    tensors = load_file(out / "model.safetensors")
    assert "transformer.wte.weight" in tensors and "lm_head.weight" not in tensors
    model = load(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_no_dense_zeros_in_the_file(outputs):
    out, model = outputs["llama"]
    tensors = load_file(out / "model.safetensors")
    values = tensors["model.layers.0.mlp.up_proj.weight.values"]
    assert values.numel() == int(model.model.layers[0].mlp.up_proj.mask.sum()) < 48 * 32
    assert (values != 0).all() and "model.layers.0.mlp.up_proj.weight" not in tensors


def _rewrite(out, tmp_path, edit):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    from safetensors import safe_open

    with safe_open(str(copy / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(copy / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(copy / "model.safetensors"), metadata=metadata)
    return copy


def test_missing_tensor_is_named(outputs, tmp_path):
    out, _ = outputs["bert"]
    copy = _rewrite(out, tmp_path, lambda t: t.pop("encoder.layer.1.output.dense.weight.mask"))
    with pytest.raises(CheckpointError, match=r"encoder.layer.1.output.dense.*missing tensors.*weight.mask"):
        load(copy)


def test_unexpected_tensor_is_named(outputs, tmp_path):
    out, _ = outputs["bert"]
    copy = _rewrite(out, tmp_path, lambda t: t.__setitem__("stowaway", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected tensors \\['stowaway'\\]"):
        load(copy)


def test_compresses_in_place_with_a_filter(tiny_hf_dirs):
    """Exactly the modules the filter accepts become sparse, at the sparsity asked; everything else is the
    same module with the same weights."""
    from compresscli.codecs import SparseLinear

    model = load_checkpoint(tiny_hf_dirs["bert"]).model
    before = {n: m for n, m in model.named_modules()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    chosen = [n for n in before if n.endswith("intermediate.dense")]
    stats = compress_(model, MagnitudeConfig(sparsity=0.5), lambda m, n: n.endswith("intermediate.dense"))
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert sorted(sparse) == sorted(chosen) == [f"encoder.layer.{i}.intermediate.dense" for i in (0, 1)]
    kept = sum(int(m.mask.sum()) for m in sparse.values())
    assert stats["layers"] == 2 and stats["kept"] == kept == 32 * 64  # half of the two 64 x 32 weights
    for name, layer in sparse.items():  # the largest half of the magnitudes, in place of the dense weight
        dense = weights[f"{name}.weight"]
        assert torch.equal(layer.dense_weight(), dense * layer.mask)
    scores = torch.cat([weights[f"{n}.weight"].abs().flatten() for n in chosen])
    assert torch.cat([weights[f"{n}.weight"].abs()[sparse[n].mask] for n in chosen]).min() >= scores.median()
    for name, module in model.named_modules():
        if not any(name == n or name.startswith(f"{n}.") for n in chosen):
            assert module is before[name], name
    for name, param in model.named_parameters():
        if not any(name.startswith(f"{n}.") for n in chosen):
            assert torch.equal(param, weights[name]), name


def test_metadata_records_format_and_codecs(outputs):
    from compresscli.io.safetensors import read_header

    _, metadata = read_header(outputs["bert"][0] / "model.safetensors")
    layers = json.loads(metadata["layers"])
    assert metadata["format"] == "compresscli" and metadata["format_version"] == "1"
    assert {m["codec"] for m in layers.values()} == {"sparse_linear"} and len(layers) == 12
