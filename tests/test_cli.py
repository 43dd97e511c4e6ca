"""End-to-end: the `compress` command on the real MiniLM and the real digits ViT."""
import json

import pytest
import torch

import compresscli
from compresscli.io.checkpoint import load_checkpoint
from conftest import run_cli, write_recipe

FAST = ["--set", "1.steps=2", "--eval-examples", "32", "--batch-size", "8"]


@pytest.fixture(scope="module")
def minilm_out(tmp_path_factory, minilm_dir):
    out = tmp_path_factory.mktemp("runs") / "minilm-50"
    from compresscli.engine.options import RunOptions
    from compresscli.engine.whole_model import run_recipe
    from compresscli.engine.recipe import load_recipe

    recipe = load_recipe("magnitude-50", ["1.steps=2"])
    result = run_recipe(load_checkpoint(minilm_dir), recipe, out, RunOptions(eval_examples=32, batch_size=8))
    return out, result.report


def test_run_minilm_writes_a_small_exact_checkpoint(minilm_out, minilm_dir):
    out, report = minilm_out
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "recipe.yaml", "report.json",
                                               "report.md", "tokenizer.json"}
    targeted = report["memory"]["targeted"]
    assert targeted["layers"] == 12 and targeted["dense_params"] == 7_089_408
    assert targeted["actual_bytes"] <= 0.56 * targeted["dense_bytes"]  # the file really is smaller
    assert targeted["theoretical_bytes"] < targeted["actual_bytes"]  # the mask's bytes are counted, honestly
    assert (out / "model.safetensors").stat().st_size < 0.9 * (minilm_dir / "model.safetensors").stat().st_size
    assert report["reload"]["max_abs_diff"] < 1e-5
    cosine = report["eval"]["metrics"][0]
    assert cosine["name"] == "embedding cosine to original" and 0.5 < cosine["compressed"] < 1.0
    assert json.loads((out / "report.json").read_text())["recipe"]["stages"][0]["params"]["scope"] == "global"


def test_load_returns_a_ready_module(minilm_out, minilm_dir):
    out, _ = minilm_out
    model = compresscli.load(out)
    original = load_checkpoint(minilm_dir).model
    ids = torch.tensor([[101, 7592, 2088, 102]])
    mask = torch.ones_like(ids)
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    b = original(input_ids=ids, attention_mask=mask).last_hidden_state
    assert a.shape == b.shape and not torch.equal(a, b)
    assert sum(type(m).__name__ == "CompactSparseLinear" for m in model.modules()) == 12  # the inference form
    trainable = compresscli.load(out, trainable=True)
    assert sum(isinstance(m, compresscli.codecs.SparseLinear) for m in trainable.modules()) == 12


def test_eval_and_inspect_on_the_output(capsys, minilm_out, minilm_dir):
    out, _ = minilm_out
    code, stdout, _ = run_cli(capsys, "eval", str(out), "--baseline", str(minilm_dir), "--examples", "16", "--json")
    assert code == 0
    cosine = json.loads(stdout)["metrics"][0]
    assert 0.5 < cosine["compressed"] < 0.999
    code, stdout, _ = run_cli(capsys, "eval", str(out), "--examples", "16", "--json")  # the original OUT records
    assert code == 0 and json.loads(stdout)["metrics"][0] == cosine
    code, stdout, _ = run_cli(capsys, "eval", str(minilm_dir), "--baseline", str(minilm_dir), "--examples", "16",
                              "--json")
    assert code == 0 and json.loads(stdout)["metrics"][0]["compressed"] == pytest.approx(1.0, abs=1e-6)
    code, _, stderr = run_cli(capsys, "eval", str(minilm_dir), "--examples", "16")
    assert code == 1 and "pass --baseline ORIGINAL" in stderr
    code, stdout, _ = run_cli(capsys, "inspect", str(out), "--json")
    layers = {r["name"]: r for r in json.loads(stdout)["layers"]}
    fc1 = layers["encoder.layer.0.intermediate.dense"]
    mask = compresscli.load(out, trainable=True).encoder.layer[0].intermediate.dense.mask
    assert fc1["codec"] == "sparse_linear" and fc1["stored_params"] == int(mask.sum()) + 1536
    assert fc1["dense_params"] == 1536 * 384 + 1536 and fc1["bytes"] < fc1["dense_bytes"]
    code, stdout, _ = run_cli(capsys, "inspect", str(minilm_dir), "--json")
    assert code == 0 and json.loads(stdout)["totals"]["dense_params"] >= 22_713_216


def test_inspect_fits_80_columns_with_names_that_tell_layers_apart(capsys, minilm_out, monkeypatch):
    from compresscli import cli

    monkeypatch.setattr(cli.out_console, "width", 80)
    code, stdout, _ = run_cli(capsys, "inspect", str(minilm_out[0]))
    assert code == 0 and max(map(len, stdout.splitlines())) <= 80
    shown = [line.split("│")[1].strip() for line in stdout.splitlines() if line.startswith("│")][:-1]  # - total
    code, stdout, _ = run_cli(capsys, "inspect", str(minilm_out[0]), "--json")
    full = [row["name"] for row in json.loads(stdout)["layers"]]

    def abbreviates(short: str, name: str) -> bool:  # part by part: kept, or its first letter; numbers and last kept
        a, b = short.split("."), name.split(".")
        return len(a) == len(b) and a[-1] == b[-1] and all(
            x == y or (not y.isdigit() and x == y[0]) for x, y in zip(a, b))

    assert len(shown) == len(full) and len(set(shown)) == len(shown)  # every layer, no two rows alike
    assert all(abbreviates(s, n) or (s.startswith("…") and n.endswith(s[1:])) for s, n in zip(shown, full))
    assert "intermediate.dense" in shown[0] and shown[0] != full[0]  # shortened, the telling part kept


