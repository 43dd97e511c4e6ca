"""Reading the next unit's weights while the current one computes (block-by-block runs on a GPU).

On CUDA the GPU computes a unit while the host would otherwise wait for it before reading the next
unit from disk. `ReadAhead` reads the tensors of the blocks named next on one background thread, into
pinned host memory (so the copy to the GPU is a DMA transfer, not a staged one), and hands them to the
loader as if they came from the index; anything not read ahead is read as before. File reads release
the GIL, so the reading overlaps the main thread's work. The host then holds two units' weights at
most (engine/prediction.py counts the second one), the GPU one.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from compresscli.io.safetensors import TensorIndex


class ReadAhead:
    """`index` with a look-ahead: `start(names)` reads them in the background; `read` serves what was
    read ahead (waiting for it if needed) and reads the rest from the index. Quacks as a TensorIndex."""

    def __init__(self, index: TensorIndex, pin: bool):
        self.index, self.pin = index, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compresscli-read-ahead")
        self._pending: dict[str, Future] = {}
        self.served = 0  # tensors handed out from the look-ahead (for tests and reports)

    def start(self, names: list[str], dtype: torch.dtype | None) -> None:
        wanted = [n for n in names if n not in self._pending]
        if wanted:
            future = self._pool.submit(self._read, wanted, dtype)
            for name in wanted:
                self._pending[name] = future

    def _read(self, names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        tensors = self.index.read(names, dtype)
        return {k: t.pin_memory() for k, t in tensors.items()} if self.pin else tensors

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for name in [n for n in names if n in self._pending]:
            tensor = self._pending.pop(name).result()[name]
            out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            self.served += 1
        rest = [n for n in names if n not in out]
        return {**out, **(self.index.read(rest, dtype) if rest else {})}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __getattr__(self, name: str) -> Any:  # names(), entries, metadata, files...: the index's own
        return getattr(self.index, name)
