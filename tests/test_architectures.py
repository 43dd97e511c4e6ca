import pytest

from compresscli.model.architecture import detect
from compresscli.io.checkpoint import load_checkpoint
from compresscli.core.errors import RecipeError
from conftest import tiny_timm


def test_minilm_real(minilm_dir):
    arch = detect(load_checkpoint(minilm_dir).model)
    assert arch.family == "bert" and len(arch.blocks) == 6
    assert arch.blocks[0].width == 384 and arch.blocks[0].hidden == 1536
    assert [layer.role for layer in arch.blocks[0].mlp] == ["fc1", "fc2"]
    assert len(arch.groups["mlp"]) == 12 and len(arch.groups["attention"]) == 24


@pytest.mark.parametrize("name, family, roles", [
    ("bert", "bert", ["fc1", "fc2"]), ("gpt2", "gpt2", ["fc1", "fc2"]), ("llama", "llama", ["gate", "up", "down"])])
def test_hf_families(tiny_hf_dirs, name, family, roles):
    model = load_checkpoint(tiny_hf_dirs[name]).model
    arch = detect(model)
    assert arch.family == family and len(arch.blocks) == 2
    assert [layer.role for layer in arch.blocks[1].mlp] == roles
    for layer in arch.blocks[0].mlp:  # orientation: "in" layers map d -> h
        weight = model.get_submodule(layer.name).weight
        d, h = arch.blocks[0].width, arch.blocks[0].hidden
        assert tuple(weight.shape) == ((h, d) if layer.orientation == "in" else (d, h))


def test_vit_and_swin_stages():
    vit = detect(tiny_timm())
    assert vit.family == "timm-mlp" and [b.name for b in vit.blocks] == ["blocks.0", "blocks.1"]
    assert vit.groups["head"] == ["head"]
    swin = detect(tiny_timm("swin_tiny_patch4_window7_224"))
    assert [b.stage for b in swin.blocks] == [0, 1]
    assert swin.blocks[0].width != swin.blocks[1].width  # groups must never cross a change of width


def test_resolve_targets_and_errors():
    model = tiny_timm()
    arch = detect(model)
    assert arch.resolve(["mlp"], model, "s") == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert arch.resolve(["re:blocks\\.1\\.mlp\\.fc.*"], model, "s") == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    with pytest.raises(RecipeError, match="matches no module"):
        arch.resolve(["re:nothing.*"], model, "s")
    with pytest.raises(RecipeError, match="did you mean 'mlp'"):
        arch.resolve(["mlps"], model, "s")
