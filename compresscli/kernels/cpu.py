"""The compiled CPU kernels: build the library of cpu_source.py on first use, cache it, call it via ctypes.

The shared library is compiled with the system C++ compiler (g++/c++, overridable with $CXX) into
$COMPRESSCLI_CACHE/kernels/, named by a hash of the source, the flags and the compiler, so a change of
any of them rebuilds and concurrent processes never load a half-written file (a file lock serialises
the build; the library is written to a temporary name and renamed). Where compiling is impossible (no
compiler, no OpenMP, $COMPRESSCLI_NO_CPU_KERNEL set) `library()` returns None once and logs why; the
dispatcher then uses the pure-PyTorch paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no build lock, so no build (the pure-PyTorch paths still work)
    fcntl = None

from compresscli.core.cache import cache_dir
from compresscli.core.cpu_isa import amx_runs, cpu_flags
from compresscli.kernels.cpu_source import SOURCE

log = logging.getLogger(__name__)

DISABLE_ENV = "COMPRESSCLI_NO_CPU_KERNEL"
# Below this many multiply-adds per thread a call runs on fewer threads. Waking an OpenMP worker costs a
# few microseconds on an idle machine but a whole scheduler time slice on a busy one: on the shared 2-core
# benchmark machine (load average ~6) a 2-thread call of ViT-B fc2 at 90% (236k multiply-adds, 90 us on
# one thread) took 8 ms. MKL's dense gemv also stays on one thread at that size.
MIN_WORK_PER_THREAD = 1 << 18


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


ISA_ENV = "COMPRESSCLI_CPU_ISA"
"""Caps the instruction sets the kernels are built for: "amx" (the default where the CPU has them; used only
where AMX is seen to run), "avx512-bf16", "avx512", "avx2" or "scalar". How the tests reach every code path
on one machine."""
ISAS = ("scalar", "avx2", "avx512", "avx512-bf16", "amx")


def isa() -> str:
    """The instruction sets this build uses: the best this CPU runs, capped by $COMPRESSCLI_CPU_ISA."""
    capability = torch.backends.cpu.get_cpu_capability()
    best = {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "scalar")
    if best == "avx512" and {"avx512_bf16", "avx512_vbmi2"} <= cpu_flags():
        best = "amx" if {"amx_tile", "amx_bf16"} <= cpu_flags() else "avx512-bf16"
    cap = os.environ.get(ISA_ENV) or best
    if cap not in ISAS:
        raise ValueError(f"${ISA_ENV}={cap!r} is not one of {', '.join(ISAS)}")
    return ISAS[min(ISAS.index(cap), ISAS.index(best))]


def _flags() -> list[str]:
    """The compiler flags for `isa()` (so each kind of machine, and each cap, gets its own build)."""
    flags = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
    level = ISAS.index(isa())
    if level >= ISAS.index("avx2"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if level >= ISAS.index("avx512"):
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    if level >= ISAS.index("avx512-bf16"):
        flags += ["-mavx512bf16", "-mavx512vbmi2"]
    if level >= ISAS.index("amx"):
        flags += ["-mamx-tile", "-mamx-bf16"]
    return flags


def _compiler_version(compiler: str) -> str:
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else ""


def _build(compiler: str, flags: list[str], target: Path) -> None:
    """Compile into a temporary file beside `target`, then rename: readers never see a partial library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "compresscli_cpu.cpp"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, str(src), "-o", str(out)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-600:]}")
        os.replace(out, target)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built if needed; None (logged once) when it cannot be had."""
    if os.environ.get(DISABLE_ENV):
        log.info("CPU kernels disabled by $%s", DISABLE_ENV)
        return None
    if fcntl is None:
        log.warning("no POSIX file locking here: compressed layers use the slower pure-PyTorch paths on CPU")
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler found: compressed layers use the slower pure-PyTorch paths on CPU")
        return None
    flags = _flags()
    try:
        key = hashlib.sha256("\0".join([SOURCE, *flags, _compiler_version(compiler), torch.__version__]).encode())
        target = cache_dir() / "kernels" / f"compresscli_cpu_{key.hexdigest()[:16]}.so"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target.parent / ".build.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not target.is_file():
                    log.info("compiling the CPU kernels into %s", target)
                    _build(compiler, flags, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("could not build the CPU kernels (%s): using the pure-PyTorch paths", err)
        return None
    ptr, i64, int_, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    for name, args in {"sparse_mm": [int_, ptr, i64, i64, ptr, ptr, i64, int_, ptr, i64, ptr, ptr, i64, int_],
                       "sparse_to_dense": [int_, ptr, ptr, i64, int_, ptr, i64, ptr, i64, i64, i64, i64, int_],
                       "rps_weight": [int_, ptr, ptr, f32, i64, i64, ptr, int_],
                       "rps_mm": [int_, ptr, ptr, f32, ptr, i64, ptr, ptr, int_],
                       "row_major_mm": [int_, ptr, i64, i64, ptr, i64, ptr, int_]}.items():
        getattr(lib, name).restype = int_
        getattr(lib, name).argtypes = args
    if isa() == "amx":  # the build has AMX code: let it run only where a bf16 matmul on AMX was seen to
        lib.compresscli_allow_amx(int(amx_runs()))
    return lib


def available() -> bool:
    return library() is not None


DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""The value dtypes the kernels take (x, values, bias and the output share one)."""
KINDS = {torch.int16: 0, torch.int32: 1, torch.int64: 2}
"""Column structure by its tensor's dtype: int16 / int32 indices, or int64 bitmask words (one row each)."""


