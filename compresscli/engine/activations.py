"""Hidden states carried from block to block by the block-by-block engine, within a byte budget.

Kept in memory, in the model's dtype, while they fit the budget; beyond it, a state is written to a
file in a temporary directory and read back (memory-mapped) when asked for, so calibration sets
larger than the memory left for them still run, at the cost of disk traffic. With `pin` (a run on a
GPU) the states kept in memory are in pinned host memory, so their copies to and from the GPU are DMA
transfers that need no staging buffer, and a copy to the GPU can be asynchronous.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Hashable

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class ActivationStore:
    def __init__(self, budget_bytes: int, spill_parent: Path | None = None, pin: bool = False):
        self.budget = budget_bytes
        self.spill_parent = spill_parent
        self.pin = pin
        self._memory: dict[Hashable, torch.Tensor] = {}
        self._files: dict[Hashable, Path] = {}
        self._dir: Path | None = None
        self.resident_bytes = 0
        self.spilled_bytes = 0  # written to disk so far

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        self.drop(key)
        tensor = tensor.detach()
        size = tensor.numel() * tensor.element_size()
        if self.resident_bytes + size <= self.budget:
            if self.pin and not tensor.is_pinned():
                tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
            self._memory[key] = tensor.to("cpu")
            self.resident_bytes += size
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="compresscli-activations-", dir=self.spill_parent))
        path = self._dir / f"{len(self._files)}-{abs(hash(key))}.safetensors"
        save_file({"t": tensor.to("cpu").contiguous()}, str(path))
        self._files[key] = path
        self.spilled_bytes += size

    def get(self, key: Hashable) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        with safe_open(str(self._files[key]), framework="pt") as f:
            return f.get_tensor("t")

    def __contains__(self, key: Hashable) -> bool:
        return key in self._memory or key in self._files

    def drop(self, key: Hashable) -> None:
        if key in self._memory:
            tensor = self._memory.pop(key)
            self.resident_bytes -= tensor.numel() * tensor.element_size()
        elif key in self._files:
            self._files.pop(key).unlink(missing_ok=True)

    def close(self) -> None:
        self._memory.clear()
        self._files.clear()
        self.resident_bytes = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
