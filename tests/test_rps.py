"""Randomized parameter sharing (ROAST / STABLE-RPS): the maps, the projection, the gradient scaling,
the codec, and the method end to end on the real MiniLM and the digits ViT."""
import copy
import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from compresscli import MagnitudeConfig, compress_, load
from compresscli.io.checkpoint import load_checkpoint
from compresscli.core.errors import RecipeError, StageError
from compresscli.io.native import save_model, tensors_to_model
from compresscli.io.safetensors import TensorIndex
from compresscli.methods.rps import RPSConfig
from compresscli.codecs.rps.training import RPSConv2d, RPSEmbedding, RPSLinear
from compresscli.codecs.rps.inference import CompactRPSConv2d, CompactRPSEmbedding, CompactRPSLinear
from compresscli.codecs.rps.hashing import Placement, randomfold
from compresscli.engine.options import RunOptions
from compresscli.engine.whole_model import run_recipe
from compresscli.engine.recipe import load_recipe, parse_recipe
from conftest import DEVICES, REPO, run_cli, tiny_timm

RPS_TYPES = (RPSLinear, RPSConv2d, RPSEmbedding, CompactRPSLinear, CompactRPSConv2d, CompactRPSEmbedding)


class Mixed(nn.Module):
    """One of each layer type, at very different scales (as embeddings and projections are)."""

    def __init__(self, scales=(1.0, 100.0, 0.01)):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(6 + 3, 5)
        with torch.no_grad():
            for layer, s in zip((self.emb, self.conv, self.fc), scales):
                layer.weight.mul_(s)

    def forward(self, ids, image):  # (B, T), (B, 2, 4, 4) -> (B, 5)
        pooled = self.emb(ids).mean(1)  # (B, 6)
        feats = self.conv(image).mean((2, 3))  # (B, 3)
        return self.fc(torch.cat([pooled, feats], -1))


def _mixed_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 11, (4, 7), generator=g), torch.randn(4, 2, 4, 4, generator=g)


def _roast_small(**kw):
    return RPSConfig(mapper="roast", block_k=2, block_n=3, block_z=2, **kw)


def _rps_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, RPS_TYPES)}


def _memory(model):
    return next(iter(_rps_layers(model).values())).memory


# ----------------------------------------------------------------------------- maps

