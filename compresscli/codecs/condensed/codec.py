"""The condensed codec (constant fan-in Linear / Conv2d: every kept output neuron reads exactly k inputs),
what both of its forms share: the tensors, their checks, the layer layouts and the product.

Stored as `values` (R x k, the model's dtype) and `indices` (R x k, int16 when the fan-in fits, else
int32), plus `rows` (the R kept output ids, only when neurons were ablated) and the full `bias`: an
ablated neuron outputs its bias. A conv is viewed as out x (in/groups * kh * kw).

The values may be stored quantized (codecs/quant: `values.codes` + `values.scales`, params "quant"), on a
grid over the (R, fan_in) coordinates: a value's scale is that of its row and its input's column group.

The structure lives in `forward`, so recovery training only moves the kept values; the indices are
buffers. The training form (training.py) holds the values as a Parameter, the inference form
(inference.py) as a buffer: the same tensors, nothing trainable. Loading checks the indices (range, one entry per input per neuron) and the row ids, so a
damaged file is a clear CheckpointError, never an out-of-bounds read in a kernel.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compresscli import kernels
from compresscli.core.errors import CheckpointError
from compresscli.codecs.base import CONV_ARGS, CompressedModule, conv_params
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import QuantizedValues, Quantizer, tensor_names
from compresscli.codecs.sparse.encoding import VALUE_DTYPES, index_dtype


def structure_problem(values: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor | None, out_features: int,
                      fan_in: int) -> str | None:
    """Why these tensors are not a valid condensed layer, or None when they are."""
    if values.dim() != 2 or indices.shape != values.shape:
        return f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must be equal (rows x k) shapes"
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        return f"indices must be integers, got {indices.dtype}"
    if values.dtype not in VALUE_DTYPES:  # the values are trained: a Parameter needs floating point
        return f"values must be float16/bfloat16/float32/float64, got {values.dtype}"
    kept, k = values.shape
    if kept == 0:
        return "no output neuron is kept"
    if not 0 < k <= fan_in:
        return f"fan-in k={k} must be in [1, {fan_in}]"
    if int(indices.min()) < 0 or int(indices.max()) >= fan_in:
        return f"indices must lie in [0, {fan_in}), found [{int(indices.min())}, {int(indices.max())}]"
    ordered = indices.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
    if repeated.any():
        return f"neuron {int(repeated.nonzero()[0])} reads the same input twice (indices must be unique per row)"
    if rows is None:
        return None if kept == out_features else f"{kept} rows of values without row ids, expected {out_features}"
    if rows.dim() != 1 or rows.numel() != kept or rows.is_floating_point() or rows.dtype == torch.bool:
        return f"row ids must be {kept} integers, got {rows.dtype} {tuple(rows.shape)}"
    if int(rows.min()) < 0 or int(rows.max()) >= out_features or rows.unique().numel() != kept:
        return f"row ids must be unique and lie in [0, {out_features})"
    return None


class _Condensed(CompressedModule):
    """What Linear and Conv2d share: the condensed tensors, their codec, and the dense view."""

    out_features: int
    fan_in: int
    weight_shape: tuple[int, ...]
    last_path: str | None = None  # the product that ran last (see kernels.dispatch), for speed reports
    # Set by dynamic sparse training (methods/condensed_dst.py) on the steps that update the structure: called
    # with dL/dW of the whole dense weight (ablated rows included), which the training product computes anyway.
    dense_grad_sink: Callable[[torch.Tensor], None] | None = None
    trainable: ClassVar[bool]  # the training form's values and bias are Parameters, the inference form's buffers

    def _init_condensed(self, values: torch.Tensor | QuantizedValues, indices: torch.Tensor, rows: torch.Tensor | None,
                        bias: torch.Tensor | None) -> None:
        """`values` float (R, k), or stored quantized: the training form then trains their dequantized
        shadow through a Quantizer, the inference form keeps them as they are (`quantized`)."""
        stored = values if isinstance(values, QuantizedValues) else None
        shape_of_values = torch.empty(stored.shape, device="meta") if stored is not None else values
        problem = structure_problem(shape_of_values, indices, rows, self.out_features, self.fan_in)
        if problem:
            raise ValueError(problem)
        self.register_module("quantizer", None if stored is None or not self.trainable else Quantizer.of(stored))
        self.register_module("quantized", None if self.trainable else stored)
        if stored is not None and self.trainable:
            values = stored.dequantize(columns=indices)
        if self.trainable:
            self.values = nn.Parameter(values.detach().clone())
        else:
            self.register_buffer("values", None if stored is not None else values.detach().contiguous())
        self.register_buffer("indices", indices.to(index_dtype(self.fan_in)).contiguous())
        self.register_buffer("rows", None if rows is None else rows.to(index_dtype(self.out_features)))
        if self.trainable:
            self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone()))
        else:
            self.register_buffer("bias", None if bias is None else bias.detach())

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def float_values(self) -> torch.Tensor:
        """The values (R, k) the layer computes with: as held, rounded to the grid (training form, quantized),
        or dequantized for the call (inference form, quantized)."""
        if self.quantizer is not None:
            return self.quantizer(self.values, columns=self.indices)
        if self.quantized is not None:
            return self.quantized.dequantize(columns=self.indices)
        return self.values

    def _spec(self) -> QuantSpec | None:
        held = self.quantizer or self.quantized
        return None if held is None else held.spec

    def quantizable_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The values to quantize as the (R, fan_in) matrix they sit in, and the kept entries' mask."""
        dense = kernels.scatter_dense(self.float_values().detach(), self.indices, self.fan_in)
        kept = torch.zeros_like(dense, dtype=torch.bool).scatter_(1, self.indices.long(), True)
        return dense, kept

    def quantize_values_(self, quantizer: Quantizer, values: torch.Tensor) -> None:
        """Store the values on `quantizer`'s grid from now on, the shadow read from `values` (R, fan_in)."""
        with torch.no_grad():
            self.values.copy_(values.gather(1, self.indices.long()))
        self.quantizer = quantizer.to(self.values.device)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight this layer equals (zeros where nothing is kept); differentiable in `values`."""
        kept = kernels.scatter_dense(self.float_values(), self.indices, self.fan_in)  # (R, fan_in)
        if self.rows is not None:
            kept = kept.new_zeros(self.out_features, self.fan_in).index_copy(0, self.rows.long(), kept)
        weight = kept.view(self.weight_shape)
        if self.dense_grad_sink is not None and weight.requires_grad:
            weight.register_hook(self.dense_grad_sink)
        return weight

    @property
    def weight(self) -> torch.Tensor:
        """Dense view, materialised on demand (for code that reads `.weight`); not stored."""
        return self.dense_weight()

    def mask(self) -> torch.Tensor:
        """Bool (out, fan_in): which weights are kept."""
        ones = torch.ones_like(self.indices, dtype=torch.bool)
        mask = torch.zeros(self.indices.shape[0], self.fan_in, dtype=torch.bool, device=self.indices.device)
        mask.scatter_(1, self.indices.long(), ones)
        if self.rows is not None:
            mask = mask.new_zeros(self.out_features, self.fan_in).index_copy(0, self.rows.long(), mask)
        return mask

    def stored_parameters(self) -> int:
        """Stored values plus the bias; indices and row ids are structure (they count in bytes, not here)."""
        return self.indices.numel() + (self.bias.numel() if self.bias is not None else 0)

    def dense_equivalent(self) -> dict[str, torch.Size]:
        return {"weight": torch.Size(self.weight_shape), **self._bias_entry(shape=True)}

    def _stored_values(self) -> dict[str, torch.Tensor]:
        if self.quantizer is not None:
            return self.quantizer.tensors("values", self.quantizer.codes(self.values, columns=self.indices))
        if self.quantized is not None:
            return self.quantized.tensors("values")
        return {"values": self.values.detach()}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {**self._stored_values(), "indices": self.indices}
        if self.rows is not None:
            tensors["rows"] = self.rows
        return {**tensors, **self._bias_entry()}

    def _condensed_params(self) -> dict[str, Any]:
        dtype = (self.values if self.quantized is None else self.quantized.scales).dtype
        quant = {} if self._spec() is None else {"quant": self._spec().to_params()}
        return {"out_features": self.out_features, "fan_in": self.fan_in, "k": self.k,
                "kept_rows": self.indices.shape[0], "ablated": self.rows is not None, "bias": self.bias is not None,
                "dtype": str(dtype).removeprefix("torch."),
                "index_dtype": str(self.indices.dtype).removeprefix("torch."), **quant}

    @classmethod
    def expected_tensors(cls, params: dict[str, Any]) -> set[str]:
        spec = QuantSpec.from_params(params.get("quant"))
        names = {"indices"} | ({"values"} if spec is None else tensor_names("values", spec))
        return names | ({"rows"} if params["ablated"] else set()) | ({"bias"} if params["bias"] else set())

    @classmethod
    def _checked(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, Any]:
        """The constructor's tensor arguments, after checking them against the metadata."""
        indices, rows, spec = tensors["indices"], tensors.get("rows"), QuantSpec.from_params(params.get("quant"))
        values = tensors.get("values")
        if spec is not None:  # codes for the (R, k) values, on a grid over (R, fan_in)
            values = QuantizedValues.from_tensors(tensors, "values", spec, tuple(indices.shape),
                                                  (indices.shape[0], params["fan_in"]))
        shape_of_values = values if spec is None else torch.empty(values.shape, device="meta")
        problem = structure_problem(shape_of_values, indices, rows, params["out_features"], params["fan_in"])
        if problem is None and indices.dtype not in (torch.int16, torch.int32):
            problem = f"indices are stored as int16 or int32, found {indices.dtype}"
        if problem is None and indices.shape[1] != params["k"]:
            problem = f"values hold k={indices.shape[1]} per neuron, the metadata says k={params['k']}"
        bias = tensors.get("bias")
        if problem is None and bias is not None and (bias.shape != (params["out_features"],)
                                                     or bias.dtype not in VALUE_DTYPES):
            problem = f"bias must be {params['out_features']} floats, got {bias.dtype} {list(bias.shape)}"
        if problem is not None:
            raise CheckpointError(f"invalid {cls.codec} layer: {problem}", "the file is damaged; re-export it")
        return {"values": values, "indices": indices, "rows": rows, "bias": tensors.get("bias")}

    def _expand(self, y: torch.Tensor) -> torch.Tensor:
        """(N, R) kept outputs -> (N, out): ablated neurons output their bias."""
        if self.rows is None:
            return y
        if self.bias is not None:
            base = self.bias.to(y.dtype).expand(y.shape[0], self.out_features)
        else:
            base = y.new_zeros(y.shape[0], self.out_features)
        return base.index_copy(1, self.rows.long(), y)


