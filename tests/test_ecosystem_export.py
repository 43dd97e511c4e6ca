"""`compress export`: every codec's dense form; `--format dense` directories that transformers and timm load,
and `--format compressed-tensors` directories that compressed-tensors decompresses, in a process where
compresscli cannot be imported, computing what compresscli.load(OUT, trainable=True) computes (the training form: the same dense weights)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import compresscli
from compresscli.interop import compressed_tensors as ct_sparse
from compresscli.io.checkpoint import load_checkpoint
from compresscli.interop.export import FORMATS, export
from compresscli.codecs import CODECS, codec_for
from compresscli.engine.options import RunOptions
from compresscli.engine.whole_model import run_recipe
from compresscli.engine.recipe import parse_recipe
from compresscli.core.errors import CompressError
from compresscli.io.safetensors import read_header
from conftest import codec_samples, run_cli, tiny_timm

# ----------------------------------------------------------------------------- every codec's dense form


@pytest.mark.parametrize("codec", CODECS.names())
def test_every_codec_decodes_to_the_dense_layer_it_computes(codec):
    for sample in codec_samples(codec):
        torch.manual_seed(0)
        layer, dense = sample.make()
        params = json.loads(json.dumps(layer.codec_params()))
        shared = {k: nn.Parameter(v.detach().clone(), requires_grad=v.is_floating_point())  # codes: integers
                  for k, v in layer.shared_tensors().items()}
        decoded = codec_for(codec).from_tensors(layer.to_tensors(), params, shared).eval()
        dense.load_state_dict(decoded.dense_tensors())  # strict: exactly the dense layer's keys and shapes
        x = sample.input()
        with torch.no_grad():
            torch.testing.assert_close(dense(x), decoded(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- loading without compresscli

# Runs in a fresh interpreter where `import compresscli` fails: DIR must load with transformers or timm alone.
LOADER = """
import glob, json, sys
sys.modules["compresscli"] = None  # any import of it raises ImportError
import torch


def decompressed(directory, config):
    # compressed-tensors <= 0.14 decompresses sparse checkpoints itself (ModelCompressor); 0.15 removed its
    # sparse compressors but still validates the sparsity_config and unpacks the bitmasks: decode with those
    import transformers
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.utils import unpack_bitmasks
    block = config.quantization_config["sparsity_config"]
    sparsity = SparsityCompressionConfig.load_from_registry(block["format"], **block)
    del config.quantization_config  # the model itself is built plain, then given the decompressed weights
    model = getattr(transformers, config.architectures[0])(config)
    try:
        BaseCompressor.get_value_from_registry(sparsity.format)
    except KeyError:
        from safetensors.torch import load_file
        state = {k: v for f in sorted(glob.glob(directory + "/*.safetensors")) for k, v in load_file(f).items()}
        for target in sparsity.targets:
            shape = state.pop(target + ".shape").flatten().tolist()
            mask = unpack_bitmasks(state.pop(target + ".bitmask"), shape)
            values = state.pop(target + ".compressed").flatten()
            if sparsity.format == "sparse-bitmask":
                counts = mask.sum(1)
                assert torch.equal(state.pop(target + ".row_offsets"), counts.cumsum(0) - counts)
            else:
                assert (mask.view(shape[0], -1, 4).sum(-1) == 2).all() and values.numel() == mask.numel() // 2
            weight = torch.zeros(shape, dtype=values.dtype)
            weight[mask] = values
            state[target + ".weight"] = weight
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the input
    else:
        ModelCompressor.from_pretrained(directory).decompress(directory, model)
    model.tie_weights()
    return model


