"""Running a model one block at a time, with only that block's weights in memory.

The model's own forward computes everything around the blocks (embeddings, masks, rotary tables,
the final norm and head), so nothing here knows a family. During a "skeleton forward" every block
is replaced by a stub: the stubs record what the model passes each block (the hidden state, and
the masks / position embeddings it computed once), return the hidden state unchanged, and stop the
forward at the last block (capture), or hand the model a final hidden state computed block by block
elsewhere (finish). Between the two, the caller runs each real block on the recorded inputs.

This assumes what every decoder/encoder stack of transformers and timm does: the blocks of one
container are called in order, each on the previous one's output. A model that changes the hidden
state between blocks is detected (the next stub would not receive what the previous returned) and
refused, rather than streamed wrongly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from compresscli.core.errors import CompressError
from compresscli.methods.calibration import first_tensor
from compresscli.model.tasks import Batch
HIDDEN_KWARGS = ("hidden_states", "x", "hidden_state")


class _Stop(Exception):
    """Raised by the last stub: everything after the blocks is not needed while capturing."""


@dataclass
class BlockCall:
    """What the model passes one block, besides the hidden state: the other positional arguments and
    the keyword arguments, as recorded (tensors detached, on the CPU, shared between blocks)."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_at: int | str  # where the hidden state goes: a positional index or a keyword

    def inputs(self, hidden: torch.Tensor, device: torch.device) -> tuple[tuple, dict[str, Any]]:
        args = list(to_device(self.args, device))
        kwargs = to_device(self.kwargs, device)
        if isinstance(self.hidden_at, int):
            args.insert(self.hidden_at, hidden)
        else:
            kwargs[self.hidden_at] = hidden
        return tuple(args), kwargs


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Tensors in `obj` moved to `device`; to a GPU asynchronously (a no-op wait from pageable memory, a DMA
    transfer overlapping the host's work from the pinned memory the activation store keeps on CUDA runs)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=torch.device(device).type == "cuda")
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _record(obj: Any, memo: dict[int, Any]) -> Any:
    """Detached CPU copies of the tensors in args/kwargs, one per distinct tensor (every block reads
    the same mask); KV caches are dropped and use_cache turned off, so blocks never append to them."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.detach().to("cpu", copy=True))
        return memo[id(obj)][1]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_record(o, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: (False if k == "use_cache" else _record(v, memo)) for k, v in obj.items()}
    if "Cache" in type(obj).__name__:
        return None
    return obj


def split_hidden(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict[str, Any], int | str]:
    """(hidden state, other args, other kwargs, where the hidden state was)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], args[1:], dict(kwargs), 0
    for key in HIDDEN_KWARGS:
        if isinstance(kwargs.get(key), torch.Tensor):
            rest = dict(kwargs)
            return rest.pop(key), tuple(args), rest, key
    raise CompressError("a block was called without a hidden-state tensor as its first argument",
                        "this model cannot be streamed block by block; drop --sequential")


class _Stub(nn.Module):
    """Stands in for block `index` during a skeleton forward."""

    def __init__(self, index: int, streamer: "BlockStreamer"):
        super().__init__()
        self.index = index
        self.streamer = streamer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.streamer._stub_call(self.index, args, kwargs)


@dataclass
class ChunkCalls:
    """One batch's recorded calls: the first block's hidden input and each block's other inputs."""

    hidden: torch.Tensor  # (B, T, C) or (B, N, C): the input of the first block
    calls: list[BlockCall] = field(default_factory=list)


