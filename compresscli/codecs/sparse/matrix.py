"""A sparse matrix held as its file holds it, for the inference forms: values plus a bitmask or CSR columns.

The bytes stay those on disk plus O(rows): a bitmask layer keeps its bits (one int64 word per 64 columns,
each row padded to whole words so that a row starts at a word, at most 63 bits more per row) and an int64
offset per row into the values; a CSR layer keeps its int16/int32 column indices and its row pointer
(int64 here, int32 on disk). Which of the two a layer uses is the one its file chose (the smaller).
`mm` runs the product through kernels.sparse_mm, which never keeps a dense copy. Quantized values
(codecs/quant) are held as their codes and scales: symmetric int8 ones are read as they are by the int8
kernels (kernels/dispatch.sparse_q8_mm); the others are dequantized for each product.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compresscli import kernels
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import QuantizedValues
from compresscli.codecs.sparse import encoding, quantized


def pack_row_words(mask: torch.Tensor) -> torch.Tensor:
    """Bool (rows, cols) -> int64 (rows, ceil(cols / 64)): bit j of word w is column 64 w + j."""
    rows, cols = mask.shape
    words = (cols + 63) // 64
    padded = np.zeros((rows, words * 64), dtype=bool)
    padded[:, :cols] = mask.cpu().numpy()
    packed = np.packbits(padded, axis=1, bitorder="little").view("<i8")  # (rows, words), little-endian bytes
    return torch.from_numpy(packed.astype(np.int64, copy=False).copy())


def _row_offsets(mask: torch.Tensor) -> torch.Tensor:
    """int64 (rows + 1,): where each row's values start, and the total."""
    offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    offsets[1:] = mask.sum(1).cumsum(0)
    return offsets


