"""Checkpoints load through transformers and timm as published: the class that fits the tensors, the
sentence-transformers layouts, shards, the stored dtype, families no table lists."""
import json
import shutil

import pytest
import torch
import transformers
from torch import nn

import compresscli
from compresscli.model.architecture import detect
from compresscli.io.checkpoint import load_checkpoint
from compresscli.core.errors import RecipeError
from compresscli.engine.options import RunOptions
from compresscli.engine.run import compress_source
from compresscli.engine.recipe import parse_recipe
from compresscli.io.safetensors import INDEX_NAME, TensorIndex
from compresscli.io.source import open_source
from conftest import tiny_text_configs, write_tiny_text_model

MAGNITUDE = "stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5, scope: layer}\n"


def _copy_minilm(minilm_dir, path, **config_changes):
    shutil.copytree(minilm_dir, path)
    config = json.loads((path / "config.json").read_text())
    config.update(config_changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _embed(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def test_a_head_class_without_its_head_loads_as_the_base_model(minilm_dir, tmp_path):
    """How sentence-embedding checkpoints are published: the encoder and pooler under a masked-LM config."""
    path = _copy_minilm(minilm_dir, tmp_path / "mlm", architectures=["BertForMaskedLM"])
    source = open_source(path)
    assert source.model_class == "BertModel"
    assert any("names BertForMaskedLM" in note and "cls.predictions" in note for note in source.notes)
    ckpt = load_checkpoint(path)
    reference = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    ids = torch.randint(1000, 30000, (2, 9))
    assert type(ckpt.model) is transformers.BertModel and torch.allclose(_embed(ckpt.model, ids), _embed(reference, ids))


def test_sentence_transformers_layouts_load_their_encoder_and_pooling(minilm_dir, tmp_path):
    assert open_source(minilm_dir).pooling == "mean"  # the real MiniLM is a sentence-transformers directory
    root = tmp_path / "st"
    root.mkdir()
    shutil.copytree(minilm_dir, root / "0_Transformer", ignore=shutil.ignore_patterns("modules.json", "1_Pooling"))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384,
                                                                "pooling_mode_cls_token": True}))
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    ckpt = load_checkpoint(root)
    assert ckpt.directory == root / "0_Transformer" and ckpt.source.pooling == "cls"
    task = ckpt.task()
    hidden, mask = torch.randn(2, 5, 384), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(task.embed(hidden, mask), hidden[:, 0])
    result = compress_source(open_source(root), parse_recipe(MAGNITUDE), tmp_path / "out",
                             RunOptions(eval_examples=16))
    assert result.report["eval"]["examples"] == 16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["compression"]["pooling"] == "cls"


def test_sharded_input_and_output(minilm_dir, tmp_path):
    source_dir = write_tiny_text_model(tiny_text_configs()["llama"], tmp_path / "sharded", minilm_dir, shard="400KB")
    assert (source_dir / INDEX_NAME).is_file() and len(TensorIndex.of_directory(source_dir).files) > 1
    ckpt = load_checkpoint(source_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(source_dir).eval()
    ids = torch.randint(1000, 30000, (2, 6))
    with torch.no_grad():
        assert torch.equal(ckpt.model(input_ids=ids).logits, reference(input_ids=ids).logits)
    for sequential in (False, True):
        out = tmp_path / f"out-{sequential}"
        result = compress_source(open_source(source_dir), parse_recipe(MAGNITUDE), out,
                                 RunOptions(sequential=sequential, evaluate=False, shard_bytes=300_000))
        index = json.loads((out / INDEX_NAME).read_text())
        shards = sorted(out.glob("model-*.safetensors"))
        assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
        assert not (out / "model.safetensors").exists() and result.report["reload"]["max_abs_diff"] < 1e-5
        with torch.no_grad():
            logits = compresscli.load(out)(input_ids=ids).logits
        assert torch.isfinite(logits).all()
        assert result.report["memory"]["model"]["file_bytes"] == sum(s.stat().st_size for s in shards)


@pytest.mark.parametrize("sequential", [False, True])
def test_a_bf16_checkpoint_stays_bf16(minilm_dir, tmp_path, sequential):
    source_dir = write_tiny_text_model(tiny_text_configs()["llama"], tmp_path / "bf16", minilm_dir,
                                       dtype=torch.bfloat16)
    assert open_source(source_dir).stored_dtype() == torch.bfloat16
    assert next(load_checkpoint(source_dir).model.parameters()).dtype == torch.bfloat16
    out = tmp_path / "out"
    compress_source(open_source(source_dir), parse_recipe(MAGNITUDE), out,
                    RunOptions(sequential=sequential, evaluate=False))
    index = TensorIndex.of_directory(out)
    floats = {e.dtype for e in index.entries.values() if e.dtype.startswith(("F", "BF"))}
    assert floats == {"BF16"}
    assert out.joinpath("model.safetensors").stat().st_size < (source_dir / "model.safetensors").stat().st_size
    assert {p.dtype for p in compresscli.load(out).parameters()} == {torch.bfloat16}
    converted = tmp_path / "f32"
    compress_source(open_source(source_dir), parse_recipe(MAGNITUDE), converted,
                    RunOptions(sequential=sequential, evaluate=False, dtype=torch.float32))
    assert "BF16" not in {e.dtype for e in TensorIndex.of_directory(converted).entries.values()}


def test_a_family_no_table_lists_is_found_by_its_shapes(tiny_text_dirs):
    """GPT-NeoX (mlp.dense_h_to_4h / dense_4h_to_h) is in no table: the structural rule finds it, and
    its legacy tensor names load the way transformers renames them."""
    source = open_source(tiny_text_dirs["neox"])
    assert source.model_class == "GPTNeoXForCausalLM" and not source.notes  # embed_out renamed to lm_head
    arch = detect(load_checkpoint(tiny_text_dirs["neox"]).model)
    assert arch.family == "structural" and len(arch.blocks) == 3
    block = arch.blocks[1]
    assert [(m.role, m.name, m.orientation) for m in block.mlp] == [
        ("fc1", "gpt_neox.layers.1.mlp.dense_h_to_4h", "in"), ("fc2", "gpt_neox.layers.1.mlp.dense_4h_to_h", "out")]
    assert block.attention == ["gpt_neox.layers.1.attention.query_key_value", "gpt_neox.layers.1.attention.dense"]
    assert (block.width, block.hidden) == (32, 64)


class _GatedBlock(nn.Module):
    def __init__(self, d=8, h=24):
        super().__init__()
        self.wq, self.wo = nn.Linear(d, d), nn.Linear(d, d)
        self.w_gate, self.w_in, self.w_out = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)


class _NoMlpBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.proj_a, self.proj_b = nn.Linear(d, d), nn.Linear(d, d)


def test_the_structural_rule_finds_gated_mlps_and_explains_when_nothing_fits():
    gated = nn.Module()
    gated.stack = nn.ModuleList(_GatedBlock() for _ in range(3))
    arch = detect(gated)
    assert [(m.role, m.name) for m in arch.blocks[0].mlp] == [
        ("gate", "stack.0.w_gate"), ("up", "stack.0.w_in"), ("down", "stack.0.w_out")]
    assert arch.blocks[0].attention == ["stack.0.wq", "stack.0.wo"]
    plain = nn.Module()
    plain.layers = nn.ModuleList(_NoMlpBlock() for _ in range(2))
    arch = detect(plain)
    with pytest.raises(RecipeError, match=r"proj_a \(8->8\), proj_b \(8->8\).*'re:layers\\\.\\d\+\\\.proj_a'"):
        arch.resolve(["mlp"], plain, "stage 0")
