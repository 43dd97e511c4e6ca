"""`compress sweep` on the real digits ViT: the table, the plot, failures recorded, and resume."""
import json

import pytest

from compresscli.checkpoint import load_checkpoint
from compresscli.errors import CompressError
from compresscli.pipeline import RunOptions
from compresscli.methods import METHODS
from compresscli.sweep import SweepOptions, check_methods, finetune_steps, run_sweep, stage_config, sweep_methods
from conftest import run_cli


def _options(methods, ratios):
    return SweepOptions(methods, ratios, steps=2, run=RunOptions(data="digits", eval_examples=64))


def test_sweep_resumes_where_it_stopped(tmp_path, digits_vit_dir):
    ckpt = load_checkpoint(digits_vit_dir)
    seen = []

    def stop_after_first(i, total, run_id, entry):
        seen.append(run_id)
        if len(seen) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(ckpt, _options(["magnitude"], [2, 4]), tmp_path, on_run=stop_after_first)
    state = json.loads((tmp_path / "sweep.json").read_text())
    assert list(state["runs"]) == ["magnitude-x2"]
    with pytest.raises(CompressError, match="--resume"):
        run_sweep(ckpt, _options(["magnitude"], [2, 4]), tmp_path)
    seen.clear()
    state = run_sweep(ckpt, _options(["magnitude"], [2, 4]), tmp_path, resume=True, on_run=lambda *a: seen.append(a[2]))
    assert seen == ["magnitude-x4"]  # the finished run was not repeated
    for run_id, target in (("magnitude-x2", 2), ("magnitude-x4", 4)):
        run = state["runs"][run_id]
        assert run["status"] == "ok" and run["ratio"] == pytest.approx(target, rel=0.03)
        assert 0 < run["value"] <= 1 and run["original"] >= 0.9  # 64 eval images
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    assert "| magnitude |" in (tmp_path / "sweep.md").read_text()


def test_unreachable_or_failing_runs_are_recorded_and_the_sweep_goes_on(tmp_path, digits_vit_dir):
    state = run_sweep(load_checkpoint(digits_vit_dir), _options(["magnitude"], [1000, 2]), tmp_path)
    assert state["runs"]["magnitude-x1000"]["status"] == "failed"
    assert "cannot reach 1000x" in state["runs"]["magnitude-x1000"]["error"]
    assert state["runs"]["magnitude-x2"]["status"] == "ok"


def test_the_sweep_reads_its_methods_from_the_registry():
    with pytest.raises(CompressError, match="did you mean 'magnitude'"):
        check_methods(["magnitud"])
    entries = sweep_methods()
    for name in METHODS:  # every method that declares a size knob is sweepable, no list to keep
        if METHODS.get(name).config_cls.size_knob is not None:
            assert any(e.method == name for e in entries.values())
    assert {"snip", "synflow", "grasp"} <= set(entries) and entries["snip"].fixed == {"score": "snip"}
    assert entries["ltr"].storage == "magnitude" and "finetune" not in entries and "reconstruct" not in entries
    fips = stage_config(entries["fips"], 0.3, SweepOptions(["fips"], [4], steps=10))
    assert fips.steps == 5 and finetune_steps(fips, SweepOptions(["fips"], [4], steps=10)) == 5


def test_sweep_cli(capsys, tmp_path, digits_vit_dir):
    code, stdout, stderr = run_cli(capsys, "sweep", str(digits_vit_dir), "--data", "digits", "--methods", "magnitude,snip",
                                   "--ratios", "3", "--steps", "1", "--eval-examples", "32", "--out", str(tmp_path / "s"),
                                   "--json")
    assert code == 0, stderr
    runs = json.loads(stdout)["runs"]
    assert set(runs) == {"magnitude-x3", "snip-x3"} and all(r["status"] == "ok" for r in runs.values())
    code, _, stderr = run_cli(capsys, "sweep", str(digits_vit_dir), "--methods", "magnitude", "--ratios", "0.5",
                              "--out", str(tmp_path / "t"))
    assert code == 1 and "every ratio must be >= 1" in stderr


def test_knob_search_steps_over_budgets_too_small_to_build():
    """FiPS at budget 0.0005 cannot build (rank 0); the search treats it as beyond any ratio and still
    finds the budget of the asked ratio."""
    from compresscli.architectures import detect
    from compresscli.methods import StageContext
    from compresscli.sweep import find_knob, measured_ratio
    from conftest import tiny_timm

    model = tiny_timm(depth=2)
    names = detect(model).groups["mlp"]
    fips = sweep_methods()["fips"]
    ctx = StageContext(dry_run=True)
    assert measured_ratio(model, names, fips, 0.0005, ctx) == float("inf")
    budget = find_knob(model, names, fips, 4.0, ctx)
    assert budget is not None and measured_ratio(model, names, fips, budget, ctx) == pytest.approx(4, rel=0.05)
