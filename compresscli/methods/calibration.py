"""Calibration data as the methods see it, the same in both execution modes.

A stage gets a `Calibrator` on its context. `run()` passes the calibration data through the part of
the model the stage works on, so forward hooks on its layers see their inputs (activation norms,
Hessians); `block_io()` gives, per chunk and block, the inputs the block is fed and the original
block's output on them, for block-wise reconstruction. The whole-model run captures them from the
frozen original with hooks (WholeModelCalibrator); the block-by-block engine computes them from the
block it just read from disk (sequential.UnitCalibrator).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from compresscli.model.tasks import Batch


def first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class BlockIO:
    args: tuple
    kwargs: dict[str, Any]
    target: torch.Tensor  # the original block's output
    token_mask: torch.Tensor | None  # (B, T) real tokens, when the output is (B, T, C) text


class Calibrator(Protocol):
    def run(self, model: nn.Module, stop_after: nn.Module | None = None, limit: int | None = None) -> None:
        """Pass the calibration data (its first `limit` chunks) through the part of `model` the stage
        works on (hooks see the inputs); with `stop_after`, each forward ends once that module has run
        (what comes after it cannot matter to statistics gathered before it)."""

    def block_io(self, block_names: list[str], chunk_size: int) -> list[list[BlockIO]]:
        """Per chunk, per block: the block's inputs and the original block's output on them."""


class StopForward(Exception):
    """Raised after the `stop_after` module of a calibration run: the rest of the forward is skipped."""


@contextmanager
def stopping_after(module: nn.Module | None) -> Iterator[None]:
    if module is None:
        yield
        return

    def stop(*_: Any) -> None:
        raise StopForward

    handle = module.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def token_mask(batch: Batch, output: torch.Tensor) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return mask if mask is not None and output.shape[:2] == mask.shape else None


def split_batches(batches: list[Batch], size: int) -> list[Batch]:
    """Chunks of at most `size` examples; text chunks lose the padding columns no example in them needs."""
    chunks = []
    for batch in batches:
        n = len(next(iter(batch.values())))
        for start in range(0, n, size):
            chunk = {k: v[start:start + size] for k, v in batch.items()}
            mask = chunk.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                used = mask.any(0).nonzero()
                end = int(used.max()) + 1 if len(used) else mask.shape[1]
                chunk = {k: v[:, :end] if v.shape[:2] == mask.shape else v for k, v in chunk.items()}
            chunks.append(chunk)
    return chunks


def move(obj: Any, device: torch.device | str, memo: dict[int, tuple] | None = None,
         dtype: torch.dtype | None = None) -> Any:
    """Tensors inside args/kwargs copied (detached) to `device` (floating-point ones in `dtype` when given: a
    block training in float32 reads what a float16 model recorded), so a block that writes into its input
    cannot alter the cache; caches are dropped, so blocks never append to them."""
    if isinstance(obj, torch.Tensor):
        cast = dtype if dtype is not None and obj.is_floating_point() else obj.dtype
        if memo is None:
            return obj.detach().to(device, cast, copy=True)
        key = id(obj)  # one copy of a tensor several blocks read (the hidden state, the attention mask)
        if key not in memo:
            memo[key] = (obj, obj.detach().to(device, cast, copy=True))
        return memo[key][1]
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(o, device, memo, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: (False if k == "use_cache" else move(v, device, memo, dtype)) for k, v in obj.items()}
    if "Cache" in type(obj).__name__:
        return None
    return obj


@torch.no_grad()
def capture(teacher: nn.Module, block_names: list[str], task, chunks: list[Batch],
            device: torch.device) -> list[list[BlockIO]]:
    """Per chunk, per block: the original block's inputs and output, stored on the CPU."""
    blocks = [teacher.get_submodule(name) for name in block_names]
    captured: list[list[BlockIO]] = []
    for chunk in chunks:
        memo: dict[int, tuple] = {}
        inputs: dict[int, tuple] = {}
        outputs: dict[int, torch.Tensor] = {}
        handles = []
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(
                lambda m, a, kw, i=i: inputs.__setitem__(i, (move(a, "cpu", memo), move(kw, "cpu", memo))),
                with_kwargs=True))
            handles.append(block.register_forward_hook(
                lambda m, a, out, i=i: outputs.__setitem__(i, move(first_tensor(out), "cpu", memo))))
        try:
            task.outputs(teacher.eval(), {k: v.to(device) for k, v in chunk.items()})
        finally:
            for handle in handles:
                handle.remove()
        captured.append([BlockIO(*inputs[i], outputs[i], token_mask(chunk, outputs[i])) for i in range(len(blocks))])
    return captured


class WholeModelCalibrator:
    """Calibration for a model held whole: the model being compressed runs on the batches; block targets
    come from the frozen original (the teacher)."""

    def __init__(self, teacher: nn.Module | None, task, batches: list[Batch], device: torch.device):
        self.teacher, self.task, self.batches, self.device = teacher, task, batches, device

    @torch.no_grad()
    def run(self, model: nn.Module, stop_after: nn.Module | None = None, limit: int | None = None) -> None:
        with stopping_after(stop_after):
            for batch in self.batches[:limit]:
                try:
                    self.task.outputs(model, {k: v.to(self.device) for k, v in batch.items()})
                except StopForward:
                    pass

    def block_io(self, block_names: list[str], chunk_size: int) -> list[list[BlockIO]]:
        if self.teacher is None:
            raise ValueError("block targets need the original model, and none was kept (a bug in the engine)")
        return capture(self.teacher, block_names, self.task, split_batches(self.batches, chunk_size), self.device)
