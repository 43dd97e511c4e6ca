import pytest
import torch

from compresscli import FinetuneConfig, MagnitudeConfig, StageContext, compress_
from compresscli.core.errors import DivergedError, StageError
from compresscli.codecs import SparseLinear
from compresscli.model.tasks import ImageClassification
from conftest import tiny_timm


def _mlp_filter(module, name):
    return ".mlp.fc" in name


def _sparsity(model):
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    kept = sum(int(m.mask.sum()) for m in layers)
    return 1 - kept / sum(m.mask.numel() for m in layers), layers


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_exact_sparsity_and_untouched_biases(scope):
    model = tiny_timm()
    biases = {n: p.clone() for n, p in model.named_parameters() if n.endswith("bias")}
    stats = compress_(model, MagnitudeConfig(sparsity=0.7, scope=scope), _mlp_filter)
    sparsity, layers = _sparsity(model)
    assert len(layers) == 4 and sparsity == pytest.approx(0.7, abs=1e-3) and stats["sparsity"] == pytest.approx(sparsity)
    if scope == "layer":
        for layer in layers:
            assert 1 - layer.mask.float().mean().item() == pytest.approx(0.7, abs=2e-3)
    for name, value in model.named_parameters():
        if name in biases:
            assert torch.equal(value, biases[name])


def test_global_keeps_the_largest_magnitudes():
    model = tiny_timm()
    weights = torch.cat([model.get_submodule(n).weight.detach().abs().flatten()
                         for n in ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]])
    compress_(model, MagnitudeConfig(sparsity=0.5), _mlp_filter)
    kept = torch.cat([m.weight.detach().abs()[m.mask] for m in model.modules() if isinstance(m, SparseLinear)])
    pruned_max = weights.sort().values[: weights.numel() - kept.numel()].max()
    assert kept.min() >= pruned_max


def test_pruning_again_prunes_further_and_keeps_old_zeros():
    model = tiny_timm()
    compress_(model, MagnitudeConfig(sparsity=0.5), _mlp_filter)
    first = {n: m.mask.clone() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    compress_(model, MagnitudeConfig(sparsity=0.8), _mlp_filter)
    sparsity, _ = _sparsity(model)
    assert sparsity == pytest.approx(0.8, abs=1e-3)
    for name, mask in first.items():
        assert not (model.get_submodule(name).mask & ~mask).any()  # nothing pruned comes back


def test_non_prunable_target_is_a_clear_error():
    model = tiny_timm()
    with pytest.raises(StageError, match="no Linear or Conv2d"):
        compress_(model, MagnitudeConfig(), lambda m, n: n.endswith("norm1"))


def _context():
    torch.manual_seed(0)
    teacher = tiny_timm().eval()
    batches = [{"pixel_values": torch.randn(8, 3, 16, 16), "labels": torch.randint(0, 5, (8,))} for _ in range(3)]
    return StageContext(teacher=teacher, task=ImageClassification(), train=batches)


def test_finetune_keeps_masks_fixed_and_learns():
    model = tiny_timm()
    compress_(model, MagnitudeConfig(sparsity=0.6), _mlp_filter)
    masks = {n: m.mask.clone() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    stats = compress_(model, FinetuneConfig(steps=30, lr=3e-3), None, _context())
    assert stats["final_loss"] < stats["first_loss"]
    for name, mask in masks.items():
        layer = model.get_submodule(name)
        assert torch.equal(layer.mask, mask)
        assert (layer.dense_weight()[~mask] == 0).all()


def test_finetune_divergence_stops_with_a_clear_error():
    model = tiny_timm()
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    with pytest.raises(DivergedError, match="diverged at step 0"):
        compress_(model, FinetuneConfig(steps=5), None, _context())
