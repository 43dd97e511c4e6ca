"""`compress export --format compressed-tensors` of quantized layers: pack-quantized tensors and a quantization_config
that transformers 5 + compressed-tensors load in a process where compresscli cannot be imported (its outputs those
of compresscli.load(OUT)), the file's codes reused byte for byte, and every other structure refused by name."""
from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import codec_samples, run_cli
from safetensors import safe_open
from test_ecosystem_export import _compress, _job, _load_elsewhere, _output

import compresscli
from compresscli.codecs import CODECS, codec_for
from compresscli.codecs.base import CompressedModule
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.core.errors import CompressError
from compresscli.interop import compressed_tensors as ct_sparse
from compresscli.interop import ct_quantized
from compresscli.interop.export import export
from compresscli.io.safetensors import read_header

pytest.importorskip("compressed_tensors", reason="the pack-quantized layout is checked with compressed-tensors itself")

RTN_INT4 = "stages:\n  - method: quantize\n    targets: [mlp]\n    params: {bits: 4, group_size: 128, solver: rtn}\n"
RTN_INT8 = "stages:\n  - method: quantize\n    targets: [mlp]\n    params: {bits: 8, group_size: null, solver: rtn}\n"


def _decompressed(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """compressed-tensors' own pack-quantized decompressor on the exported tensors of one layer."""
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**ct_quantized.weights_args(spec)))
    return PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]


def _quant_params(params: dict) -> list[str]:
    return [k for k in CompressedModule.QUANT_PARAMS if params.get(k)]


@pytest.mark.parametrize("codec", CODECS.names())
def test_every_codec_exports_to_compressed_tensors_or_is_refused_by_name(codec):
    """Quantized dense Linears decompress, in compressed-tensors itself, to exactly the weight compresscli computes
    with; every other quantized structure, and any layer whose grid the format cannot hold, is refused naming the
    layer, its codec and --format dense."""
    exported = 0
    for i, sample in enumerate(codec_samples(codec)):
        torch.manual_seed(0)
        layer, dense = sample.make()
        params = json.loads(json.dumps(layer.codec_params()))
        unit = f"model.layer{i}"
        if not _quant_params(params):  # float values: the sparse path's rule, the codec's own declaration
            if "compressed-tensors" in codec_for(codec).export_formats:
                ct_sparse.refuse_codec(unit, codec)
            else:
                with pytest.raises(CompressError, match=rf"\({unit}: {codec}\).*--format dense"):
                    ct_sparse.refuse_codec(unit, codec)
            continue
        spec = QuantSpec.from_params(params[_quant_params(params)[0]])
        fits = codec == ct_quantized.CODEC and params["in_features"] % spec.group(params["in_features"]) == 0 \
            and spec.symmetric
        if not fits:
            with pytest.raises(CompressError, match=rf"\({unit}: {codec}, .*--format dense"):
                ct_quantized.refuse_layer(unit, codec, params, type(dense).__name__)
            continue
        ct_quantized.refuse_layer(unit, codec, params, type(dense).__name__)
        written = ct_quantized.encode(layer.to_tensors(), spec, (params["out_features"], params["in_features"]))
        assert written["weight_packed"].dtype == torch.int32
        assert written["weight_packed"].shape[1] == -(-params["in_features"] * spec.bits // 32)
        torch.testing.assert_close(_decompressed(written, spec), layer.dense_weight(), rtol=0, atol=0)
        exported += 1
    assert exported or codec != ct_quantized.CODEC  # some quantized_linear samples fit the format


def test_packing_is_compressed_tensors_pack_to_int32():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    generator = torch.Generator().manual_seed(3)
    for bits in (2, 3, 4, 8):
        for rows, cols in ((5, 40), (3, 7), (4, 64)):
            q = torch.randint(-(1 << bits - 1), 1 << bits - 1, (rows, cols), generator=generator, dtype=torch.int8)
            assert torch.equal(ct_quantized.pack_int32(q, bits), pack_to_int32(q, bits)), (bits, rows, cols)


def _raw(directory, names: list[str]) -> dict[str, bytes]:
    """The stored bytes of tensors in a one-file directory."""
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes() for name in names}


