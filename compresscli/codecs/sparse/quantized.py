"""A sparse matrix whose kept values are stored quantized (codecs/quant): the bitmask or CSR structure as
encoding.py writes it, and in place of the float `values` their codes in the same row-major order (one packed
row) with scales on a grid over the dense (rows, cols) coordinates, so a value's scale is that of its row and
column group whatever else is kept. What the sparse codec and FiPS's sparse factors share."""
from __future__ import annotations

import math

import torch

from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import QuantizedValues, Quantizer, tensor_names
from compresscli.codecs.sparse import encoding
from compresscli.core.errors import CheckpointError


def names(fmt: str, spec: QuantSpec) -> set[str]:
    """The tensors a `fmt` encoding with quantized values is stored as."""
    return (encoding.TENSORS_BY_FORMAT[fmt] - {"values"}) | tensor_names("values", spec)


def encode(weight: torch.Tensor, mask: torch.Tensor, quantizer: Quantizer, fmt: str = "auto") -> dict[str, torch.Tensor]:
    """The masked entries of `weight` (viewed as rows x cols) as structure + codes of their quantized values."""
    weight2d = weight.detach().reshape(weight.shape[0], -1)
    mask2d = mask.reshape(weight2d.shape).bool()
    _, structure = encoding.encode(weight2d, mask2d, fmt)
    structure.pop("values")
    codes = quantizer.codes(weight2d)[mask2d].view(1, -1)  # row-major, as the structure orders its values
    return {**quantizer.tensors("values", codes), **structure}


def decode(fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], spec: QuantSpec,
           nnz: int) -> tuple[QuantizedValues, torch.Tensor]:
    """The stored values (codes as one row of `nnz`) and the bool (rows, cols) mask, both checked."""
    rows, cols = shape[0], math.prod(shape[1:])
    if type(nnz) is not int or not 0 <= nnz <= rows * cols:
        raise CheckpointError(f"invalid sparse {fmt} encoding: nnz {str(nnz)[:20]} is not a count of at most "
                              f"{rows * cols} values", "the file is damaged; re-export it")
    values = QuantizedValues.from_tensors(tensors, "values", spec, (1, nnz), (rows, cols))
    return values, encoding.decode_mask(fmt, tensors, shape, count=nnz)


def dense(values: QuantizedValues, mask: torch.Tensor) -> torch.Tensor:
    """The dense (rows, cols) matrix of the stored values at `mask`, zero elsewhere, in the scales' dtype."""
    rows, cols = mask.nonzero(as_tuple=True)
    out = torch.zeros(mask.shape, dtype=values.scales.dtype, device=mask.device)
    out[mask] = values.dequantize(rows=rows, columns=cols)
    return out

