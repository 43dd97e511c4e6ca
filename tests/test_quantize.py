"""The `quantize` stage: after any method it keeps that method's structure and puts its values on the grid; the
bytes on disk are the report's, to the byte; recovery trains through the quantizer; the inference forms of
the real MiniLM's quantized MLPs hold at most 1.05x their file; bad params and targets are named."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import compresscli
from compresscli import compress_
from compresscli.codecs.base import compressed_layers
from compresscli.codecs.forms import to_inference_
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.core.errors import RecipeError, StageError
from compresscli.engine.options import RunOptions
from compresscli.engine.recipe import parse_recipe
from compresscli.engine.run import compress_source
from compresscli.engine.whole_model import run_recipe
from compresscli.io.checkpoint import load_checkpoint
from compresscli.io.source import open_source
from compresscli.methods.quantize import QuantizeConfig

FAST = dict(batch_size=4, calibration_examples=8, max_length=16, evaluate=False)
STRUCTURE = {  # a recipe's first stage, and what of its structure the quantize stage must keep, per layer
    "magnitude": ("{sparsity: 0.6, scope: layer}", lambda layer: layer.mask),
    "condensed": ("{sparsity: 0.5}", lambda layer: torch.cat([layer.indices.long().view(-1),
                                                               torch.tensor([-1]) if layer.rows is None
                                                               else layer.rows.long()])),
    "fips": ("{budget: 0.5, steps: 1}", lambda layer: layer.mask),
    "rps": ("{compression: 4}", lambda layer: torch.tensor(list(layer.placement.kernel_spec(layer.weight_shape)))),
}


def _run(path, out, recipe: str, data="pydoc"):
    return run_recipe(load_checkpoint(path), parse_recipe(recipe), out, RunOptions(data=data, **FAST))


def _stage(method: str, params: str, targets: str = "[mlp]") -> str:
    return f"  - method: {method}\n    targets: {targets}\n    params: {params}\n"


@pytest.mark.parametrize("method", sorted(STRUCTURE))
def test_quantize_after_a_method_keeps_its_structure(method, tiny_text_dirs, tmp_path):
    """The layers stay the method's codec with the same mask / indices / placement, their values (and a FiPS
    base, an RPS memory) now on the grid; the output reloads computing the same (the run checks it)."""
    params, structure = STRUCTURE[method]
    path = tiny_text_dirs["llama"]
    first = _run(path, tmp_path / "a", "stages:\n" + _stage(method, params))
    both = _run(path, tmp_path / "b", "stages:\n" + _stage(method, params)
                + _stage("quantize", "{bits: 4, group_size: 16, solver: gptq}"))
    before, after = compressed_layers(first.model), compressed_layers(both.model)
    assert before and sorted(before) == sorted(after)
    for name, layer in after.items():
        assert layer.codec == before[name].codec and torch.equal(structure(layer), structure(before[name])), name
        params = layer.codec_params()
        assert {"quant", "shared_quant"} & set(params), name
        assert layer.stored_version() == 2
    assert both.report["memory"]["targeted"]["actual_bytes"] < first.report["memory"]["targeted"]["actual_bytes"]


def test_gptq_after_pruning_keeps_pruned_weights_at_zero(tiny_text_dirs, tmp_path):
    result = _run(tiny_text_dirs["bert"], tmp_path / "out", "stages:\n" + _stage("magnitude", "{sparsity: 0.7}")
                  + _stage("quantize", "{bits: 3, group_size: null, symmetric: false}"))
    for name, layer in compressed_layers(result.model).items():
        weight = layer.dense_weight()
        assert torch.equal(weight[~layer.mask], torch.zeros(int((~layer.mask).sum()))), name
        assert layer.codec_params()["quant"] == {"bits": 3, "group_size": None, "symmetric": False}


def test_gptq_in_one_pass_differs_only_after_the_first_layer(tiny_text_dirs, tmp_path):
    """sequential: false takes every layer's Hessian from the unit's unquantized inputs: the first MLP layer
    (whose inputs no quantized layer feeds) is solved alike, a later one differently."""
    codes = {}
    for sequential in (True, False):
        result = _run(tiny_text_dirs["bert"], tmp_path / str(sequential), "stages:\n" + _stage(
            "quantize", f"{{bits: 4, group_size: 16, sequential: {str(sequential).lower()}}}"))
        codes[sequential] = {n: m.to_tensors()["weight.codes"] for n, m in compressed_layers(result.model).items()}
    names = list(codes[True])
    assert torch.equal(codes[True][names[0]], codes[False][names[0]])
    assert any(not torch.equal(codes[True][n], codes[False][n]) for n in names[1:])


def _expected_bytes(params: dict, scale_bytes: int) -> int:
    """A quantized_linear layer's stored bytes by the format's arithmetic: packed rows, scales, zeros, bias."""
    rows, cols, spec = params["out_features"], params["in_features"], QuantSpec.from_params(params["quant"])
    groups = spec.groups(cols)
    codes = rows * (cols if spec.bits == 8 else math.ceil(cols * spec.bits / 8))
    return codes + rows * groups * scale_bytes + (0 if spec.symmetric else rows * groups) + rows * scale_bytes


@pytest.mark.parametrize("dtype,bits,group_size,symmetric", [("bfloat16", 4, 16, True), ("float32", 3, None, False),
                                                             ("bfloat16", 2, 8, False), ("float32", 8, None, True)])
def test_bytes_on_disk_are_the_reports(tiny_text_dirs, tmp_path, dtype, bits, group_size, symmetric):
    """Every quantized layer's bytes in the report (and `compress inspect`) are its tensors' bytes in the file,
    which are the format's arithmetic: ceil(cols * bits / 8) a row, scales in the checkpoint's dtype."""
    options = RunOptions(data="pydoc", dtype=getattr(torch, dtype), **FAST)
    recipe = parse_recipe("stages:\n" + _stage("quantize", f"{{bits: {bits}, group_size: {group_size or 'null'}, "
                                                           f"symmetric: {str(symmetric).lower()}, solver: rtn}}"))
    out = tmp_path / "out"
    report = compress_source(open_source(str(tiny_text_dirs["bert"])), recipe, out, options).report
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    rows = {r["name"]: r for r in report["memory"]["layers"]}
    quantized = [n for n, r in rows.items() if r["codec"] == "quantized_linear"]
    assert len(quantized) == 6  # 3 blocks x 2 MLP layers
    scale_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    for name in quantized:
        on_disk = sum(t.numel() * t.element_size() for k, t in stored.items() if k.startswith(name + "."))
        params = compressed_layers(compresscli.load(out))[name].codec_params()
        assert rows[name]["bytes"] == on_disk == _expected_bytes(params, scale_bytes), name
        assert rows[name]["dense_bytes"] == rows[name]["dense_params"] * scale_bytes
        assert stored[f"{name}.weight.scales"].dtype == getattr(torch, dtype)
    assert report["memory"]["model"]["tensor_bytes"] == sum(t.numel() * t.element_size() for t in stored.values())


def test_recovery_trains_the_shadow_and_the_scales(tiny_text_dirs, tmp_path):
    """finetune after quantize trains the float shadow and the scales through the fake quantizer: the codes
    and scales written change, and what was written is what the trained model computes (the run's reload
    check), with the values still on the 4-bit grid."""
    path = tiny_text_dirs["gpt2"]
    quantize = _stage("quantize", "{bits: 4, group_size: 16, solver: rtn}")
    alone = _run(path, tmp_path / "a", "stages:\n" + quantize)
    trained = _run(path, tmp_path / "b", "stages:\n" + quantize + "  - method: finetune\n    params: {steps: 5, "
                                                                    "lr: 1.0e-2}\n")
    assert trained.report["stages"][1]["stats"]["final_loss"] == trained.report["stages"][1]["stats"]["final_loss"]
    first, second = compressed_layers(alone.model), compressed_layers(trained.model)
    for name, layer in second.items():
        codes = layer.to_tensors()["weight.codes"]
        assert not torch.equal(layer.quantizer.scales(), first[name].quantizer.scales()), name
        assert not torch.equal(codes, first[name].to_tensors()["weight.codes"]), name
        assert torch.equal(layer.dense_weight(), layer.quantizer.dequantize(layer.quantizer.codes(layer.weight)))


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 128), (4, 32), (2, 64)])
def test_real_minilm_quantized_layers_resident_within_5_percent_of_the_file(minilm_dir, bits, group_size):
    """The bound on the real model in bfloat16: every quantized MLP layer's inference form (int8 and int4
    kernels' layouts prepared, or codes kept for dequantizing) holds at most 1.05x what its file stores."""
    model = compresscli.load(minilm_dir).to(torch.bfloat16)
    compress_(model, QuantizeConfig(bits=bits, group_size=group_size, solver="rtn"),
              lambda module, name: "intermediate.dense" in name or ("output.dense" in name and "attention" not in name))
    layers = compressed_layers(model)
    assert len(layers) == 12
    stored = {n: sum(t.numel() * t.element_size() for t in m.to_tensors().values()) for n, m in layers.items()}
    to_inference_(model)
    for name, layer in compressed_layers(model).items():
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in (*layer.parameters(), *layer.buffers())}
        assert sum(storages.values()) <= 1.05 * stored[name], name
        assert layer.kernel == {8: "int8", 4: "int4" if group_size == 128 else None, 2: None}[bits], name


