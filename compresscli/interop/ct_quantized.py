"""compressed-tensors' `pack-quantized` format for quantized dense Linears, written without the package.

A quantized_linear layer (codes, scales, zero points on a per-row or per-group grid: codecs/quant) becomes, under
its module's name, what compressed-tensors 0.20 / transformers 5 read (research: /work/proto/ct/ct_format.md):

- `weight_packed`: int32 (rows, ceil(cols * bits / 32)), each row one little-endian bitstream of offset-binary
  codes (code + 2^(bits-1)), code j at bits j*bits .. j*bits + bits - 1: compresscli's own packing (codecs/quant/
  packing.py) padded to whole int32 words, so the file's bytes are reused, never re-quantized;
- `weight_scale`: (rows, groups) in the layer's float dtype; `weight_shape`: int64 [rows, cols].

Dequantized there as code * scale, exactly compresscli's grid. Asymmetric grids are refused: compressed-tensors
writes their zero points packed along the rows, but transformers 5.25 with compressed-tensors 0.20.1 expects them
unpacked when it loads (a size mismatch, measured), so no zero-point layout loads there. Every layer with the same grid (bits,
group size, symmetry) is one config group whose targets name its modules; every other Linear is listed in
`ignore` (vLLM refuses a Linear that neither targets nor ignore name). Names are written as `re:` patterns with
the base model's prefix optional, as transformers adds or strips it (`AutoModel` on a `...ForCausalLM`
checkpoint names `model.layers.0.mlp.up_proj` as `layers.0.mlp.up_proj`) and compressed-tensors matches them
against the loaded model's names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from compresscli.codecs.quant import packing
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.core.errors import CompressError

PACKED = "pack-quantized"
CODEC = "quantized_linear"
FORMAT_VERSION = "0.20.1"  # the compressed-tensors release this layout was verified against
FIX = "use --format dense, which writes every method (quantized weights dequantized)"


def refuse_layer(unit: str, codec: str, params: dict[str, Any], module_type: str) -> None:
    """Raise for a quantized layer pack-quantized cannot hold: quantized values of any structure but a dense
    Linear, a GPT-2 Conv1D (compressed-tensors quantizes torch Linears), zero points (see above), a group size
    that does not divide the inputs (its grouped dequantization requires it)."""
    quantized = [k for k in ("quant", "shared_quant") if params.get(k)]
    if codec != CODEC:
        spec = QuantSpec.from_params(params[quantized[0]])
        raise CompressError(f"compressed-tensors has no format for quantized {codec.split('_')[0]} layers "
                            f"({unit}: {codec}, int{spec.bits} values)", FIX)
    spec = QuantSpec.from_params(params["quant"])
    if module_type != "Linear":
        raise CompressError(f"compressed-tensors quantizes torch Linear layers; {unit} is a {module_type} "
                            f"({codec}, int{spec.bits})", FIX)
    if not spec.symmetric:
        raise CompressError(f"transformers cannot load asymmetric compressed-tensors layers ({unit}: {codec}, "
                            f"int{spec.bits} with zero points)", "quantize with symmetric: true, or " + FIX)
    cols = params["in_features"]
    if cols % spec.group(cols):
        raise CompressError(f"compressed-tensors needs the group size to divide the inputs ({unit}: {codec}, "
                            f"group_size {spec.group_size} of {cols} inputs)", FIX)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (rows, cols) int8 -> compressed-tensors' `pack_to_int32` of them."""
    stream = (codes.to(torch.int16) + 128).to(torch.uint8) if bits == 8 else packing.pack(codes, bits)
    words = -(-codes.shape[1] * bits // 32)
    stream = torch.nn.functional.pad(stream, (0, 4 * words - stream.shape[1]))
    return stream.contiguous().view(torch.int32)  # little-endian words, as safetensors stores them


def encode(stored: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A symmetric quantized_linear layer's stored weight tensors (`weight.codes`, `.scales`) in pack-quantized."""
    rows, cols = shape
    codes = packing.unpack(stored["weight.codes"], spec.bits, cols)
    return {"weight_packed": pack_int32(codes, spec.bits), "weight_scale": stored["weight.scales"],
            "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}


def module_pattern(name: str, prefix: str) -> str:
    """A compressed-tensors target matching module `name` with or without the base model's `prefix`."""
    rest = name.removeprefix(f"{prefix}.") if prefix else name
    return f"re:^({re.escape(prefix)}\\.)?{re.escape(rest)}$" if prefix else f"re:^{re.escape(rest)}$"


def weights_args(spec: QuantSpec) -> dict[str, Any]:
    """The `weights` QuantizationArgs of one grid (strategy channel: one scale per row)."""
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
            "strategy": "channel" if spec.group_size is None else "group", "group_size": spec.group_size,
            "dynamic": False, "observer": "minmax"}


@dataclass
class QuantizationBlock:
    """The `quantization_config` of a model whose quantized layers are `layers` (unit -> params) and whose other
    Linears are `plain`; `prefix` is the architecture's base_model_prefix. `encode` is the export's per-layer hook
    (export._write_dense)."""

    layers: dict[str, dict[str, Any]]
    plain: list[str]
    read: Any  # names -> tensors, the checkpoint's TensorIndex.read
    prefix: str = ""
    written: list[str] = field(default_factory=list)

    def encode(self, unit: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A quantized layer's dense tensors with the weight replaced by its stored codes in pack-quantized."""
        params = self.layers.get(unit)
        if params is None or f"{unit}.weight" not in tensors:  # a weight tied to one stored elsewhere: kept plain
            self.plain.append(unit)
            return tensors
        spec = QuantSpec.from_params(params["quant"])
        names = [f"{unit}.weight.codes", f"{unit}.weight.scales"]
        stored = {k.removeprefix(f"{unit}."): v for k, v in self.read(names).items()}
        packed = encode(stored, spec, (params["out_features"], params["in_features"]))
        self.written.append(unit)
        rest = {k: v for k, v in tensors.items() if k != f"{unit}.weight"}
        return {**rest, **{f"{unit}.{k}": v for k, v in packed.items()}}

    def quantization_config(self) -> dict[str, Any]:
        """The config.json block: one config group per grid, `format` in each (the loader reads it there)."""
        groups: dict[QuantSpec, list[str]] = {}
        for unit in self.written:
            groups.setdefault(QuantSpec.from_params(self.layers[unit]["quant"]), []).append(
                module_pattern(unit, self.prefix))
        config_groups = {f"group_{i}": {"targets": targets, "weights": weights_args(spec), "input_activations": None,
                                        "output_activations": None, "format": PACKED}
                         for i, (spec, targets) in enumerate(groups.items())}
        return {"quant_method": "compressed-tensors", "format": PACKED, "quantization_status": "compressed",
                "config_groups": config_groups, "ignore": [module_pattern(name, self.prefix) for name in dict.fromkeys(self.plain)], "kv_cache_scheme": None,
                "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
                "version": FORMAT_VERSION}
