"""`compress bench --decode`, measured in one process: how fast a causal LM generates token by token with
its KV cache, how long a prompt's prefill takes, the bytes each token reads, and the kernel each layer ran.

Batch-1 decoding reads every weight once per token, so its speed is bounded by the machine's read
bandwidth divided by those bytes (the "bytes limit"); a compressed model should approach its own limit
the way the dense model approaches its. `decode_here` is run by decode_compare.py in a fresh process per
model, so that a model's load peak and resident set are its own.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any

import torch
from torch import nn

from compresscli.commands.bench import layer_paths

PROMPT_TOKENS = 16


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second this machine reads with `threads` threads: the best of `repeats` sums of a float32
    buffer of `gib` GiB (far beyond the caches), each reading it once."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(int(gib * 2**30) // 4)
        buffer.sum()  # pages touched, threads started
        best = min(_seconds(buffer.sum) for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)
    return buffer.numel() * 4 / best


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once: what it holds resident."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}
    return sum(storages.values())


class ReadCounter:
    """Bytes the weights read during forwards, counted by hooks on every module that holds tensors (a
    compressed layer with everything under it): a layer's own tensors once per call; a tensor it shares with
    others (a FiPS base U) once per distinct input, as the kernels read it; an embedding only the rows it
    looks up; an RPS layer one memory slot per weight (what it reads, though its memory may be far smaller
    and stay in cache)."""

    def __init__(self, model: nn.Module):
        self.bytes = 0
        self._seen: set[tuple[int, int]] = set()
        self._hooks = []
        inside_compressed: set[str] = set()
        for name, module in model.named_modules():
            if any(name.startswith(p + ".") for p in inside_compressed):
                continue  # counted with the compressed layer holding it (its forward runs them as methods)
            if hasattr(module, "to_tensors"):
                inside_compressed.add(name)
                self._hooks.append(module.register_forward_hook(self._count))
            elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
                self._hooks.append(module.register_forward_hook(self._count))

    def _count(self, module: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        compressed = hasattr(module, "to_tensors")
        tensors = [*module.parameters(recurse=compressed), *module.buffers(recurse=compressed)]
        if isinstance(module, nn.Embedding) or getattr(module, "codec", None) == "rps_embedding":
            looked_up = first.numel() if first is not None else 0
            self.bytes += looked_up * module.embedding_dim * tensors[0].element_size()
            return
        if getattr(module, "cached_weight", None) is None and hasattr(module, "placement"):  # RPS: a slot per weight
            self.bytes += int(torch.Size(module.weight_shape).numel()) * module.memory.element_size()
            tensors = [t for t in tensors if t is not module.memory]
        shared = {id(t) for t in module.shared_tensors().values()} if compressed else set()
        for tensor in tensors:
            if id(tensor) in shared:  # once per distinct input
                key = (tensor.untyped_storage().data_ptr(), id(first))
                if key in self._seen:
                    continue
                self._seen.add(key)
            self.bytes += tensor.numel() * tensor.element_size()

    def remove(self) -> None:
        """Stop counting: the hooks come off the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _prompt(model: nn.Module, batch: int, tokens: int) -> torch.Tensor:
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    return torch.randint(min(999, vocab - 1), vocab, (batch, tokens), generator=generator)


@torch.no_grad()
def decode_speed(model: nn.Module, batch: int, steps: int, warmup: int = 2) -> dict[str, Any]:
    """Greedy generation with the KV cache after a PROMPT_TOKENS-token prompt: tokens/s over `steps` timed
    steps (median step) after `warmup` untimed ones and one untimed step that counts the bytes read, and
    the kernel each layer ran at this batch."""
    out = model(input_ids=_prompt(model, batch, PROMPT_TOKENS), use_cache=True)

    def step() -> float:
        nonlocal out
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1): greedy
        start = time.perf_counter()
        out = model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    counter = ReadCounter(model)
    step()
    counter.remove()
    step_s = statistics.median(step() for _ in range(steps))
    paths = layer_paths(model)
    return {"batch": batch, "steps": steps, "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s,
            "bytes_read_per_step": counter.bytes, "paths": dict(Counter(paths.values())), "layer_paths": paths}


@torch.no_grad()
def prefill_time(model: nn.Module, tokens: int, repeats: int = 3) -> dict[str, Any]:
    """Seconds one forward over a `tokens`-token prompt takes (batch 1, median of `repeats` after one untimed)."""
    ids = _prompt(model, 1, tokens)
    model(input_ids=ids, use_cache=True)
    seconds = statistics.median(_seconds(lambda: model(input_ids=ids, use_cache=True)) for _ in range(repeats))
    return {"tokens": tokens, "ms": seconds * 1e3, "paths": dict(Counter(layer_paths(model).values()))}