class BlockStreamer:
    """Skeleton forwards over one container of blocks (see the module docstring)."""

    def __init__(self, model: nn.Module, container: nn.Module, block_names: list[str],
                 run_model: Callable[[nn.Module, Batch], Any], device: torch.device):
        self.model = model
        self.container = container
        self.block_names = block_names
        self.run_model = run_model  # task.outputs: how the model is called on a batch
        self.device = device
        self.output_template: Any = None  # what a real block returns, learnt by `learn_output`
        self._mode = "capture"
        self._stop_at = len(block_names) - 1
        self._memo: dict[int, Any] = {}
        self._recorded: ChunkCalls | None = None
        self._final: torch.Tensor | None = None
        self._last_output: Any = None

    # ------------------------------------------------------------------ the stubs

    def _stub_call(self, index: int, args: tuple, kwargs: dict[str, Any]) -> Any:
        hidden, rest_args, rest_kwargs, at = split_hidden(args, kwargs)
        if index > 0 and self._last_output is not None and hidden is not self._last_output:
            raise CompressError(f"the model changes the hidden state between {self.block_names[index - 1]} and "
                                f"{self.block_names[index]}", "this model cannot be streamed block by block; "
                                "drop --sequential (or raise --max-memory)")
        if self._mode == "capture":
            if index == 0:
                self._recorded = ChunkCalls(hidden.detach().to("cpu", copy=True))
            self._recorded.calls.append(BlockCall(_record(rest_args, self._memo), _record(rest_kwargs, self._memo), at))
            if index == self._stop_at:
                raise _Stop
        out = self._final.to(hidden.device) if self._mode == "finish" and index == len(self.block_names) - 1 else hidden
        self._last_output = out
        return self.shape_output(out)

    def shape_output(self, hidden: torch.Tensor) -> Any:
        """`hidden` in the structure the real blocks return (a tensor, or a tuple led by it)."""
        if self.output_template is None or isinstance(self.output_template, torch.Tensor):
            return hidden
        return (hidden, *self.output_template[1:])

    def _swap_in_stubs(self) -> list[nn.Module]:
        originals = list(self.container)
        for i in range(len(originals)):
            self.container[i] = _Stub(i, self)
        return originals

    def _restore(self, originals: list[nn.Module]) -> None:
        for i, block in enumerate(originals):
            self.container[i] = block

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def capture(self, batch: Batch, blocks: int | None = None) -> ChunkCalls:
        """Run the model on `batch` up to its last block (or its first `blocks`); what each block is passed."""
        self._mode, self._memo, self._recorded, self._last_output = "capture", {}, None, None
        self._stop_at = (blocks or len(self.block_names)) - 1
        originals = self._swap_in_stubs()
        try:
            self.run_model(self.model, {k: v.to(self.device) for k, v in batch.items()})
        except _Stop:
            pass
        finally:
            self._restore(originals)
            self._memo = {}
        if self._recorded is None or len(self._recorded.calls) != (blocks or len(self.block_names)):
            raise CompressError("the model did not call each of its blocks once, in order",
                                "this model cannot be streamed block by block; drop --sequential")
        return self._recorded

    @torch.no_grad()
    def finish(self, batch: Batch, final_hidden: torch.Tensor) -> Any:
        """The model's output on `batch` when its blocks produce `final_hidden` (the norm and head run)."""
        self._mode, self._final, self._last_output = "finish", final_hidden, None
        originals = self._swap_in_stubs()
        try:
            return self.run_model(self.model, {k: v.to(self.device) for k, v in batch.items()})
        finally:
            self._restore(originals)
            self._final = None

    def learn_output(self, block: nn.Module, chunk: ChunkCalls) -> None:
        """Run a real block once, to learn the structure blocks return (tensor or tuple)."""
        with torch.no_grad():
            args, kwargs = chunk.calls[0].inputs(chunk.hidden.to(self.device), self.device)
            self.output_template = block(*args, **kwargs)
        if isinstance(self.output_template, (tuple, list)):
            self.output_template = tuple(o.detach().cpu() if isinstance(o, torch.Tensor) else o
                                         for o in self.output_template)

    def run_block(self, block: nn.Module, index: int, chunk: ChunkCalls, hidden: torch.Tensor,
                  grad: bool = False) -> torch.Tensor:
        """Block `index` on `hidden` with the inputs recorded for this chunk; the output hidden state."""
        with torch.set_grad_enabled(grad):
            args, kwargs = chunk.calls[index].inputs(to_device(hidden, self.device), self.device)
            return first_tensor(block(*args, **kwargs))