jobs = json.loads(sys.argv[1])
for job in jobs:
    inputs = torch.load(job["inputs"])
    if job["library"] == "timm":
        import timm
        config = json.load(open(job["dir"] + "/config.json"))
        models = [timm.create_model("local-dir:" + job["dir"], pretrained=True),
                  timm.create_model(config["architecture"], pretrained=True, num_classes=config["num_classes"],
                                    pretrained_cfg_overlay=dict(config["pretrained_cfg"],
                                                                file=job["dir"] + "/model.safetensors"),
                                    **config["model_args"])]
        outputs = [m.eval()(inputs["x"]) for m in models]
    elif job["library"] == "compressed-tensors":
        import transformers
        config = transformers.AutoConfig.from_pretrained(job["dir"])
        model = decompressed(job["dir"], config)
        out = model.eval()(input_ids=inputs["input_ids"])
        outputs = [out.logits if hasattr(out, "logits") else out.last_hidden_state]
    else:
        import transformers
        config = transformers.AutoConfig.from_pretrained(job["dir"])
        cls = getattr(transformers, config.architectures[0]) if job["library"] == "hf-class" else transformers.AutoModel
        model, info = cls.from_pretrained(job["dir"], output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        if "text" in inputs:
            tokenizer = transformers.AutoTokenizer.from_pretrained(job["dir"])
            assert tokenizer(inputs["text"], return_tensors="pt")["input_ids"].tolist() == inputs["input_ids"].tolist()
        out = model.eval()(input_ids=inputs["input_ids"])
        outputs = [out.logits if hasattr(out, "logits") else out.last_hidden_state]
    torch.save([o.detach() for o in outputs], job["result"])
assert sys.modules["compresscli"] is None and not any(m.startswith("compresscli.") for m in sys.modules)
"""


def _load_elsewhere(tmp_path: Path, jobs: list[dict]) -> None:
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _job(tmp_path: Path, name: str, directory: Path, library: str, inputs: dict) -> dict:
    torch.save(inputs, tmp_path / f"{name}-inputs.pt")
    return {"dir": str(directory), "library": library, "inputs": str(tmp_path / f"{name}-inputs.pt"),
            "result": str(tmp_path / f"{name}-result.pt")}


def _compress(source: Path, recipe: str, out: Path, **options) -> Path:
    run_recipe(load_checkpoint(source), parse_recipe(recipe), out, RunOptions(evaluate=False, **options))
    return out


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


MAGNITUDE = "stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5}\n"
WANDA_24 = "stages:\n  - method: wanda\n    targets: [mlp]\n    params: {n_m: [2, 4]}\n"  # SparseLinear, 2:4
CONDENSED_24 = "stages:\n  - method: condensed\n    targets: [mlp]\n    params: {n_m: [2, 4]}\n"
TINY_RECIPES = {
    # GPT-2: Conv1D written back transposed; the tied wte / lm_head read one RPS memory
    "gpt2": "stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.6}\n"
            "  - method: rps\n    targets: [attention, embeddings]\n    params: {compression: 4, mapper: roast}\n",
    "bert": "stages:\n  - method: condensed\n    targets: [mlp]\n"
            "    params: {sparsity: 0.75, ablate: true, min_salient: 0.9}\n",
    "llama": "stages:\n  - method: fips\n    targets: [mlp]\n    params: {budget: 0.5, steps: 0}\n",
}


def _untie(out: Path, copy: Path) -> Path:
    """A copy of a GPT-2 output whose RPS lm_head reads the memory with another scale than wte."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(out, copy)
    tensors = load_file(copy / "model.safetensors")
    tensors["lm_head.weight_scale"] = tensors["lm_head.weight_scale"] * 2
    save_file(tensors, str(copy / "model.safetensors"), metadata=read_header(copy / "model.safetensors")[1])
    return copy


def test_tiny_hf_families_load_in_plain_transformers(tmp_path, tiny_hf_dirs):
    jobs, expected = [], {}
    outs = {family: _compress(tiny_hf_dirs[family], recipe, tmp_path / f"{family}-out")
            for family, recipe in TINY_RECIPES.items()}
    outs["gpt2-untied"] = _untie(outs["gpt2"], tmp_path / "gpt2-untied-out")
    for family, out in outs.items():
        shard = {"shard_bytes": 20_000} if family == "llama" else {}  # several shards and the index
        result = export(out, tmp_path / f"{family}-dense", **shard)
        assert result.decoded_layers > 0 and result.untied == (["lm_head.weight"] if family == "gpt2-untied" else [])
        inputs = {"input_ids": torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(1))}
        expected[family] = _output(compresscli.load(out, trainable=True), inputs)
        jobs.append(_job(tmp_path, family, result.to, "hf-class", inputs))

    gpt2 = tmp_path / "gpt2-dense"
    header, metadata = read_header(gpt2 / "model.safetensors")
    assert header["transformer.h.0.mlp.c_fc.weight"]["shape"] == [32, 128]  # Conv1D: in x out, as GPT-2 stores it
    assert "lm_head.weight" not in header and metadata == {"format": "pt"}  # tied: stored once, as transformers does
    assert "compression" not in json.loads((gpt2 / "config.json").read_text())
    llama = json.loads((tmp_path / "llama-dense" / "model.safetensors.index.json").read_text())
    assert len(set(llama["weight_map"].values())) > 1
    assert json.loads((tmp_path / "gpt2-untied-dense" / "config.json").read_text())["tie_word_embeddings"] is False
    _load_elsewhere(tmp_path, jobs)
    for job, family in zip(jobs, outs):
        (got,) = torch.load(job["result"])
        torch.testing.assert_close(got, expected[family], atol=1e-5, rtol=1e-4)


