"""Exact encodings of a sparse weight: values + packed bitmask, or CSR. Never dense zeros.

Bitmask costs 1 bit per dense element plus the values; CSR costs an index per non-zero plus a
row pointer. `encode` picks whichever is smaller for the given mask, so bytes follow sparsity.
"""
from __future__ import annotations

import math

import torch

from compresscli.core.errors import CheckpointError
from compresscli.kernels.reference import row_sparse_mask

VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what a weight can be stored as
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (any shape, row-major) into uint8, 8 elements per byte, MSB first."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return bits.view(-1)[:numel].bool()


def index_dtype(size: int) -> torch.dtype:
    """The smallest signed integer type that can index `size` positions."""
    return torch.int16 if size <= 32767 else torch.int32


def bitmask_bytes(numel: int, nnz: int, value_bytes: int) -> int:
    return nnz * value_bytes + (numel + 7) // 8


def csr_bytes(rows: int, cols: int, nnz: int, value_bytes: int) -> int:
    index_bytes = torch.empty(0, dtype=index_dtype(cols)).element_size()
    return nnz * (value_bytes + index_bytes) + (rows + 1) * 4


def choose_format(rows: int, cols: int, nnz: int, value_bytes: int, fmt: str = "auto") -> str:
    """`fmt` itself, or for "auto" whichever of bitmask and CSR takes fewer bytes."""
    if fmt != "auto":
        return fmt
    smaller_as_bitmask = bitmask_bytes(rows * cols, nnz, value_bytes) <= csr_bytes(rows, cols, nnz, value_bytes)
    return "bitmask" if smaller_as_bitmask else "csr"


def encode(weight: torch.Tensor, mask: torch.Tensor, fmt: str = "auto") -> tuple[str, dict[str, torch.Tensor]]:
    """Encode the masked entries of `weight` (viewed as rows x cols) in the smaller format."""
    weight2d = weight.detach().reshape(weight.shape[0], -1)
    mask2d = mask.reshape(weight2d.shape).bool()
    rows, cols = weight2d.shape
    fmt = choose_format(rows, cols, int(torch.count_nonzero(mask2d)), weight.element_size(), fmt)
    values = weight2d[mask2d].contiguous()  # row-major order, the order both decoders expect
    if fmt == "bitmask":
        return fmt, {"values": values, "mask": pack_bits(mask2d)}
    if fmt == "csr":
        # on the values' device: a GPU decode reads both
        row_ptr = torch.zeros(rows + 1, dtype=torch.int32, device=mask2d.device)
        row_ptr[1:] = torch.cumsum(mask2d.sum(1), 0)
        col_idx = mask2d.nonzero()[:, 1].to(index_dtype(cols)).contiguous()
        return fmt, {"values": values, "col_idx": col_idx, "row_ptr": row_ptr}
    raise ValueError(f"unknown sparse format {fmt!r}")


def _is_index(t: torch.Tensor) -> bool:
    return t.dim() == 1 and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def structure_problem(fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> str | None:
    """Why `tensors` are not a `fmt` encoding of a `shape` weight, or None when they are.

    Checked before `decode` allocates or indexes anything: sizes come from the stored tensors (a
    bitmask holds a bit per weight, a row pointer an entry per row), so a damaged file is a message,
    never an out-of-range index or an allocation its tensors do not justify."""
    if fmt not in TENSORS_BY_FORMAT:
        return f"unknown sparse format {fmt!r}, expected one of {sorted(TENSORS_BY_FORMAT)}"
    if not shape or not all(type(s) is int and s >= 0 for s in shape):
        return f"weight shape {list(shape)} is not a list of sizes"
    missing = TENSORS_BY_FORMAT[fmt] - set(tensors)
    if missing:
        return f"{fmt} needs tensors {sorted(missing)}"
    rows, cols, values = shape[0], math.prod(shape[1:]), tensors["values"]
    if values.dim() != 1 or values.dtype not in VALUE_DTYPES:
        return f"values must be a 1-D float16/bfloat16/float32/float64 tensor, got {values.dtype} {list(values.shape)}"
    if fmt == "bitmask":
        mask = tensors["mask"]
        if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != (rows * cols + 7) // 8:
            return (f"mask must hold {(rows * cols + 7) // 8} uint8 bytes for {rows}x{cols}, "
                    f"got {mask.dtype} {list(mask.shape)}")
        return None
    row_ptr, col_idx = tensors["row_ptr"], tensors["col_idx"]
    if not _is_index(row_ptr) or row_ptr.numel() != rows + 1:
        return f"row_ptr must be {rows + 1} integers, got {row_ptr.dtype} {list(row_ptr.shape)}"
    if not _is_index(col_idx) or col_idx.numel() != values.numel():
        return f"col_idx must be {values.numel()} integers (one per value), got {col_idx.dtype} {list(col_idx.shape)}"
    steps = row_ptr.long().diff()
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != values.numel() or bool((steps < 0).any()):
        return f"row_ptr must rise from 0 to {values.numel()} (the number of values)"
    if col_idx.numel() and (int(col_idx.min()) < 0 or int(col_idx.max()) >= cols):
        return f"col_idx must lie in [0, {cols})"
    rising = col_idx.long().diff() > 0
    rising[row_ptr.long()[1:-1][(row_ptr[1:-1] > 0) & (row_ptr[1:-1] < col_idx.numel())] - 1] = True  # row starts
    if not bool(rising.all()):  # the values are in row-major order: the training and inference forms agree
        return "col_idx must rise within each row (the values are stored in row-major order)"
    return None


def decode_mask(fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The bool (rows, cols) mask an encoding selects, after checking it (`structure_problem`, and one
    stored value per selected entry)."""
    problem = structure_problem(fmt, tensors, tuple(shape))
    if problem:
        raise CheckpointError(f"invalid sparse {fmt} encoding: {problem}", "the file is damaged; re-export it")
    rows, cols = shape[0], math.prod(shape[1:])
    values = tensors["values"]
    if fmt == "bitmask":
        mask2d = unpack_bits(tensors["mask"], rows * cols).view(rows, cols)
    else:
        mask2d = row_sparse_mask(tensors["col_idx"], tensors["row_ptr"], rows, cols)
    selected = int(torch.count_nonzero(mask2d))
    if selected != values.numel():  # a bitmask with other counts, or a CSR row naming a column twice
        raise CheckpointError(f"invalid sparse {fmt} encoding: it selects {selected} entries but "
                              f"{values.numel()} values are stored", "the file is damaged; re-export it")
    return mask2d


def decode(fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `encode`: the dense weight (zeros where pruned) and its bool mask."""
    mask2d = decode_mask(fmt, tensors, shape)
    values = tensors["values"]
    dense = torch.zeros(mask2d.shape, dtype=values.dtype, device=values.device)
    dense[mask2d] = values
    return dense.view(shape), mask2d.view(shape)


TENSORS_BY_FORMAT = {"bitmask": {"values", "mask"}, "csr": {"values", "col_idx", "row_ptr"}}
