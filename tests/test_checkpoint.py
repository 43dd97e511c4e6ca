import json

import pytest
import torch
from safetensors.torch import save_file

from compresscli.io.checkpoint import load_checkpoint
from compresscli.core.errors import CheckpointError
from conftest import tiny_timm


def test_minilm_loads_and_embeds(minilm_dir):
    ckpt = load_checkpoint(minilm_dir)
    assert ckpt.kind == "hf" and type(ckpt.model).__name__ == "BertModel"
    assert sum(p.numel() for p in ckpt.model.parameters()) == 22_713_216


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_tiny_hf_dirs_load_exactly(tiny_hf_dirs, name):
    import transformers

    path = tiny_hf_dirs[name]
    model = load_checkpoint(path).model
    config = transformers.AutoConfig.from_pretrained(path)
    reference = getattr(transformers, config.architectures[0])(config)
    from safetensors.torch import load_file

    reference.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    reference.tie_weights()
    ids = torch.randint(0, 99, (2, 7))
    out = model(input_ids=ids)
    ref = reference.eval()(input_ids=ids)
    key = "logits" if hasattr(out, "logits") else "last_hidden_state"
    assert torch.allclose(getattr(out, key), getattr(ref, key), atol=1e-5)
    if name == "gpt2":  # Conv1D became Linear with the transposed weight
        assert isinstance(model.transformer.h[0].mlp.c_fc, torch.nn.Linear)


def test_timm_arch_with_weights(tmp_path):
    model = tiny_timm("resnet18", num_classes=7)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    ckpt = load_checkpoint("timm:resnet18", tmp_path / "w.safetensors")
    assert ckpt.model.num_classes == 7
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(ckpt.model(x), model.eval()(x), atol=1e-5)


def test_digits_vit_is_a_real_trained_model(digits_vit_dir):
    config = json.loads((digits_vit_dir / "config.json").read_text())
    assert config["training"]["eval_accuracy"] >= 0.95
    assert load_checkpoint(digits_vit_dir).kind == "timm"


def test_bad_inputs_have_clear_errors(tmp_path, minilm_dir):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="did you mean 'resnet18'"):
        load_checkpoint("timm:resnet81", tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="needs its weights"):
        load_checkpoint("timm:resnet18")


def test_corrupt_and_truncated_safetensors(tmp_path, minilm_dir):
    bad = tmp_path / "garbage"
    bad.mkdir()
    (bad / "config.json").write_text((minilm_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        load_checkpoint(bad)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text((minilm_dir / "config.json").read_text())
    data = (minilm_dir / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        load_checkpoint(cut)


def test_weights_that_do_not_fit_are_named(tmp_path):
    model = tiny_timm()
    state = model.state_dict()
    state.pop("blocks.0.mlp.fc1.bias")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint("timm:vit_tiny_patch16_224", tmp_path / "w.safetensors")
    assert "missing: blocks.0.mlp.fc1.bias" in str(err.value) and "unexpected: extra.weight" in str(err.value)
