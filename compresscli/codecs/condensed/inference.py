"""The inference form of the condensed layers: the stored tensors as buffers, nothing trainable (the layout
is already compact: values + int16/int32 indices, run by the condensed kernels)."""
from __future__ import annotations

from compresscli.codecs.base import register_inference_form
from compresscli.codecs.condensed.codec import _CondensedConv2d, _CondensedLinear


@register_inference_form
class CompactCondensedLinear(_CondensedLinear):
    trainable = False


@register_inference_form
class CompactCondensedConv2d(_CondensedConv2d):
    trainable = False
