"""Fuzzing what a file or a recipe can say: a damaged or hostile input must end in the tool's own error
(CompressError and its kinds), never a traceback, a hang, or an allocation the input does not justify.

Three targets: the safetensors reader (mutated bytes of a real small file), every registered codec's
decode as the loader runs it (mutated tensors and params of a real small layer), and the recipe
parser (random YAML texts and structures, `--set` overrides). The default run is small, fixed and
fast; `make fuzz` (FUZZ_EXAMPLES=20000) runs long with fresh random inputs. A crash the fuzzer finds
is fixed in the reader and kept below as an explicit @example, so it is replayed on every run.
"""
from __future__ import annotations

import json
import math
import os
import resource
import struct
import tracemalloc
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from compresscli.core.errors import CompressError
from compresscli.io.native import (FORMAT_METADATA, check_layer_tensors, decode_layer, layer_codec, layer_metadata,
                                   read_format, shared_parameter)
from compresscli.methods import METHODS
from compresscli.codecs import CODECS, SparseLinear
from compresscli.engine.recipe import apply_override, parse_recipe
from compresscli.io.safetensors import DTYPES, TensorIndex
from conftest import CODEC_SAMPLES, codec_samples

# Small and fixed by default (the whole file in well under a minute on 2 cores, the same inputs on every
# run); FUZZ_EXAMPLES=N runs N inputs per target with a fresh random seed.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0")) or None
settings.register_profile("fuzz", max_examples=EXAMPLES or 60, deadline=None, database=None,
                          derandomize=EXAMPLES is None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
FUZZ = settings.get_profile("fuzz")
RSS_GROWTH_KIB = 2 * 1024 * 1024  # fuzzing tiny inputs never needs this much more memory than the process had

BIG_INTS = st.sampled_from([-1, 0, 1, 2**31, 2**32 + 1, 2**53, 2**63 - 1, 2**63, 2**64, -2**63, 10**30])
SMALL_INTS = st.integers(-3, 40)
JSON_SCALARS = (st.none() | st.booleans() | SMALL_INTS | BIG_INTS | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)


@lru_cache(maxsize=1)
def _rss_before_fuzzing() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.fixture(scope="module", autouse=True)
def _rss_baseline() -> None:
    _rss_before_fuzzing()  # before this file's first input, after whatever other tests ran before it


def _rss_ok() -> None:
    """Catches what tracemalloc cannot see (torch's allocator): the peak memory of the process must not
    jump by GBs, as it would if a size in a damaged input were believed."""
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _rss_before_fuzzing()
    assert grown < RSS_GROWTH_KIB, f"an input made the process allocate {grown >> 20} GiB more"


def assert_clean(err: CompressError) -> None:
    """What every test here is named for: the error is one line that names the problem and says what to do
    (its `fix`), short enough to read, never a dump of the input."""
    text = str(err)
    assert "\n" not in text and err.fix and len(text) <= 600, text


# ============================================================================= 1. the safetensors reader

@lru_cache(maxsize=1)
def _real_file() -> bytes:
    """A real small file as compresscli writes one: several dtypes, an empty tensor, format metadata."""
    import tempfile

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(5, generator=g).bfloat16(),
               "b.index": torch.arange(4, dtype=torch.int64).view(2, 2), "b.empty": torch.zeros(0, dtype=torch.uint8),
               "c.mask": torch.tensor([True, False, True])}
    layer = SparseLinear.from_dense(nn.Linear(4, 3), torch.rand(3, 4, generator=g) > 0.5)
    metadata = {**FORMAT_METADATA, "layers": json.dumps({"a": layer_metadata(layer)}), "tied": json.dumps({"d": "a"})}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        return path.read_bytes()


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _apply_byte_edit(data: bytes, edit: tuple) -> bytes:
    """One mutation of a file's bytes; positions are fractions so one edit fits any file length."""
    kind, *args = edit
    spot = lambda fraction: min(int(fraction * len(data)), max(len(data) - 1, 0))  # noqa: E731
    if kind == "truncate":
        return data[:spot(args[0])]
    if kind == "flip" and data:  # xor one byte: args = (fraction, byte)
        i = spot(args[0])
        return data[:i] + bytes([data[i] ^ args[1]]) + data[i + 1:]
    if kind == "flip_length":  # xor one of the 8 bytes of the header length
        i = args[0] % 8
        return data[:i] + bytes([data[i] ^ args[1]]) + data[i + 1:] if len(data) > i else data
    if kind == "length":  # a different header length, the rest unchanged
        return struct.pack("<Q", args[0] % 2**64) + data[8:]
    if kind == "header":  # a whole header of these bytes, with its true length
        return struct.pack("<Q", len(args[0])) + args[0]
    if kind == "insert":
        i = spot(args[0])
        return data[:i] + args[1] + data[i:]
    if kind == "delete":
        i = spot(args[0])
        return data[:i] + data[i + args[1]:]
    if kind in ("metadata", "entry", "field", "layers"):  # lie in the JSON header, re-encoded with its true length
        try:
            header, body = _split(data)
        except (ValueError, UnicodeDecodeError, struct.error):
            return data
        if not isinstance(header, dict):
            return data
        names = sorted(k for k in header if k != "__metadata__")
        if kind == "metadata":
            header["__metadata__"] = args[0]
        elif kind == "layers" and isinstance(header.get("__metadata__"), dict):
            header["__metadata__"][args[0]] = args[1]
        elif kind == "entry" and names:
            header[names[args[0] % len(names)]] = args[1]
        elif kind == "field" and names and isinstance(header[names[args[0] % len(names)]], dict):
            header[names[args[0] % len(names)]][args[1]] = args[2]
        return _join(header, body)
    return data


