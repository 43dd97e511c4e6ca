"""The inference form of a quantized Linear: the codes and scales as the file holds them, run by torch's
weight-only CPU kernels where one applies (kernels/quantized.py: symmetric int8 per row in bfloat16; symmetric
int4 in groups of 32-256, its layout prepared here, once, from the file's bytes) at few input rows, other symmetric
int8 by the compiled dense int8 kernel (path `cpu-int8`); at many, those codes
(and symmetric int8 in groups) decoded a tile at a time by compiled code for torch's GEMM; on CUDA by the
Triton dequantize-in-kernel product on the file's layout (kernels/triton_quantized.py); else dequantized for
each call in PyTorch."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compresscli.codecs.base import register_inference_form
from compresscli.codecs.quant.values import QuantizedValues
from compresscli.codecs.quantized_linear.codec import _QuantizedLinearCodec
from compresscli.kernels import dispatch
from compresscli.kernels import quantized as qk

KERNEL_OVERHEAD = 0.05  # the int4 kernel's zero points may add at most this fraction of the layer's file bytes


def int4_kernel_fits(params: dict[str, Any], scale_bytes: int) -> bool:
    """Whether the int4 kernel holds this layer within KERNEL_OVERHEAD of its file bytes (its scales come with as
    many zero points: a float32 layer in groups of 128 would hold 1.06x its file)."""
    spec, rows, cols = params["quant"], params["out_features"], params["in_features"]
    group = spec["group_size"] or cols
    if spec["bits"] != 4 or not spec["symmetric"] or not qk.int4_supported(rows, cols, group):
        return False
    file_bytes = rows * cols // 2 + rows * (cols // group) * scale_bytes + (rows * scale_bytes if params["bias"] else 0)
    return int4_extra_bytes(rows, cols, group, scale_bytes) <= KERNEL_OVERHEAD * file_bytes


def int4_extra_bytes(rows: int, cols: int, group: int, scale_bytes: int) -> int:
    """What the int4 kernel's layout holds beyond the file: a zero point beside every scale, and the padding
    rows (codes, scale and zero) up to a multiple of 16 rows."""
    held = qk.int4_rows(rows)
    return (held - rows) * cols // 2 + (cols // group) * scale_bytes * (2 * held - rows)


@register_inference_form
class CompactQuantizedLinear(_QuantizedLinearCodec):
    """`values` (codes, scales) and a `bias` buffer; `kernel` names the product that runs on the CPU ("int8",
    "int4", or None: dequantize per call). For "int4" the codes are held in the kernel's layout and the scales
    as a view into its (groups, rows, 2) scales-and-zeros: the file's bytes, reordered, plus the zeros."""

    last_path: str | None = None

    def __init__(self, tensors: dict[str, torch.Tensor], params: dict[str, Any]):
        super().__init__()
        self.spec = self._checked(tensors, params)
        self.in_features, self.out_features = params["in_features"], params["out_features"]
        shape = (self.out_features, self.in_features)
        self.values = QuantizedValues.from_tensors(tensors, "weight", self.spec, shape, shape)
        self.register_buffer("bias", tensors.get("bias"))
        self.register_buffer("scales_and_zeros", None)
        self.kernel = None
        if (self.spec.bits == 8 and self.spec.symmetric and self.spec.group_size in (None, self.in_features)
                and qk.int8_supported(self.in_features)):
            self.kernel = "int8"
            self.values.codes = qk.aligned(self.values.codes)
        elif int4_kernel_fits(params, self.values.scales.element_size()):
            self.kernel = "int4"
            self.values.codes = qk.int4_prepare(self.values.codes)
            self.scales_and_zeros = qk.int4_scales_and_zeros(self.values.scales)
            # a view: the scales are held once (the padding rows' left out)
            self.values.scales = self.scales_and_zeros[..., 0].t()[:self.out_features]

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None) -> "CompactQuantizedLinear":
        return cls(tensors, params)

    @classmethod
    def inference_extra_bytes(cls, params: dict[str, Any]) -> int:
        scale_bytes = torch.empty(0, dtype=getattr(torch, params["dtype"])).element_size()
        if not int4_kernel_fits(params, scale_bytes):
            return 0
        cols = params["in_features"]
        return int4_extra_bytes(params["out_features"], cols, params["quant"]["group_size"] or cols, scale_bytes)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """After a move (`.to`, `.cuda`): off the CPU, the int4 codes go back to the file's layout, which the
        Triton kernel reads (the reordered one is torch's CPU kernel's); moved back, they stay so (dequantized
        per call there)."""
        super()._apply(fn, recurse)
        if self.kernel == "int4" and self.values.codes.device.type != "cpu":
            self.values.codes = self._plain_codes()
            self.values.scales = self.values.scales.contiguous()
            self.scales_and_zeros, self.kernel = None, None
        return self

    def _plain_codes(self) -> torch.Tensor:
        return qk.int4_plain(self.values.codes, self.out_features) if self.kernel == "int4" else self.values.codes

    def _weight_tensors(self) -> dict[str, torch.Tensor]:
        stored = {"weight.codes": self._plain_codes(), "weight.scales": self.values.scales.contiguous()}
        return stored if self.values.zeros is None else {**stored, "weight.zeros": self.values.zeros}

    def _value_dtype(self) -> torch.dtype:
        return self.values.scales.dtype

    def dense_weight(self) -> torch.Tensor:
        if self.kernel != "int4":
            return self.values.dequantize()
        plain = QuantizedValues(self.spec, self._plain_codes(), self.values.scales, None, self.values.shape,
                                self.in_features)
        return plain.dequantize()

    @property
    def weight(self) -> torch.Tensor:
        """Dense view, made on demand for code that reads `.weight`; never stored."""
        return self.dense_weight()

    def _symmetric_int8(self) -> bool:
        return self.spec.bits == 8 and self.spec.symmetric

    def _decodable(self) -> bool:
        """Whether the compiled decoder reads these codes as held: the int4 kernel's layout, or symmetric int8."""
        return self.kernel == "int4" or self._symmetric_int8()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # (N, in)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        group, needs_grad = self.spec.group(self.in_features), torch.is_grad_enabled() and x.requires_grad
        on_cuda = x2d.is_cuda and dispatch.quantized_mm(x2d, self.values.codes, self.values.scales, self.values.zeros,
                                                        self.spec.bits, group, bias)
        if on_cuda:
            y, path = on_cuda
        elif self.kernel is not None and qk.use_kernel(self.spec.bits, x2d, needs_grad):
            if self.kernel == "int8":
                y = qk.int8_mm(x2d, self.values.codes, self.values.scales.reshape(-1).to(x.dtype), bias)
            else:
                y = qk.int4_mm(x2d, self.values.codes, group, self.scales_and_zeros.to(x.dtype), bias, self.out_features)
            path = self.kernel
        elif self._symmetric_int8() and qk.use_dense_int8(x2d, self.values.codes, self.values.scales, group, needs_grad):
            y, path = qk.dense_int8_mm(x2d, self.values.codes, self.values.scales, group, bias), "cpu-int8"
        elif self._decodable() and qk.use_decoder(x2d, self.values.scales, needs_grad):
            if self.kernel == "int4":
                y = qk.decoded_int4_mm(x2d, self.values.codes, group, self.scales_and_zeros, bias, self.out_features)
            else:
                y = qk.decoded_int8_mm(x2d, self.values.codes, self.values.scales, group, bias)
            path = "decoded"
        else:
            y, path = qk.dequantized_mm(x2d, self.dense_weight(), bias), "dequantize"
        self.__dict__["last_path"] = path  # past nn.Module.__setattr__: a few us per call on tiny layers
        return y.view(*lead, self.out_features)