def test_compress_a_compressed_checkpoint_further(capsys, tmp_path, minilm_out):
    out, _ = minilm_out
    further = tmp_path / "further"
    code, stdout, stderr = run_cli(capsys, "run", str(out), "--recipe", "magnitude-90", "--set", "1.steps=0",
                                   "--out", str(further), "--no-eval", "--json")
    assert code == 0, stderr
    targeted = json.loads(stdout)["report"]["memory"]["targeted"]
    assert targeted["stored_params"] == pytest.approx(0.1 * 7_077_888 + 12 * 0 + 6 * (1536 + 384), rel=1e-3)
    first, second = compresscli.load(out, trainable=True), compresscli.load(further, trainable=True)
    name = "encoder.layer.3.output.dense"
    assert not (second.get_submodule(name).mask & ~first.get_submodule(name).mask).any()


def test_dry_run_writes_nothing(capsys, tmp_path, minilm_dir):
    code, stdout, _ = run_cli(capsys, "run", str(minilm_dir), "--recipe", "magnitude-90", "--out",
                              str(tmp_path / "o"), "--dry-run", "--json")
    assert code == 0 and not (tmp_path / "o").exists()
    plan = json.loads(stdout)["stages"]
    assert len(plan[0]["modules"]) == 12 and plan[0]["params_after"] < 0.12 * plan[0]["params_before"]
    assert plan[0]["bytes_after"] < 0.2 * plan[0]["bytes_before"]


def test_digits_vit_end_to_end_accuracy(capsys, tmp_path, digits_vit_dir):
    out = tmp_path / "vit"
    code, stdout, stderr = run_cli(capsys, "run", str(digits_vit_dir), "--recipe", "magnitude-50", "--data", "digits",
                                   "--out", str(out), "--set", "1.steps=20", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)["report"]
    accuracy = next(m for m in report["eval"]["metrics"] if m["name"] == "accuracy")
    assert accuracy["original"] >= 0.95 and accuracy["compressed"] >= 0.85
    assert report["eval"]["examples"] == 359 and "paired" in report["eval"]
    code, stdout, _ = run_cli(capsys, "eval", str(out), "--baseline", str(digits_vit_dir), "--data", "digits", "--json")
    again = next(m for m in json.loads(stdout)["metrics"] if m["name"] == "accuracy")
    assert again["compressed"] == pytest.approx(accuracy["compressed"])  # same held-out data, same answer


def test_existing_output_is_refused_then_forced(capsys, tmp_path, digits_vit_dir):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run_cli(capsys, "run", str(digits_vit_dir), "--recipe", "magnitude-50", "--data", "digits",
                              "--out", str(out), "--set", "1.steps=1")
    assert code == 1 and "already exists" in stderr and "--force" in stderr
    assert (out / "keep.txt").exists()
    code, _, stderr = run_cli(capsys, "run", str(digits_vit_dir), "--recipe", "magnitude-50", "--data", "digits",
                              "--out", str(out), "--set", "1.steps=1", "--force", "--no-eval")
    assert code == 0, stderr
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("args, needle", [
    (["run", "NOPE", "--recipe", "magnitude-50", "--out", "OUT"], "no such file or directory"),
    (["run", "VIT", "--recipe", "magnitude-5", "--out", "OUT"], "did you mean 'magnitude-50'"),
    (["run", "VIT", "--recipe", "magnitude-50", "--out", "OUT"], "no --data was given"),
    (["run", "VIT", "--recipe", "magnitude-50", "--out", "OUT", "--data", "pydoc"], "holds text but the model reads images"),
    (["run", "VIT", "--recipe", "BADTARGET", "--out", "OUT", "--data", "digits"], "matches no module"),
    (["run", "VIT", "--recipe", "magnitude-50", "--out", "OUT", "--data", "digits", "--set", "1.lr=1e12",
      "--set", "1.steps=30", "--set", "1.max_grad_norm=0"], "diverged"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, digits_vit_dir, args, needle):
    recipe = write_recipe(tmp_path / "bad.yaml", "stages:\n  - method: magnitude\n    targets: ['re:nothing\\..*']\n")
    replace = {"NOPE": str(tmp_path / "nope"), "VIT": str(digits_vit_dir), "OUT": str(tmp_path / "out"),
               "BADTARGET": str(recipe)}
    code, _, stderr = run_cli(capsys, *[replace.get(a, a) for a in args])
    assert code == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == errors[0]  # progress lines before it, nothing after
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_ctrl_c_during_finetune_leaves_no_output(capsys, tmp_path, digits_vit_dir, monkeypatch):
    from compresscli.training import loop as training

    calls = {"n": 0}
    original = training.lr_factor

    def interrupt_on_third_step(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(training, "lr_factor", interrupt_on_third_step)
    code, _, stderr = run_cli(capsys, "run", str(digits_vit_dir), "--recipe", "magnitude-50", "--data", "digits",
                              "--out", str(tmp_path / "out"), "--set", "1.steps=10")
    assert code == 130 and "interrupted" in stderr and "nothing was written" in stderr
    assert list(tmp_path.iterdir()) == []


def test_recipes_lists_bundled_recipes(capsys):
    code, stdout, _ = run_cli(capsys, "recipes", "--json")
    listing = json.loads(stdout)
    assert code == 0 and {"magnitude-50", "magnitude-90"} <= {r["name"] for r in listing["recipes"]}
    assert {"magnitude", "finetune"} <= {m["method"] for m in listing["methods"]}
