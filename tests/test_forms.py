"""Both forms of every codec: the inference form holds what the file holds (plus O(rows)) and computes what
the training form computes; converting either way loses nothing. Parametrized over the codec registry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import compresscli
from compresscli.codecs.base import compressed_layers
from compresscli.codecs.forms import to_inference_, to_training_
from compresscli.engine.verify import output_tolerance
from compresscli import MagnitudeConfig, compress_
from compresscli.codecs import CODECS, INFERENCE_FORMS, SparseLinear
from conftest import codec_samples

DTYPES = [torch.float32, torch.bfloat16]


def _holder(layer: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.layer = layer
    return holder


def _input(shape, dtype):
    return torch.randint(0, 11, (3, 4)) if shape is None else torch.randn(shape).to(dtype)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _resident_bytes(layer: nn.Module) -> int:
    """Bytes of the layer's parameters and buffers, each storage once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*layer.parameters(), *layer.buffers())}
    return sum(storages.values())


def _samples(codec: str):
    for sample in codec_samples(codec):
        torch.manual_seed(0)
        yield sample.make()[0].eval(), sample.shape


@pytest.mark.parametrize("codec", CODECS.names())
def test_every_codec_has_an_inference_form(codec):
    form = INFERENCE_FORMS.get(codec)
    assert form.codec == codec


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("codec", CODECS.names())
def test_conversion_is_lossless_both_ways(codec, dtype):
    """training -> inference -> training: the same tensors and parameters bit for bit, and the training form
    computes exactly what it computed; the inference form computes the same up to summation order."""
    for layer, shape in _samples(codec):
        layer = layer.to(dtype)
        x = _input(shape, dtype)
        with torch.no_grad():
            expected = layer(x)
        tensors, params = layer.to_tensors(), layer.codec_params()
        holder = to_inference_(_holder(layer))
        compact = holder.layer
        assert type(compact) is INFERENCE_FORMS.get(codec)
        assert not any(p.requires_grad for p in compact.parameters())
        assert compact.codec_params() == params
        assert all(torch.equal(a, b) for a, b in zip(compact.to_tensors().values(), tensors.values()))
        assert list(compact.to_tensors()) == list(tensors)
        with torch.no_grad():  # one layer: the reload check's rounding tolerance at depth 1, of the output scale
            scale = max(1.0, expected.abs().max().item())
            torch.testing.assert_close(compact(x), expected, rtol=0, atol=output_tolerance(dtype, 1) * scale)
        back = to_training_(holder).layer
        assert type(back) is CODECS.get(codec)
        assert all(torch.equal(a, b) for a, b in zip(back.to_tensors().values(), tensors.values()))
        assert any(p.requires_grad for p in back.parameters())
        with torch.no_grad():
            assert torch.equal(back(x), expected)


@pytest.mark.parametrize("codec", CODECS.names())
def test_inference_form_holds_its_file_bytes_plus_rows(codec):
    """The inference form's tensors are the file's (own and shared) plus exactly what
    `inference_extra_bytes` says, and that is O(rows): at most 16 bytes a row."""
    for layer, _ in _samples(codec):
        stored = _tensor_bytes(layer.to_tensors().values()) + _tensor_bytes(layer.shared_tensors().values())
        compact = to_inference_(_holder(layer)).layer
        extra = compact.inference_extra_bytes(compact.codec_params())
        assert _resident_bytes(compact) == stored + extra
        rows = compact.dense_equivalent()["weight"][0]
        assert extra <= 16 * (rows + 1)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_real_minilm_sparse_layers_resident_within_5_percent_of_the_file(minilm_dir, sparsity):
    """The bound on the real model: every pruned MLP layer's inference form holds at most 1.05x the bytes
    its file stores (values, bitmask or CSR, bias)."""
    model = compresscli.load(minilm_dir)
    compress_(model, MagnitudeConfig(sparsity=sparsity), lambda module, name: "intermediate" in name or
              ("output.dense" in name and "attention" not in name))
    layers = {n: m for n, m in compressed_layers(model).items()}
    assert len(layers) == 12 and all(isinstance(m, SparseLinear) for m in layers.values())
    stored = {n: _tensor_bytes(m.to_tensors().values()) for n, m in layers.items()}
    to_inference_(model)
    for name, layer in compressed_layers(model).items():
        assert _resident_bytes(layer) <= 1.05 * stored[name], name