class _CondensedLinear(_Condensed):
    """y[..., o] = sum_j values[o, j] * x[..., indices[o, j]] + bias[o], by the fastest available kernel."""

    codec = "condensed_linear"
    export_formats = frozenset({"compressed-tensors"})  # where the weight is 2:4 (sparse-24-bitmask)

    def __init__(self, in_features: int, out_features: int, values: torch.Tensor, indices: torch.Tensor,
                 rows: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fan_in = in_features, out_features, in_features
        self.weight_shape = (out_features, in_features)
        self._init_condensed(values, indices, rows, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_grad_sink is not None and torch.is_grad_enabled():  # the training product, its dL/dW kept
            self.__dict__["last_path"] = "dense"
            return F.linear(x, self.dense_weight(), self.bias)  # ablated rows are zero: they output their bias
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # (N, in)
        bias = self.bias if self.rows is None or self.bias is None else self.bias[self.rows.long()]
        y, path = kernels.condensed_mm(x2d, self.float_values(), self.indices, bias, self.in_features)  # (N, R)
        self.__dict__["last_path"] = path  # past nn.Module.__setattr__: a few us per call on tiny layers
        return self._expand(y).view(*lead, self.out_features)  # (..., out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"kept_rows={self.indices.shape[0]}, bias={self.bias is not None}")

    def codec_params(self) -> dict[str, Any]:
        return {"in_features": self.in_features, **self._condensed_params()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None) -> "_CondensedLinear":
        return cls(params["in_features"], params["out_features"], **cls._checked(tensors, params))


class _CondensedConv2d(_Condensed):
    """A zero-padded Conv2d whose every output channel reads k of its in/groups * kh * kw inputs.
    The forward runs the convolution on the dense view: the condensed kernels serve Linear layers."""

    codec = "condensed_conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int] | str, dilation: tuple[int, int], groups: int, values: torch.Tensor,
                 indices: torch.Tensor, rows: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, tuple(kernel_size)
        self.stride, self.dilation, self.groups = tuple(stride), tuple(dilation), groups
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.out_features = out_channels
        self.fan_in = in_channels // groups * math.prod(self.kernel_size)
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_condensed(values, indices, rows, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.__dict__["last_path"] = "dense"
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)  # (B, C, H, W) -> (B, O, H', W')

    def codec_params(self) -> dict[str, Any]:
        return {**conv_params(self), **self._condensed_params()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None) -> "_CondensedConv2d":
        conv = {name: params[name] for name in CONV_ARGS}
        return cls(**conv, **cls._checked(tensors, params))