FRACTION = st.floats(0, 1)
BYTE_EDITS = st.one_of(
    st.tuples(st.just("truncate"), FRACTION),
    st.tuples(st.just("flip"), FRACTION, st.integers(1, 255)),
    st.tuples(st.just("flip_length"), st.integers(0, 7), st.integers(1, 255)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1) | BIG_INTS | st.integers(0, 400)),
    st.tuples(st.just("insert"), FRACTION, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), FRACTION, st.integers(1, 16)),
    st.tuples(st.just("header"), JSON_VALUES.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64)),
    st.tuples(st.just("metadata"), JSON_VALUES),
    st.tuples(st.just("layers"), st.sampled_from(["layers", "tied", "format", "format_version"]),
              JSON_VALUES.map(json.dumps) | st.text(max_size=20) | JSON_VALUES),
    st.tuples(st.just("entry"), st.integers(0, 9), JSON_VALUES),
    st.tuples(st.just("field"), st.integers(0, 9), st.sampled_from(["dtype", "shape", "data_offsets"]),
              JSON_VALUES | st.sampled_from(["F32", "BF16", "I64", "U16", "F8_E4M3", "C64"])
              | st.lists(SMALL_INTS | BIG_INTS, max_size=4)),
)


def _read_everything(path: Path) -> None:
    """What the tool does with a weight file: index it, read every tensor, parse the format metadata."""
    index = TensorIndex.of_files([path])
    index.read(index.names())
    index.read(index.names(), torch.float32)
    read_format(index, str(path))


@FUZZ
@given(edits=st.lists(BYTE_EDITS, min_size=1, max_size=4))
@example(edits=[("length", 2**63)]).via("a header length far past the end of the file")
@example(edits=[("field", 0, "shape", [10**30, 10**30])]).via("a shape that lies about its size")
@example(edits=[("field", 0, "data_offsets", [None, None])]).via("found: TypeError in read_header")
@example(edits=[("field", 0, "data_offsets", "00")]).via("found: TypeError in read_header")
@example(edits=[("field", 0, "shape", None)]).via("found: TypeError in TensorIndex.of_files")
@example(edits=[("header", b"[" * 100_000)]).via("found: RecursionError in read_header")
@example(edits=[("header", b'{"a": ' + b"9" * 5000 + b"}")]).via("found: ValueError (int digits) in read_header")
@example(edits=[("layers", "layers", "9" * 5000)]).via("found: ValueError (int digits) in read_format")
@example(edits=[("layers", "layers", "[" * 100_000)]).via("found: RecursionError in read_format")
@example(edits=[("metadata", [1])]).via("__metadata__ not a map of strings")
def test_safetensors_reader_gives_clean_errors(tmp_path_factory, edits):
    data = _real_file()
    for edit in edits:
        data = _apply_byte_edit(data, edit)
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        _read_everything(path)
    except CompressError as err:
        assert_clean(err)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # Python-side allocations (header bytes, parsed JSON): bounded by what the file holds
    assert peak < 64 * len(data) + (4 << 20), f"reading a {len(data)}-byte file allocated {peak} bytes"
    _rss_ok()


