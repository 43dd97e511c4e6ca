"""Linear / Conv2d / Embedding layers whose weights are read from one shared memory (ROAST, STABLE-RPS).

Weight i of a layer is w_i = lambda * g_i * m[h(i)]: `m` is the memory nn.Parameter shared by every
layer of the group, h and g (slot and sign) are recomputed from the layer's Placement, and lambda is
the layer's fixed scale. The training forms keep the map as buffers and materialise the weight by a
gather (embeddings gather only the rows they look up); autograd's backward of the gather is the
scatter-add into m. The inference forms (inference.py) keep no map at all. Stored per layer: the
scale and the bias; the memory is a shared tensor, stored once; the map is never stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compresscli.codecs.base import register_codec
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import QuantizedValues, Quantizer, shared_shadow
from compresscli.codecs.rps.codec import _ConvLayout, _EmbeddingLayout, _LinearLayout, _SharedWeightCodec
from compresscli.codecs.rps.hashing import Placement
from compresscli.codecs.rps.slot_norms import book_for


class _SharedWeight(_SharedWeightCodec):
    """The training form: the map (slot and sign of every weight) kept as buffers, and the memory book
    that gives the least-squares projection and the STABLE-RPS gradient scaling."""

    index: torch.Tensor
    sign: torch.Tensor

    def _init_weight(self, shape: tuple[int, ...], memory: nn.Parameter | QuantizedValues, memory_name: str,
                     placement: Placement, scale: float, scale_gradients: bool, bias: torch.Tensor | None,
                     counted: bool = True) -> None:
        quantizer = None
        if isinstance(memory, QuantizedValues):  # stored quantized: its shadow and grid, shared as the memory is
            memory, quantizer = shared_shadow(memory, (placement.memory_size,))
        self._init_codec(shape, memory, memory_name, placement, scale, scale_gradients, counted)
        self.register_module("memory_quantizer", quantizer)  # the same Quantizer in every layer sharing the memory
        index, sign = placement.locate(self.weight_shape)
        # the map is derived data: never in state_dict, recomputed on load
        self.register_buffer("index", index.to(memory.device), persistent=False)  # (weight shape) int64
        self.register_buffer("sign", sign.to(memory.device), persistent=False)  # (weight shape) int8, +-1
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().to(memory.device))
        self.book = book_for(memory, placement.memory_size, scale_gradients)
        if counted:
            self.book.add(index, float(self.weight_scale))

    def _memory_values(self) -> torch.Tensor:
        """The memory as the weights read it: rounded to its grid when quantized; its gradient STABLE-RPS scaled."""
        memory = self.book.scaled_memory(self.memory)
        if self.memory_quantizer is None:
            return memory
        return self.memory_quantizer(memory.view(1, -1)).view(-1)

    def _memory_spec(self) -> QuantSpec | None:
        return None if self.memory_quantizer is None else self.memory_quantizer.spec

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        if self.memory_quantizer is None:
            return super().shared_tensors()
        memory = self.memory.view(1, -1)
        return self.memory_quantizer.tensors(self.memory_name, self.memory_quantizer.codes(memory))

    def quantizable_shared(self) -> dict[str, torch.Tensor]:
        """The shared values (key -> (rows, cols)) a quantize stage may put on a grid: the memory, one row."""
        with torch.no_grad():
            return {self.memory_name: self._memory_values().detach().view(1, -1)}

    def quantize_shared_(self, key: str, quantizer: Quantizer, values: torch.Tensor) -> None:
        """The memory on `quantizer`'s grid from now on (the same for every layer sharing it)."""
        with torch.no_grad():
            self.memory.copy_(values.view(-1))
        self.memory_quantizer = quantizer.to(self.memory.device)

    @property
    def weight(self) -> torch.Tensor:
        """The materialised weight (differentiable w.r.t. the memory); read-only."""
        return self._memory_values()[self.index] * (self.sign * self.weight_scale)  # (weight shape)

    def dense_weight(self) -> torch.Tensor:
        return self.weight


@register_codec
class RPSLinear(_LinearLayout, _SharedWeight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., in) -> (..., out)


@register_codec
class RPSConv2d(_ConvLayout, _SharedWeight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, O, H', W')
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


@register_codec
class RPSEmbedding(_EmbeddingLayout, _SharedWeight):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # gather only the looked-up rows: (...) ids -> (..., dim), never the whole table
        memory = self._memory_values()
        out = memory[self.index[ids]] * (self.sign[ids] * self.weight_scale)
        if self.padding_idx is not None:  # as nn.Embedding: the padding row receives no gradient
            out = torch.where((ids == self.padding_idx).unsqueeze(-1), out.detach(), out)
        return out