def _needs_compressed_tensors() -> None:
    pytest.importorskip("compressed_tensors", reason="--format compressed-tensors is checked with the "
                        "compressed-tensors package itself: pip install compressed-tensors (or .[test])")


# (format, recipe, sparsity format): magnitude pruning is unstructured, wanda's 2:4 a SparseLinear in 2:4
MINILM_EXPORTS = {"dense": ("dense", MAGNITUDE, None),
                  "ct-bitmask": ("compressed-tensors", MAGNITUDE, ct_sparse.BITMASK),
                  "ct-24": ("compressed-tensors", WANDA_24, ct_sparse.BITMASK_24)}


@pytest.mark.parametrize("case", MINILM_EXPORTS)
def test_real_minilm_with_its_tokenizer_loads_without_compresscli(tmp_path, minilm_dir, capsys, case):
    fmt, recipe, sparse_format = MINILM_EXPORTS[case]
    if fmt != "dense":
        _needs_compressed_tensors()
    out = _compress(minilm_dir, recipe, tmp_path / "out", calibration_examples=8, max_length=16)
    code, stdout, stderr = run_cli(capsys, "export", str(out), "--to", str(tmp_path / "dense"), "--format", fmt,
                                   "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["kind"] == "hf" and result["files"] == ["model.safetensors"] and result["decoded_layers"] == 12
    assert result["sparse_format"] == sparse_format
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= set(result["copied"])
    import transformers

    transformers_5 = int(transformers.__version__.split(".")[0]) >= 5
    assert bool(result["notes"]) == (fmt == "compressed-tensors" and transformers_5)  # the loading trap, said

    text = "Compressed models should load anywhere."
    ids = transformers.AutoTokenizer.from_pretrained(out)(text, return_tensors="pt")["input_ids"]
    inputs = {"input_ids": ids, "text": text}
    compressed = compresscli.load(out, trainable=True)
    expected = _output(compressed, inputs)
    job = _job(tmp_path, "minilm", tmp_path / "dense", "hf-auto" if fmt == "dense" else fmt, inputs)
    _load_elsewhere(tmp_path, [job])
    (got,) = torch.load(job["result"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    if fmt != "dense":
        header, _ = read_header(tmp_path / "dense" / "model.safetensors")
        assert "encoder.layer.0.intermediate.dense.weight" not in header
        assert header["encoder.layer.0.intermediate.dense.bitmask"]["shape"] == [1536, 384 // 8]
        return
    fc1 = compressed.encoder.layer[0].intermediate.dense
    dense_fc1 = transformers.AutoModel.from_pretrained(tmp_path / "dense").encoder.layer[0].intermediate.dense.weight
    assert torch.equal(dense_fc1, fc1.dense_weight()) and not dense_fc1[~fc1.mask].any()  # pruned: zeros


def test_timm_vit_loads_in_plain_timm(tmp_path):
    from safetensors.torch import save_file

    source = tmp_path / "vit"
    source.mkdir()
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model = tiny_timm(**args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(source / "model.safetensors"))
    (source / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 5,
                                                    "model_args": args, "pretrained_cfg": {"input_size": [3, 16, 16]}}))
    recipe = MAGNITUDE + "  - method: condensed\n    targets: [attention]\n    params: {sparsity: 0.5}\n"
    out = _compress(source, recipe, tmp_path / "out")
    result = export(out, tmp_path / "dense")
    assert result.kind == "timm" and result.files == ["model.safetensors"] and result.decoded_layers == 8
    inputs = {"x": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        expected = compresscli.load(out, trainable=True)(inputs["x"])
    job = _job(tmp_path, "vit", result.to, "timm", inputs)
    _load_elsewhere(tmp_path, [job])
    for got in torch.load(job["result"]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert compresscli.load(tmp_path / "dense").__class__.__name__ == "VisionTransformer"  # and compresscli reads it
    with pytest.raises(CompressError, match=r"Hugging Face transformers format.*--format dense"):
        export(out, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()


# ----------------------------------------------------------------------------- compressed-tensors

# Each tiny family compressed by a method compressed-tensors holds, and the sparsity format it should get.
CT_RECIPES = {
    "bert": (MAGNITUDE, ct_sparse.BITMASK, 4),
    "gpt2": (MAGNITUDE, ct_sparse.BITMASK, 4),  # Conv1D: stored (in, out) as GPT-2 stores it, compressed that way
    "llama": (CONDENSED_24, ct_sparse.BITMASK_24, 6),  # condensed 2:4 layers (gate, up, down), several shards
}


def test_tiny_hf_families_load_in_compressed_tensors(tmp_path, tiny_hf_dirs):
    _needs_compressed_tensors()
    jobs, expected, models = [], {}, {}
    for family, (recipe, sparse_format, layers) in CT_RECIPES.items():
        out = _compress(tiny_hf_dirs[family], recipe, tmp_path / f"{family}-out")
        shard = {"shard_bytes": 20_000} if family == "llama" else {}
        result = export(out, tmp_path / f"{family}-ct", "compressed-tensors", **shard)
        assert result.sparse_format == sparse_format and result.decoded_layers == layers
        block = json.loads((result.to / "config.json").read_text())["quantization_config"]
        assert block["quant_method"] == "compressed-tensors" and block["sparsity_config"]["format"] == sparse_format
        sparsity = block["sparsity_config"]
        assert len(sparsity["targets"]) == layers and 0 < sparsity["global_sparsity"] < 1
        inputs = {"input_ids": torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(1))}
        models[family] = compresscli.load(out, trainable=True)
        expected[family] = _output(models[family], inputs)
        jobs.append(_job(tmp_path, family, result.to, "compressed-tensors", inputs))

    header, _ = read_header(tmp_path / "bert-ct" / "model.safetensors")
    name = "encoder.layer.0.intermediate.dense"
    assert f"{name}.weight" not in header and header[f"{name}.bias"]["shape"] == [64]
    kept = int(models["bert"].get_submodule(name).mask.sum())
    written = {k: (header[f"{name}.{k}"]["dtype"], header[f"{name}.{k}"]["shape"])
               for k in ct_sparse.TENSORS[ct_sparse.BITMASK]}
    assert written == {"compressed": ("F32", [kept]), "bitmask": ("U8", [64, 4]), "row_offsets": ("I64", [64]),
                       "shape": ("I64", [2])}
    header, _ = read_header(tmp_path / "gpt2-ct" / "model.safetensors")
    assert "lm_head.weight" not in header and header["transformer.h.0.mlp.c_fc.bitmask"]["shape"] == [32, 128 // 8]
    llama = json.loads((tmp_path / "llama-ct" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(llama.values())) > 1
    up = "model.layers.0.mlp.up_proj"
    assert {f"{up}.compressed", f"{up}.bitmask", f"{up}.shape"} <= set(llama) and f"{up}.row_offsets" not in llama
    _load_elsewhere(tmp_path, jobs)
    for job, family in zip(jobs, CT_RECIPES):
        (got,) = torch.load(job["result"])
        torch.testing.assert_close(got, expected[family], atol=1e-5, rtol=1e-4)


def _ct_compressor(fmt: str):
    """compressed-tensors' own compressor for `fmt`, or None where this release has none (0.15 removed them)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import SparsityCompressionConfig

    try:
        return BaseCompressor.load_from_registry(fmt, config=SparsityCompressionConfig.load_from_registry(fmt))
    except KeyError:
        return None


@pytest.mark.parametrize("fmt", [ct_sparse.BITMASK, ct_sparse.BITMASK_24])
def test_tensors_are_the_ones_compressed_tensors_writes(fmt):
    _needs_compressed_tensors()
    from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks

    torch.manual_seed(0)
    weight = torch.randn(6, 20)  # 20 columns: a row's bitmask ends in a padded byte
    keep = torch.rand(6, 5, 4).argsort(-1) < 2 if fmt == ct_sparse.BITMASK_24 else torch.rand(6, 5, 4) < 0.4
    weight = weight * keep.reshape(6, 20)
    ours = ct_sparse.encode(weight, fmt)
    assert torch.equal(ours["bitmask"], pack_bitmasks(weight != 0))
    mask = unpack_bitmasks(ours["bitmask"], [6, 20])
    assert torch.equal(weight[mask], ours["compressed"].flatten())
    compressor = _ct_compressor(fmt)
    if compressor is not None:  # a release that still writes the format: its tensors, bit for bit
        theirs = compressor.compress_weight("w", weight)
        assert set(theirs) == {f"w.{k}" for k in ours}
        for k, tensor in ours.items():
            assert torch.equal(theirs[f"w.{k}"], tensor) and theirs[f"w.{k}"].dtype == tensor.dtype, k


def test_2_4_groups_with_fewer_non_zeros_keep_zeros():
    weight = torch.tensor([[0.0, 0.0, 0.0, 3.0, 1.0, 0.0, 2.0, 0.0]])
    assert ct_sparse.fits_24(weight) and not ct_sparse.fits_24(torch.ones(2, 8))
    assert not ct_sparse.fits_24(torch.ones(2, 6))  # no whole groups of 4
    tensors = ct_sparse.encode(weight, ct_sparse.BITMASK_24)
    assert tensors["compressed"].tolist() == [[0.0, 3.0, 1.0, 2.0]] and tensors["shape"].tolist() == [[1], [8]]
    assert tensors["bitmask"].tolist() == [[0b01011001]]  # columns 0, 3, 4, 6: the first column is the lowest bit


# A method compressed-tensors has no format for, and what the one-line error names.
CT_REFUSED = {"gpt2": "no format for rps layers", "bert": "condensed layers that are not 2:4",
              "llama": "no format for fips layers"}


@pytest.mark.parametrize("family", CT_REFUSED)
def test_methods_without_a_sparse_format_are_refused_by_name(capsys, tmp_path, tiny_hf_dirs, family):
    out = _compress(tiny_hf_dirs[family], TINY_RECIPES[family], tmp_path / "out")
    stderr = _error(capsys, str(out), "--to", str(tmp_path / "ct"), "--format", "compressed-tensors")
    assert CT_REFUSED[family] in stderr and "use --format dense" in stderr
    assert not (tmp_path / "ct").exists()


def _transformers_major() -> int:
    from importlib.metadata import version

    return int(version("transformers").split(".")[0])


@pytest.mark.xfail(_transformers_major() >= 5, strict=True, reason=(
    "transformers 5 no longer reads a sparsity_config: its CompressedTensorsConfig drops it and its quantizer has no "
    "sparse decompression (compressed-tensors 0.15 removed the sparse compressors, and transformers 5 needs >= 0.15), "
    "so the sparse layers' weights load as fresh random values, reported only as missing keys"))
def test_transformers_from_pretrained_loads_it_directly(tmp_path, bert_out):
    _needs_compressed_tensors()
    result = export(bert_out, tmp_path / "ct", "compressed-tensors")
    inputs = {"input_ids": torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(1))}
    job = _job(tmp_path, "bert", result.to, "hf-auto", inputs)
    _load_elsewhere(tmp_path, [job])
    (got,) = torch.load(job["result"])
    torch.testing.assert_close(got, _output(compresscli.load(bert_out, trainable=True), inputs), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bert_out(tmp_path_factory, tiny_hf_dirs) -> Path:
    return _compress(tiny_hf_dirs["bert"], MAGNITUDE, tmp_path_factory.mktemp("bad") / "out")


def _error(capsys, *args: str) -> str:
    code, _, stderr = run_cli(capsys, "export", *args)
    assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
    return stderr


def test_bad_input_is_one_line(capsys, tmp_path, tiny_hf_dirs, bert_out):
    assert "not a compresscli output" in _error(capsys, str(tiny_hf_dirs["bert"]), "--to", str(tmp_path / "a"))
    assert "no such file or directory" in _error(capsys, str(tmp_path / "nowhere"), "--to", str(tmp_path / "b"))
    assert "did you mean 'dense'" in _error(capsys, str(bert_out), "--to", str(tmp_path / "c"), "--format", "dens")
    assert "did you mean 'compressed-tensors'" in _error(capsys, str(bert_out), "--to", str(tmp_path / "c"),
                                                         "--format", "compressed_tensors")
    assert "overlaps" in _error(capsys, str(bert_out), "--to", str(bert_out / "inside"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert "--force" in _error(capsys, str(bert_out), "--to", str(taken))
    assert (taken / "keep.txt").read_text() == "mine"
    code, _, stderr = run_cli(capsys, "export", str(bert_out), "--to", str(taken), "--force")
    assert code == 0 and not (taken / "keep.txt").exists() and (taken / "model.safetensors").is_file(), stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(capsys, "export", str(bert_out), "--to", str(empty))[0] == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_damaged_output_writes_nothing(tmp_path, bert_out, fmt):
    import shutil

    from safetensors.torch import load_file, save_file

    from compresscli.core.errors import CheckpointError
    from compresscli.io.safetensors import read_header as header_of

    copy = tmp_path / "copy"
    shutil.copytree(bert_out, copy)
    metadata = header_of(copy / "model.safetensors")[1]
    tensors = load_file(copy / "model.safetensors")
    tensors["stowaway"] = torch.zeros(1)
    save_file(tensors, str(copy / "model.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['stowaway'\]"):
        export(copy, tmp_path / "dense", fmt)
    assert not (tmp_path / "dense").exists() and [p.name for p in tmp_path.iterdir()] == ["copy"]