# ============================================================================= 2. every codec's decode

DTYPE_NAMES = sorted(DTYPES)


def _tensor(spec: tuple[str, list[int], str]) -> torch.Tensor:
    """A tensor a safetensors file could hold: (dtype name, shape, fill)."""
    name, shape, fill = spec
    dtype = DTYPES[name]
    g = torch.Generator().manual_seed(len(shape) + sum(shape))
    if fill == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        if fill == "extreme":
            values = torch.tensor([math.nan, math.inf, -math.inf, 1e38, -0.0])
            return values[torch.randint(0, 5, shape, generator=g)].to(dtype)
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    if fill == "extreme":
        return torch.tensor([info.min, info.max, 0, -1 if info.min < 0 else 1], dtype=dtype)[
            torch.randint(0, 4, shape, generator=g)]
    return torch.randint(max(info.min, -3), min(info.max, 40), shape, generator=g).to(dtype)


TENSOR_SPECS = st.tuples(st.sampled_from(DTYPE_NAMES), st.lists(st.integers(0, 7), max_size=3),
                         st.sampled_from(["random", "zeros", "extreme"]))
NAMES = st.sampled_from(["values", "indices", "rows", "bias", "mask", "col_idx", "row_ptr", "weight_scale",
                         "weight.values", "weight.mask", "weight.col_idx", "weight.row_ptr",
                         "factor.values", "factor.mask", "factor.col_idx", "factor.row_ptr",
                         "weight.codes", "weight.scales", "weight.zeros", "weight.values.codes", "weight.values.scales",
                         "weight.values.zeros", "values.codes", "values.scales", "values.zeros", "factor.values.codes",
                         "factor.values.scales"])
PARAM_KEYS = st.sampled_from(sorted({"in_features", "out_features", "weight_shape", "format", "bias", "nnz", "dtype",
                                     "fan_in", "k", "kept_rows", "ablated", "index_dtype", "in_channels",
                                     "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                                     "padding_mode", "orientation", "width", "hidden", "rank", "base_key",
                                     "counts_base", "memory", "placement", "counted", "scale_gradients",
                                     "num_embeddings", "embedding_dim", "padding_idx", "quant", "shared_quant"}))
PLACEMENT_KEYS = st.sampled_from(["memory_size", "mapper", "seed", "offset", "tensor_index", "layout", "block_k",
                                  "block_n", "block_z", "extra"])
DELETE = "<delete>"
QUANT_PARAMS = st.fixed_dictionaries({"bits": st.sampled_from([2, 3, 4, 8, 5, 0, True]),
                                      "group_size": st.none() | SMALL_INTS | BIG_INTS, "symmetric": st.booleans()})
PARAM_VALUES = JSON_VALUES | st.just(DELETE) | st.lists(SMALL_INTS, max_size=5) | QUANT_PARAMS | st.sampled_from(
    ["bitmask", "csr", "in", "out", "roast", "randomfold", "linear", "conv", "embedding", "same", "valid", "rps.0"])
CODEC_EDITS = st.one_of(
    st.tuples(st.just("param"), PARAM_KEYS, PARAM_VALUES),
    st.tuples(st.just("placement"), PLACEMENT_KEYS, PARAM_VALUES),
    st.tuples(st.just("tensor"), NAMES, TENSOR_SPECS | st.just(DELETE)),
    st.tuples(st.just("poke"), NAMES, FRACTION, SMALL_INTS | BIG_INTS | st.floats(allow_nan=True)),
    st.tuples(st.just("cast"), NAMES, st.sampled_from(DTYPE_NAMES)),
    st.tuples(st.just("reshape"), NAMES, st.lists(st.integers(0, 7), max_size=3)),
    st.tuples(st.just("shared"), TENSOR_SPECS | st.just(DELETE)),
    st.tuples(st.just("meta"), st.sampled_from(["codec", "version", "params"]), JSON_VALUES),
)


