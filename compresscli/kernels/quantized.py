"""Weight-only quantized products on the CPU through torch's own kernels, for dense layers whose weight is
stored as integer codes (torch_kernels.md in the research notes has their exact semantics and timings):

  int8   aten._weight_int8pack_mm(x, codes, scales): y = scales[n] * sum_k x[m, k] codes[n, k]. Symmetric int8,
         one scale per row, scales in x's dtype. The file's codes are its operand as they are. Its bfloat16
         path (AVX512 / AVX2) reads 16 inputs at a time with aligned loads and no tail: it needs K % 16 == 0
         and 32-byte aligned rows, or it reads past the row (wrong results) or faults (found probing it: K = 24
         gave 1e33, odd K crashed the process); its float32 / float16 path is plain C++ loops.
  int4   aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros): y = sum_k x[m, k] *
         ((nibble - 8) * scale + zero) per group of 32, 64, 128 or 256 inputs; rows a multiple of 16 (other
         row counts are padded at load: int4_rows).
         Symmetric int4 is expressed exactly (nibble = code + 8, zero = 0).

Both dequantize in float32 registers and round only the output, so in bfloat16 they are closer to the exact
product than dequantizing to bfloat16 and calling F.linear. The int4 kernel reads its weight in a layout that
depends on the CPU capability torch dispatches to (blocks of 64 rows on AVX512, 32 on AVX2, each byte pairing
row j with row j + block / 2); it is prepared once at load from the file's plain nibbles (the same bytes,
reordered) and undone exactly when the tensors are written again. The layout is checked against torch's own
conversion on first use; where it differs (another ISA, another torch), the int4 kernel is not used.

Where torch's int8 kernel is plain loops (float32, float16 activations) or cannot run (int8 in groups), few input
rows take a compiled dense int8 kernel instead (`dense_int8_mm`, kernels/cpu_source.py `dense_q8_mm`).

At many input rows (a prompt's prefill), where the GEMM is compute-bound, symmetric int8 (any group) and the
int4 kernel's layout are decoded by compiled code (kernels/cpu_source.py) into a reused tile in the input's
dtype and multiplied by torch's GEMM (kernels/decoded.py): `decoded_int8_mm`, `decoded_int4_mm`. Where
neither applies (int3 / int2, asymmetric grids, other int4 layouts, no compiler) the caller dequantizes the
weight for the call in PyTorch and runs F.linear (`dequantized_mm`).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from compresscli.kernels import cpu
from compresscli.kernels.decoded import decoded_mm

INT4_GROUPS = (32, 64, 128, 256)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The kernels run while the input has at most this many rows (above, decoding the weight for the call and
# running the dense GEMM wins: decoded_int8_mm / decoded_int4_mm, or dequantized_mm where no decoder reads the
# layout), by (bits, dtype). bfloat16: measured against the compiled decoded path on a 5632x2048 layer, 2
# threads, Sapphire Rapids, calls round robin over copies exceeding 1 GB up to 16 rows
# (`flock /tmp/timing.lock python benchmarks/quantized_prefill.py crossover --dtypes bfloat16`,
# benchmarks/results/quantized_prefill.md), ms per call, kernel / decoded:
#   rows          1           4           8           16          32          64          512
#   int8 bf16     1.01 / 2.19 1.37 / 2.09 2.39 / 2.21 3.80 / 2.22 5.47 / 2.17 9.31 / 3.00 74.6 / 7.5
#   int4 bf16     0.51 / 2.79 0.69 / 2.87 1.22 / 2.95 2.34 / 2.68 4.33 / 2.79 8.59 / 3.49 69.6 / 7.5
#   int8 fp16     8.62 / 1.62 32.9 / 2.24 65.7 / 2.73 129 / 3.26  270 / 4.54  555 / 6.41  4129 / 37.0
# (`... crossover --dtypes float16 --repeats 5`: torch's float16 int8 kernel is plain C++ loops, so it never
# runs). float32 (from the research probe, torch_kernels.md, against dequantize + F.linear): the float32 int8
# kernel is plain C++ loops too, ~0.19 ms per input row of a 1536x384 weight, so dequantizing wins from 2-3
# rows on. float16 int4: not re-measured against the decoded path (the previous limit kept).
# float32 int8: torch's kernel is never used (0): the compiled dense int8 kernel below is 4-10x faster.
KERNEL_MAX_ROWS = {(8, torch.float32): 0, (8, torch.bfloat16): 4, (8, torch.float16): 0,
                   (4, torch.float32): 4, (4, torch.bfloat16): 16, (4, torch.float16): 64}

# Symmetric int8 where torch's kernel does not run (float32 and float16 activations: plain loops there; int8 in
# groups) takes the compiled dense int8 kernel (kernels/cpu_source.py `dense_q8_mm`, path `cpu-int8`) up to this
# many input rows, decode + GEMM above. Measured per row scales, round robin over copies exceeding 1 GB, 2 threads
# (`flock /tmp/timing.lock python benchmarks/dense_int8.py`, benchmarks/results/dense_int8.md), us per call,
# ours / decode + GEMM / torch's int8 kernel:
#   float32  5632x2048  1: 660 / 1993 / 4355    4: 1209 / 2779 / 12996   8: 2388 / 3605
#   float32  384x1536   1: 46 / 64 / 236        4: 75 / 73 / 718         8: 126 / 89
#   float16  5632x2048  1: 689 / 1538           4: 1213 / 2099           8: 2303 / 2447 (3004 / 2452 in another run)
# bfloat16 per row keeps torch's kernel (KERNEL_MAX_ROWS): ours is faster on short rows (5632x2048, one row: 690
# against 866) but slower on long ones (2048x5632: 766 against 598).
DENSE_INT8_MAX_ROWS = 4


def _ops_available(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


@lru_cache(maxsize=1)
def int4_block() -> int | None:
    """Rows per block of the int4 kernel's layout on this CPU (64 on AVX512, 32 on AVX2), found by checking
    our reordering against torch's conversion on a small weight; None when neither matches (or no kernel)."""
    if not (_ops_available("_convert_weight_to_int4pack_for_cpu") and _ops_available("_weight_int4pack_mm_for_cpu")):
        return None
    probe = torch.randint(0, 16, (80, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.int(), 1)
    except RuntimeError:
        return None
    for block in (64, 32):
        if torch.equal(_to_blocks(probe, block), expected):
            return block
    return None


def _to_blocks(nibbles: torch.Tensor, block: int) -> torch.Tensor:
    """Nibbles (rows, cols) uint8 -> the kernel's layout (rows, cols / 2): per block of rows and input k,
    byte j = row j | row j + block / 2 << 4; a last partial block pairs adjacent rows."""
    rows, cols = nibbles.shape
    out = torch.empty(rows, cols // 2, dtype=torch.uint8, device=nibbles.device)
    full = rows // block * block
    if full:
        v = nibbles[:full].view(rows // block, block, cols)
        lo, hi = v[:, :block // 2].transpose(1, 2), v[:, block // 2:].transpose(1, 2)  # (blocks, cols, block / 2)
        out[:full].view(-1).copy_((lo | (hi << 4)).reshape(-1))
    if full < rows:
        rest = nibbles[full:]
        out[full:].view(-1).copy_((rest[0::2].t() | (rest[1::2].t() << 4)).reshape(-1))
    return out


def _from_blocks(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of _to_blocks: the kernel's layout (rows, cols / 2) -> nibbles (rows, cols) uint8."""
    rows, half = packed.shape
    cols = 2 * half
    nibbles = torch.empty(rows, cols, dtype=torch.uint8, device=packed.device)
    full = rows // block * block
    if full:
        v = packed[:full].reshape(rows // block, cols, block // 2)
        blocks = nibbles[:full].view(rows // block, block, cols)
        blocks[:, :block // 2] = (v & 15).transpose(1, 2)
        blocks[:, block // 2:] = (v >> 4).transpose(1, 2)
    if full < rows:
        rest = packed[full:].reshape(cols, (rows - full) // 2)
        nibbles[full::2] = (rest & 15).t()
        nibbles[full + 1::2] = (rest >> 4).t()
    return nibbles


ALIGN = 64  # bytes: what torch's CPU allocator gives; the int8 kernel's aligned loads need 32


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, contiguous and starting on an ALIGN-byte boundary (a copy when it does not: a tensor read
    from a safetensors file may start anywhere its 8-byte alignment allows)."""
    tensor = tensor.contiguous()
    return tensor if tensor.data_ptr() % ALIGN == 0 else tensor.clone()


def int8_supported(cols: int) -> bool:
    """Whether the int8 kernel can run a weight of `cols` inputs in every dtype it takes (bfloat16 needs K % 16)."""
    return _ops_available("_weight_int8pack_mm") and cols % 16 == 0


def int4_supported(rows: int, cols: int, group: int) -> bool:
    """Whether the int4 kernel can hold a (rows, cols) weight with `group` inputs per scale here (any rows: they
    are padded to a multiple of INT4_ROWS, see int4_rows)."""
    return int4_block() is not None and rows > 0 and group in INT4_GROUPS and cols % group == 0


INT4_ROWS = 16  # the kernel takes a multiple of 16 rows; others (an LM head of 30522) are padded with zero rows


def int4_rows(rows: int) -> int:
    """The rows the kernel holds for a weight of `rows`: padded up to a multiple of INT4_ROWS."""
    return -(-rows // INT4_ROWS) * INT4_ROWS


def int4_prepare(plain: torch.Tensor) -> torch.Tensor:
    """The file's int4 rows (rows, cols / 2: low nibble = even column, nibble = code + 8) in the kernel's layout,
    padded with rows of code 0 (nibbles 8) to int4_rows(rows)."""
    rows = plain.shape[0]
    if int4_rows(rows) != rows:
        plain = torch.cat([plain, plain.new_full((int4_rows(rows) - rows, plain.shape[1]), 0x88)])
    nibbles = torch.stack([plain & 15, plain >> 4], -1).view(plain.shape[0], -1)
    return _to_blocks(nibbles, int4_block())


def int4_plain(prepared: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of int4_prepare, exactly: the file's bytes back (its `rows`, the padding dropped)."""
    nibbles = _from_blocks(prepared, int4_block())[:rows]
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()


def int4_scales_and_zeros(scales: torch.Tensor) -> torch.Tensor:
    """(rows, groups) symmetric scales -> the kernel's (groups, int4_rows(rows), 2) [scale, zero = 0] (the
    padding rows' scales 0)."""
    s = scales.t()
    pad = int4_rows(scales.shape[0]) - scales.shape[0]
    if pad:
        s = torch.cat([s, s.new_zeros(s.shape[0], pad)], 1)
    return torch.stack([s, torch.zeros_like(s)], -1).contiguous()


def use_kernel(bits: int, x: torch.Tensor, needs_grad: bool) -> bool:
    """Whether a prepared kernel should run this product (a CPU input in the kernel's dtype, few rows)."""
    limit = KERNEL_MAX_ROWS.get((bits, x.dtype))
    return (limit is not None and not needs_grad and x.device.type == "cpu"
            and x.numel() // max(1, x.shape[-1]) <= limit)


def use_dense_int8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int, needs_grad: bool) -> bool:
    """Whether the compiled dense int8 kernel runs this product: symmetric int8 codes on the CPU in a grouping it
    takes, x in its dtypes with at most DENSE_INT8_MAX_ROWS rows, no autograd."""
    return (not needs_grad and x.device.type == "cpu" and codes.dtype == torch.int8 and x.dtype in cpu.DTYPES
            and scales.dtype in cpu.DTYPES and x.numel() // max(1, x.shape[-1]) <= DENSE_INT8_MAX_ROWS
            and cpu.dense_q8_supported(codes.shape[1], group) and cpu.available())


def dense_int8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x (N, K) @ W^T (+ bias) for symmetric int8 codes (rows, K) with scales (rows, ceil(K / group)): each
    group's float32 sum times its scale (not the weight rounded to the scales' dtype first)."""
    return cpu.dense_q8_mm(x.contiguous(), codes, scales.contiguous(), group, bias)


def int8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (N, K) @ (codes * scales[:, None])^T (+ bias) -> (N, rows); scales (rows,) in x's dtype."""
    y = torch.ops.aten._weight_int8pack_mm(aligned(x), codes, scales)
    return y if bias is None else y + bias


def int4_mm(x: torch.Tensor, prepared: torch.Tensor, group: int, scales_and_zeros: torch.Tensor,
            bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """x (N, K) @ W^T (+ bias) for an int4 weight of `rows` rows in the kernel's layout -> (N, rows)."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), prepared, group, scales_and_zeros)
    if y.shape[1] != rows:  # the padding rows' outputs (zeros) dropped
        y = y[:, :rows] if bias is not None else y[:, :rows].contiguous()
    return y if bias is None else y + bias


def dequantized_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The fallback: the weight dequantized for this call (never kept), then the dense GEMM."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def use_decoder(x: torch.Tensor, scales: torch.Tensor, needs_grad: bool) -> bool:
    """Whether the compiled decoder can run this product (a CPU input and scales in its dtypes, no autograd)."""
    return (not needs_grad and x.device.type == "cpu" and x.dtype in cpu.DTYPES and scales.dtype in cpu.DTYPES
            and cpu.available())


def decoded_int8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """x (N, K) @ W^T (+ bias) for symmetric int8 codes (rows, K) with scales (rows, ceil(K / group)), W decoded
    into x's dtype a tile of rows at a time (the same values as dequantizing it whole) for torch's GEMM."""
    rows, columns = codes.shape
    scales = scales.contiguous()
    decode = lambda r0, r1, out: cpu.int8_rows(codes, scales, group, r0, r1, out)  # noqa: E731
    return decoded_mm(x.contiguous(), decode, rows, columns, bias, x.dtype)


def decoded_int4_mm(x: torch.Tensor, prepared: torch.Tensor, group: int, scales_and_zeros: torch.Tensor,
                    bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """x (N, K) @ W^T (+ bias) for an int4 weight of `rows` rows held in the kernel's layout (int4_prepare), W
    decoded transposed (each block's rows contiguous at every input) into x's dtype for torch's GEMM."""
    decode = lambda r0, r1, out: cpu.int4_block_rows_t(prepared, scales_and_zeros, group, int4_block(), r0, r1,  # noqa: E731
                                                       out)
    return decoded_mm(x.contiguous(), decode, rows, 2 * prepared.shape[1], bias, x.dtype, transposed=True)
