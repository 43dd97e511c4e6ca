"""Tests driven by the registries, as timm tests every registered model: every registered method on a tiny
model of each family and on the real MiniLM, every bundled recipe end to end, every codec round trip. A new
method, recipe or codec is tested here without anyone adding it to a list (a new codec needs a small sample
layer in conftest.CODEC_SAMPLES, and the test says so)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import compresscli
from compresscli.io.checkpoint import load_checkpoint
from compresscli.methods import METHODS
from compresscli.codecs.base import compressed_layers
from compresscli.codecs import CODECS
from compresscli.io.inspect import inspect_path
from compresscli.engine.options import RunOptions
from compresscli.engine.whole_model import run_recipe
from compresscli.engine.recipe import Recipe, Stage, bundled_recipes, load_recipe, make_config
from conftest import codec_samples, steps_like, tiny_timm

FAMILIES = ["bert", "gpt2", "llama", "vit"]
FAST = dict(batch_size=4, calibration_examples=4, max_length=16, evaluate=False)


def _default_stage(method: str) -> Stage:
    """The method's own one-stage recipe: its defaults and default targets, every steps-like field at 1."""
    cls = METHODS.get(method).config_cls
    return Stage(make_config(method, {name: 1 for name in steps_like(cls)}), list(cls.default_targets))


@pytest.fixture(scope="module")
def family_dirs(tiny_text_dirs, tmp_path_factory) -> dict:
    """A tiny model directory and its --data per family: the text models read MiniLM's tokenizer, so the
    real pydoc text calibrates them; the ViT reads the real digits (10 classes) resized to 16x16."""
    vit = tmp_path_factory.mktemp("tiny-vit")
    model = tiny_timm(num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(vit / "model.safetensors"))
    (vit / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 10,
        "model_args": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
        "pretrained_cfg": {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3}}))
    dirs = {name: (tiny_text_dirs[name], "pydoc") for name in ("bert", "gpt2", "llama")}
    return {**dirs, "vit": (vit, "digits")}


def _inputs(ckpt) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if ckpt.task().modality == "image":
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g)}
    ids = torch.randint(1000, ckpt.model.config.vocab_size, (2, 11), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _dry_run(path, data, recipe: Recipe, tmp_path) -> None:
    """Nothing written; every compressing stage matches modules and makes them smaller."""
    dry = run_recipe(load_checkpoint(path), recipe, tmp_path / "dry", RunOptions(data=data, dry_run=True, **FAST))
    assert not (tmp_path / "dry").exists()
    for stage, record in zip(recipe.stages, dry.stages):
        if stage.config.compresses:
            assert record.modules and record.bytes_after < record.bytes_before, record


def _real_run_reloads(path, data, recipe: Recipe, tmp_path):
    """A real run, then the output reloads computing what the in-memory compressed model computes: its
    training form bit for bit, its inference form up to the kernels' summation order."""
    ckpt = load_checkpoint(path)
    out = tmp_path / "out"
    result = run_recipe(ckpt, recipe, out, RunOptions(data=data, **FAST))
    report = json.loads((out / "report.json").read_text())
    inputs = _inputs(ckpt)
    task = ckpt.task()
    with torch.no_grad():
        expected = task.outputs(result.model.eval(), inputs)
        trained = task.outputs(compresscli.load(out, trainable=True), inputs)
        got = task.outputs(compresscli.load(out), inputs)
        original = task.outputs(load_checkpoint(path).model.eval(), inputs)
    scale = max(1.0, expected.abs().max().item())
    assert report["reload"]["max_abs_diff"] <= 1e-4 * scale  # the run checked the inference form too
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * scale)
    if any(stage.config.compresses for stage in recipe.stages):  # (recovering an intact model may change nothing)
        assert not torch.allclose(expected, original), "the compression left the model as it was"
    _inspect_says_what_loading_holds(out)
    return result


def _inspect_says_what_loading_holds(out) -> None:
    """`compress inspect`'s in-memory bytes of the compressed layers (from the file's metadata alone) are
    the bytes their inference forms hold once loaded, shared tensors counted once."""
    rows = {r["name"]: r for r in inspect_path(out)["layers"]}
    layers = compressed_layers(compresscli.load(out))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for layer in layers.values() for t in (*layer.parameters(), *layer.buffers())}
    assert sum(rows[name]["memory_bytes"] for name in layers) == sum(storages.values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_a_tiny_model_of_each_family(family, method, family_dirs, tmp_path):
    path, data = family_dirs[family]
    recipe = Recipe(f"{method} with its defaults", [_default_stage(method)], f"<{method} defaults>")
    _dry_run(path, data, recipe, tmp_path)  # every method applies to every family: a RecipeError fails here
    _real_run_reloads(path, data, recipe, tmp_path)  # what ran dry must run for real


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_the_real_minilm(method, minilm_dir, tmp_path):
    """No skipping here: every method must apply to a real BERT (the dry runs are on the tiny models)."""
    recipe = Recipe(f"{method} with its defaults", [_default_stage(method)], f"<{method} defaults>")
    result = _real_run_reloads(minilm_dir, "pydoc", recipe, tmp_path)
    if METHODS.get(method).config_cls.compresses:
        record = result.stages[0]
        assert record.params_after < record.params_before or record.bytes_after < record.bytes_before


def _recipe_overrides(name: str) -> list[str]:
    recipe = load_recipe(name)
    return [f"{i}.{field}=1" for i, stage in enumerate(recipe.stages) for field in steps_like(type(stage.config))]


@pytest.mark.parametrize("name", bundled_recipes())
def test_every_bundled_recipe_end_to_end(name, family_dirs, tmp_path):
    """On the tiny BERT with real pydoc text, every steps-like parameter at 1; evaluated, saved, reloaded."""
    path, data = family_dirs["bert"]
    recipe = load_recipe(name, _recipe_overrides(name))
    out = tmp_path / "out"
    ckpt = load_checkpoint(path)
    result = run_recipe(ckpt, recipe, out, RunOptions(data=data, **{**FAST, "evaluate": True}, eval_examples=4))
    assert result.report["reload"]["max_abs_diff"] <= 1e-5
    assert [s["method"] for s in result.report["stages"]] == [s.method for s in recipe.stages]
    inputs = _inputs(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.task().outputs(compresscli.load(out), inputs),
                                   ckpt.task().outputs(result.model.eval(), inputs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("codec", CODECS.names())
def test_every_codec_round_trips_to_the_same_outputs(codec):
    """Encoded, written as safetensors bytes with its params as JSON, decoded: the layer computes what the
    original layer computed (the fuzz and export tests compare a decoded layer with itself, in tensors or in
    its dense form; this compares it with the layer that was encoded)."""
    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes
    from torch import nn

    from compresscli.codecs import codec_for

    for sample in codec_samples(codec):
        torch.manual_seed(0)
        layer, _ = sample.make()
        layer.eval()
        tensors = load_bytes(save_bytes({k: v.contiguous() for k, v in layer.to_tensors().items()}))
        params = json.loads(json.dumps(layer.codec_params()))
        shared = {k: nn.Parameter(v.detach().clone(), requires_grad=v.is_floating_point())
                  for k, v in layer.shared_tensors().items()}
        decoded = codec_for(codec).from_tensors(tensors, params, shared).eval()
        x = sample.input()
        with torch.no_grad():
            torch.testing.assert_close(decoded(x), layer(x), rtol=0, atol=1e-6)