@pytest.mark.parametrize("n,size", [(1000, 1000), (1000, 1500), (1000, 999), (1000, 333), (4097, 64), (10, 3)])
@pytest.mark.parametrize("seed", [0, 7])
def test_randomfold_is_injective_when_it_fits_and_balanced_otherwise(n, size, seed):
    slots = randomfold(torch.arange(n), size, seed)
    assert slots.min() >= 0 and slots.max() < size
    loads = torch.bincount(slots, minlength=size)
    if size >= n:
        assert len(set(slots.tolist())) == n  # a bijection onto its image: nothing shared at c <= 1
    else:
        assert set(loads.tolist()) <= {n // size, -(-n // size)}


def test_randomfold_is_a_hash_not_the_identity():
    a, b = randomfold(torch.arange(5000), 1000, 0), randomfold(torch.arange(5000), 1000, 1)
    assert not torch.equal(a, b)
    assert not torch.equal(a[1000:2000], a[:1000])  # each chunk of M positions has its own rotation


def test_roast_tiles_are_contiguous_and_in_range():
    p = Placement(500, "roast", 3, 0, 0, "linear", block_k=4, block_n=8)
    index, sign = p.locate((16, 12))  # Linear(12 -> 16): tiles of the (in=12, out=16) view
    assert index.min() >= 0 and index.max() < 500 and set(sign.unique().tolist()) == {-1, 1}
    view = index.t()  # (in, out)
    tile = view[4:8, 8:16]  # one full 4 x 8 tile
    assert torch.equal(tile - tile[0, 0], torch.arange(32).view(4, 8))


def test_the_map_is_the_same_in_another_process():
    p = Placement(7777, "roast", 11, 123, 2, "embedding", block_z=16)
    code = ("import hashlib, torch; from compresscli.codecs.rps.hashing import Placement as P; "
            "i, s = P(7777, 'roast', 11, 123, 2, 'embedding', block_z=16).locate((50, 40)); "
            "j = P(7777, 'randomfold', 11, 123, 2).locate((50, 40))[0]; "
            "print(hashlib.sha256(i.numpy().tobytes() + s.numpy().tobytes() + j.numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    i, s = p.locate((50, 40))
    j = Placement(7777, "randomfold", 11, 123, 2).locate((50, 40))[0]
    here = hashlib.sha256(i.numpy().tobytes() + s.numpy().tobytes() + j.numpy().tobytes()).hexdigest()
    assert out.stdout.strip() == here
    other = Placement(7777, "roast", 12, 123, 2, "embedding", block_z=16).locate((50, 40))[0]
    assert not torch.equal(other, i)  # the seed matters


# ----------------------------------------------------------------------------- projection

@pytest.mark.parametrize("config", [RPSConfig(compression=3), _roast_small(compression=3),
                                    RPSConfig(compression=1.7, memory_scale=0.05)], ids=["randomfold", "roast", "scaled"])
def test_projection_is_the_least_squares_solution(config):
    model = Mixed()
    weights = [model.emb.weight, model.conv.weight, model.fc.weight]
    target = torch.cat([w.detach().reshape(-1) for w in weights]).double().numpy()
    compress_(model, config, None)
    layers = [model.emb, model.conv, model.fc]
    size = _memory(model).numel()
    assert size == math.floor(len(target) / config.compression)
    design = np.zeros((len(target), size))  # w = A m with A[i, h(i)] = lambda_i g_i
    row = 0
    for layer in layers:
        idx, sign = layer.index.reshape(-1).numpy(), layer.sign.reshape(-1).numpy()
        design[row + np.arange(len(idx)), idx] = sign * float(layer.weight_scale)
        row += len(idx)
    solution = np.linalg.lstsq(design, target, rcond=None)[0]  # minimum norm: 0 on empty slots
    memory = _memory(model).detach().double().numpy()
    assert np.allclose(memory, solution, rtol=1e-5, atol=1e-7 * np.abs(solution).max())
    scales = [float(layer.weight_scale) for layer in layers]
    assert max(scales) / min(scales) > 1e3  # the case really mixes scales


def test_c1_recovers_every_weight():
    model = Mixed()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, image = _mixed_inputs()
    before = model(ids, image)
    stats = compress_(model, RPSConfig(compression=1), None)
    assert stats["memory"] == stats["weights"] and stats["slot_load_min"] == stats["slot_load_max"] == 1
    for name in ("emb", "conv", "fc"):
        assert torch.allclose(getattr(model, name).weight, dense[f"{name}.weight"], rtol=1e-6, atol=0)
    assert torch.allclose(model(ids, image), before, rtol=1e-5, atol=1e-6)


def test_stats_and_compression():
    model = tiny_timm()
    targets = lambda m, n: ".mlp." in n or ".attn." in n  # noqa: E731
    linears = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if targets(m, n) and isinstance(m, nn.Linear)}
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    norm_weights = {n: copy.deepcopy(m.state_dict()) for n, m in norms.items()}
    stats = compress_(model, RPSConfig(compression=10), targets)
    weights = sum(w.numel() for w in linears.values())
    assert stats["weights"] == weights and stats["memory"] == weights // 10 == _memory(model).numel()
    assert stats["compression"] == pytest.approx(10, rel=1e-3)
    assert stats["slot_load_min"] >= 10 and stats["slot_load_max"] <= 11 and stats["empty_slots"] == 0
    layers = _rps_layers(model)
    assert sorted(layers) == sorted(linears) and len(layers) == stats["layers"] == 8  # qkv, proj, fc1, fc2 x 2
    error = sum((layers[n].weight.detach().double() - w.double()).pow(2).sum() for n, w in linears.items())
    power = sum(w.double().pow(2).sum() for w in linears.values())
    assert stats["projection_rel_error"] == pytest.approx(math.sqrt(error / power), rel=1e-6)
    assert 0 < stats["projection_rel_error"] < 1
    assert len(norms) == 5  # 2 per block and the final norm: the same modules, with the same weights
    for name, norm in norms.items():
        assert model.get_submodule(name) is norm
        assert all(torch.equal(v, norm_weights[name][k]) for k, v in norm.state_dict().items())


# ----------------------------------------------------------------------------- gradient scaling

def _sgd_steps(model, steps=4, lr=0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _targets(module, name):
    return ".mlp." in name or ".attn." in name or name == "patch_embed.proj"


@pytest.mark.parametrize("memory_scale", [1.0, 0.1, 10.0])
def test_scaled_sgd_at_c1_is_dense_sgd_step_for_step(memory_scale):
    dense, shared, plain = tiny_timm(), tiny_timm(), tiny_timm()
    compress_(shared, RPSConfig(compression=1, memory_scale=memory_scale), _targets)
    compress_(plain, RPSConfig(compression=1, memory_scale=memory_scale, scale_gradients=False), _targets)
    for step in range(3):
        for m in (dense, shared, plain):
            _sgd_steps(m, steps=1)
        for name, layer in _rps_layers(shared).items():
            want = dense.get_submodule(name).weight
            assert torch.allclose(layer.weight, want, rtol=1e-4, atol=1e-6), (step, name)
    drift = max((plain.get_submodule(n).weight - dense.get_submodule(n).weight).abs().max().item()
                for n in _rps_layers(plain))
    if memory_scale != 1.0:  # plain ROAST gradients move w by lambda^2 times the dense step
        assert drift > 1e-3
    else:  # lambda = rms(w_t) / rms(all) is not 1 either, but close: still a different trajectory
        assert drift > 1e-6


def test_gradient_scaling_survives_deepcopy():
    model = Mixed()
    compress_(model, RPSConfig(compression=2, memory_scale=0.1), None)
    clone = copy.deepcopy(model)
    assert _memory(clone) is not _memory(model) and clone.fc.memory is clone.emb.memory
    ids, image = _mixed_inputs()
    for m in (model, clone):
        m(ids, image).sum().backward()
    assert torch.allclose(_memory(clone).grad, _memory(model).grad)
    unscaled = copy.deepcopy(model)
    for layer in _rps_layers(unscaled).values():
        layer.book.scale_gradients = False
    _memory(unscaled).grad = None
    unscaled(ids, image).sum().backward()
    divisor = model.fc.book.divisor(torch.device("cpu"), torch.float32)
    assert torch.allclose(_memory(model).grad * divisor, _memory(unscaled).grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- codec

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [RPSConfig(compression=4), _roast_small(compression=4, scale_gradients=False)],
                         ids=["randomfold", "roast"])
def test_safetensors_round_trip(tmp_path, device, config):
    model = Mixed().to(device)
    compress_(model, config, None)
    save_model(model, tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert "shared.rps.0.memory" in stored and not any(k.endswith((".index", ".sign", ".weight")) for k in stored)
    rebuilt = Mixed(scales=(3.0, 3.0, 3.0))  # other weights: everything must come from the file
    tensors_to_model(rebuilt, TensorIndex.of_directory(tmp_path), "test", trainable=True)
    rebuilt.to(device)
    ids, image = (t.to(device) for t in _mixed_inputs())
    assert torch.equal(rebuilt(ids, image), model(ids, image))
    assert rebuilt.emb.memory is rebuilt.conv.memory is rebuilt.fc.memory
    for name in ("emb", "conv", "fc"):
        a, b = getattr(model, name), getattr(rebuilt, name)
        assert type(a) is type(b) and torch.equal(a.index, b.index) and torch.equal(a.sign, b.sign)
    assert torch.equal(rebuilt.fc.book.denominator, model.fc.book.denominator)  # gradient scale rebuilt too


def test_padding_row_gets_no_gradient():
    model = Mixed()
    compress_(model, RPSConfig(compression=1), lambda m, n: n == "emb")
    out = model.emb(torch.tensor([[0, 0]]))
    out.sum().backward()
    assert _memory(model).grad.abs().sum() == 0


def test_tied_lm_head_reads_the_embedding_slots(tiny_hf_dirs, tmp_path):
    ckpt = load_checkpoint(tiny_hf_dirs["gpt2"])
    model = ckpt.model
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 99, (2, 9))
    stats = compress_(model, RPSConfig(compression=1), lambda m, n: n == "transformer.wte" or n.endswith("mlp.c_fc"))
    assert stats["tied"] == ["lm_head"] and isinstance(model.lm_head, RPSLinear)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert stats["weights"] == 99 * 32 + 2 * 32 * 128  # the tied tensor once
    save_model(model, tmp_path)
    index = TensorIndex.of_directory(tmp_path)
    assert "lm_head.weight" not in index and "transformer.wte.weight" not in index
    rebuilt = load_checkpoint(tiny_hf_dirs["gpt2"]).model
    tensors_to_model(rebuilt, index, "test", trainable=True)
    assert torch.allclose(rebuilt(ids).logits, model(ids).logits, atol=1e-6)
    assert torch.equal(rebuilt.lm_head.book.denominator, model.lm_head.book.denominator)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("params,needle", [({"compression": 0.5}, "compression must be"),
                                           ({"mapper": "fold"}, "mapper must be one of"),
                                           ({"block_k": 0}, "block_k must be"),
                                           ({"memory_scale": -1}, "memory_scale must be"),
                                           ({"seed": -2}, "seed must be")])
def test_bad_config_is_a_clear_error(params, needle):
    with pytest.raises(StageError, match=needle):
        RPSConfig(**params)
    text = f"description: x\nstages:\n  - method: rps\n    params: {json.dumps(params)}\n"
    with pytest.raises(RecipeError, match=needle):
        parse_recipe(text, "r.yaml")


def test_bad_targets_are_clear_errors():
    with pytest.raises(StageError, match="no Linear, Conv2d or Embedding"):
        compress_(tiny_timm(), RPSConfig(), lambda m, n: n.endswith("norm1"))
    with pytest.raises(StageError, match="fewer than one roast tile"):
        compress_(tiny_timm(), RPSConfig(compression=100, mapper="roast"), lambda m, n: n == "blocks.0.mlp.fc1")
    with pytest.raises(StageError, match="leaves no memory"):
        compress_(Mixed(), RPSConfig(compression=10**6), None)
    model = tiny_timm()
    compress_(model, MagnitudeConfig(sparsity=0.5), lambda m, n: n == "blocks.0.mlp.fc1")
    with pytest.raises(StageError, match="already compressed"):
        compress_(model, RPSConfig(), lambda m, n: n == "blocks.0.mlp.fc1")


def test_second_stage_gets_its_own_memory(tmp_path):
    model = tiny_timm()
    compress_(model, RPSConfig(compression=2), lambda m, n: n.startswith("blocks.0.") and n.endswith(("fc1", "fc2")))
    compress_(model, RPSConfig(compression=2), lambda m, n: n.startswith("blocks.1.") and n.endswith(("fc1", "fc2")))
    names = {layer.memory_name for layer in _rps_layers(model).values()}
    assert names == {"rps.0.memory", "rps.1.memory"}
    save_model(model, tmp_path)
    assert {"shared.rps.0.memory", "shared.rps.1.memory"} <= set(TensorIndex.of_directory(tmp_path).names())


# ----------------------------------------------------------------------------- real models, real pipeline

def test_minilm_at_c1_reloads_equal_to_the_original(minilm_dir, tmp_path):
    recipe = parse_recipe("description: exact RPS at c=1\nstages:\n  - method: rps\n    targets: [linear, embeddings]\n"
                          "    params: {compression: 1}\n", "rps-1.yaml")
    original = load_checkpoint(minilm_dir).model
    result = run_recipe(load_checkpoint(minilm_dir), recipe, tmp_path / "out", RunOptions(evaluate=False))
    stats = result.report["stages"][0]["stats"]
    assert stats["compression"] == 1.0 and stats["slot_load_max"] == 1
    assert stats["layers"] == 6 * 6 + 1 + 3  # every encoder Linear, the pooler, three embedding tables
    reloaded = load(tmp_path / "out")
    assert isinstance(reloaded.embeddings.word_embeddings, CompactRPSEmbedding)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tok(["Randomized parameter sharing at one times compression.", "A second, longer sentence to pad."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        want = original(**batch).last_hidden_state
        got = reloaded(**batch).last_hidden_state
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.slow
def test_checkpoint_at_c10_is_a_tenth_of_the_targets(minilm_dir, tmp_path):
    recipe = load_recipe("rps-10", overrides=["1.steps=0"])
    result = run_recipe(load_checkpoint(minilm_dir), recipe, tmp_path / "out", RunOptions(evaluate=False))
    stats = result.report["stages"][0]["stats"]
    header = load_file(str(tmp_path / "out" / "model.safetensors"))
    memory_bytes = header["shared.rps.0.memory"].numel() * 4
    assert memory_bytes == stats["memory"] * 4 and stats["weights"] / stats["memory"] == pytest.approx(10, rel=1e-4)
    dense = load_file(str(minilm_dir / "model.safetensors"))
    targeted = sum(v.numel() * 4 for k, v in dense.items()
                   if k.endswith("weight") and "LayerNorm" not in k and "embeddings" not in k)
    assert memory_bytes == pytest.approx(targeted / 10, rel=1e-3)


@pytest.mark.parametrize("recipe", ["rps-10", pytest.param("rps-roast-10", marks=pytest.mark.slow)])
def test_recipe_end_to_end_on_the_digits_vit(capsys, tmp_path, digits_vit_dir, recipe):
    out = tmp_path / recipe
    code, stdout, stderr = run_cli(capsys, "run", str(digits_vit_dir), "--recipe", recipe, "--data", "digits",
                                   "--out", str(out), "--set", "1.steps=150", "--set", "1.lr=3e-3", "--json")
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    metrics = {m["name"]: m for m in report["eval"]["metrics"]}
    accuracy = metrics["accuracy"]
    # 10x smaller: the projection alone is near chance (~0.1), 150 recovery steps bring it far above (0.82 measured)
    assert accuracy["original"] > 0.9 and accuracy["compressed"] > 0.5
    assert report["reload"]["max_abs_diff"] < 1e-4
    assert {type(m) for m in _rps_layers(load(out)).values()} == {CompactRPSLinear}
    assert {type(m) for m in _rps_layers(load(out, trainable=True)).values()} == {RPSLinear}
