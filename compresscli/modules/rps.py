"""Linear / Conv2d / Embedding layers whose weights are read from one shared memory (ROAST, STABLE-RPS).

Weight i of a layer is w_i = lambda * g_i * m[h(i)]: `m` is the memory nn.Parameter shared by every
layer of the group, h and g (slot and sign) are recomputed from the layer's Placement, and lambda is
the layer's fixed scale. The training forms keep the map as buffers and materialise the weight by a
gather (embeddings gather only the rows they look up); autograd's backward of the gather is the
scatter-add into m. The inference forms (rps_compact.py) keep no map at all. Stored per layer: the
scale and the bias; the memory is a shared tensor, stored once; the map is never stored.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .base import CONV_ARGS, Codec, CompressedModule, conv_params, register_codec
from .rps_hash import Placement
from .rps_memory import book_for


_PLACEMENT_INTS = ("memory_size", "seed", "offset", "tensor_index", "block_k", "block_n", "block_z")


def _stored_problem(tensors: dict[str, torch.Tensor], placement: Any, memory: torch.Tensor, dims: int) -> str | None:
    """Why a stored RPS layer cannot be rebuilt, or None. The map is recomputed from the placement's
    integers, so they are checked before it is: a zero tile size would divide by zero, an offset near
    2^63 would wrap the int64 positions, a 4-D weight cannot be tiled as a linear one."""
    if not isinstance(placement, dict) or not set(placement) <= set(Placement.__dataclass_fields__):
        return f"placement must be an object with a Placement's fields, got {str(placement)[:60]}"
    if not all(type(placement.get(k, 1)) is int for k in _PLACEMENT_INTS):
        return f"placement must hold integers for {', '.join(_PLACEMENT_INTS)}"
    blocks = [placement.get(k, 32) for k in ("block_k", "block_n", "block_z")]
    if not 0 <= placement.get("offset", 0) < 2**62 or min(blocks) < 1:
        return "placement needs an offset in [0, 2^62) and tile sizes of at least 1"
    layout = placement.get("layout", "linear")
    if layout not in ("linear", "conv", "embedding") or (layout == "linear" and dims != 2):  # roast tiles it 2-D
        return f"placement layout {str(layout)[:20]!r} does not fit a {dims}-D weight"
    if placement.get("memory_size") != memory.numel():
        return f"the placement is for {placement.get('memory_size')} memory slots, the memory holds {memory.numel()}"
    scale, bias = tensors["weight_scale"], tensors.get("bias")
    if scale.numel() != 1 or not scale.is_floating_point():
        return f"weight_scale must be one float, got {scale.dtype} {list(scale.shape)}"
    if bias is not None and (bias.dim() != 1 or not bias.is_floating_point()):
        return f"bias must be a 1-D float tensor, got {bias.dtype} {list(bias.shape)}"
    return None


class _SharedWeightCodec(CompressedModule):
    """What every RPS layer shares, in both forms: the memory, the placement, the scale, the bias, and the
    codec plumbing (stored per layer: the scale and the bias; the memory once, as a shared tensor)."""

    memory: nn.Parameter
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    scale_gradients: bool

    def _init_codec(self, shape: tuple[int, ...], memory: nn.Parameter, memory_name: str, placement: Placement,
                    scale: float, scale_gradients: bool, counted: bool) -> None:
        self.memory = memory  # (M,), the same nn.Parameter object in every layer sharing it
        self.memory_name = memory_name  # model-wide name of the shared tensor
        self.placement = placement
        self.weight_shape = tuple(shape)
        # False for the second reader of a tied tensor: it must not add its weights to the slot sums again
        self.counted = counted
        self.scale_gradients = scale_gradients
        # the scale as stored (memory dtype), so the slot sums are the same after compression and after loading
        self.register_buffer("weight_scale", torch.tensor(float(scale), dtype=memory.dtype).to(memory.device))

    def stored_parameters(self) -> int:
        """The scale, the bias, and the whole memory counted once: by the group's first tensor."""
        own = 1 + (self.bias.numel() if self.bias is not None else 0)
        first = self.placement.tensor_index == 0 and self.counted
        return own + (self.memory.numel() if first else 0)

    def dense_equivalent(self) -> dict[str, torch.Size]:
        return {"weight": torch.Size(self.weight_shape), **self._bias_entry(shape=True)}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight_scale": self.weight_scale.detach(), **self._bias_entry()}

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        return {self.memory_name: self.memory}

    @classmethod
    def expected_shared(cls, params: dict[str, Any]) -> set[str]:
        return {params["memory"]}

    @classmethod
    def expected_tensors(cls, params: dict[str, Any]) -> set[str]:
        return {"weight_scale"} | ({"bias"} if params["bias"] else set())

    def _shared_params(self) -> dict[str, Any]:
        return {"memory": self.memory_name, "placement": self.placement.to_dict(), "counted": self.counted,
                "scale_gradients": self.scale_gradients, "bias": self.bias is not None}

    @staticmethod
    def _shared_args(tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None, dims: int = 2) -> dict[str, Any]:
        if not shared or params["memory"] not in shared:
            raise ValueError(f"RPS layer needs the shared memory {params['memory']!r}")
        problem = _stored_problem(tensors, params["placement"], shared[params["memory"]], dims)
        if problem:
            raise CheckpointError(f"invalid RPS layer: {problem}", "the file is damaged; re-export it")
        return {"memory": shared[params["memory"]], "memory_name": params["memory"],
                "placement": Placement(**params["placement"]), "scale": float(tensors["weight_scale"]),
                "scale_gradients": params["scale_gradients"], "bias": tensors.get("bias"),
                "counted": params.get("counted", True)}

    def extra_repr(self) -> str:
        p = self.placement
        return f"shape={self.weight_shape}, memory={self.memory_name}[{p.memory_size}], mapper={p.mapper}"