def _put(where: dict, key: str, value: Any) -> None:
    """Set `key`, or remove it when `value` is DELETE."""
    if value == DELETE:
        where.pop(key, None)
    else:
        where[key] = value


def _apply_codec_edit(edit: tuple, meta: dict, tensors: dict[str, torch.Tensor],
                      shared: dict[str, torch.Tensor]) -> None:
    """One mutation of a layer's metadata, own tensors or shared tensor, as a damaged file would hold them."""
    kind, *args = edit
    params = meta.get("params") if isinstance(meta.get("params"), dict) else {}
    if kind == "param":
        _put(params, args[0], args[1])
    elif kind == "placement" and isinstance(params.get("placement"), dict):
        _put(params["placement"], args[0], args[1])
    elif kind == "tensor":
        _put(tensors, args[0], args[1] if args[1] == DELETE else _tensor(args[1]))
    elif kind == "poke" and tensors.get(args[0]) is not None and tensors[args[0]].numel():
        flat = tensors[args[0]].clone().reshape(-1)
        try:
            flat[min(int(args[1] * flat.numel()), flat.numel() - 1)] = args[2]
        except (RuntimeError, OverflowError, ValueError, TypeError):  # not representable: no file holds it either
            return
        tensors[args[0]] = flat.view(tensors[args[0]].shape)
    elif kind == "cast" and args[0] in tensors:
        tensors[args[0]] = tensors[args[0]].to(DTYPES[args[1]])
    elif kind == "reshape" and args[0] in tensors:
        t, numel = tensors[args[0]], math.prod(args[1])
        tensors[args[0]] = t.reshape(args[1]) if numel == t.numel() else t.reshape(-1)[:numel]
    elif kind == "shared" and shared:
        _put(shared, next(iter(shared)), args[0] if args[0] == DELETE else _tensor(args[0]))
    elif kind == "meta":
        meta[args[0]] = args[1]


def _decode_mutated(codec: str, sample: int, edits: list[tuple]) -> None:
    """The loader's path for one layer (metadata checked against the architecture, tensors read, decoded),
    on a real layer's tensors and metadata after `edits`."""
    torch.manual_seed(sample)
    samples = codec_samples(codec)
    layer, dense = samples[sample % len(samples)].make()
    meta = json.loads(json.dumps(layer_metadata(layer)))  # as it comes back from the file
    tensors = {k: v.detach().clone() for k, v in layer.to_tensors().items()}
    shared = {k: v.detach().clone() for k, v in layer.shared_tensors().items()}
    for edit in edits:
        _apply_codec_edit(edit, meta, tensors, shared)
    try:
        cls, params, own, wanted = layer_codec("layer", meta, dense, "fuzz")
        check_layer_tensors("layer", meta["codec"], own, wanted, set(tensors), set(shared), "fuzz")
        parameters = {k: shared_parameter(k, shared[k], "fuzz") for k in wanted}
        decode_layer(cls, "layer", {k: tensors[k] for k in own}, params, parameters, dense, "fuzz")
    except CompressError as err:
        assert_clean(err)
    _rss_ok()


# Inputs the fuzzer found crashing, kept as regressions: (codec, sample, edits).
CODEC_REGRESSIONS: list[tuple[str, int, list[tuple]]] = [
    ("sparse_linear", 0, [("tensor", "weight.mask", ("U8", [1], "random"))]),  # RuntimeError: view of a short mask
    ("sparse_linear", 0, [("cast", "weight.mask", "F8_E4M3")]),  # RuntimeError: no float8 promotion in unpack_bits
    ("sparse_linear", 0, [("cast", "weight.mask", "BF16")]),  # NotImplementedError: rshift on bfloat16
    ("sparse_linear", 0, [("cast", "weight.values", "F8_E4M3")]),  # NotImplementedError: nn.Linear init in float8
    ("sparse_conv2d", 0, [("cast", "weight.values", "I32")]),  # RuntimeError: an int Parameter
    ("sparse_linear", 1, [("reshape", "weight.row_ptr", [])]),  # RuntimeError: repeat_interleave of a 0-d row_ptr
    ("sparse_linear", 0, [("cast", "bias", "BOOL")]),  # RuntimeError: a bool Parameter (found at 400 examples)
    ("condensed_linear", 0, [("cast", "values", "I64")]),  # RuntimeError: an int Parameter
    ("condensed_linear", 0, [("tensor", "bias", ("I8", [5], "random"))]),  # RuntimeError: an int Parameter
    ("fips_linear", 1, [("tensor", "factor.row_ptr", ("BF16", [], "random"))]),  # RuntimeError: diff of 0-d
    ("fips_linear", 0, [("cast", "factor.values", "I16")]),  # RuntimeError: an int Parameter
    ("fips_linear", 0, [("cast", "bias", "U8")]),  # RuntimeError: an int Parameter
    ("rps_linear", 1, [("placement", "block_k", 0)]),  # RuntimeError: integer division by zero
    ("rps_conv2d", 1, [("placement", "layout", DELETE)]),  # RuntimeError: a 'linear' tiling of a 4-D weight
]


