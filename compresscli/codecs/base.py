"""The codec contract shared by every compressed layer, and the registry that rebuilds them on load."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from compresscli.core.registry import Registry


class CompressedModule(nn.Module):
    """A layer with an exact, pure storage codec.

    `to_tensors()` returns the tensors to store (names relative to the layer) and `codec_params()`
    the JSON-able parameters needed to rebuild it; `from_tensors()` inverts both. Neither mutates
    the module, and the rebuilt layer computes exactly what the original computed.

    Each codec has two forms that read and write the same tensors: the training form (registered with
    `register_codec`: dense weights and masks, trainable memories, what recovery and further
    compression work on) and the inference form (`register_inference_form`: the tensors as stored, run
    by the kernels, resident bytes those of the file plus O(rows)). Converting one into the other is
    `to_tensors` then the other's `from_tensors` (compresscli.codecs.forms), so it is exact by construction.
    """

    codec: ClassVar[str]  # the name `__metadata__` records per layer; the registries are keyed by it
    # The formats `compress export` can write this codec in besides "dense" (which every codec can: its
    # dense_tensors). compresscli.interop asks the codec rather than keeping a list of its own.
    export_formats: ClassVar[frozenset[str]] = frozenset()
    # The newest layer version this build reads. Version 2 layers may store their values quantized (params
    # "quant" / "shared_quant", codecs/quant); a layer is written as version 1 unless it does, so files
    # without quantization stay readable by builds before it.
    codec_version: ClassVar[int] = 2
    QUANT_PARAMS: ClassVar[tuple[str, ...]] = ("quant", "shared_quant")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def stored_version(self) -> int:
        """The version this layer is written as: 2 when its values are quantized, else 1."""
        return 2 if any(k in self.codec_params() for k in self.QUANT_PARAMS) else 1

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors owned jointly with other layers (a FiPS group's base U, an RPS memory), keyed by a
        model-wide name. Stored once; on load every layer naming them gets the same nn.Parameter (an integer
        one, not trainable, for quantized codes)."""
        return {}

    @classmethod
    def expected_shared(cls, params: dict[str, Any]) -> set[str]:
        return set()

    def codec_params(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None) -> "CompressedModule":
        raise NotImplementedError

    @classmethod
    def expected_tensors(cls, params: dict[str, Any]) -> set[str]:
        """The tensor names `from_tensors` needs, so a loader can name what is missing or extra."""
        raise NotImplementedError

    def stored_parameters(self) -> int:
        """Parameters as stored: non-zeros for sparse layers, shared memory for hashed ones."""
        raise NotImplementedError

    def dense_equivalent(self) -> dict[str, torch.Size]:
        """Shapes of the dense tensors this layer replaces (for ratios against dense)."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The dense weight this layer computes with, in the replaced layer's layout, zero where weights
        were removed."""
        raise NotImplementedError

    @classmethod
    def inference_extra_bytes(cls, params: dict[str, Any]) -> int:
        """Bytes the inference form holds beyond the layer's stored tensors (row offsets, row padding of a
        bitmask): what `compress inspect` adds to the bytes on disk to show the resident bytes."""
        return 0

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        """The dense tensors this layer computes with, keyed as the layer it replaces holds them
        (weight, bias): what a plain transformers/timm export stores."""
        return {"weight": self.dense_weight().detach(), **self._bias_entry()}

    def _bias_entry(self, shape: bool = False) -> dict[str, Any]:
        """{"bias": the bias (or its shape)} when the layer has one, else {}: every codec stores the
        bias as it is, dense, under the dense layer's name."""
        bias = getattr(self, "bias", None)
        if bias is None:
            return {}
        return {"bias": bias.shape if shape else bias.detach()}


CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
"""What a compressed Conv2d keeps of nn.Conv2d's constructor (the codecs support zero padding only)."""


def conv_params(layer: nn.Module, names: tuple[str, ...] = CONV_ARGS) -> dict[str, Any]:
    """`layer`'s Conv2d constructor arguments as JSON-able codec params (tuples become lists)."""
    return {name: list(v) if isinstance(v, tuple) else v for name in names for v in [getattr(layer, name)]}


CODECS: Registry[type[CompressedModule]] = Registry("codec")
"""Codec name -> its training form."""
INFERENCE_FORMS: Registry[type[CompressedModule]] = Registry("codec")
"""Codec name -> its inference form (the same class where the training form is already compact)."""


def register_codec(cls: type[CompressedModule]) -> type[CompressedModule]:
    return CODECS.register(cls.codec)(cls)


def register_inference_form(cls: type[CompressedModule]) -> type[CompressedModule]:
    return INFERENCE_FORMS.register(cls.codec)(cls)


def codec_for(name: str, trainable: bool = True) -> type[CompressedModule]:
    """The class that decodes codec `name`: its training form, or with trainable=False its inference form."""
    return (CODECS if trainable else INFERENCE_FORMS).get(name)


def compressed_layers(model: nn.Module) -> dict[str, CompressedModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedModule)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at `name` (dotted path) for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