class _SharedWeight(_SharedWeightCodec):
    """The training form: the map (slot and sign of every weight) kept as buffers, and the memory book
    that gives the least-squares projection and the STABLE-RPS gradient scaling."""

    index: torch.Tensor
    sign: torch.Tensor

    def _init_weight(self, shape: tuple[int, ...], memory: nn.Parameter, memory_name: str, placement: Placement,
                     scale: float, scale_gradients: bool, bias: torch.Tensor | None, counted: bool = True) -> None:
        self._init_codec(shape, memory, memory_name, placement, scale, scale_gradients, counted)
        index, sign = placement.locate(self.weight_shape)
        # the map is derived data: never in state_dict, recomputed on load
        self.register_buffer("index", index.to(memory.device), persistent=False)  # (weight shape) int64
        self.register_buffer("sign", sign.to(memory.device), persistent=False)  # (weight shape) int8, +-1
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().to(memory.device))
        self.book = book_for(memory, placement.memory_size, scale_gradients)
        if counted:
            self.book.add(index, float(self.weight_scale))

    @property
    def weight(self) -> torch.Tensor:
        """The materialised weight (differentiable w.r.t. the memory); read-only."""
        memory = self.book.scaled_memory(self.memory)
        return memory[self.index] * (self.sign * self.weight_scale)  # (weight shape)

    def dense_weight(self) -> torch.Tensor:
        return self.weight


# What a layer type adds to either form: its constructor arguments, the weight shape they give, its codec
# params. A form supplies `_init_weight(shape, **shared)` and `forward`.

class _LinearLayout:
    codec = Codec.RPS_LINEAR

    def __init__(self, in_features: int, out_features: int, **shared: Any):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_weight((out_features, in_features), **shared)

    def codec_params(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, **self._shared_params()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None):
        return cls(params["in_features"], params["out_features"], **cls._shared_args(tensors, params, shared))


class _ConvLayout:
    codec = Codec.RPS_CONV2D

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int] | str, dilation: tuple[int, int], groups: int, **shared: Any):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self._init_weight((out_channels, in_channels // groups, *self.kernel_size), **shared)

    def codec_params(self) -> dict[str, Any]:
        return {**conv_params(self), **self._shared_params()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None):
        return cls(*(params[n] for n in CONV_ARGS), **cls._shared_args(tensors, params, shared, dims=4))


class _EmbeddingLayout:
    codec = Codec.RPS_EMBEDDING

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, **shared: Any):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_weight((num_embeddings, embedding_dim), **shared)

    def codec_params(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, **self._shared_params()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None):
        return cls(params["num_embeddings"], params["embedding_dim"], params["padding_idx"],
                   **cls._shared_args(tensors, params, shared))


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
        memory = self.book.scaled_memory(self.memory)
        out = memory[self.index[ids]] * (self.sign[ids] * self.weight_scale)
        if self.padding_idx is not None:  # as nn.Embedding: the padding row receives no gradient
            out = torch.where((ids == self.padding_idx).unsqueeze(-1), out.detach(), out)
        return out
