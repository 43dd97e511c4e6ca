"""Reading a checkpoint one block at a time, and carrying batches through its blocks.

`StreamedModel` is the model's skeleton (parameters on the meta device) with everything outside the
repeated blocks read from disk, and each block read when asked for and dropped after: a plain
Hugging Face / timm checkpoint through the key map checked up front, a compresscli output through
its codecs. Streams are batches whose hidden states are kept in an ActivationStore and advanced
block by block (skeleton_forward.py runs the model around the blocks). `stream_outputs` runs a checkpoint
of any size within the memory of one block plus what lies outside the blocks.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from compresscli.engine.activations import ActivationStore
from compresscli.engine.read_ahead import ReadAhead
from compresscli.model.architecture import Block, detect
from compresscli.engine.skeleton_forward import BlockStreamer, ChunkCalls
from compresscli.io.checkpoint import Checkpoint
from compresscli.core.errors import CompressError
from compresscli.io.native import tensors_to_model
from compresscli.io.source import Source, assign_tensors, check_fit, conv1d_to_linear, skeleton_of
from compresscli.model.tasks import Task, task_for


class StreamedModel:
    """A checkpoint read one block at a time: the skeleton, with everything outside the blocks loaded,
    and `load_block(i)` / `free_block(i)` for the blocks (plain or compressed sources alike; compressed
    layers in their inference form, or with `trainable` their training form, to compress further)."""

    def __init__(self, source: Source, dtype: torch.dtype | None, device: torch.device, trainable: bool = False,
                 read_ahead: bool | None = None):
        self.source, self.dtype, self.device, self.trainable = source, dtype, device, trainable
        # On a GPU the next blocks are read from disk into pinned host memory while the current one computes
        # (read_ahead.py); on the CPU both would compete for the same cores and memory, so blocks are read when asked.
        cuda = device.type == "cuda"
        self.read_ahead = ReadAhead(source.index, pin=cuda and torch.cuda.is_available()) \
            if (cuda if read_ahead is None else read_ahead) else None
        self.index = self.read_ahead or source.index
        self.model = skeleton_of(source)
        self.arch = detect(self.model)
        blocks = self.arch.blocks
        if not blocks:
            raise CompressError(f"{source.name}: no repeated blocks were found, so it cannot be read block by block",
                                "drop --sequential (the whole-model path needs no blocks)")
        if len({b.stage for b in blocks}) > 1:
            raise CompressError(f"{source.name}: its blocks sit in {len({b.stage for b in blocks})} stages of "
                                "different widths, with layers between them", "drop --sequential for this model")
        self.blocks: list[Block] = blocks
        container_name = blocks[0].name.rpartition(".")[0]
        self.container = self.model.get_submodule(container_name) if container_name else self.model
        self.skeletons = list(self.container)  # put back when a block is freed
        self.prefixes = tuple(b.name + "." for b in blocks)
        self.shared: dict[str, nn.Parameter] = {}  # compressed sources: tensors several blocks read
        self.key_map = None if source.kind == "compressed" else \
            check_fit(self.model, source.index, source.name, strict=source.kind == "timm")
        self.task: Task = task_for(source.model_kind, self.model, source.pooling)
        self._load_outer()

    def outside_blocks(self, name: str) -> bool:
        return not (name + ".").startswith(self.prefixes)

    def _load_outer(self) -> None:
        if self.key_map is None:
            tensors_to_model(self.model, self.index, self.source.name, self.dtype,
                             include=self.outside_blocks, shared_cache=self.shared, trainable=self.trainable)
        else:
            keys = [k for k in self.key_map if self.outside_blocks(k)]
            read = self.index.read([self.key_map[k] for k in keys], self.dtype)
            assign_tensors(self.model, {k: read[self.key_map[k]] for k in keys})
            conv1d_to_linear(self.model, exclude=self.prefixes)
        for module_name, module in self.model.named_modules():
            if self.outside_blocks(module_name) or not module_name:
                for key, tensor in list(module._parameters.items()) + list(module._buffers.items()):
                    if tensor is not None and not tensor.is_meta and tensor.device != self.device:
                        store = module._parameters if key in module._parameters else module._buffers
                        moved = tensor.to(self.device)
                        store[key] = nn.Parameter(moved, tensor.requires_grad) if key in module._parameters else moved

    def load_block(self, i: int) -> nn.Module:
        """Block i read from disk into the model (its weights in the run dtype, on the run device)."""
        name = self.blocks[i].name
        self.container[i] = copy.deepcopy(self.skeletons[i])
        if self.key_map is None:
            tensors_to_model(self.model, self.index, self.source.name, self.dtype,
                             include=lambda n: (n + ".").startswith(name + "."), shared_cache=self.shared,
                             trainable=self.trainable)
        else:
            keys = [k for k in self.key_map if k.startswith(name + ".")]
            read = self.index.read([self.key_map[k] for k in keys], self.dtype)
            assign_tensors(self.container[i], {k[len(name) + 1:]: read[self.key_map[k]] for k in keys})
            conv1d_to_linear(self.container[i])
        return self.container[i].to(self.device).eval()

    def free_block(self, i: int) -> None:
        self.container[i] = self.skeletons[i]

    def prefetch(self, blocks: list[int]) -> None:
        """Start reading `blocks` in the background (when reading ahead; else nothing happens)."""
        if self.read_ahead is None:
            return
        prefixes = tuple(self.blocks[i].name + "." for i in blocks if 0 <= i < len(self.blocks))
        if self.key_map is None:
            names = [n for n in self.source.index.names() if n.startswith(prefixes)]
        else:
            names = [self.key_map[k] for k in self.key_map if k.startswith(prefixes)]
        self.read_ahead.start(names, self.dtype)

    def close(self) -> None:
        if self.read_ahead is not None:
            self.read_ahead.close()

    def streamer(self) -> BlockStreamer:
        return BlockStreamer(self.model, self.container, [b.name for b in self.blocks], self.task.outputs, self.device)

    def as_checkpoint(self) -> Checkpoint:
        """A Checkpoint view (for data preparation) whose model is the skeleton."""
        return Checkpoint(self.model, self.source.model_kind, self.source.config, self.source.name,
                          directory=self.source.directory, file_bytes=self.source.file_bytes, source=self.source)


@dataclass
class Stream:
    """Batches carried through the blocks: their recorded calls, and where their hidden states live."""

    key: str
    batches: list[dict[str, torch.Tensor]]
    calls: list[ChunkCalls]


def capture_streams(streamer: BlockStreamer, store: ActivationStore, named: dict[str, list[dict]],
                    aliases: dict[str, str]) -> dict[str, Stream]:
    """Run every batch up to the first block; each stream's hidden states go into `store`. An alias
    starts as a copy of another stream (the original and compressed paths of the same batches)."""
    streams = {}
    for key, batches in named.items():
        calls = [streamer.capture(batch) for batch in batches]
        for c, chunk in enumerate(calls):
            store.put((key, c), chunk.hidden)
            chunk.hidden = None
        streams[key] = Stream(key, batches, calls)
    for alias, key in aliases.items():
        for c in range(len(streams[key].calls)):
            store.put((alias, c), store.get((key, c)).clone())
        streams[alias] = Stream(alias, streams[key].batches, streams[key].calls)
    return streams


def advance(streamer: BlockStreamer, store: ActivationStore, stream: Stream, block: nn.Module, index: int,
            source_key: str | None = None, target_key: str | None = None) -> None:
    """Pass a stream's hidden states through block `index` (from `source_key`, into `target_key`;
    by default the stream's own states are replaced)."""
    for c, chunk in enumerate(stream.calls):
        hidden = store.get((source_key or stream.key, c))
        store.put((target_key or stream.key, c), streamer.run_block(block, index, chunk, hidden))


