"""Condensed layers that keep learning (SRigL during recovery): one topology update, the hooks in the training
loop, the schedule shared with FiPS, the recipes and the report."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from compresscli import CondensedConfig, FinetuneConfig, StageContext, compress_
from compresscli.codecs.condensed.codec import structure_problem
from compresscli.codecs.condensed.training import CondensedLinear
from compresscli.core.errors import RecipeError
from compresscli.engine.options import RunOptions
from compresscli.engine.recipe import load_recipe, parse_recipe
from compresscli.engine.whole_model import run_recipe
from compresscli.io.checkpoint import load_checkpoint
from compresscli.methods.condensed_dst import ATTRIBUTE, CondensedDST, DynamicSparsity, attach
from compresscli.methods.condensed_update import update_topology
from compresscli.methods.mask_schedule import UpdateSchedule, top_mask, top_per_row
from compresscli.methods.reconstruct import ReconstructConfig
from compresscli.model.tasks import task_for
from compresscli.training.loop import TrainConfig, train
from conftest import tiny_timm


def random_layer(out, fan_in, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(fan_in, generator=g)[:k] for _ in range(out)]).sort(1).values
    return torch.randn(out, k, generator=g), indices


def dense(values, indices, rows, out, fan_in):
    weight = torch.zeros(out, fan_in, dtype=values.dtype)
    ids = torch.arange(out) if rows is None else rows.long()
    weight[ids] = weight[ids].scatter(1, indices.long(), values)
    return weight


def check(topology, out, fan_in, k):
    """Exactly k unique inputs per kept neuron, ascending; kept + ablated = every neuron; new entries zero."""
    assert topology.values.shape == topology.indices.shape == (topology.values.shape[0], k)
    assert structure_problem(topology.values, topology.indices, topology.rows, out, fan_in) is None
    assert bool((topology.indices[:, 1:] > topology.indices[:, :-1]).all())
    assert topology.values.shape[0] + topology.ablated == out
    assert bool((topology.values[topology.slot_map < 0] == 0).all())


# ----------------------------------------------------------------------------- the schedule and the selections

def test_schedule_is_rigls():
    schedule = UpdateSchedule(every=100, until=0.75, drop_fraction=0.3)
    assert [s for s in range(400) if schedule.updating(s, 400)] == [100, 200]
    assert schedule.fraction(0, 400) == pytest.approx(0.3) and schedule.fraction(150, 400) == pytest.approx(0.15)
    assert schedule.fraction(300, 400) == pytest.approx(0.0, abs=1e-12)


def test_selections_match_a_stable_sort_with_many_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        scores = torch.randint(0, 6, (9, 13), generator=g).float()
        scores[scores == 0] = -torch.inf
        n = int(torch.randint(0, 9 * 13 + 1, (1,), generator=g))
        order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
        expected = torch.zeros(9 * 13, dtype=torch.bool)
        expected[order[:n]] = True
        assert torch.equal(top_mask(scores, n), expected.view(9, 13))
        counts = torch.randint(0, 14, (9,), generator=g)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        expected = torch.zeros(9, 13, dtype=torch.bool).scatter(1, order, torch.arange(13) < counts.unsqueeze(1))
        assert torch.equal(top_per_row(scores, counts), expected)


# ----------------------------------------------------------------------------- one update

@pytest.mark.parametrize("regrow", ["gradient", "random"])
def test_every_neuron_keeps_k_inputs_over_many_updates(regrow):
    out, fan_in, k = 24, 40, 7
    values, indices = random_layer(out, fan_in, k)
    g = torch.Generator().manual_seed(1)
    moved = 0
    for step in range(60):
        generator = torch.Generator().manual_seed(step) if regrow == "random" else None
        t = update_topology(values, indices, None, torch.randn(out, fan_in, generator=g), 0.5 * (1 + math.cos(step)) / 2,
                            out * k, out, fan_in, generator=generator)
        check(t, out, fan_in, k)
        survived = t.slot_map >= 0
        assert torch.equal(t.values[survived], values.reshape(-1)[t.slot_map[survived]])
        new = dense(t.values, t.indices, None, out, fan_in)
        assert torch.equal(new[new != 0], dense(values, indices, None, out, fan_in)[new != 0])  # each at its input
        moved += t.grown
        values, indices = t.values + 0.1 * torch.randn(t.values.shape, generator=g), t.indices
    assert moved > 0


def test_n_m_stays_n_m():
    out, fan_in, n, m = 16, 32, 2, 4
    g = torch.Generator().manual_seed(0)
    within = torch.stack([torch.randperm(m, generator=g)[:n] for _ in range(out * fan_in // m)]).view(out, -1, n)
    indices = (within + torch.arange(0, fan_in, m).view(1, -1, 1)).view(out, -1).sort(1).values
    values = torch.randn(out, fan_in * n // m, generator=g)
    for step in range(40):
        t = update_topology(values, indices, None, torch.randn(out, fan_in, generator=g), 0.4, values.numel(), out,
                            fan_in, n_m=(n, m))
        check(t, out, fan_in, fan_in * n // m)
        per_group = torch.zeros(out, fan_in).scatter(1, t.indices, 1.0).view(out, -1, m).sum(2)
        assert bool((per_group == n).all())
        values, indices = t.values + 0.1 * torch.randn(t.values.shape, generator=g), t.indices


def test_regrowth_takes_the_largest_gradient_among_inactive_inputs():
    """2 neurons, fan-in 8, k 3, drop fraction 1/3 (2 of 6, layer-wide): the two smallest |W| go (input 2 of
    neuron 0, input 4 of neuron 1); each neuron regrows its largest-|grad| inactive input, at zero."""
    values = torch.tensor([[0.5, -0.1, 0.9], [2.0, 0.2, -3.0]])
    indices = torch.tensor([[0, 2, 5], [1, 4, 6]])
    grad = torch.tensor([[9.0, 0.2, 0.05, 0.3, -0.7, 9.0, 0.1, 0.6],  # inactive best: input 4
                         [0.0, 5.0, 0.1, -4.0, 0.2, 0.2, 5.0, 3.9]])  # inactive best: input 3
    t = update_topology(values, indices, None, grad, 1 / 3, 6, 2, 8)
    assert t.indices.tolist() == [[0, 4, 5], [1, 3, 6]]
    assert torch.equal(t.values, torch.tensor([[0.5, 0.0, 0.9], [2.0, 0.0, -3.0]]))
    assert t.grown == 2


def test_a_dropped_weight_with_the_largest_gradient_comes_back_with_its_value():
    values, indices = torch.tensor([[0.5, -0.1, 0.9]]), torch.tensor([[0, 2, 5]])
    t = update_topology(values, indices, None, torch.tensor([[0.0, 0.1, 7.0, 0.3, 0.2, 0.0]]), 1 / 3, 3, 1, 6)
    assert t.indices.tolist() == [[0, 2, 5]] and torch.equal(t.values, values) and t.grown == 0


def test_layer_wide_drop_lets_neurons_lose_different_counts():
    values, indices = torch.tensor([[0.01, 0.02, 0.03], [5.0, 6.0, 7.0]]), torch.tensor([[0, 1, 2], [0, 1, 2]])
    t = update_topology(values, indices, None, torch.arange(12.0).view(2, 6), 0.5, 6, 2, 6)
    assert t.indices.tolist() == [[3, 4, 5], [0, 1, 2]] and t.values[0].tolist() == [0.0, 0.0, 0.0]


def ablation_case():
    """6 neurons, fan-in 20, k 5 (budget 30). At fraction 0.2 (n_prune 6, n_keep 24) the salient counts are
    5, 5, 5, 5 for neurons 0-3, 3 for neuron 4 (three medium weights) and 1 for neuron 5."""
    out, fan_in, k = 6, 20, 5
    indices = torch.stack([torch.arange(r, r + k) for r in range(out)])
    values = torch.full((out, k), 10.0)
    values[4] = torch.tensor([1.0, 1.1, 1.2, 1e-3, 2e-3])
    values[5] = torch.tensor([1.3, 3e-3, 4e-3, 5e-3, 6e-3])
    grad = torch.full((out, fan_in), 1e-4)
    grad[:4, 15:] = 1.0  # the 6 largest gradients all lie in neurons 0-3
    return values, indices, grad, out * k


def test_ablation_removes_neurons_with_few_salient_weights_and_spreads_their_budget():
    values, indices, grad, budget = ablation_case()
    t = update_topology(values, indices, None, grad, 0.2, budget, 6, 20, min_salient=0.6)  # threshold 3
    assert t.ablated == 1 and t.rows.tolist() == [0, 1, 2, 3, 4] and t.indices.shape[1] == 6  # 30 over 5
    check(t, 6, 20, 6)
    t = update_topology(values, indices, None, grad, 0.2, budget, 6, 20, min_salient=0.8)  # threshold 4
    assert t.ablated == 2 and t.rows.tolist() == [0, 1, 2, 3] and t.indices.shape[1] == 8  # round(7.5)
    check(t, 6, 20, 8)


def test_an_ablated_neuron_comes_back_when_its_gradient_makes_it_salient():
    values, indices, grad, budget = ablation_case()
    t = update_topology(values, indices, None, grad, 0.2, budget, 6, 20, min_salient=0.6)
    grad = torch.full((6, 20), 1e-4)
    grad[5] = 100.0
    again = update_topology(t.values, t.indices, t.rows, grad, 0.3, budget, 6, 20, min_salient=0.3)
    assert again.rows is None and again.indices.shape[1] == 5
    check(again, 6, 20, 5)
    assert bool((again.values[5] == 0).all())


def test_the_update_is_deterministic_under_ties():
    out, fan_in, k = 64, 96, 12
    values, indices = random_layer(out, fan_in, k, seed=7)
    grad = torch.randn(out, fan_in)
    grad[:, ::7] = 0.5
    values[:, ::3] = 0.25
    runs = [update_topology(values.clone(), indices.clone(), None, grad.clone(), 0.3, out * k, out, fan_in,
                            min_salient=0.3) for _ in range(3)]
    for t in runs[1:]:
        assert torch.equal(t.indices, runs[0].indices) and torch.equal(t.values, runs[0].values)


# ----------------------------------------------------------------------------- in the training loop

def _teacher_items(dead=0):
    out, fan_in, k = 16, 64, 8
    values, indices = random_layer(out, fan_in, k, seed=11)
    teacher = dense(values, indices, None, out, fan_in)
    teacher[:dead] = 0
    g = torch.Generator().manual_seed(0)
    return teacher, [(x, x @ teacher.T) for x in (torch.randn(128, fan_in, generator=g) for _ in range(8))]


def _student(update, min_salient=None):
    values, indices = random_layer(16, 64, 8, seed=12)
    layer = CondensedLinear(64, 16, values * 0.1, indices)
    if update != "none":
        attach(layer, DynamicSparsity(update, UpdateSchedule(20, 0.75, 0.3), min_salient))
    return layer


def _fit(layer, items, steps=400, hooks=None):
    hooks = hooks if hooks is not None else (CondensedDST({"fc": layer}, steps, 0)
                                            if getattr(layer, ATTRIBUTE, None) else None)
    stats = train([layer.values], items, lambda m, item: (F.mse_loss(m[0](item[0]), item[1]), None),
                  TrainConfig(steps, 3e-2), torch.device("cpu"), hooks=hooks, modules=[layer])
    return stats, hooks


def test_gradient_regrowth_finds_the_teachers_inputs_and_a_fixed_mask_cannot():
    teacher, items = _teacher_items()
    found = {}
    for update in ("none", "set", "rigl"):
        layer = _student(update)
        stats, _ = _fit(layer, items)
        found[update] = (stats["final_loss"], (layer.mask() & (teacher != 0)).sum().item() / (16 * 8))
    assert found["rigl"][1] == 1.0 and found["none"][1] < 0.2 < found["set"][1]
    assert found["rigl"][0] < 1e-3 * found["none"][0] and found["set"][0] < found["none"][0]


def test_ablation_in_training_removes_the_dead_neurons_and_reports_them():
    teacher, items = _teacher_items(dead=4)
    layer = _student("rigl", min_salient=0.3)
    stats, hooks = _fit(layer, items)
    assert layer.rows.tolist() == list(range(4, 16)) and layer.k == 11  # round(128 / 12)
    assert stats["final_loss"] < 1e-3 * stats["first_loss"]
    summary = hooks.summary()
    assert summary["ablated_neurons"] == 4 and summary["mask_per_layer"]["fc"]["ablated"] == 4
    assert summary["mask_updates"] == 14 and 0 < summary["mask_changed"] <= 1


def check_after_every_update(monkeypatch) -> list[int]:
    """Makes every update check the constant fan-in of every layer it updated (every kept neuron reads exactly
    k distinct inputs, N of every M with N:M, and its optimiser moments match); returns the count of checks."""
    checked = []
    update = CondensedDST.after_backward

    def after_backward(self, step, optimizer):
        update(self, step, optimizer)
        for layer in (self.layers[name] for name in self._due(step)):
            assert structure_problem(layer.values, layer.indices, layer.rows, layer.out_features, layer.fan_in) is None
            assert int(layer.mask().sum()) == layer.values.numel() == layer.values.shape[0] * layer.k
            assert layer.values.grad.shape == layer.values.shape
            assert all(v.shape == layer.values.shape for v in optimizer.state[layer.values].values() if v.dim())
            settings = getattr(layer, ATTRIBUTE)
            if settings.n_m is not None:
                n, m = settings.n_m
                assert bool((layer.mask().view(layer.out_features, -1, m).sum(2) == n).all())
            checked.append(step)

    monkeypatch.setattr(CondensedDST, "after_backward", after_backward)
    return checked


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return [{"pixel_values": x[i:i + 8], "labels": torch.randint(0, 5, (8,), generator=g)} for i in range(0, n, 8)]


@pytest.mark.parametrize("stage", ["finetune", "reconstruct"])
@pytest.mark.parametrize("params", [{"sparsity": 0.8, "update": "rigl"}, {"n_m": [2, 4], "update": "set"},
                                    {"sparsity": 0.8, "update": "rigl", "ablate": True, "min_salient": 0.5}])
def test_recovery_stages_update_the_masks_and_keep_k_after_every_update(stage, params, monkeypatch):
    torch.manual_seed(0)
    model = tiny_timm()
    ctx = StageContext(teacher=copy.deepcopy(model).eval(), task=task_for("timm", model), calibration=_images(),
                       train=_images(seed=1), device=torch.device("cpu"))
    compress_(model, CondensedConfig(every=2, **params), lambda m, n: ".mlp.fc" in n, ctx)
    before = {n: m.mask().clone() for n, m in model.named_modules() if isinstance(m, CondensedLinear)}
    checked = check_after_every_update(monkeypatch)
    config = FinetuneConfig(steps=12, lr=1e-3) if stage == "finetune" else ReconstructConfig(steps=12, batch_size=8)
    stats = compress_(model, config, None, ctx)
    assert stats["mask_updates"] == 4 and checked == [2] * 4 + [4] * 4 + [6] * 4 + [8] * 4  # until 0.75 of 12
    assert len(before) == 4
    assert set(stats["mask_per_layer"]) == set(before) and stats["mask_changed"] > 0
    after = {n: m.mask() for n, m in model.named_modules() if isinstance(m, CondensedLinear)}
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_bfloat16_layers_whose_shape_changed_go_back_to_bfloat16():
    """Ablation gives the values a new shape, so a new Parameter: float32_master restores it by name."""
    teacher, items = _teacher_items(dead=4)
    layer = _student("rigl", min_salient=0.3).to(torch.bfloat16)
    _fit(layer, items, steps=100)  # float32 inputs: the tasks cast them to the (master) compute dtype
    assert layer.rows is not None and layer.values.dtype == torch.bfloat16 and layer.values.grad is None


def test_fixed_masks_leave_no_hooks_and_output_heads_are_never_ablated():
    model = tiny_timm()
    compress_(model, CondensedConfig(sparsity=0.8), lambda m, n: ".mlp.fc" in n)
    assert all(getattr(m, ATTRIBUTE, None) is None for m in model.modules())
    model = tiny_timm()
    compress_(model, CondensedConfig(sparsity=0.5, update="rigl", ablate=True, min_salient=1.0),
              lambda m, n: n in ("head", "blocks.0.mlp.fc1"))
    assert model.head.rows is None and getattr(model.head, ATTRIBUTE).min_salient is None
    assert getattr(model.blocks[0].mlp.fc1, ATTRIBUTE).min_salient == 1.0


@pytest.mark.parametrize("key,value,said", [("update", "srigl", "update must be one of none, rigl, set"),
                                            ("every", 0, "every must be >= 1"), ("until", 0, "until must be in"),
                                            ("drop_fraction", 1.0, "drop_fraction must be in")])
def test_schedule_errors_name_the_field(key, value, said):
    with pytest.raises(RecipeError, match=said):
        parse_recipe(f"stages:\n  - method: condensed\n    targets: [mlp]\n    params: {{{key}: {value}}}\n")


# ----------------------------------------------------------------------------- recipes on real models

def test_srigl_recipe_on_the_real_digits_vit_reports_what_moved(tmp_path, digits_vit_dir):
    recipe = load_recipe("condensed-90-srigl", ["1.steps=30", "0.every=5"])
    assert recipe.stages[0].config.update == "rigl" and recipe.stages[1].config.steps == 30
    report = run_recipe(load_checkpoint(digits_vit_dir), recipe, tmp_path / "out",
                        RunOptions(data="digits", eval_examples=200)).report
    stats = report["stages"][1]["stats"]
    assert stats["mask_updates"] == 4 and 0 < stats["mask_changed"] < 1  # steps 5, 10, 15, 20
    assert len(stats["mask_per_layer"]) == 8 and all(p["changed"] > 0 for p in stats["mask_per_layer"].values())
    assert report["eval"]["metrics"][0]["compressed"] > 0.75 and report["reload"]["max_abs_diff"] == 0.0
    assert "mask_changed=" in (tmp_path / "out" / "report.md").read_text()


def test_the_sweeps_condensed_entry_keeps_learning_when_it_recovers():
    from compresscli.commands.sweep import SweepOptions, stage_config, sweep_methods
    spec = sweep_methods()["condensed"]
    config = stage_config(spec, 0.9, SweepOptions(methods=["condensed"], ratios=[4], steps=50))
    assert config.update == "rigl" and config.every == 4  # about ten updates before 0.75 of the steps
    assert stage_config(spec, 0.9, SweepOptions(methods=["condensed"], ratios=[4], steps=0)).update == "none"


# ----------------------------------------------------------------------------- output heads and the auxiliary objective

def test_a_condensed_head_trains_with_the_penultimate_auxiliary_term_which_decays_and_leaves_no_hook():
    from compresscli.methods.penultimate import PenultimateDistillation
    torch.manual_seed(0)
    model = tiny_timm()
    teacher = copy.deepcopy(model).eval()
    compress_(model, CondensedConfig(sparsity=0.8, update="set", every=2), lambda m, n: n == "head")
    aux = PenultimateDistillation(model, teacher, weight=1.0, until=0.5, steps=10)
    batch = _images()[0]
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.add_(0.1)  # the student's representation differs from the teacher's
    terms = []
    for step in (0, 2, 4, 5):
        aux.before_forward(step)
        teacher(batch["pixel_values"])
        model(batch["pixel_values"])
        terms.append(aux.term(batch))
    assert terms[0] > terms[1] > terms[2] > 0 and terms[3] is None  # cosine decay, off from 0.5 of the steps
    aux.finish()
    assert not teacher.head._forward_pre_hooks and not model.head._forward_pre_hooks
    ctx = StageContext(teacher=teacher, task=task_for("timm", model), train=_images(seed=1))
    stats = compress_(model, FinetuneConfig(steps=8, lr=1e-3, aux="penultimate"), None, ctx)
    assert stats["mask_updates"] == 2 and math.isfinite(stats["final_loss"])
    assert not teacher.head._forward_pre_hooks


def test_the_auxiliary_term_needs_an_output_head(minilm_dir):
    from compresscli.core.errors import StageError
    ckpt = load_checkpoint(minilm_dir)
    model = ckpt.model
    ctx = StageContext(teacher=model, task=ckpt.task(), train=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}])
    with pytest.raises(StageError, match="aux: penultimate distils the input of the model's output head"):
        compress_(model, FinetuneConfig(steps=1, aux="penultimate"), None, ctx)
