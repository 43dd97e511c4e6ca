"""Float32 matrix products on CUDA in TF32 where a run's work allows it, exact float32 where a result is
solved or compared.

TF32 multiplies float32 matrices on the tensor cores with a 10-bit mantissa (about 8x float32's rate on an
H100): right for the forwards of calibration, evaluation and recovery, wrong for what must be exact, the
SparseGPT solver and its Hessian (its reference implementation turns TF32 off) and the reload check's
comparison, whose tolerance is then derived from TF32's epsilon (`matmul_eps`). On the CPU nothing changes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

TF32_EPS = 2.0 ** -10  # TF32 keeps 10 of float32's 23 mantissa bits


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """torch's float32 matmul precision ("highest": float32, "high": TF32 on CUDA) inside the block."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def tf32_on(device: torch.device):
    """TF32 for float32 products while the block runs on a CUDA `device`; nothing changes elsewhere."""
    return matmul_precision("high" if device.type == "cuda" else torch.get_float32_matmul_precision())


def exact_float32():
    return matmul_precision("highest")


def matmul_eps(dtype: torch.dtype) -> float:
    """The relative rounding of a matrix product in `dtype` as torch computes it now (TF32's for float32
    under "high" / "medium" precision, which only CUDA honours; the dtype's own otherwise)."""
    if not dtype.is_floating_point:
        return 0.0
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" and torch.cuda.is_available():
        return TF32_EPS
    return torch.finfo(dtype).eps