def stream_outputs(source: Source, batches: list[dict[str, torch.Tensor]], dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu",
                   visit: Callable[[nn.Module, Callable[[str], bool]], None] | None = None) -> list[torch.Tensor]:
    """The model's task outputs (logits, hidden states) on `batches`, reading one block at a time: a
    checkpoint of any size runs within the memory of one block plus what lies outside the blocks.
    `visit(model, include)` is called with what is loaded, once for everything outside the blocks and once
    per block (`include` accepting the names that belong to it), before it runs (the reload check)."""
    device = torch.device(device)
    streamed = StreamedModel(source, dtype, device)
    streamer = streamed.streamer()
    store = ActivationStore(budget_bytes=2**62, pin=streamed.read_ahead is not None and streamed.read_ahead.pin)
    try:
        if visit is not None:
            visit(streamed.model, streamed.outside_blocks)
        probe = streamer.capture({k: v[:1] for k, v in batches[0].items()}, blocks=1)
        streamer.learn_output(streamed.load_block(0), probe)
        stream = capture_streams(streamer, store, {"s": batches}, {})["s"]
        for i in range(len(streamed.blocks)):
            block = streamed.load_block(i)
            streamed.prefetch([i + 1])
            if visit is not None:
                prefix = streamed.blocks[i].name + "."
                visit(streamed.model, lambda n, prefix=prefix: (n + ".").startswith(prefix))
            advance(streamer, store, stream, block, i)
            streamed.free_block(i)
        return [streamer.finish(batch, store.get(("s", c))).float().cpu() for c, batch in enumerate(batches)]
    finally:
        store.close()
        streamed.close()