def test_quantize_names_what_it_cannot_do(tiny_text_dirs, tmp_path):
    with pytest.raises(RecipeError, match="bits must be one of"):
        parse_recipe("stages:\n" + _stage("quantize", "{bits: 5}"))
    with pytest.raises(RecipeError, match="group_size"):
        parse_recipe("stages:\n" + _stage("quantize", "{bits: 4, group_size: 0}"))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4))
    with pytest.raises(StageError, match="0 is a dense Conv2d"):
        compress_(model, QuantizeConfig(solver="rtn"), lambda module, name: name in ("0", "1"))
    with pytest.raises(StageError, match="needs calibration data"):
        compress_(nn.Sequential(nn.Linear(4, 4)), QuantizeConfig(), lambda module, name: name == "0")


def test_an_rps_layer_with_a_quantized_memory_dequantizes_it_once_per_call(tiny_text_dirs, tmp_path, monkeypatch):
    """The PyTorch path computes a large weight in slices; a quantized memory is dequantized once for the call,
    not once per slice (each slice would otherwise pay the whole memory's dequantization)."""
    from compresscli.codecs.quant.values import QuantizedValues
    from compresscli.codecs.rps import inference

    _run(tiny_text_dirs["llama"], tmp_path / "out", "stages:\n" + _stage("rps", "{compression: 4}")
         + _stage("quantize", "{bits: 8, group_size: null, solver: rtn}"))
    layer = next(m for m in compressed_layers(compresscli.load(tmp_path / "out")).values()
                 if isinstance(m, inference.CompactRPSLinear))
    calls = []
    dequantize = QuantizedValues.dequantize
    monkeypatch.setattr(QuantizedValues, "dequantize", lambda self, *a, **k: calls.append(1) or dequantize(self, *a, **k))
    monkeypatch.setattr(inference, "ROW_CHUNK", 2 * layer.in_features)  # slices of 2 rows
    x = torch.randn(3, layer.in_features, requires_grad=True)  # gradients: the compiled kernels decline
    y = layer(x)
    assert layer.last_path == "rps" and len(calls) == 1
    calls.clear()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.dense_weight(), layer.bias))
