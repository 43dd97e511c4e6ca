"""`compress sweep` on the real digits ViT: the table, the plot, failures recorded, and resume."""
import json

import pytest

from compresscli.io.checkpoint import load_checkpoint
from compresscli.core.errors import CompressError
from compresscli.engine.options import RunOptions
from compresscli.methods import METHODS
from compresscli.commands.sweep import (SweepOptions, check_methods, finetune_steps, run_sweep, stage_config,
                                        sweep_methods)
from conftest import run_cli


def _painted(png, color: str):
    """Which pixels of a PNG have matplotlib's `color` ("C0", "C1", ...): a (rows, columns) bool array."""
    import matplotlib.colors
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(str(png))[..., :3]
    return np.abs(pixels - np.array(matplotlib.colors.to_rgb(color))).sum(-1) < 0.1


def _drawn(png, color: str) -> list[tuple[slice, slice]]:
    """The (rows, columns) extents of the separate shapes drawn in `color`. Pixels within 2 of each other
    count as one shape: a line crossing another one (the original's accuracy) is cut by it for a pixel."""
    from scipy import ndimage

    painted = _painted(png, color)
    joined = ndimage.binary_dilation(painted, iterations=2)
    return ndimage.find_objects(ndimage.label(joined)[0])


def test_pareto_plot_draws_each_method_where_its_runs_are(tmp_path):
    """Method a: 1 kB -> 0.5 and 100 kB -> 0.9; method b: one run at 10 kB -> 0.6. On the log x axis b's
    point lies at the middle of a's line, below it; a's line rises to the right."""
    from compresscli.commands.sweep_plot import pareto_plot

    def run(method, size, value):
        return {"status": "ok", "method": method, "bytes": size, "value": value, "original": 0.95,
                "dense_bytes": 1e6, "metric": "accuracy"}

    state = {"config": {"methods": ["a", "b"], "source": "/models/tiny"},
             "runs": {"a-x1": run("a", 1e3, 0.5), "a-x2": run("a", 1e5, 0.9), "b-x1": run("b", 1e4, 0.6),
                      "b-x9": {"status": "failed", "method": "b"}}}
    png = tmp_path / "p.png"
    pareto_plot(state, png)
    a, b = _drawn(png, "C0"), _drawn(png, "C1")
    assert len(a) == len(b) == 2  # each method: its data and its legend handle
    rows, cols = max(a, key=lambda box: box[1].stop - box[1].start)  # a's line, two decades wide
    point_rows, point_cols = min(b, key=lambda box: box[1].stop - box[1].start)  # b's lone marker
    assert cols.stop - cols.start > 300 and rows.stop - rows.start > 100
    blue = _painted(png, "C0")[rows, :]
    left, right = blue[:, cols.start + 2].nonzero()[0], blue[:, cols.stop - 3].nonzero()[0]
    assert left.min() > right.max()  # a rises: its left end is lower on the image
    assert abs((point_cols.start + point_cols.stop) / 2 - (cols.start + cols.stop) / 2) <= 3  # 10 kB: midway
    assert (point_rows.start + point_rows.stop) / 2 > (rows.start + rows.stop) / 2 + 20  # 0.6 < 0.7: below


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
    line = _drawn(tmp_path / "pareto.png", "C0")  # magnitude: its legend handle and its two points joined
    assert len(line) == 2 and max(cols.stop - cols.start for _, cols in line) > 100
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
    from compresscli.model.architecture import detect
    from compresscli.methods import StageContext
    from compresscli.commands.sweep import find_knob, measured_ratio
    from conftest import tiny_timm

    model = tiny_timm(depth=2)
    names = detect(model).groups["mlp"]
    fips = sweep_methods()["fips"]
    ctx = StageContext(dry_run=True)
    assert measured_ratio(model, names, fips, 0.0005, ctx) == float("inf")
    budget = find_knob(model, names, fips, 4.0, ctx)
    assert budget is not None and measured_ratio(model, names, fips, budget, ctx) == pytest.approx(4, rel=0.05)


def test_points_run_once_where_their_bytes_put_them(tmp_path, digits_vit_dir):
    """Recipes whose size their grid fixes: run once each on the sweep's targets, their recovery given the
    sweep's steps, listed and plotted at their measured relative bytes."""
    options = SweepOptions([], [], steps=2, points=["rtn-int8", "condensed-90-int8"],
                           run=RunOptions(data="digits", eval_examples=64))
    state = run_sweep(load_checkpoint(digits_vit_dir), options, tmp_path)
    int8, composed = state["runs"]["rtn-int8"], state["runs"]["condensed-90-int8"]
    assert int8["status"] == composed["status"] == "ok" and int8["point"] and int8["target_ratio"] is None
    assert 3.3 < int8["ratio"] < 4.0  # float32 -> int8 codes plus a float32 scale and bias per row
    assert composed["ratio"] > int8["ratio"] and int8["value"] >= int8["original"] - 0.05
    report = json.loads((tmp_path / "runs" / "condensed-90-int8" / "report.json").read_text())
    assert [s["method"] for s in report["recipe"]["stages"]] == ["condensed", "quantize", "finetune"]
    assert report["recipe"]["stages"][2]["params"]["steps"] == 2
    assert "| rtn-int8 |" in (tmp_path / "sweep.md").read_text()
    with pytest.raises(CompressError, match="unknown recipe"):
        SweepOptions([], [], points=["gptq-int9"])


def test_quantized_points_are_bundled_recipes():
    options = SweepOptions([], [], steps=3, points=["quantized"])
    from compresscli.commands.sweep import QUANTIZED_POINTS, point_recipe

    assert options.points == QUANTIZED_POINTS
    for name in QUANTIZED_POINTS:
        recipe = point_recipe(name, options)
        assert any(s.method in ("quantize", "sparsegpt") for s in recipe.stages)
        assert all(s.config.steps == 3 for s in recipe.stages if s.method in ("finetune", "reconstruct"))
