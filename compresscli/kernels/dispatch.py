"""Which product runs, for a device, a dtype, a batch and a layer shape: condensed layers (below), the
row-sparse inference forms (`sparse_mm`), RPS layers (`rps_mm`), quantized dense layers on CUDA
(`quantized_mm`) and the product with a row-major matrix FiPS's "in" layers need (`row_major_mm`).

Paths (all compute y (N, R) = sum_j values[r, j] * x[n, indices[r, j]] + bias[r]):
  dense         decode the dense weight in PyTorch, then F.linear. Differentiable: what training runs, and
                the fallback where no compiled kernel can run (no compiler, another device).
  gather        the definition in PyTorch (reference; never chosen automatically).
  cpu           the compiled C++ kernel (cpu.py): CPU, float32 / bfloat16 / float16, inference.
  decoded       the compiled decoder writes the weight tile by tile for torch's GEMM (decoded.py): CPU,
                inference, many input rows.
  triton_gemv   Triton, few input rows (CUDA).
  triton_tiled  Triton, batch-tiled (CUDA).
  triton_decode the dense weight written by a Triton kernel, then cuBLAS (CUDA).

On the CPU the choice between `cpu` and `decoded` is measured, not guessed: benchmarks/kernel_thresholds.py
times both per structure, dtype, density and shape on the machine and writes kernels/cpu_thresholds.py,
the table `cpu_kernel_max_rows` reads. The CUDA side, for condensed and row-sparse layers alike, reads
cuda_paths.py's table (design points, NOT measured, until benchmarks/gpu_check.py measures them on a GPU).

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

from compresscli.kernels import cpu, cpu_thresholds, cuda_paths, reference
from compresscli.kernels.decoded import decoded_mm

log = logging.getLogger(__name__)

PATHS = ("dense", "gather", "cpu", "decoded", "triton_gemv", "triton_tiled", "triton_decode")
PATH_ENV = "COMPRESSCLI_CONDENSED_PATH"
_forced: ContextVar[str | None] = ContextVar("condensed_forced_path", default=None)


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
    if device.type == "cpu" and dtype in cpu.DTYPES and cpu.available():
        paths += ["cpu", "decoded"]
    if device.type == "cuda" and triton_available():
        paths += ["triton_gemv", "triton_tiled", "triton_decode"]
    return paths


@contextlib.contextmanager
def force_path(path: str | None) -> Iterator[None]:
    """Run every condensed product inside the block on `path` (None: automatic); "dense", "cpu" and
    "decoded" also force the row-sparse and RPS products."""
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown condensed path {path!r}; choose one of {', '.join(PATHS)}")
    token = _forced.set(path)
    try:
        yield
    finally:
        _forced.reset(token)


UNMEASURED_MAX_ROWS = 8
"""The kernel's row limit for a structure and dtype the table has no entry for (a table generated for
fewer dtypes, or a new structure): at up to 8 rows every kernel measured so far beat decode + GEMM
(benchmarks/results/kernel_thresholds.md: the lowest crossover is 16 rows), and past it decode + GEMM is
never much slower than the kernel. Logged once per structure and dtype so that a gap is seen, not hidden."""


@lru_cache(maxsize=None)
def _unmeasured(structure: str, dtype: str) -> int:
    log.warning("no measured CPU threshold for %s %s (kernels/cpu_thresholds.py): the kernel runs up to %d "
                "rows; rerun benchmarks/kernel_thresholds.py to measure it", structure, dtype, UNMEASURED_MAX_ROWS)
    return UNMEASURED_MAX_ROWS


def cpu_kernel_max_rows(structure: str, dtype: torch.dtype, density: float, weights: int) -> int:
    """The most input rows for which the compiled kernel beat decoding + GEMM when measured on this machine
    (kernels/cpu_thresholds.py): for the measured density nearest above `density` (the kernel's cost grows
    with it) and the shape class of a (rows x columns = `weights`) layer, the other class where only one
    was measured; UNMEASURED_MAX_ROWS where the table has no entry for the structure and dtype."""
    name = str(dtype).removeprefix("torch.")
    table = cpu_thresholds.KERNEL_MAX_ROWS.get(structure, {}).get(name)
    if not table:
        return _unmeasured(structure, name)
    measured = sorted(table)
    above = [d for d in measured if d >= density - 1e-9]
    by_size = table[above[0] if above else measured[-1]]
    size = "small" if weights <= cpu_thresholds.SMALL_WEIGHTS else "large"
    return by_size.get(size, min(by_size.values()))


def _cpu_choice(structure: str, dtype: torch.dtype, n: int, density: float, weights: int) -> str:
    return "cpu" if n <= cpu_kernel_max_rows(structure, dtype, density, weights) else "decoded"


def choose_path(device: torch.device, dtype: torch.dtype | None, n: int, in_features: int, k: int,
                needs_grad: bool, rows: int = 1) -> str:
    """The fastest available path by the thresholds above (a layer of `rows` kept output rows); `dense`
    whenever gradients are needed."""
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
        if dtype in cpu.DTYPES and cpu.available():
            return _cpu_choice("condensed", dtype, n, density, rows * in_features)
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
    path = choose_path(x.device, x.dtype if same else None, x.shape[0], in_features, values.shape[1], needs_grad,
                       rows=values.shape[0])
    if path == "dense":
        return reference.dense_mm(x, values, indices, bias, in_features), path
    if path == "gather":
        return reference.gather_mm(x, values, indices, bias), path
    if needs_grad:
        raise ValueError(f"condensed path {path!r} has no backward; run it under torch.no_grad()")
    if path == "cpu":
        return cpu.condensed_mm(x, values, indices, bias), path
    if path == "decoded":
        values, indices = values.contiguous(), indices.contiguous()
        decode = lambda r0, r1, out: cpu.sparse_to_dense(values, indices, None, values.shape[0], in_features, r0, r1,  # noqa: E731
                                                         out)
        return decoded_mm(x.contiguous(), decode, values.shape[0], in_features, bias, values.dtype), path
    if path == "triton_decode":
        return cuda_paths.condensed_decode_mm(x, values, indices, bias, in_features), path
    from compresscli.kernels import triton_kernels

    return triton_kernels.condensed_mm(x, values, indices, bias, tiled=path == "triton_tiled"), path


# ----------------------------------------------------------------------------- row-sparse inference forms

SPARSE_PATHS = ("dense", "cpu", "decoded")


def sparse_dense(values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor, rows: int,
                 columns: int) -> torch.Tensor:
    """The dense weight of a row-sparse structure, by the compiled decoder where it applies."""
    if values.device.type == "cpu" and values.dtype in cpu.DTYPES and cpu.available():
        return cpu.sparse_to_dense(values, cols, row_ptr, rows, columns)
    if values.device.type == "cuda" and triton_available():  # no host sync, no index built
        from compresscli.kernels import triton_sparse

        return triton_sparse.row_sparse_dense(values, cols, row_ptr, rows, columns)
    return reference.row_sparse_dense(values, cols, row_ptr, rows, columns)


def _forced_cpu_path(paths: tuple[str, ...], runnable: bool, needs_grad: bool, what: str) -> str | None:
    """The path force_path / $COMPRESSCLI_CONDENSED_PATH names for a CPU product, if it names one of `paths`."""
    forced = _forced.get() or os.environ.get(PATH_ENV) or None
    if forced not in paths:
        return None
    if forced != "dense" and not (runnable and not needs_grad):
        raise ValueError(f"the {what} CPU kernels cannot run here" + (" with gradients" if needs_grad else ""))
    return forced


def choose_sparse_path(device: torch.device, dtype: torch.dtype | None, n: int, density: float, needs_grad: bool,
                       structure: str = "bitmask", weights: int = 1) -> str:
    """`cpu` or `decoded` by the measured thresholds for a `structure` ("bitmask" or "csr") layer of `weights`
    dense weights; `dense` with gradients or where no compiled kernel runs."""
    runnable = device.type == "cpu" and dtype in cpu.DTYPES and cpu.available()
    forced = _forced_cpu_path(SPARSE_PATHS, runnable, needs_grad, "sparse")
    if forced is not None:
        return forced
    if needs_grad or not runnable:
        return "dense"
    return _cpu_choice(structure, dtype, n, density, weights)


def sparse_mm(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor,
              bias: torch.Tensor | None, rows: int, columns: int) -> tuple[torch.Tensor, str]:
    """y (N, rows) = x (N, columns) @ W^T (+ bias) for a row-sparse W (kernels.cpu.sparse_mm's layout);
    returns (y, path name). The decoded paths decode W for this call only; it is never kept."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    same = values.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
    if x.device.type == "cuda" and same and not needs_grad and triton_available():
        return cuda_paths.row_sparse_mm(x, values, cols, row_ptr, bias, rows, columns,
                                        _forced.get() or os.environ.get(PATH_ENV) or None)
    structure = "bitmask" if cols.dtype == torch.int64 else "csr"
    path = choose_sparse_path(x.device, x.dtype if same else None, x.shape[0],
                              values.numel() / max(1, rows * columns), needs_grad, structure, rows * columns)
    if path == "cpu":
        return cpu.sparse_mm(x.contiguous(), values, cols, row_ptr, bias, rows, values.numel()), path
    if path == "decoded":
        decode = lambda r0, r1, out: cpu.sparse_to_dense(values, cols, row_ptr, rows, columns, r0, r1, out)  # noqa: E731
        return decoded_mm(x.contiguous(), decode, rows, columns, bias, values.dtype), path
    return F.linear(x, sparse_dense(values, cols, row_ptr, rows, columns).to(x.dtype), bias), path


# ----------------------------------------------------------------------------- x @ M, M row-major

ROW_MAJOR_KERNEL_ROWS = {torch.float32: range(2, cpu.ROW_MAJOR_MAX_ROWS + 1),
                         torch.bfloat16: range(1, cpu.ROW_MAJOR_MAX_ROWS + 1),
                         torch.float16: range(1, cpu.ROW_MAJOR_MAX_ROWS + 1)}
"""Input rows for which cpu.row_major_mm beat torch's x @ M (2048 x 2922, 2 threads, round robin over 80 copies:
bf16 / fp16 0.55-1.03 ms against 1.09-1.48 at 1-8 rows; float32 at one row 0.85 against MKL's 0.81, so MKL)."""


def row_major_mm(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x (N, K) @ m (K, R) for a row-major m (FiPS's shared U): the compiled kernel where it was measured
    faster, else torch."""
    if (x.device.type == "cpu" and m.device.type == "cpu" and x.dtype == m.dtype
            and x.shape[0] in ROW_MAJOR_KERNEL_ROWS.get(x.dtype, ()) and m.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or m.requires_grad)) and cpu.available()):
        return cpu.row_major_mm(x.contiguous(), m)
    return x @ m


# ----------------------------------------------------------------------------- RPS layers

def rps_mm(x: torch.Tensor, memory: torch.Tensor, spec: torch.Tensor, scale: float, bias: torch.Tensor | None,
           rows: int, columns: int) -> tuple[torch.Tensor, str] | None:
    """y (N, rows) = x (N, columns) @ W^T (+ bias) for an RPS weight computed from its memory by the compiled
    kernels: row by row into the product (`cpu`), or tile by tile for a GEMM (`decoded`); None where they
    cannot run (another device or dtype, gradients, no compiler): the layer then computes in PyTorch."""
    runnable = (x.device.type == "cpu" and x.dtype in cpu.DTYPES and memory.dtype == x.dtype
                and (bias is None or bias.dtype == x.dtype) and cpu.available())
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    path = _forced_cpu_path(("cpu", "decoded"), runnable, needs_grad, "RPS")
    if path is None:
        if needs_grad or not runnable:
            return None
        path = _cpu_choice("rps", x.dtype, x.shape[0], 1.0, rows * columns)
    x = x.contiguous()
    if path == "cpu":
        return cpu.rps_mm(x, memory, spec, scale, bias, rows), path
    decode = lambda r0, r1, out: cpu.rps_weight(memory, spec, scale, r0, r1, columns, out)  # noqa: E731
    return decoded_mm(x, decode, rows, columns, bias, memory.dtype), path


# ----------------------------------------------------------------------------- quantized dense layers

def quantized_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 group: int, bias: torch.Tensor | None) -> tuple[torch.Tensor, str] | None:
    """y (N, rows) for a quantized dense weight held as the file holds it, by the Triton kernels on CUDA
    (cuda_paths.py's "quantized" table); None where they cannot run (another device, gradients, no Triton, the
    `dense` path forced): the layer then dequantizes its weight for the call."""
    if x.device.type != "cuda" or (torch.is_grad_enabled() and x.requires_grad) or not triton_available():
        return None
    forced = _forced.get() or os.environ.get(PATH_ENV) or None
    return cuda_paths.quantized_mm(x, codes, scales, zeros, bits, group, bias, forced)


# ----------------------------------------------------------------------------- int8 sparse values (issue 21)

Q8_KERNEL_MAX_ROWS = 8
"""Input rows up to which a row-sparse layer with int8 values runs the compiled kernel (`cpu-int8`); more rows
decode tiles of the weight for a GEMM (`decoded-int8`). Measured at 5632x2048, 50% bitmask, bfloat16, 2 threads
(benchmarks/results/sparse_int8.md, both paths forced): 8 rows kernel 1.94 ms vs decode + GEMM 2.49; 16 rows
2.93 vs 2.61. The float tables' 16-32 rows come from AMX tiles, which the int8 kernel does not use. A constant,
not a row of cpu_thresholds.py: benchmarks/kernel_thresholds.py does not measure int8 structures yet."""


def sparse_q8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int, cols: torch.Tensor,
                 row_ptr: torch.Tensor, bias: torch.Tensor | None, rows: int,
                 columns: int) -> tuple[torch.Tensor, str] | None:
    """y (N, rows) = x (N, columns) @ W^T (+ bias) for a row-sparse W stored as int8 codes and scales
    (cpu.sparse_q8_mm's layout), by the compiled kernel or decode + GEMM; returns (y, path name), or None where
    neither can run (another device or dtype, gradients, no compiler, the `dense` path forced): the caller then
    dequantizes the values for the call."""
    runnable = (x.device.type == "cpu" and x.dtype in cpu.DTYPES and scales.dtype in cpu.DTYPES
                and (bias is None or bias.dtype == x.dtype) and cpu.available())
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    path = _forced_cpu_path(SPARSE_PATHS, runnable, needs_grad, "int8 sparse")
    if path is None and runnable and not needs_grad:
        path = "cpu" if x.shape[0] <= Q8_KERNEL_MAX_ROWS else "decoded"
    if path not in ("cpu", "decoded"):
        return None
    x, codes, scales = x.contiguous(), codes.contiguous(), scales.contiguous()  # as loaded: already, no copy
    if path == "cpu":
        return cpu.sparse_q8_mm(x, codes, scales, group, cols, row_ptr, bias, rows), "cpu-int8"
    decode = lambda r0, r1, out: cpu.sparse_q8_to_dense(codes, scales, group, cols, row_ptr, columns, r0, r1, out)  # noqa: E731
    return decoded_mm(x, decode, rows, columns, bias, x.dtype), "decoded-int8"
