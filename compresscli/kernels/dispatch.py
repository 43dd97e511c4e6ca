"""Which product runs, for a device, a dtype, a batch and a layer shape: condensed layers (below) and
the row-sparse inference forms (`sparse_mm`, at the end).

Paths (all compute y (N, R) = sum_j values[r, j] * x[n, indices[r, j]] + bias[r]):
  dense         scatter to the dense weight, then F.linear. Differentiable: what training runs, and
                the fallback wherever nothing faster applies.
  gather        the definition in PyTorch (reference; never chosen automatically).
  cpu           the compiled C++ kernel (cpu.py): CPU, float32, inference.
  triton_gemv   Triton, few input rows (CUDA).
  triton_tiled  Triton, batch-tiled (CUDA).
  triton_decode the dense weight written by a Triton kernel, then cuBLAS (CUDA).

The CPU thresholds come from benchmarks/condensed_layers.py on a 2-core AMD EPYC (Zen 4), the crossover
run in benchmarks/results/condensed_layers.md ("Crossover"): the kernel against this module's own dense
path (which scatters the condensed weight to dense on every call, so it costs more than the original
layer), one thread, thread CPU time, 768x3072 and 3072x768 at densities 0.2-0.75. The CUDA side, for
condensed and row-sparse layers alike, reads cuda_paths.py's table (design points, NOT measured, until
benchmarks/gpu_check.py measures them on a GPU).

`force_path(name)` (or $COMPRESSCLI_CONDENSED_PATH) overrides the choice, for tests and benchmarks.
"""
from __future__ import annotations

import contextlib
import logging
import os
from contextvars import ContextVar
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn.functional as F

from compresscli.kernels import cpu, cuda_paths, reference

log = logging.getLogger(__name__)

PATHS = ("dense", "gather", "cpu", "triton_gemv", "triton_tiled", "triton_decode")
PATH_ENV = "COMPRESSCLI_CONDENSED_PATH"
_forced: ContextVar[str | None] = ContextVar("condensed_forced_path", default=None)

# CPU: the compiled kernel is used while the kept fraction k / C is at most this, by input rows. Measured:
# up to 8 rows it beat the dense path at every density tried (0.75 included); at 64 rows it won or tied
# up to 0.75; at 256 rows it lost at 0.5 and won at 0.2, tying near 0.3.
CPU_MAX_DENSITY = ((8, 1.0), (64, 0.75), (None, 0.3))


@lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        from compresscli.kernels import triton_kernels  # noqa: F401
    except Exception as err:  # ImportError, or a triton that cannot initialise here
        log.info("triton unavailable (%s): condensed layers use the dense path on CUDA", err)
        return False
    return True


def available_paths(device: torch.device, dtype: torch.dtype | None) -> list[str]:
    """The paths that can run for this device and dtype (None: mixed dtypes), in PATHS order."""
    paths = ["dense", "gather"]
    if dtype is None:
        return paths
    if device.type == "cpu" and dtype == torch.float32 and cpu.available():
        paths.append("cpu")
    if device.type == "cuda" and triton_available():
        paths += ["triton_gemv", "triton_tiled", "triton_decode"]
    return paths


@contextlib.contextmanager
def force_path(path: str | None) -> Iterator[None]:
    """Run every condensed product inside the block on `path` (None: automatic); "dense" and "cpu" also
    force the row-sparse products."""
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown condensed path {path!r}; choose one of {', '.join(PATHS)}")
    token = _forced.set(path)
    try:
        yield
    finally:
        _forced.reset(token)


def _cpu_limit(n: int) -> float:
    for rows, limit in CPU_MAX_DENSITY:
        if rows is None or n <= rows:
            return limit
    return 0.0


def choose_path(device: torch.device, dtype: torch.dtype | None, n: int, in_features: int, k: int,
                needs_grad: bool) -> str:
    """The fastest available path by the thresholds above; `dense` whenever gradients are needed."""
    forced = _forced.get() or os.environ.get(PATH_ENV) or None
    if forced is not None:
        if forced not in available_paths(device, dtype):
            raise ValueError(f"condensed path {forced!r} is not available for {device.type}/{dtype} "
                             f"(available: {', '.join(available_paths(device, dtype))})")
        return forced
    if needs_grad:
        return "dense"
    density = k / max(1, in_features)
    if device.type == "cpu":
        if dtype == torch.float32 and density <= _cpu_limit(n) and cpu.available():
            return "cpu"
        return "dense"
    if device.type == "cuda" and triton_available():
        return cuda_paths.choose("condensed", n, density)
    return "dense"


