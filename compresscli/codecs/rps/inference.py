"""The inference forms of the RPS layers: the shared memory, one scale per tensor and the bias, nothing else.

No map is kept: a forward computes the weight it needs from the memory and the placement's integers,
by the compiled CPU kernel (the hash is a few integer operations per weight, see kernels/cpu_source.py)
or by Placement.locate_rows in PyTorch elsewhere, and drops it when the call returns. Large layers are
computed ROW_CHUNK weights at a time. `cache_weights_()` keeps the computed weight instead (what
`compresscli.load(DIR, cache="weights")` asks for): faster, at the dense layer's bytes. On CUDA that is the
default: a layer computes its weight at its first call there and keeps it (rehashing every weight per call
would cost the GPU more than the bytes it saves; `cache_weights_(False)` declines).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compresscli.kernels import cpu, dispatch
from compresscli.codecs.base import register_inference_form
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import QuantizedValues
from compresscli.codecs.rps.codec import _ConvLayout, _EmbeddingLayout, _LinearLayout, _SharedWeightCodec

ROW_CHUNK = 1 << 22  # weights computed at once in a forward (16 MiB in float32), so a huge layer never is whole


class _CompactShared(_SharedWeightCodec):
    cached_weight: torch.Tensor | None
    cache_on_gpu = True  # cache_weights_(False) turns it off for this layer

    def _init_weight(self, shape: tuple[int, ...], memory: nn.Parameter, memory_name: str, placement: Any,
                      scale: float, scale_gradients: bool, bias: torch.Tensor | None, counted: bool = True) -> None:
        self._init_codec(shape, memory, memory_name, placement, scale, scale_gradients, counted)
        self.register_buffer("bias", None if bias is None else bias.to(self.weight_scale.device))
        self.register_buffer("cached_weight", None, persistent=False)
        # the kernel's integers, computed once (not a buffer: they stay on the CPU whatever device the layer is on)
        self.__dict__["_spec"] = torch.tensor(placement.kernel_spec(self.weight_shape), dtype=torch.int64)

    def _memory_values(self) -> torch.Tensor:
        """The memory (M,) as floats: as held, or dequantized for the call."""
        if isinstance(self.memory, QuantizedValues):
            return self.memory.dequantize().view(-1)
        return self.memory.detach()

    def _memory_spec(self) -> QuantSpec | None:
        return self.memory.spec if isinstance(self.memory, QuantizedValues) else None

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        if isinstance(self.memory, QuantizedValues):
            return self.memory.tensors(self.memory_name)
        return super().shared_tensors()

    def weight_rows(self, start: int, stop: int, memory: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of the weight, (stop - start, *weight_shape[1:]), computed now from `memory` (the
        memory's float values: pass them when computing many slices, so a quantized memory is dequantized once)."""
        memory, shape = self._memory_values() if memory is None else memory, self.weight_shape
        if memory.device.type == "cpu" and memory.dtype in cpu.DTYPES and cpu.available():
            rows = cpu.rps_weight(memory, self._spec, float(self.weight_scale), start, stop, math.prod(shape[1:]))
            return rows.view(stop - start, *shape[1:])
        index, sign = self.placement.locate_rows(shape, torch.arange(start, stop, device=memory.device))
        return memory[index] * (sign * self.weight_scale)

    def dense_weight(self) -> torch.Tensor:
        if self.cached_weight is not None:
            return self.cached_weight
        return self.weight_rows(0, self.weight_shape[0])

    def _prepare(self) -> None:
        """Before a call: on CUDA, compute the weight once and keep it (see the module docstring)."""
        if self.cached_weight is None and self.cache_on_gpu and self.weight_scale.is_cuda:
            self.cache_weights_()

    @property
    def weight(self) -> torch.Tensor:
        """The weight, computed on demand for code that reads `.weight` (kept only when cached)."""
        return self.dense_weight()

    def cache_weights_(self, on: bool = True) -> "_CompactShared":
        """Keep the computed weight (trading the dense layer's bytes for speed), or drop it."""
        self.cached_weight = None
        self.__dict__["cache_on_gpu"] = on
        if on:
            self.cached_weight = self.dense_weight()
        return self


@register_inference_form
class CompactRPSLinear(_LinearLayout, _CompactShared):
    last_path: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._prepare()
        if self.cached_weight is not None:
            self.__dict__["last_path"] = "cached"
            return F.linear(x, self.cached_weight, self.bias)  # (..., in) -> (..., out)
        lead, memory = x.shape[:-1], self._memory_values()
        done = dispatch.rps_mm(x.reshape(-1, self.in_features), memory, self._spec,
                               float(self.weight_scale), self.bias, self.out_features, self.in_features)
        if done is not None:  # the compiled kernels, by their measured thresholds
            self.__dict__["last_path"] = done[1]
            return done[0].view(*lead, self.out_features)
        self.__dict__["last_path"] = "rps"
        step = max(1, ROW_CHUNK // self.in_features)
        if step >= self.out_features:
            return F.linear(x, self.weight_rows(0, self.out_features, memory), self.bias)
        parts = [F.linear(x, self.weight_rows(r, min(r + step, self.out_features), memory),
                          None if self.bias is None else self.bias[r:r + step])
                 for r in range(0, self.out_features, step)]
        return torch.cat(parts, dim=-1)


@register_inference_form
class CompactRPSConv2d(_ConvLayout, _CompactShared):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._prepare()
        # (B, C, H, W) -> (B, O, H', W')
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


@register_inference_form
class CompactRPSEmbedding(_EmbeddingLayout, _CompactShared):
    """Computes only the rows it looks up: (...) ids -> (..., dim), never the whole table."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self._prepare()
        if self.cached_weight is not None:
            return F.embedding(ids, self.cached_weight)
        index, sign = self.placement.locate_rows(self.weight_shape, ids.to(self.weight_scale.device))
        return self._memory_values()[index] * (sign * self.weight_scale)
