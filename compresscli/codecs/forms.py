"""A model's compressed layers turned into their inference form or their training form, in place, exactly.

Each layer is re-decoded by the other form from its own tensors (`to_tensors`, then the other class's
`from_tensors`): the codec is exact, so nothing is lost either way and no second implementation of any
codec exists. Tensors several layers share (a FiPS base, an RPS memory, or their quantized codes and scales)
are handed over once per model-wide name (one new Parameter per tensor, on the same storage), never copied.
"""
from __future__ import annotations

from torch import nn

from compresscli.codecs.base import compressed_layers, replace_module
from compresscli.codecs.base import codec_for


def convert_(model: nn.Module, trainable: bool) -> nn.Module:
    """Every compressed layer of `model` into its training form (`trainable`) or its inference form."""
    handed_over: dict[str, nn.Parameter] = {}  # model-wide key of a shared tensor -> its Parameter in the new form
    for name, layer in compressed_layers(model).items():
        shared = {}
        for key, tensor in layer.shared_tensors().items():
            if key not in handed_over:
                grad = trainable and tensor.is_floating_point()  # quantized codes never train
                handed_over[key] = nn.Parameter(tensor.detach(), requires_grad=grad)
            shared[key] = handed_over[key]
        form = codec_for(layer.codec, trainable)
        new = form.from_tensors(layer.to_tensors(), layer.codec_params(), shared).train(layer.training)
        if not trainable:
            new.requires_grad_(False)
        replace_module(model, name, new)
    return model


def to_inference_(model: nn.Module) -> nn.Module:
    return convert_(model, trainable=False)


def to_training_(model: nn.Module) -> nn.Module:
    return convert_(model, trainable=True)
