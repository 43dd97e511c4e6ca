"""Pruning scores (SNIP, SynFlow, GraSP) against hand-computed cases, and LTR's schedule and rewinding."""
import math
from typing import get_args, get_type_hints

import pytest
import torch
from torch import nn
from torch.func import functional_call

from compresscli import StageContext, compress_
from compresscli.methods import scores as S
from compresscli.methods.ltr import LTRConfig, ltr_schedule
from compresscli.methods.magnitude import MagnitudeConfig
from compresscli.codecs import SparseLinear
from compresscli.model.tasks import ImageClassification
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


def _two_layer_case():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    return model, [{"pixel_values": x[:3], "labels": y[:3]}, {"pixel_values": x[3:], "labels": y[3:]}]


def _exact_grasp(model, batches, cross_layer=True):
    """The paper's S(-theta) = -theta * Hg, with g and the full 24 x 24 Hessian H of the mean loss over
    both weight matrices (biases held fixed) computed outright in float64. cross_layer=False zeroes the
    blocks between the two layers, to show the check would catch a per-layer Hessian."""
    params = dict(model.named_parameters())
    names = ["0.weight", "2.weight"]
    theta = torch.cat([params[n].detach().double().flatten() for n in names])
    fixed = {n: p.detach().double() for n, p in params.items() if n not in names}

    def loss(flat):
        weights = dict(zip(names, flat.split([params[n].numel() for n in names])))
        full = {**fixed, **{n: w.view(params[n].shape) for n, w in weights.items()}}
        return sum(nn.functional.cross_entropy(functional_call(model, full, (b["pixel_values"].double(),)),
                                               b["labels"]) for b in batches) / len(batches)

    g = torch.autograd.functional.jacobian(loss, theta)
    h = torch.autograd.functional.hessian(loss, theta)
    if not cross_layer:
        split = params[names[0]].numel()
        h[:split, split:] = h[split:, :split] = 0
    s = -theta * (h @ g)
    return {n[:-len(".weight")]: t.view(params[n].shape).float()
            for n, t in zip(names, s.split([params[n].numel() for n in names]))}


def test_grasp_is_the_papers_hessian_gradient_score_and_prunes_its_largest():
    """Wang et al. 2020, eq. 8-9: S(-theta) = -theta * Hg, and the weights with the largest S are removed
    (in the authors' code: top-k of -theta * Hg pruned, one threshold over all layers)."""
    model, batches = _two_layer_case()
    exact = _exact_grasp(model, batches)
    keep = S.grasp_scores(model, {"0": model[0], "2": model[2]}, ImageClassification(), batches,
                          torch.device("cpu"))
    scale = max(s.abs().max() for s in exact.values())
    for name in exact:  # the keep-score is -S: higher means keep
        assert torch.allclose(keep[name], -exact[name], atol=1e-5 * scale)
    per_layer = _exact_grasp(model, batches, cross_layer=False)
    assert not all(torch.allclose(keep[n], -per_layer[n], atol=1e-2 * scale) for n in per_layer)

    flat = torch.cat([exact["0"].flatten(), exact["2"].flatten()])
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[flat.topk(flat.numel() // 2).indices] = True
    ctx = StageContext(task=ImageClassification(), calibration=batches)
    compress_(model, MagnitudeConfig(sparsity=0.5, score="grasp"), lambda m, n: isinstance(m, nn.Linear), ctx)
    kept = torch.cat([model[0].mask.flatten(), model[2].mask.flatten()])
    assert torch.equal(kept, ~pruned)


SCORES = get_args(get_type_hints(MagnitudeConfig)["score"])


def _direct_scores(score, model, layers, batches):
    """Each scorer called by hand, as scores.py documents it, for the dispatch test below."""
    task, cpu = ImageClassification(), torch.device("cpu")
    direct = {"magnitude": lambda: S.magnitude_scores(layers),
              "snip": lambda: S.snip_scores(model, layers, task, batches, cpu),
              "grasp": lambda: S.grasp_scores(model, layers, task, batches, cpu),
              "synflow": lambda: S.synflow_scores(model, layers, S.ones_like_batch(batches[0]), task)}
    assert score in direct, f"MagnitudeConfig accepts score {score!r}: say here how its scorer is called"
    return direct[score]()


def _keep_top(scores, sparsity):
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[flat.topk(round((1 - sparsity) * flat.numel())).indices] = True
    return dict(zip(scores, (k.view(s.shape) for k, s in zip(keep.split([s.numel() for s in scores.values()]),
                                                               scores.values()))))


@pytest.mark.parametrize("score", SCORES)
def test_score_option_uses_its_scorer(score):
    """The `score:` option really reaches its scorer: the stage's mask is the scorer's own top-k, and
    (for every score but magnitude) not the magnitude mask."""
    torch.manual_seed(0)
    batches = [{"pixel_values": torch.randn(8, 3, 16, 16), "labels": torch.randint(0, 5, (8,))}]
    reference = tiny_timm()
    names = [n for n, m in reference.named_modules() if ".mlp." in n and isinstance(m, nn.Linear)]
    expected = _keep_top(_direct_scores(score, reference, {n: reference.get_submodule(n) for n in names}, batches),
                         0.5)
    masks = {}
    for s in {score, "magnitude"}:
        model = tiny_timm()
        ctx = StageContext(task=ImageClassification(), calibration=batches)
        compress_(model, MagnitudeConfig(sparsity=0.5, score=s, rounds=1), lambda m, n: n in names, ctx)
        masks[s] = {n: model.get_submodule(n).mask for n in names}
    assert all(torch.equal(masks[score][n], expected[n]) for n in names)
    if score != "magnitude":
        assert any(not torch.equal(masks[score][n], masks["magnitude"][n]) for n in names)


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
    from compresscli.io.checkpoint import load_checkpoint
    from compresscli.engine.options import RunOptions
    from compresscli.engine.whole_model import run_recipe
    from compresscli.engine.recipe import load_recipe

    path, data = (minilm_dir, "pydoc") if model == "minilm" else (digits_vit_dir, "digits")
    options = RunOptions(data=data, batch_size=4, calibration_examples=8, eval_examples=16)
    result = run_recipe(load_checkpoint(path), load_recipe(recipe, overrides), tmp_path / "out", options)
    report = result.report
    assert report["reload"]["max_abs_diff"] < 1e-5
    sparsity = report["stages"][0]["stats"]["sparsity"]
    assert sparsity == pytest.approx(0.5 if recipe.startswith("ltr") else 0.7, abs=1e-3)
    targeted = report["memory"]["targeted"]
    assert targeted["actual_bytes"] < (0.56 if recipe.startswith("ltr") else 0.36) * targeted["dense_bytes"]