# (recipe, bits): round to nearest keeps this fast; GPTQ's codes take the same path
MINILM_QUANTIZED = {"rtn-int8": (RTN_INT8, 8), "rtn-int4-g128": (RTN_INT4, 4)}


def test_real_minilm_quantized_loads_in_plain_transformers(tmp_path, minilm_dir, capsys):
    import transformers

    text = "Quantized models should load anywhere."
    jobs, expected = [], {}
    for case, (recipe, bits) in MINILM_QUANTIZED.items():
        out = _compress(minilm_dir, recipe, tmp_path / f"{case}-out")
        to = tmp_path / f"{case}-ct"
        code, stdout, stderr = run_cli(capsys, "export", str(out), "--to", str(to), "--format", "compressed-tensors",
                                       "--json")
        assert code == 0, stderr
        result = json.loads(stdout)
        assert result["quant_format"] == "pack-quantized" and result["sparse_format"] is None and not result["notes"]
        assert result["decoded_layers"] == 12 and result["files"] == ["model.safetensors"]
        block = json.loads((to / "config.json").read_text())["quantization_config"]
        (group,) = block["config_groups"].values()
        assert group["format"] == "pack-quantized" and group["weights"]["num_bits"] == bits and len(group["targets"]) == 12
        ignored = [name for name in ("encoder.layer.0.attention.self.query", "pooler.dense", "encoder.layer.0.output.dense")
                   if any(re.match(pattern[3:], name) for pattern in block["ignore"])]
        assert ignored == ["encoder.layer.0.attention.self.query", "pooler.dense"]
        assert block["quantization_status"] == "compressed"
        _check_bytes(out, to, [f"encoder.layer.{i}.{m}.dense" for i in range(6) for m in ("intermediate", "output")],
                     bits)
        ids = transformers.AutoTokenizer.from_pretrained(out)(text, return_tensors="pt")["input_ids"]
        inputs = {"input_ids": ids, "text": text}
        expected[case] = _output(compresscli.load(out), inputs)
        jobs.append(_job(tmp_path, case, to, "hf-auto", inputs))
    _load_elsewhere(tmp_path, jobs)  # also asserts no missing / unexpected / mismatched keys
    for job, case in zip(jobs, MINILM_QUANTIZED):
        (got,) = torch.load(job["result"])
        want = expected[case]
        assert (got - want).norm() <= 1e-3 * want.norm(), case
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def _check_bytes(out, to, targets: list[str], bits: int) -> None:
    """The export reuses the file's codes and scales (int8: offset binary, the top bit flipped), and weighs what
    compresscli's file weighs plus 16 bytes of weight_shape a layer."""
    ours, _ = read_header(out / "model.safetensors")
    theirs, _ = read_header(to / "model.safetensors")
    size = {name: entry["data_offsets"][1] - entry["data_offsets"][0] for name, entry in ours.items()
            if name != "__metadata__"}
    exported = {name: entry["data_offsets"][1] - entry["data_offsets"][0] for name, entry in theirs.items()
                if name != "__metadata__"}
    assert sum(exported.values()) == sum(size.values()) + 16 * len(targets)
    unit = targets[0]
    codes = _raw(out, [f"{unit}.weight.codes", f"{unit}.weight.scales"])
    packed = _raw(to, [f"{unit}.weight_packed", f"{unit}.weight_scale"])
    assert packed[f"{unit}.weight_scale"] == codes[f"{unit}.weight.scales"]
    flip = 0x80 if bits == 8 else 0x00  # int8 two's complement -> offset binary; int4 nibbles are already offset
    assert packed[f"{unit}.weight_packed"] == bytes(b ^ flip for b in codes[f"{unit}.weight.codes"])


# Tiny BERT: a grouped 4-bit grid on the MLPs and a 3-bit per-row one on the attention (two config groups)
TINY_GRIDS = ("stages:\n  - method: quantize\n    targets: [mlp]\n"
              "    params: {bits: 4, group_size: 16, solver: rtn}\n"
              "  - method: quantize\n    targets: [attention]\n    params: {bits: 3, group_size: null, solver: rtn}\n")