@pytest.mark.parametrize("codec", CODECS.names())
def test_codec_decode_gives_clean_errors(codec):
    codec_samples(codec)

    @FUZZ
    @given(sample=st.integers(0, 7), edits=st.lists(CODEC_EDITS, min_size=1, max_size=4))
    def run(sample: int, edits: list[tuple]) -> None:
        _decode_mutated(codec, sample, edits)

    for name, sample, edits in CODEC_REGRESSIONS:
        if name == codec:
            run = example(sample=sample, edits=edits)(run)
    run()


def test_unmutated_samples_decode():
    """The harness itself: every sample decodes without edits (else the fuzzer tests nothing)."""
    for codec, samples in CODEC_SAMPLES.items():
        for sample in range(len(samples)):
            layer, dense = samples[sample].make()
            meta = json.loads(json.dumps(layer_metadata(layer)))
            cls, params, own, wanted = layer_codec("layer", meta, dense, "fuzz")
            shared = {k: shared_parameter(k, v.detach().clone(), "x") for k, v in layer.shared_tensors().items()}
            rebuilt = decode_layer(cls, "layer", layer.to_tensors(), params, shared, dense, "fuzz")
            # (a decoded sparse layer stores in the smaller format again, so compare what both formats hold)
            again = rebuilt.to_tensors()
            assert all(torch.equal(again[k], v) for k, v in layer.to_tensors().items() if k in again), (codec, sample)
            assert json.loads(json.dumps(rebuilt.codec_params())) | {"format": 0} == params | {"format": 0}


# ============================================================================= 3. the recipe parser

FRAGMENTS = st.sampled_from([
    "stages:", "\n  - ", "\n    ", "method: ", "magnitude", "fips", "rps", "condensed", "finetune", "params: ",
    "{sparsity: ", "}", "[", "]", "{", ": ", "- ", "\n", "targets: ", "ignore: ", "description: ", "mlp", "re:(",
    ".nan", ".inf", "-.inf", "1e999", "1e-4", "0x1F", "0o7", "9" * 400, "&a ", "*a", "<<: *a", "!!binary aGk=",
    "!!python/object:os.system", "!!python/tuple [1]", "!!set {a}", "!!omap [a: 1]", "? [1, 2]\n", "? {a: 1}\n",
    "~", "null", "yes", "2001-13-45", "!!timestamp 2001-99-99", "!!float x", "!!int 0b2", "---\n", "...\n",
    "%YAML 1.1\n", "\t", "'", '"', "\\x00", "\x00", "\ufeff", "é", "sparsity", "steps", "lr", "seed", "1", "-1", "0.5",
])
YAML_TEXTS = st.one_of(
    st.lists(FRAGMENTS | st.text(max_size=6), max_size=30).map("".join),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
    st.text(max_size=200),
)


def _params_for(method: str) -> st.SearchStrategy:
    """Param dicts mixing the method's real keys with unknown ones and hostile values."""
    try:
        keys = sorted(f.name for f in __import__("dataclasses").fields(METHODS.get(method).config_cls))
    except CompressError:
        keys = []
    values = (JSON_VALUES | st.floats() | st.sampled_from([float("nan"), float("inf"), 10**400, 1e308, -0.0, "1e-4"])
              | st.binary(max_size=8))
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=5) if keys else st.text(max_size=5), values,
                           max_size=4)


