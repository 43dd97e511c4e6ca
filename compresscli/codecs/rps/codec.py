"""The RPS codec, what both forms of a randomized-parameter-sharing layer share: the memory (a shared
tensor, stored once, as floats or quantized: codecs/quant, params "shared_quant", on a grid over the memory
viewed as one row), the placement that fixes the map (never stored: recomputed from a few integers),
the per-tensor scale and the bias, and the layer layouts (Linear, Conv2d, Embedding).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compresscli.codecs.base import CONV_ARGS, CompressedModule, conv_params
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import QuantizedValues, tensor_names
from compresscli.codecs.rps.hashing import Placement
from compresscli.core.errors import CheckpointError


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
    if placement.get("memory_size") != memory.shape[-1]:
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

    memory: nn.Module  # (M,): a Parameter, or (inference form, quantized) its stored codes
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    scale_gradients: bool

    def _memory_spec(self) -> QuantSpec | None:
        raise NotImplementedError

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
        like = memory.scales if isinstance(memory, QuantizedValues) else memory
        self.register_buffer("weight_scale", torch.tensor(float(scale), dtype=like.dtype).to(like.device))

    def stored_parameters(self) -> int:
        """The scale, the bias, and the whole memory counted once: by the group's first tensor."""
        own = 1 + (self.bias.numel() if self.bias is not None else 0)
        first = self.placement.tensor_index == 0 and self.counted
        return own + (self.placement.memory_size if first else 0)

    def dense_equivalent(self) -> dict[str, torch.Size]:
        return {"weight": torch.Size(self.weight_shape), **self._bias_entry(shape=True)}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight_scale": self.weight_scale.detach(), **self._bias_entry()}

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        return {self.memory_name: self.memory}

    @classmethod
    def expected_shared(cls, params: dict[str, Any]) -> set[str]:
        spec = QuantSpec.from_params(params.get("shared_quant"))
        return {params["memory"]} if spec is None else tensor_names(params["memory"], spec)

    @classmethod
    def expected_tensors(cls, params: dict[str, Any]) -> set[str]:
        return {"weight_scale"} | ({"bias"} if params["bias"] else set())

    def _shared_params(self) -> dict[str, Any]:
        spec = self._memory_spec()
        quant = {} if spec is None else {"shared_quant": spec.to_params()}
        return {"memory": self.memory_name, "placement": self.placement.to_dict(), "counted": self.counted,
                "scale_gradients": self.scale_gradients, "bias": self.bias is not None, **quant}

    @staticmethod
    def _shared_args(tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None, dims: int = 2) -> dict[str, Any]:
        """The constructor's arguments; the memory is the shared Parameter, or (quantized) its stored codes."""
        spec = QuantSpec.from_params(params.get("shared_quant"))
        wanted = {params["memory"]} if spec is None else tensor_names(params["memory"], spec)
        if not shared or not wanted <= set(shared):
            raise ValueError(f"RPS layer needs the shared memory {params['memory']!r}")
        memory = shared.get(params["memory"])
        if spec is not None:  # its size is the placement's, checked before the codes are
            size = params["placement"].get("memory_size") if isinstance(params["placement"], dict) else None
            if type(size) is not int or not 0 < size < 2**40:
                raise CheckpointError("invalid RPS layer: placement needs a memory_size in [1, 2^40)",
                                      "the file is damaged; re-export it")
            memory = QuantizedValues.from_tensors(shared, params["memory"], spec, (1, size), (1, size))
        problem = _stored_problem(tensors, params["placement"], memory, dims)
        if problem:
            raise CheckpointError(f"invalid RPS layer: {problem}", "the file is damaged; re-export it")
        return {"memory": memory, "memory_name": params["memory"],
                "placement": Placement(**params["placement"]), "scale": float(tensors["weight_scale"]),
                "scale_gradients": params["scale_gradients"], "bias": tensors.get("bias"),
                "counted": params.get("counted", True)}

    def extra_repr(self) -> str:
        p = self.placement
        return f"shape={self.weight_shape}, memory={self.memory_name}[{p.memory_size}], mapper={p.mapper}"


# What a layer type adds to either form: its constructor arguments, the weight shape they give, its codec
# params. A form supplies `_init_weight(shape, **shared)` and `forward`.

class _LinearLayout:
    codec = "rps_linear"

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
    codec = "rps_conv2d"

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
    codec = "rps_embedding"

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