def _bfloat16_copy(source, to):
    """A bfloat16 checkpoint of the same model (the dtype large checkpoints are stored in)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, to)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(to / "model.safetensors").items()}
    save_file(tensors, str(to / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((to / "config.json").read_text())
    (to / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    return to


def test_several_grids_and_bfloat16_load_in_plain_transformers(tmp_path, tiny_hf_dirs):
    out = _compress(tiny_hf_dirs["bert"], TINY_GRIDS, tmp_path / "out")
    result = export(out, tmp_path / "ct", "compressed-tensors")
    block = json.loads((result.to / "config.json").read_text())["quantization_config"]
    grids = sorted((g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["symmetric"], len(g["targets"]))
                   for g in block["config_groups"].values())
    assert grids == [(3, "channel", True, 8), (4, "group", True, 4)]
    header, _ = read_header(result.to / "model.safetensors")
    assert header["encoder.layer.0.attention.self.query.weight_packed"]["shape"] == [32, 32 * 3 // 32]
    llama = _compress(_bfloat16_copy(tiny_hf_dirs["llama"], tmp_path / "llama-bf16"),
                      TINY_GRIDS.split("  - method: quantize\n    targets: [attention]")[0], tmp_path / "llama-out")
    llama_ct = export(llama, tmp_path / "llama-ct", "compressed-tensors").to
    header, _ = read_header(llama_ct / "model.safetensors")
    assert header["model.layers.0.mlp.down_proj.weight_scale"] == {**header["model.layers.0.mlp.down_proj.weight_scale"],
                                                                   "dtype": "BF16", "shape": [32, 48 // 16]}
    inputs = {"input_ids": torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(1))}
    (mlp,) = json.loads((llama_ct / "config.json").read_text())["quantization_config"]["config_groups"].values()
    for name in ("model.layers.1.mlp.up_proj", "layers.1.mlp.up_proj"):  # as LlamaForCausalLM / AutoModel name it
        assert sum(bool(re.match(pattern[3:], name)) for pattern in mlp["targets"]) == 1
    jobs = [_job(tmp_path, "bert", result.to, "hf-auto", inputs), _job(tmp_path, "llama", llama_ct, "hf-class", inputs)]
    _load_elsewhere(tmp_path, jobs)
    for job, source, tolerance in zip(jobs, (out, llama), (1e-3, 1e-2)):
        (got,) = torch.load(job["result"])
        want = _output(compresscli.load(source), inputs)
        assert got.dtype == want.dtype and (got - want).float().norm() <= tolerance * want.float().norm(), source


SPARSE_INT8 = ("stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5}\n"
               "  - method: quantize\n    targets: [mlp]\n    params: {bits: 8, group_size: null, solver: rtn}\n")
SPARSE_AND_INT8 = ("stages:\n  - method: magnitude\n    targets: [attention]\n    params: {sparsity: 0.5}\n"
                   "  - method: quantize\n    targets: [mlp]\n    params: {bits: 8, group_size: null, solver: rtn}\n")
ASYMMETRIC = ("stages:\n  - method: quantize\n    targets: [mlp]\n"
              "    params: {bits: 4, group_size: 16, symmetric: false, solver: rtn}\n")
REFUSALS = {  # case -> (recipe, the one line expected)
    "asymmetric": (ASYMMETRIC, (r"asymmetric .*\(encoder\.layer\.0\.intermediate\.dense: quantized_linear, int4 with "
                               r"zero points\)")),
    "quantized-sparse": (SPARSE_INT8, (r"no format for quantized sparse layers \(encoder\.layer\.0\.intermediate\."
                                      r"dense: sparse_linear, int8 values\)")),
    "sparse-beside-quantized": (SPARSE_AND_INT8, (r"quantized or sparse layers, not both in one model \(encoder\."
                                                 r"layer\.0\.attention\.self\.query: sparse_linear")),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_structures_the_format_cannot_hold_are_refused_in_one_line(tmp_path, tiny_hf_dirs, capsys, case):
    recipe, message = REFUSALS[case]
    out = _compress(tiny_hf_dirs["bert"], recipe, tmp_path / "out")
    code, _, stderr = run_cli(capsys, "export", str(out), "--to", str(tmp_path / "ct"), "--format",
                              "compressed-tensors")
    assert code != 0
    (line,) = [line for line in stderr.splitlines() if line.strip()]
    assert re.search(message, line) and "--format dense" in line, line
    assert not (tmp_path / "ct").exists()