STAGES = st.builds(
    lambda method, params, targets, extra: {"method": method, "params": params, "targets": targets, **extra},
    st.sampled_from(METHODS.names()) | JSON_SCALARS,
    st.sampled_from(METHODS.names()).flatmap(_params_for) | JSON_VALUES,
    st.lists(st.sampled_from(["mlp", "attention", "re:.*fc1", "re:(", ""]) | JSON_SCALARS, max_size=3) | JSON_SCALARS,
    st.dictionaries(st.sampled_from(["ignore", "method", "stuff", "params"]), JSON_VALUES, max_size=2),
) | JSON_VALUES
RECIPES = st.builds(lambda stages, extra: {"stages": stages, **extra},
                    st.lists(STAGES, max_size=3) | JSON_VALUES,
                    st.dictionaries(st.sampled_from(["description", "extra"]), JSON_VALUES | st.binary(max_size=5),
                                    max_size=2))
OVERRIDES = st.lists(st.builds(lambda i, key, value: f"{i}.{key}={value}", st.sampled_from(["0", "1", "9", "²", "-1",
                                                                                            "00", "x", " 0"]),
                               st.sampled_from(["sparsity", "method", "targets", "ignore", "params", "steps", ""])
                               | st.text(max_size=5),
                               YAML_TEXTS | st.sampled_from(["[", "{a: 1}", "!!binary x", ".nan", "&a [*a]"]))
                     | st.text(max_size=20), max_size=3)


def _parse(text: str, overrides: list[str]) -> None:
    try:
        parse_recipe(text, "fuzz.yaml", overrides)
    except CompressError as err:
        assert_clean(err)


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
OK = "stages: [{method: magnitude}]"


@FUZZ
@given(text=YAML_TEXTS, overrides=OVERRIDES)
@example(text="!!timestamp 2001-99-99", overrides=[]).via("found: AttributeError inside PyYAML")
@example(text="!!int 0b2", overrides=[]).via("found: ValueError")
@example(text="!!float x", overrides=[]).via("found: ValueError")
@example(text="2001-13-45", overrides=[]).via("found: ValueError (a date YAML reads as a timestamp)")
@example(text="!!python/object:os.system", overrides=[]).via("found: ConstructorError outside the YAML try")
@example(text="!!binary x", overrides=[]).via("found: ConstructorError outside the YAML try")
@example(text="stages: [{method: []}]", overrides=[]).via("found: TypeError (unhashable method)")
@example(text="[" * 5000, overrides=[]).via("found: RecursionError")
@example(text="stages: &a [*a]", overrides=[]).via("found: RecursionError (a recursive alias)")
@example(text=LAUGHS + OK, overrides=[]).via("found: 9^8 nodes built from 300 bytes (minutes, GBs)")
@example(text=OK, overrides=["0.sparsity={sparsity: stages:"]).via("found: ParserError from --set")
@example(text=OK, overrides=["0.sparsity=? [1, 2]\n"]).via("found: ConstructorError from --set")
@example(text=OK, overrides=["\u00b2.sparsity=1"]).via("found: ValueError (a digit int() refuses)")
@example(text=OK, overrides=["9" * 5000 + ".sparsity=1"]).via("found: ValueError (int digits limit)")
@example(text="stages: [[1]]", overrides=["0.sparsity=1"]).via("found: AttributeError (stage not a mapping)")
@example(text="stages: [~]", overrides=["0.method=x"]).via("found: TypeError (stage not a mapping)")
@example(text="stages: [{method: magnitude, params: [1]}]", overrides=["0.sparsity=1"]).via("found: TypeError")
def test_recipe_texts_give_clean_errors(text, overrides):
    _parse(text, overrides)


@FUZZ
@given(recipe=RECIPES, overrides=OVERRIDES)
def test_recipe_structures_give_clean_errors(recipe, overrides):
    # yaml.dump (not safe_dump): Python types become tags (!!python/tuple, !!binary) the safe loader must refuse
    _parse(yaml.dump(recipe, sort_keys=False), overrides)
    _parse(json.dumps(recipe, default=repr), overrides)  # JSON is YAML too: NaN, Infinity, huge integers


@FUZZ
@given(overrides=OVERRIDES)
def test_set_values_give_clean_errors(overrides):
    stages = [{"method": "magnitude", "params": {"sparsity": 0.5}}, ["not", "a", "mapping"], None]
    for override in overrides:
        try:
            apply_override(stages, override)
        except CompressError as err:
            assert_clean(err)