def threads_for(work: int) -> int:
    """torch's thread count, fewer when there are under MIN_WORK_PER_THREAD multiply-adds per thread."""
    return max(1, min(torch.get_num_threads(), work // MIN_WORK_PER_THREAD))


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def sparse_mm(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor | None,
              bias: torch.Tensor | None, rows: int, nnz: int) -> torch.Tensor:
    """y (N, rows) = x (N, C) @ W^T (+ bias) for the row-sparse W the tensors describe (see cpu_source.py):
    `cols` int16/int32 indices (with `row_ptr`, int64, or without: `values` is rows x k) or int64 bitmask
    words (rows x words per row, with `row_ptr`). No autograd; the caller guarantees what the C code cannot
    check cheaply: contiguous tensors of one dtype in DTYPES, columns in [0, C) (checked when the layer
    was built or loaded)."""
    n, c = x.shape
    y = torch.empty(n, rows, dtype=x.dtype)
    k = values.shape[1] if row_ptr is None else 0
    wpr = cols.shape[1] if cols.dtype == torch.int64 else 0
    status = library().sparse_mm(DTYPES[x.dtype], x.data_ptr(), n, c, values.data_ptr(), _ptr(row_ptr), k,
                                 KINDS[cols.dtype], cols.data_ptr(), wpr, _ptr(bias), y.data_ptr(), rows,
                                 threads_for(n * nnz))
    if status != 0:
        raise RuntimeError(f"sparse CPU kernel rejected dtype {x.dtype} or columns {cols.dtype}")
    return y


def condensed_mm(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """y (N, R) = sum_j values[r, j] * x[n, indices[r, j]] (+ bias[r]): constant fan-in rows."""
    x, values, indices = x.contiguous(), values.contiguous(), indices.contiguous()
    bias = bias.contiguous() if bias is not None else None
    return sparse_mm(x, values, indices, None, bias, values.shape[0], values.numel())


def sparse_to_dense(values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor | None, rows: int,
                    columns: int, row0: int = 0, row1: int | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [row0, row1) of the dense (rows, columns) matrix of a row-sparse structure (as `sparse_mm` takes
    it), zeros elsewhere; into `out` (contiguous, (row1 - row0) x columns, the values' dtype) when given."""
    row1 = rows if row1 is None else row1
    if out is None:
        out = torch.empty(row1 - row0, columns, dtype=values.dtype)
    k = values.shape[1] if row_ptr is None else 0
    wpr = cols.shape[1] if cols.dtype == torch.int64 else 0
    status = library().sparse_to_dense(DTYPES[values.dtype], values.data_ptr(), _ptr(row_ptr), k, KINDS[cols.dtype],
                                       cols.data_ptr(), wpr, out.data_ptr(), row0, row1, rows, columns,
                                       threads_for((row1 - row0) * columns))
    if status != 0:
        raise RuntimeError(f"sparse CPU kernel rejected dtype {values.dtype} or columns {cols.dtype}")
    return out


def rps_weight(memory: torch.Tensor, spec: torch.Tensor, scale: float, row0: int, row1: int, cols: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [row0, row1) of an RPS weight, computed from the memory and `spec`, the RpsSpec integers
    (cpu_source.py) as a contiguous int64 CPU tensor; into `out` ((row1 - row0) x cols) when given."""
    if out is None:
        out = torch.empty(row1 - row0, cols, dtype=memory.dtype)
    status = library().rps_weight(DTYPES[memory.dtype], memory.data_ptr(), spec.data_ptr(), scale, row0, row1,
                                  out.data_ptr(), threads_for((row1 - row0) * cols))
    if status != 0:
        raise RuntimeError(f"RPS CPU kernel rejected dtype {memory.dtype} or its hash parameters {spec}")
    return out


def rps_mm(x: torch.Tensor, memory: torch.Tensor, spec: torch.Tensor, scale: float, bias: torch.Tensor | None,
           rows: int) -> torch.Tensor:
    """y (N, rows) = x (N, cols) @ W^T (+ bias) for the RPS weight `spec` describes, each row of W computed
    into a buffer and used at once (never held whole). x, memory and bias share one dtype in DTYPES."""
    n = x.shape[0]
    y = torch.empty(n, rows, dtype=x.dtype)
    status = library().rps_mm(DTYPES[x.dtype], memory.data_ptr(), spec.data_ptr(), scale, x.data_ptr(), n, _ptr(bias),
                              y.data_ptr(), threads_for(rows * x.shape[1]))
    if status != 0:
        raise RuntimeError(f"RPS CPU kernel rejected dtype {x.dtype} or its hash parameters {spec}")
    return y


ROW_MAJOR_MAX_ROWS = 8


def row_major_mm(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """y (N, R) = x (N, K) @ m (K, R) for a row-major m (FiPS's shared U, projected onto by an "in" layer), read
    front to back once: torch's 16-bit GEMM reads this orientation at half the bandwidth. x (at most
    ROW_MAJOR_MAX_ROWS rows) and m contiguous, of one dtype in DTYPES; no autograd."""
    n, k = x.shape
    rows = m.shape[1]
    y = torch.empty(n, rows, dtype=x.dtype)
    if library().row_major_mm(DTYPES[x.dtype], x.data_ptr(), n, k, m.data_ptr(), rows, y.data_ptr(),
                              threads_for(n * k * rows)) != 0:
        raise RuntimeError(f"row-major CPU kernel rejected dtype {x.dtype} or {n} rows")
    return y


@lru_cache(maxsize=1)
def _quantized_decoders() -> ctypes.CDLL:
    """The library with the quantized-rows decoders' signatures set (kept apart from `library()`'s table)."""
    lib = library()
    ptr, i64, int_ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.q8_rows_decode.argtypes = [int_, int_, ptr, ptr, i64, i64, ptr, i64, i64, int_]
    lib.q4_blocks_decode_t.argtypes = [int_, int_, ptr, ptr, i64, i64, i64, i64, ptr, i64, i64, int_]
    lib.q8_rows_decode.restype = lib.q4_blocks_decode_t.restype = int_
    return lib


def int8_rows(codes: torch.Tensor, scales: torch.Tensor, group: int, row0: int, row1: int,
              out: torch.Tensor) -> torch.Tensor:
    """Rows [row0, row1) of an int8 weight (codes (R, C) int8, scales (R, ceil(C / group)), both contiguous)
    dequantized into `out` ((row1 - row0, C) contiguous, in DTYPES) exactly as QuantizedValues.dequantize
    rounds them (through the scales' dtype)."""
    status = _quantized_decoders().q8_rows_decode(DTYPES[scales.dtype], DTYPES[out.dtype], codes.data_ptr(),
                                                  scales.data_ptr(), codes.shape[1], group, out.data_ptr(), row0, row1,
                                                  threads_for((row1 - row0) * codes.shape[1]))
    if status != 0:
        raise RuntimeError(f"int8 decoder rejected scales {scales.dtype}, output {out.dtype} or group {group}")
    return out


def int4_block_rows_t(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, block: int, row0: int,
                      row1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows [row0, row1) of an int4 weight in torch's int4 kernel layout (kernels/quantized.py: `packed`
    (held, C / 2) in blocks of `block` rows, `scales_and_zeros` (C / group, held, 2), zeros 0) dequantized
    TRANSPOSED into `out` ((C, row1 - row0) contiguous, in DTYPES), rounded as QuantizedValues.dequantize does."""
    held, columns = packed.shape[0], 2 * packed.shape[1]
    status = _quantized_decoders().q4_blocks_decode_t(DTYPES[scales_and_zeros.dtype], DTYPES[out.dtype],
                                                      packed.data_ptr(), scales_and_zeros.data_ptr(), held, columns,
                                                      group, block, out.data_ptr(), row0, row1,
                                                      threads_for((row1 - row0) * columns))
    if status != 0:
        raise RuntimeError(f"int4 decoder rejected scales {scales_and_zeros.dtype}, output {out.dtype}, group {group}"
                           f" or block {block}")
    return out


# ----------------------------------------------------------------------------- int8 sparse values (issue 21)

@lru_cache(maxsize=1)
def _q8_library() -> ctypes.CDLL:
    """library() with the int8 row-sparse entry points' signatures declared."""
    lib = library()
    ptr, i64, int_ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.sparse_q8_mm.argtypes = [int_, ptr, i64, i64, ptr, ptr, int_, ptr, i64, ptr, int_, i64, i64, ptr, ptr, i64,
                                 int_]
    lib.sparse_q8_to_dense.argtypes = [int_, ptr, ptr, int_, ptr, i64, ptr, int_, i64, i64, ptr, i64, i64, i64, int_]
    lib.dense_q8_mm.argtypes = [int_, ptr, i64, i64, ptr, ptr, int_, i64, ptr, ptr, i64, int_]
    lib.sparse_q8_mm.restype = lib.sparse_q8_to_dense.restype = lib.dense_q8_mm.restype = int_
    return lib


DENSE_Q8_MAX_ROWS = 8


def dense_q8_supported(columns: int, group: int) -> bool:
    """Whether dense_q8_mm takes int8 codes with a scale per `group` of `columns` inputs."""
    return group >= columns or group % 16 == 0


def dense_q8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """y (N, rows) = x (N, K) @ (codes * scales)^T (+ bias) for symmetric int8 codes (rows, K), contiguous, and
    scales (rows, ceil(K / group)) in any of DTYPES (dense_q8_supported(K, group)); x (at most DENSE_Q8_MAX_ROWS
    rows) and bias contiguous in one dtype of DTYPES. No autograd."""
    n, c = x.shape
    rows = codes.shape[0]
    y = torch.empty(n, rows, dtype=x.dtype)
    status = _q8_library().dense_q8_mm(DTYPES[x.dtype], x.data_ptr(), n, c, codes.data_ptr(), scales.data_ptr(),
                                       DTYPES[scales.dtype], group, _ptr(bias), y.data_ptr(), rows,
                                       threads_for(n * codes.numel()))
    if status != 0:
        raise RuntimeError(f"dense int8 CPU kernel rejected dtype {x.dtype}, scales {scales.dtype}, group {group} "
                           f"or {n} rows")
    return y


def sparse_q8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int, cols: torch.Tensor,
                 row_ptr: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """y (N, rows) = x (N, C) @ W^T (+ bias) for a row-sparse W (bitmask words or int16/int32 CSR columns with its
    int64 row pointer, as `sparse_mm`) whose values are int8 codes (nnz, in row-major kept order) times float
    `scales` (rows x groups, a boundary every `group` columns; any dtype in DTYPES, read as stored). x, bias and
    y share one dtype in DTYPES. Arithmetic and what each build runs: cpu_source.py, "int8 values"."""
    n, c = x.shape
    y = torch.empty(n, rows, dtype=x.dtype)
    wpr = cols.shape[1] if cols.dtype == torch.int64 else 0
    status = _q8_library().sparse_q8_mm(DTYPES[x.dtype], x.data_ptr(), n, c, codes.data_ptr(), row_ptr.data_ptr(),
                                        KINDS[cols.dtype], cols.data_ptr(), wpr, scales.data_ptr(),
                                        DTYPES[scales.dtype], group, scales.shape[1], _ptr(bias), y.data_ptr(), rows,
                                        threads_for(n * codes.numel()))
    if status != 0:
        raise RuntimeError(f"int8 sparse CPU kernel rejected dtype {x.dtype}, scales {scales.dtype} or columns "
                           f"{cols.dtype}")
    return y


def sparse_q8_to_dense(codes: torch.Tensor, scales: torch.Tensor, group: int, cols: torch.Tensor,
                       row_ptr: torch.Tensor, columns: int, row0: int, row1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows [row0, row1) of the dense weight of `sparse_q8_mm`'s layout into `out` ((row1 - row0) x columns,
    contiguous, the activation dtype): each value code * scale rounded once to out's dtype, zeros elsewhere."""
    wpr = cols.shape[1] if cols.dtype == torch.int64 else 0
    status = _q8_library().sparse_q8_to_dense(DTYPES[out.dtype], codes.data_ptr(), row_ptr.data_ptr(),
                                              KINDS[cols.dtype], cols.data_ptr(), wpr, scales.data_ptr(),
                                              DTYPES[scales.dtype], group, scales.shape[1], out.data_ptr(), row0,
                                              row1, columns, threads_for((row1 - row0) * columns))
    if status != 0:
        raise RuntimeError(f"int8 sparse CPU decoder rejected dtype {out.dtype}, scales {scales.dtype} or columns "
                           f"{cols.dtype}")
    return out
