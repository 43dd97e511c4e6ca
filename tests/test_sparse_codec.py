import pytest
import torch

from compresscli.codecs import SparseConv2d, SparseLinear, codec_for
from compresscli.codecs.sparse import encoding as sparse_codec
from conftest import DEVICES


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_pack_bits_round_trip(numel):
    mask = torch.rand(numel) > 0.5
    packed = sparse_codec.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    assert torch.equal(sparse_codec.unpack_bits(packed, numel), mask)


@pytest.mark.parametrize("fmt", ["bitmask", "csr"])
@pytest.mark.parametrize("device", DEVICES)
def test_encode_decode_exact(fmt, device):
    weight = torch.randn(13, 29, device=device)
    mask = torch.rand(13, 29, device=device) > 0.7
    mask[3] = False  # an empty row must survive CSR
    used, tensors = sparse_codec.encode(weight, mask, fmt)
    assert used == fmt
    dense, decoded_mask = sparse_codec.decode(fmt, tensors, (13, 29))
    assert torch.equal(decoded_mask, mask)
    assert torch.equal(dense, weight * mask)
    assert tensors["values"].numel() == int(mask.sum())  # never dense zeros


def test_auto_format_picks_the_smaller():
    weight = torch.randn(64, 64)
    dense_mask = torch.rand(64, 64) > 0.5  # 50%: bitmask (1 bit/elem) beats CSR (2 bytes/nnz)
    very_sparse = torch.zeros(64, 64, dtype=torch.bool)
    very_sparse[::8, ::8] = True  # ~1.6%: CSR wins
    assert sparse_codec.encode(weight, dense_mask)[0] == "bitmask"
    assert sparse_codec.encode(weight, very_sparse)[0] == "csr"


def test_index_dtype():
    assert sparse_codec.index_dtype(32767) == torch.int16
    assert sparse_codec.index_dtype(32768) == torch.int32


def _make(codec: str):
    torch.manual_seed(0)
    if codec == "sparse_linear":
        dense = torch.nn.Linear(24, 10)
        return SparseLinear.from_dense(dense, torch.rand(10, 24) > 0.6), torch.randn(3, 24)
    dense = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
    return SparseConv2d.from_dense(dense, torch.rand(6, 3, 3, 3) > 0.6), torch.randn(2, 3, 9, 9)


@pytest.mark.parametrize("codec", ["sparse_linear", "sparse_conv2d"])
@pytest.mark.parametrize("fmt", ["bitmask", "csr"])
def test_sparse_codecs_round_trip_in_both_formats(codec, fmt):
    """The other codecs have their own round-trip tests (test_fips, test_rps, test_condensed)."""
    layer, x = _make(codec)
    layer.storage_format = fmt
    tensors, params = layer.to_tensors(), layer.codec_params()
    assert set(tensors) == codec_for(codec).expected_tensors(params)
    rebuilt = codec_for(codec).from_tensors(tensors, params)
    assert torch.equal(rebuilt(x), layer(x))
    assert rebuilt.stored_parameters() == layer.stored_parameters()


def test_sparse_forward_equals_masked_dense():
    dense = torch.nn.Linear(16, 8)
    mask = torch.rand(8, 16) > 0.5
    sparse = SparseLinear.from_dense(dense, mask)
    x = torch.randn(4, 16)
    expected = torch.nn.functional.linear(x, dense.weight * mask, dense.bias)
    assert torch.allclose(sparse(x), expected, atol=1e-6)


def test_csr_columns_out_of_order_within_a_row_are_refused():
    """Values are stored row-major: a row naming its columns out of order would pair them differently in
    the training form (dense[mask] = values) and the kernels (value j at column j), so it is damage."""
    weight = torch.arange(1.0, 13.0).view(3, 4)
    _, encoded = sparse_codec.encode(weight, torch.ones(3, 4, dtype=torch.bool), "csr")
    assert sparse_codec.structure_problem("csr", encoded, (3, 4)) is None
    swapped = {**encoded, "col_idx": encoded["col_idx"].clone()}
    swapped["col_idx"][[4, 5]] = swapped["col_idx"][[5, 4]]  # row 1 names columns 1, 0, 2, 3
    assert "must rise within each row" in sparse_codec.structure_problem("csr", swapped, (3, 4))
