"""FiPS: the rank arithmetic, the SVD initialisation, the layer and its codec, groups on every supported
family, mask schedules, block-wise reconstruction, and the recipes on the real MiniLM and digits ViT."""
import copy
import json

import pytest
import torch

from compresscli import StageContext, compress_, load
from compresscli.model.architecture import detect
from compresscli.io.checkpoint import load_checkpoint
from compresscli.core.errors import RecipeError, StageError
from compresscli.methods.fips import FipsConfig, plan_groups
from compresscli.methods.fips_init import decompose, fips_rank, kept_entries, magnitude_masks
from compresscli.codecs.fips.inference import CompactFipsLinear
from compresscli.codecs.fips.training import FipsLinear
from compresscli.model.tasks import task_for
from conftest import run_cli, tiny_timm, write_recipe


def _fips_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FipsLinear)}


def _mlp_filter(model):
    names = set(detect(model).groups["mlp"])
    return lambda m, n: n in names


def _context(model, batches, seed=0):
    return StageContext(teacher=copy.deepcopy(model).eval(), task=task_for("timm", model), calibration=batches,
                        device=torch.device("cpu"), seed=seed)


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return [{"pixel_values": x[i:i + 8], "labels": torch.randint(0, 5, (8,), generator=g)} for i in range(0, n, 8)]


def test_rank_formula_on_deit_base_shapes():
    d, h, n, f = 768, 3072, 4, 2
    columns = f * h * n
    r = fips_rank(d, columns, budget=0.5, sparsity=0.75)
    assert r == 1365
    kept = d * r + kept_entries(r, columns, 0.75)
    assert kept / (d * columns) == pytest.approx(0.4999, abs=1e-4)


@pytest.mark.parametrize("budget,sparsity", [(0.5, 0.75), (0.25, 0.75), (0.4, 0.5), (1.0, 0.0)])
def test_rank_is_the_largest_within_budget(budget, sparsity):
    d, columns = 64, 2 * 256 * 3
    r = fips_rank(d, columns, budget, sparsity)
    size = lambda rank: d * rank + (1 - sparsity) * rank * columns  # noqa: E731
    assert size(r) <= budget * d * columns + 1e-6 < size(r + 1)


def test_decompose_is_exact_at_full_rank_and_when_padded_beyond_it():
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    for rank in (16, 25):  # min(d, H) = 16; 25 pads U with zero columns
        u, v = decompose(w, rank)
        assert u.shape == (16, rank) and v.shape == (rank, 40)
        torch.testing.assert_close(u @ v, w, atol=1e-5, rtol=1e-5)
    assert decompose(w, 25)[1][16:].abs().sum() > 0  # padded rows get gradients from the first step


def test_init_at_full_budget_without_sparsity_is_the_best_rank_r_approximation():
    """p = 1, s = 0 gives r = dH / (d + H) < d, so the init is the Eckart-Young optimum of that rank:
    its error is exactly the energy of the dropped singular values."""
    model = tiny_timm(depth=2)
    w_cat = torch.cat([model.blocks[i].mlp.fc1.weight.detach().t() for i in range(2)]
                      + [model.blocks[i].mlp.fc2.weight.detach() for i in range(2)], 1)
    w_cat = torch.cat([w_cat[:, :128], w_cat[:, 256:384], w_cat[:, 128:256], w_cat[:, 384:]], 1)  # block order
    compress_(model, FipsConfig(budget=1.0, sparsity=0.0, steps=0, group_size=2), _mlp_filter(model))
    layers = list(_fips_layers(model).values())
    rank = layers[0].rank
    assert rank == fips_rank(32, 512, 1.0, 0.0) == 30
    approx = torch.cat([layer.weight_dxh() for layer in layers], 1)
    s = torch.linalg.svdvals(w_cat)
    assert (approx - w_cat).pow(2).sum().item() == pytest.approx(s[rank:].pow(2).sum().item(), rel=1e-3)


