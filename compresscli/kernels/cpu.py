"""The compiled CPU path: build the kernel of cpu_source.py on first use, cache it, call it via ctypes.

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

from ..references import cache_dir
from .cpu_source import SOURCE

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


def _flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _compiler_version(compiler: str) -> str:
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else ""


def _build(compiler: str, flags: list[str], target: Path) -> None:
    """Compile into a temporary file beside `target`, then rename: readers never see a partial library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "condensed.cpp"
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
        log.info("CPU condensed kernel disabled by $%s", DISABLE_ENV)
        return None
    if fcntl is None:
        log.warning("no POSIX file locking here: condensed layers use the slower pure-PyTorch path on CPU")
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler found: condensed layers use the slower pure-PyTorch path on CPU")
        return None
    flags = _flags()
    try:
        key = hashlib.sha256("\0".join([SOURCE, *flags, _compiler_version(compiler), torch.__version__]).encode())
        target = cache_dir() / "kernels" / f"condensed_cpu_{key.hexdigest()[:16]}.so"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target.parent / ".build.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not target.is_file():
                    log.info("compiling the CPU condensed kernel into %s", target)
                    _build(compiler, flags, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("could not build the CPU condensed kernel (%s): using the pure-PyTorch path", err)
        return None
    lib.condensed_mm_f32.restype = ctypes.c_int
    lib.condensed_mm_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return lib


def available() -> bool:
    return library() is not None


def condensed_mm(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """y (N, R) = sum_j values[r, j] * x[n, indices[r, j]] (+ bias[r]); float32 CPU tensors, no autograd.

    The caller guarantees what the C code cannot check cheaply: indices in [0, C) (checked when the
    layer was built or loaded), contiguous float32 tensors, int16/int32 indices.
    """
    lib = library()
    x, values, indices = x.contiguous(), values.contiguous(), indices.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n, c = x.shape
    rows, k = values.shape
    y = torch.empty(n, rows, dtype=torch.float32)
    threads = max(1, min(torch.get_num_threads(), n * rows * k // MIN_WORK_PER_THREAD))
    status = lib.condensed_mm_f32(x.data_ptr(), n, c, values.data_ptr(), indices.data_ptr(), indices.element_size(),
                                  bias.data_ptr() if bias is not None else None, y.data_ptr(), rows, k, threads)
    if status != 0:
        raise RuntimeError(f"condensed CPU kernel rejected index type {indices.dtype}")
    return y
