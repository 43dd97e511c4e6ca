"""Pruning scores (SNIP, SynFlow, GraSP) against hand-computed cases, and LTR's schedule and rewinding."""
import math

import pytest
import torch
from torch import nn

from compresscli import StageContext, compress_
from compresscli.methods import scores as S
from compresscli.methods.ltr import LTRConfig, ltr_schedule
from compresscli.methods.magnitude import MagnitudeConfig
from compresscli.modules import SparseLinear
from compresscli.tasks import ImageClassification
from conftest import tiny_timm


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 4, bias=False), nn.ReLU(),
                         nn.Linear(4, 3, bias=False))


def _layers(model):
    return {"0": model[0], "2": model[2], "4": model[4]}


def test_synflow_is_data_free_and_conserves_synaptic_flow():
    model = _mlp()
    ones = {"pixel_values": torch.ones(1, 6)}
    scores = S.synflow_scores(model, _layers(model), ones, ImageClassification())
    again = S.synflow_scores(model, _layers(model), S.ones_like_batch({"pixel_values": torch.randn(7, 6)}),
                             ImageClassification())
    for name in scores:
        assert torch.allclose(scores[name], again[name])  # the data's values never matter
    # Conservation: flow into each hidden neuron equals flow out of it, and every layer carries all of it.
    assert torch.allclose(scores["0"].sum(1), scores["2"].sum(0), rtol=1e-5)
    assert torch.allclose(scores["2"].sum(1), scores["4"].sum(0), rtol=1e-5)
    totals = [s.sum().item() for s in scores.values()]
    assert totals[0] == pytest.approx(totals[1], rel=1e-5) == pytest.approx(totals[2], rel=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _mlp().parameters()))  # model untouched


def _linear_case():
    torch.manual_seed(1)
    model = nn.Linear(4, 3, bias=False)
    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    return model, x, y, [{"pixel_values": x, "labels": y}]


def test_snip_matches_hand_computed_gradient():
    model, x, y, batches = _linear_case()
    p = torch.softmax(x @ model.weight.detach().T, dim=-1)
    grad = (p - nn.functional.one_hot(y, 3).float()).T @ x / len(x)  # dCE/dW for a linear classifier
    scores = S.snip_scores(model, {"w": model}, ImageClassification(), batches, torch.device("cpu"))
    assert torch.allclose(scores["w"], (model.weight.detach() * grad).abs(), atol=1e-6)


def test_grasp_matches_hand_computed_hessian_gradient_product():
    model, x, y, batches = _linear_case()
    w = model.weight.detach()
    p = torch.softmax(x @ w.T, dim=-1)
    g = (p - nn.functional.one_hot(y, 3).float()).T @ x / len(x)
    hg = torch.zeros_like(w)
    for pb, xb in zip(p, x):  # H = mean_b (diag(p) - p p^T) (x) x x^T
        a = torch.diag(pb) - torch.outer(pb, pb)
        hg += torch.outer(a @ (g @ xb), xb) / len(x)
    scores = S.grasp_scores(model, {"w": model}, ImageClassification(), batches, torch.device("cpu"))
    assert torch.allclose(scores["w"], w * hg, atol=1e-6)


@pytest.mark.parametrize("score", ["snip", "synflow", "grasp"])
def test_scored_pruning_reaches_the_sparsity(score):
    model = tiny_timm()
    batch = {"pixel_values": torch.randn(8, 3, 16, 16), "labels": torch.randint(0, 5, (8,))}
    ctx = StageContext(task=ImageClassification(), calibration=[batch])
    compress_(model, MagnitudeConfig(sparsity=0.8, score=score, rounds=10), lambda m, n: ".mlp." in n, ctx)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    kept = sum(int(m.mask.sum()) for m in layers) / sum(m.mask.numel() for m in layers)
    assert kept == pytest.approx(0.2, abs=1e-3)


def test_ltr_schedule_removes_a_fraction_of_the_remaining():
    schedule = ltr_schedule(0.8, 0.2)
    remaining = [1 - s for s in schedule]
    assert len(schedule) == math.ceil(math.log(0.2) / math.log(0.8)) == 8
    for k in range(1, len(schedule) - 1):
        assert remaining[k] == pytest.approx(remaining[k - 1] * 0.8)
    assert schedule[-1] == pytest.approx(0.8)
    assert ltr_schedule(0.2, 0.2) == pytest.approx([0.2])
    assert ltr_schedule(0.0, 0.2) == []


def test_ltr_rewinds_survivors_to_the_pretrained_weights():
    model = tiny_timm()
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    batches = [{"pixel_values": torch.randn(8, 3, 16, 16), "labels": torch.randint(0, 5, (8,))} for _ in range(2)]
    ctx = StageContext(teacher=tiny_timm().eval(), task=ImageClassification(), train=batches)
    stats = compress_(model, LTRConfig(sparsity=0.5, round_steps=3, final_steps=0, lr=1e-2),
                      lambda m, n: ".mlp." in n, ctx)
    assert stats["rounds"] == 4 and stats["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for name, param in model.named_parameters():  # no final recovery: every weight is rewound (or pruned)
        if ".mlp.fc" in name and name.endswith(".weight"):
            mask = model.get_submodule(name[:-7]).mask
            assert torch.equal(param[mask], pretrained[name][mask]) and (param[~mask] == 0).all()
        else:
            assert torch.equal(param, pretrained[name])


@pytest.mark.parametrize("recipe, overrides", [
    ("ltr-80", ["0.round_steps=1", "0.final_steps=1", "0.sparsity=0.5"]),
    ("snip-70", ["1.steps=1"]), ("synflow-70", ["0.rounds=3", "1.steps=1"]), ("grasp-70", ["1.steps=1"])])
@pytest.mark.parametrize("model", ["minilm", "digits-vit"])
def test_real_models_end_to_end(tmp_path, recipe, overrides, model, minilm_dir, digits_vit_dir):
    """Every scored/iterative pruning method on the real MiniLM and the real digits ViT: saved, reloaded exactly."""
    from compresscli.checkpoint import load_checkpoint
    from compresscli.pipeline import RunOptions, run_recipe
    from compresscli.recipe import load_recipe

    path, data = (minilm_dir, "pydoc") if model == "minilm" else (digits_vit_dir, "digits")
    options = RunOptions(data=data, batch_size=4, calibration_examples=8, eval_examples=16)
    result = run_recipe(load_checkpoint(path), load_recipe(recipe, overrides), tmp_path / "out", options)
    report = result.report
    assert report["reload"]["max_abs_diff"] < 1e-5
    sparsity = report["stages"][0]["stats"]["sparsity"]
    assert sparsity == pytest.approx(0.5 if recipe.startswith("ltr") else 0.7, abs=1e-3)
    targeted = report["memory"]["targeted"]
    assert targeted["actual_bytes"] < (0.56 if recipe.startswith("ltr") else 0.36) * targeted["dense_bytes"]
