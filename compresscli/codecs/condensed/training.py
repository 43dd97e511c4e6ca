"""The training form of the condensed layers: the kept values a Parameter (recovery trains them), indices
and kept-row ids buffers."""
from __future__ import annotations

from compresscli.codecs.base import register_codec
from compresscli.codecs.condensed.codec import _CondensedConv2d, _CondensedLinear


@register_codec
class CondensedLinear(_CondensedLinear):
    trainable = True


@register_codec
class CondensedConv2d(_CondensedConv2d):
    trainable = True