def condensed_mm(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int) -> tuple[torch.Tensor, str]:
    """y (N, R) for x (N, C) by the chosen path; returns (y, path name)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or values.requires_grad
                                              or (bias is not None and bias.requires_grad))
    same = values.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
    path = choose_path(x.device, x.dtype if same else None, x.shape[0], in_features, values.shape[1], needs_grad)
    if path == "dense":
        return reference.dense_mm(x, values, indices, bias, in_features), path
    if path == "gather":
        return reference.gather_mm(x, values, indices, bias), path
    if needs_grad:
        raise ValueError(f"condensed path {path!r} has no backward; run it under torch.no_grad()")
    if path == "cpu":
        return cpu.condensed_mm(x, values, indices, bias), path
    if path == "triton_decode":
        return cuda_paths.condensed_decode_mm(x, values, indices, bias, in_features), path
    from compresscli.kernels import triton_kernels

    return triton_kernels.condensed_mm(x, values, indices, bias, tiled=path == "triton_tiled"), path


# ----------------------------------------------------------------------------- row-sparse inference forms

# CPU: the compiled kernel runs while the kept fraction nnz / (rows x columns) is at most this, by input
# rows; above it the weight is decoded to dense for the call and MKL's GEMM runs. Measured on MiniLM's MLP
# shapes (384x1536, 1536x384; one thread, idle 2-core AMD EPYC Zen 4, bitmask and CSR alike): up to 64 rows
# the kernel beat decoding at every density (decoding a 384x1536 weight alone costs about as much as a
# 16-row dense product); at 1024 rows it won at 0.25 (1.0-1.7x dense) and tied or lost at 0.5 (0.9-1.2x,
# decoding then 1.1x).
SPARSE_CPU_MAX_DENSITY = ((64, 1.0), (None, 0.35))
SPARSE_PATHS = ("dense", "cpu")


def sparse_dense(values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor, rows: int,
                 columns: int) -> torch.Tensor:
    """The dense weight of a row-sparse structure, by the compiled decoder where it applies."""
    if values.device.type == "cpu" and values.dtype in cpu.DTYPES and cpu.available():
        return cpu.sparse_to_dense(values, cols, row_ptr, rows, columns)
    if values.device.type == "cuda" and triton_available():  # no host sync, no index built
        from compresscli.kernels import triton_sparse

        return triton_sparse.row_sparse_dense(values, cols, row_ptr, rows, columns)
    return reference.row_sparse_dense(values, cols, row_ptr, rows, columns)


def choose_sparse_path(device: torch.device, dtype: torch.dtype | None, n: int, density: float,
                       needs_grad: bool) -> str:
    runnable = device.type == "cpu" and dtype in cpu.DTYPES and cpu.available()
    forced = _forced.get() or os.environ.get(PATH_ENV) or None
    if forced in SPARSE_PATHS:
        if forced == "cpu" and not (runnable and not needs_grad):
            raise ValueError(f"the sparse CPU kernel cannot run {device.type}/{dtype}"
                             + (" with gradients" if needs_grad else ""))
        return forced
    if needs_grad or not runnable:
        return "dense"
    for rows, limit in SPARSE_CPU_MAX_DENSITY:
        if rows is None or n <= rows:
            return "cpu" if density <= limit else "dense"
    return "dense"


def sparse_mm(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor,
              bias: torch.Tensor | None, rows: int, columns: int) -> tuple[torch.Tensor, str]:
    """y (N, rows) = x (N, columns) @ W^T (+ bias) for a row-sparse W (kernels.cpu.sparse_mm's layout);
    returns (y, path name). The dense path decodes W for this call only; it is never kept."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    same = values.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
    if x.device.type == "cuda" and same and not needs_grad and triton_available():
        return cuda_paths.row_sparse_mm(x, values, cols, row_ptr, bias, rows, columns,
                                        _forced.get() or os.environ.get(PATH_ENV) or None)
    path = choose_sparse_path(x.device, x.dtype if same else None, x.shape[0],
                              values.numel() / max(1, rows * columns), needs_grad)
    if path == "cpu":
        x = x.contiguous()
        return cpu.sparse_mm(x, values, cols, row_ptr, bias, rows, values.numel()), path
    return F.linear(x, sparse_dense(values, cols, row_ptr, rows, columns).to(x.dtype), bias), path