class CompactSparse(nn.Module):
    """A (rows, cols) sparse matrix: `values` (nnz,) or, quantized, `quantized` (their codes as one row, on a
    grid over the matrix), `cols` (bitmask words, or column indices), `row_ptr` (rows + 1,) int64 offsets into
    the values. Buffers only: nothing here trains."""

    values: torch.Tensor | None
    cols: torch.Tensor
    row_ptr: torch.Tensor

    def __init__(self, values: torch.Tensor | QuantizedValues, cols: torch.Tensor, row_ptr: torch.Tensor,
                 shape: tuple[int, int]):
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        if isinstance(values, QuantizedValues):
            self.quantized = values
            self.register_buffer("values", None)
        else:
            self.register_module("quantized", None)
            self.register_buffer("values", values.contiguous())
        self.register_buffer("cols", cols.contiguous())
        self.register_buffer("row_ptr", row_ptr.to(torch.int64).contiguous())

    @property
    def fmt(self) -> str:
        """The on-disk format this structure mirrors."""
        return "bitmask" if self.cols.dtype == torch.int64 else "csr"

    @classmethod
    def from_masked(cls, weight: torch.Tensor, mask: torch.Tensor, fmt: str) -> "CompactSparse":
        """From a (rows, cols) weight and its bool mask (entries the mask drops are not stored)."""
        mask = mask.bool()
        values = weight.detach()[mask].contiguous()
        if fmt == "bitmask":
            return cls.from_masked_values(values, mask)
        if fmt != "csr":
            raise ValueError(f"unknown sparse format {fmt!r}")
        col_idx = mask.nonzero()[:, 1].to(encoding.index_dtype(mask.shape[1]))
        return cls(values, col_idx, _row_offsets(mask), tuple(mask.shape))

    @classmethod
    def from_masked_values(cls, values: torch.Tensor, mask: torch.Tensor) -> "CompactSparse":
        """A bitmask structure from the stored values (row-major order) and their bool (rows, cols) mask."""
        return cls(values, pack_row_words(mask).to(values.device), _row_offsets(mask), tuple(mask.shape))

    @classmethod
    def from_encoded(cls, fmt: str, encoded: dict[str, torch.Tensor], shape: tuple[int, ...],
                     transpose: bool = False, spec: QuantSpec | None = None, nnz: int = 0) -> "CompactSparse":
        """From a encoding of a `shape` weight (checked there), viewed as rows x the rest and
        kept in `fmt`; with `transpose`, of its transpose (dense only while it is transposed); with `spec`,
        of `nnz` quantized values (never transposed)."""
        if spec is not None:
            values, mask = quantized.decode(fmt, encoded, shape, spec, nnz)
            cols = encoded["col_idx"] if fmt == "csr" else pack_row_words(mask).to(mask.device)
            return cls(values, cols, _row_offsets(mask), tuple(mask.shape))
        if transpose:
            dense, mask = encoding.decode(fmt, encoded, shape)
            return cls.from_masked(dense.t(), mask.t(), fmt)
        mask = encoding.decode_mask(fmt, encoded, shape)  # checked before anything is built from it
        if fmt == "csr":
            return cls(encoded["values"], encoded["col_idx"], encoded["row_ptr"], tuple(mask.shape))
        return cls.from_masked_values(encoded["values"], mask)

    def encoded(self) -> dict[str, torch.Tensor]:
        """The encoding of this matrix, in the format it mirrors, without forming it densely."""
        values = {"values": self.values} if self.quantized is None else self.quantized.tensors("values")
        if self.fmt == "csr":
            return {**values, "col_idx": self.cols, "row_ptr": self.row_ptr.to(torch.int32)}
        words = self.cols.cpu().numpy().view(np.uint8)  # (rows, 8 * words per row), little-endian bytes
        bits = np.unpackbits(words, axis=1, bitorder="little")[:, :self.shape[1]]  # (rows, cols)
        return {**values, "mask": torch.from_numpy(np.packbits(bits.reshape(-1), bitorder="big"))}

    def float_values(self) -> torch.Tensor:
        """The values (nnz,) as floats: as held, or dequantized for the caller (each value's scale is that of
        its row and, grouped, of its column's group)."""
        if self.quantized is None:
            return self.values
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.cols.device), self.row_ptr.diff())
        grouped = self.quantized.scales.shape[1] > 1
        cols = None if not grouped else self.cols if self.fmt == "csr" else self.mask().nonzero()[:, 1]
        return self.quantized.dequantize(rows=rows, columns=cols)

    @property
    def value_dtype(self) -> torch.dtype:
        return (self.values if self.quantized is None else self.quantized.scales).dtype

    def mask(self) -> torch.Tensor:
        """Bool (rows, cols): which entries are stored."""
        return kernels.reference.row_sparse_mask(self.cols, self.row_ptr, *self.shape)

    def dense(self) -> torch.Tensor:
        """The dense (rows, cols) matrix, zeros where nothing is stored (made for the caller, not kept)."""
        return kernels.sparse_dense(self.float_values(), self.cols, self.row_ptr, *self.shape)

    def mm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        """x (N, cols) @ self^T (+ bias) -> ((N, rows), the kernel path that ran). Symmetric int8 values run the
        int8 kernels on their codes and scales as held (`cpu-int8`, `decoded-int8`); other quantized values
        (sub-byte codes, zero points) and other devices dequantize every value for the call, then run the
        float paths."""
        q = self.quantized
        if q is not None and q.spec.bits == 8 and q.zeros is None:
            done = kernels.dispatch.sparse_q8_mm(x, q.codes, q.scales, q.spec.group(self.shape[1]), self.cols,
                                                 self.row_ptr, bias, *self.shape)
            if done is not None:
                return done
        return kernels.sparse_mm(x, self.float_values(), self.cols, self.row_ptr, bias, *self.shape)

    def nnz(self) -> int:
        return self.values.numel() if self.quantized is None else self.quantized.shape[1]

    @staticmethod
    def extra_bytes(fmt: str, rows: int, cols: int, nnz: int = 0, transposed: bool = False) -> int:
        """Bytes this structure holds beyond the on-disk encoding of a (rows, cols) matrix in `fmt` with `nnz`
        values; `transposed`: the file encodes its (cols, rows) transpose (FiPS keeps V^T for "in" layers)."""
        if fmt == "bitmask":  # words padded per row, and the int64 row offsets the file does not store
            return rows * ((cols + 63) // 64) * 8 - (rows * cols + 7) // 8 + (rows + 1) * 8
        file_rows, file_cols = (cols, rows) if transposed else (rows, cols)
        index = lambda columns: torch.empty(0, dtype=encoding.index_dtype(columns)).element_size()  # noqa: E731
        # the row pointer as int64 here, int32 on disk (of the file's rows), and column indices of our width
        return (rows + 1) * 8 - (file_rows + 1) * 4 + nnz * (index(cols) - index(file_cols))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, format={self.fmt}, nnz={self.nnz()}"