def test_layer_computes_its_dense_weight_in_both_orientations():
    torch.manual_seed(0)
    base = torch.nn.Parameter(torch.randn(8, 5))
    factor, mask = torch.randn(5, 12), torch.rand(5, 12) > 0.5
    bias_in, bias_out = torch.randn(12), torch.randn(8)
    fc1 = FipsLinear(base, factor, mask, bias_in, "in", "b", counts_base=True)
    fc2 = FipsLinear(base, factor, mask, bias_out, "out", "b", counts_base=False)
    w = base @ (factor * mask)  # (d, h)
    for tokens in (1, 3, 40):  # both multiplication orders
        x = torch.randn(2, tokens, 8)
        torch.testing.assert_close(fc1(x), x @ w + bias_in, atol=1e-5, rtol=1e-5)
        y = torch.randn(2, tokens, 12)
        torch.testing.assert_close(fc2(y), y @ w.t() + bias_out, atol=1e-5, rtol=1e-5)
    assert fc1.stored_parameters() == 40 + int(mask.sum()) + 12 and fc2.stored_parameters() == int(mask.sum()) + 8


def test_vit_groups_shapes_budget_and_shared_base():
    model = tiny_timm(depth=4)
    stats = compress_(model, FipsConfig(budget=0.5, steps=0, group_size=2), _mlp_filter(model))
    layers = _fips_layers(model)
    assert len(layers) == 8 and stats["groups"] == [["blocks.0", "blocks.1"], ["blocks.2", "blocks.3"]]
    assert model.blocks[0].mlp.fc1.base is model.blocks[1].mlp.fc2.base
    assert model.blocks[0].mlp.fc1.base is not model.blocks[2].mlp.fc1.base
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    assert (fc1.in_features, fc1.out_features, fc2.in_features, fc2.out_features) == (32, 128, 128, 32)
    assert stats["kept"] == stats["planned_kept"] and stats["kept_ratio"] <= 0.5
    assert stats["kept_ratio"] == pytest.approx(0.5, abs=0.01) and stats["v_sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_six_blocks_split_into_equal_groups_and_explicit_groups_are_checked():
    model = tiny_timm(depth=6)
    blocks = detect(model).blocks
    assert [[b.index for b in g] for g in plan_groups(blocks, 4, None)] == [[0, 1, 2], [3, 4, 5]]
    assert [[b.index for b in g] for g in plan_groups(blocks, 4, [[0], [1, 2, 3, 4, 5]])] == [[0], [1, 2, 3, 4, 5]]
    with pytest.raises(StageError, match="exactly once"):
        plan_groups(blocks, 4, [[0, 1], [1, 2, 3, 4, 5]])
    with pytest.raises(StageError, match="not targeted"):
        plan_groups(blocks, 4, [[0, 1, 2, 3, 4, 5, 6]])


def test_swin_groups_never_cross_a_change_of_width():
    model = tiny_timm("swin_tiny_patch4_window7_224", depths=(2, 2), num_heads=(1, 2))
    stats = compress_(model, FipsConfig(budget=0.5, steps=0, group_size=4), _mlp_filter(model))
    assert len(stats["groups"]) == 2  # one group per stage, although group_size would allow 4 blocks
    widths = {layer.base_key: layer.width for layer in _fips_layers(model).values()}
    assert sorted(widths.values()) == [16, 32]
    blocks = detect(model).blocks
    with pytest.raises(StageError, match="change of width"):
        plan_groups(blocks, 4, [[b.index for b in blocks]])


@pytest.mark.parametrize("family,matrices", [("bert", 2), ("gpt2", 2), ("llama", 3)])
def test_hf_families_share_one_base_across_every_mlp_matrix(tiny_hf_dirs, family, matrices):
    ckpt = load_checkpoint(tiny_hf_dirs[family])
    model = ckpt.model
    arch = detect(model)
    assert all(len(b.mlp) == matrices for b in arch.blocks)
    stats = compress_(model, FipsConfig(budget=0.5, steps=0), _mlp_filter(model))
    layers = _fips_layers(model)
    assert len(layers) == matrices * len(arch.blocks) and len({id(m.base) for m in layers.values()}) == 1
    d, h = arch.blocks[0].width, arch.blocks[0].hidden
    assert stats["ranks"] == [fips_rank(d, matrices * h * len(arch.blocks), 0.5, 0.75)]
    ids = torch.randint(0, 99, (2, 7))
    out = model(input_ids=ids)
    assert torch.isfinite(out[0]).all()


def test_fips_refuses_partial_blocks_and_other_layers():
    model = tiny_timm(depth=2)
    with pytest.raises(StageError, match="not targeted"):
        compress_(model, FipsConfig(steps=0), lambda m, n: n == "blocks.0.mlp.fc1")
    with pytest.raises(StageError, match="only the MLP layers"):
        compress_(model, FipsConfig(steps=0), lambda m, n: n.endswith("attn.qkv") or ".mlp.fc" in n)


@pytest.mark.parametrize("field,value", [("budget", 0.0), ("budget", 1.5), ("sparsity", 1.0), ("group_size", 0),
                                         ("mask_update", "sometimes")])
def test_config_errors_name_the_field(field, value):
    from compresscli.engine.recipe import parse_recipe

    with pytest.raises(RecipeError, match=rf":4: stage 0 \(fips\): {field}"):
        parse_recipe(f"stages:\n  - method: fips\n    params:\n      {field}: {value}\n")


def test_global_magnitude_masks_respect_current_masks():
    a, b = torch.tensor([[4.0, 3.0], [0.5, 9.0]]), torch.tensor([[1.0, 2.0], [8.0, 0.1]])
    masks = magnitude_masks([a, b], 0.5)
    assert [m.tolist() for m in masks] == [[[True, True], [False, True]], [[False, False], [True, False]]]  # 9, 8, 4, 3
    current = [torch.tensor([[True, True], [True, False]]), torch.ones(2, 2, dtype=torch.bool)]
    again = magnitude_masks([a, b], 0.5, current)
    assert not again[0][1, 1] and sum(int(m.sum()) for m in again) == 4  # 9.0 was pruned already: never revived


@pytest.mark.parametrize("mode", ["rigl", "gmp", "fixed"])
def test_reconstruction_lowers_block_error_and_keeps_the_sparsity(mode):
    model = tiny_timm(depth=2)
    initial = copy.deepcopy(model)  # the masks the SVD initialisation gives, before any training
    compress_(initial, FipsConfig(budget=0.3, steps=0, group_size=2), _mlp_filter(initial))
    ctx = _context(model, _images())
    config = FipsConfig(budget=0.3, steps=40, lr=3e-3, group_size=2, mask_update=mode, update_every=5,
                        batch_size=8, initial_sparsity=0.5)
    stats = compress_(model, config, _mlp_filter(model), ctx)
    recon = stats["reconstruction"]
    assert recon["final_loss"] < 0.5 * recon["first_loss"]
    assert stats["v_sparsity"] == pytest.approx(0.75, abs=2e-3)
    before = {n: m.mask for n, m in _fips_layers(initial).items()}
    after = {n: m.mask for n, m in _fips_layers(model).items()}
    assert before.keys() == after.keys()
    if mode == "fixed":  # bitwise the initial masks, and no update was counted
        assert stats["mask_updates"] == 0 and all(torch.equal(before[n], after[n]) for n in before)
    else:  # every 5 steps strictly before step 30 (75% of 40): 5 updates; gmp once more at step 30
        assert stats["mask_updates"] == (5 if mode == "rigl" else 6)
        assert any(not torch.equal(before[n], after[n]) for n in before)
    for layer in _fips_layers(model).values():
        assert torch.all(layer.factor[~layer.mask] == 0)  # pruned entries stay exactly zero
    # attention and norms were frozen: identical to the teacher
    teacher = dict(ctx.teacher.named_parameters())
    for name, p in model.named_parameters():
        if "mlp" not in name and name in teacher:
            assert torch.equal(p, teacher[name]), name


def test_rigl_moves_the_pattern_but_not_the_count():
    model = tiny_timm(depth=2)
    config = FipsConfig(budget=0.3, steps=30, lr=3e-3, group_size=2, mask_update="rigl", update_every=5)
    initial = copy.deepcopy(model)
    compress_(initial, FipsConfig(budget=0.3, steps=0, group_size=2), _mlp_filter(initial))
    compress_(model, config, _mlp_filter(model), _context(model, _images()))
    before = {n: m.mask for n, m in _fips_layers(initial).items()}
    after = {n: m.mask for n, m in _fips_layers(model).items()}
    assert sum(int(m.sum()) for m in before.values()) == sum(int(m.sum()) for m in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_reconstruction_without_calibration_data_is_a_clear_error():
    model = tiny_timm(depth=2)
    with pytest.raises(StageError, match="calibration data"):
        compress_(model, FipsConfig(steps=5), _mlp_filter(model), _context(model, []))


def _recipe(tmp_path, budget, steps, finetune_steps=0):
    text = (f"description: test\nstages:\n  - method: fips\n    targets: [mlp]\n"
            f"    params: {{budget: {budget}, steps: {steps}, batch_size: 8}}\n")
    if finetune_steps:
        text += f"  - method: finetune\n    params: {{steps: {finetune_steps}, lr: 1.0e-4}}\n"
    return write_recipe(tmp_path / "fips.yaml", text)


def test_real_minilm_through_the_pipeline_is_small_and_reloads(tmp_path, capsys, minilm_dir):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "run", str(minilm_dir), "--recipe", str(_recipe(tmp_path, 0.4, 20)),
                                "--data", "pydoc", "--out", str(out), "--eval-examples", "16",
                                "--json")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    targeted = report["memory"]["targeted"]
    assert targeted["actual_bytes"] < 0.5 * targeted["dense_bytes"]  # 40% of the weights, indices included
    stats = report["stages"][0]["stats"]
    assert stats["kept_ratio"] <= 0.4 and len(stats["ranks"]) == 2  # 6 blocks -> groups of 3 + 3
    assert stats["reconstruction"]["final_loss"] < stats["reconstruction"]["first_loss"]
    # the check reloads the inference form, which multiplies (x @ U) @ V where the training form may form U @ V
    assert report["reload"]["max_abs_diff"] < 1e-3
    cosine = next(m for m in report["eval"]["metrics"] if m["name"] == "embedding cosine to original")
    assert cosine["compressed"] > 0.8
    assert sum(isinstance(m, CompactFipsLinear) for m in load(out).modules()) == 12
    assert sum(isinstance(m, FipsLinear) for m in load(out, trainable=True).modules()) == 12
    code, stdout, _ = run_cli(capsys, "inspect", str(out), "--json")
    assert code == 0 and "fips_linear" in stdout


def test_real_digits_vit_recipe_keeps_its_accuracy(tmp_path, capsys, digits_vit_dir):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", str(digits_vit_dir), "--recipe", "fips-50", "--set", "0.steps=100",
                           "--set", "1.steps=50", "--data", "digits", "--out", str(out), "--json")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    accuracy = next(m for m in report["eval"]["metrics"] if m["name"] == "accuracy")
    assert accuracy["compressed"] >= accuracy["original"] - 0.03
    assert report["memory"]["targeted"]["actual_bytes"] < 0.6 * report["memory"]["targeted"]["dense_bytes"]
    assert report["reload"]["max_abs_diff"] < 1e-5


def test_round_trip_and_a_missing_shared_base_is_a_clear_error(tmp_path, tiny_hf_dirs):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from compresscli.core.errors import CheckpointError
    from compresscli.engine.options import RunOptions
    from compresscli.engine.whole_model import run_recipe
    from compresscli.engine.recipe import parse_recipe

    recipe = parse_recipe("stages:\n  - method: fips\n    targets: [mlp]\n    params: {budget: 0.5, steps: 0}\n")
    out = tmp_path / "m"
    model = run_recipe(load_checkpoint(tiny_hf_dirs["llama"]), recipe, out, RunOptions(evaluate=False)).model
    ids = torch.randint(0, 99, (2, 9))
    assert torch.equal(load(out)(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    tensors = load_file(out / "model.safetensors")
    shared = [k for k in tensors if k.startswith("shared.")]
    assert len(shared) == 1 and tensors[shared[0]].shape == model.model.layers[0].mlp.up_proj.base.shape
    with safe_open(out / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    del tensors[shared[0]]
    save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="shared"):
        load(out)
