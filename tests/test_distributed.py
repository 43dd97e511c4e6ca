"""Data-parallel recovery under torchrun (gloo, 2 CPU processes) gives what one process gives, sharded
recovery (FSDP2) what data-parallel gives, and a failure or Ctrl-C on one rank fails every rank and
publishes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compresscli.training import distributed
from compresscli.training.distributed import World, examples_in, relaunch_command, shard
from compresscli.core.errors import CompressError
from compresscli.engine.prediction import predict_memory, shard_wanted
from compresscli.engine.options import RunOptions
from compresscli.engine.run import compress_source
from compresscli.engine.planning import resolve_targets
from compresscli.engine.recipe import load_recipe
from compresscli.io.source import open_source, skeleton_of

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TIMEOUT = 240  # seconds; two processes importing torch and transformers on two busy cores


def run_cli(command: list[str], timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def one_process(checkpoint: Path, recipe: str | Path, out: Path, overrides: list[str] | None = None, **options):
    return compress_source(open_source(str(checkpoint)), load_recipe(recipe, overrides), out,
                           RunOptions(device="cpu", evaluate=False, **options))


def same_tensors(a: Path, b: Path, atol: float) -> float:
    """Every tensor of the two outputs: integer ones (bitmasks, indices) equal, float ones within atol."""
    one, two = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert one.keys() == two.keys()
    worst = 0.0
    for key in one:
        if one[key].is_floating_point():
            worst = max(worst, (one[key] - two[key]).abs().max().item())
        else:
            assert torch.equal(one[key], two[key]), key
    assert worst <= atol
    return worst


def test_shard_splits_every_batch_tensor_and_keeps_the_rest():
    batch = {"input_ids": torch.arange(10).view(5, 2), "mask": torch.ones(1, 1, 2)}
    parts = [shard(batch, r, 2) for r in range(2)]
    assert [examples_in(p) for p in parts] == [3, 2]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert all(p["mask"] is batch["mask"] for p in parts)  # not a batch tensor: every rank gets it whole


def test_relaunch_drops_nproc_and_runs_the_module_under_torchrun():
    command = relaunch_command("py", ["--debug", "run", "X", "--nproc", "4", "--out", "O", "--nproc=4"], 4)
    assert command == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m",
                       "compresscli", "--debug", "run", "X", "--out", "O"]


def test_two_processes_write_what_one_process_writes(tmp_path, digits_vit_dir):
    """magnitude + finetune on the digits ViT: the same global batch (16), seed and steps give the same masks
    exactly and the same weights within 5e-5: the ranks add their half-batch gradients in another order
    than one process adds the whole batch, and 4 AdamW steps of lr 1e-4 carry that difference (measured
    about 1e-5); a step of a different batch would move weights by about the lr."""
    args = ["--recipe", "magnitude-50", "--data", "digits", "--set", "1.steps=4", "--no-eval", "--device", "cpu",
            "--batch-size", "16", "--json"]
    done = run_cli([sys.executable, "-m", "compresscli", "run", str(digits_vit_dir), "--out", str(tmp_path / "two"),
                    "--nproc", "2", *args])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)["report"]  # rank 0 alone prints
    assert report["execution"]["world_size"] == 2 and report["execution"]["backend"] == "gloo"
    magnitude, finetune = (stage["stats"] for stage in report["stages"])
    assert magnitude["ranks_differed"] == 0  # one-shot masks are deterministic: the broadcast changed nothing
    assert len(finetune["steps_per_second_per_rank"]) == 2 and min(finetune["steps_per_second_per_rank"]) > 0

    one = one_process(digits_vit_dir, "magnitude-50", tmp_path / "one", ["1.steps=4"], data="digits", batch_size=16)
    assert finetune["final_loss"] == pytest.approx(one.stages[1].stats["final_loss"], rel=1e-5)
    same_tensors(tmp_path / "one", tmp_path / "two", atol=5e-5)


RECONSTRUCT = """stages:
  - method: magnitude
    targets: [mlp]
    params: {sparsity: 0.5, scope: layer}
  - method: reconstruct
    params: {steps: 3, batch_size: 8}
"""


def test_block_reconstruction_on_two_processes_reaches_the_loss_of_one(tmp_path, minilm_dir):
    """Block by block on the real MiniLM: each rank reconstructs half of every 8-example chunk, weighted by
    its real tokens, so the global loss is that of one process up to the order of additions (rel 1e-4)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECONSTRUCT)
    args = ["run", str(minilm_dir), "--recipe", str(recipe), "--calibration-examples", "16", "--max-length", "32",
            "--no-eval", "--device", "cpu", "--sequential", "--json"]
    done = run_cli([*TORCHRUN, "-m", "compresscli", *args, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)["report"]
    assert report["execution"]["mode"] == "sequential" and report["execution"]["world_size"] == 2
    two = report["stages"][1]["stats"]["per_unit"]
    one = one_process(minilm_dir, recipe, tmp_path / "one", sequential=True, calibration_examples=16,
                      max_length=32).stages[1].stats["per_unit"]
    assert len(two) == len(one) == 6
    assert [u["final_loss"] for u in two] == pytest.approx([u["final_loss"] for u in one], rel=1e-4)
    assert all(len(u["steps_per_second_per_rank"]) == 2 for u in two)
    assert all(u["ranks_differed"] == 0 for u in report["stages"][0]["stats"]["per_unit"])


SHARDED_RECIPES = {
    "magnitude": "stages:\n  - {method: magnitude, targets: [mlp], params: {sparsity: 0.5}}\n"
                 "  - {method: finetune, params: {steps: 4}}\n",
    "fips": "stages:\n  - {method: fips, params: {budget: 0.5, steps: 3, batch_size: 4}}\n"
            "  - {method: finetune, params: {steps: 3}}\n",
}


@pytest.mark.parametrize("recipe", SHARDED_RECIPES)
def test_sharded_recovery_writes_what_the_unsharded_run_writes(tmp_path, tiny_text_dirs, recipe):
    """FSDP2 (--shard) on a tiny Llama, 2 gloo processes: the checkpoint equals the unsharded (data-parallel)
    2-process run's within 1e-6 (measured: 0.0; each reduce-scatter adds the same two per-rank gradients the
    all_reduce adds, only the clipping norm is summed in another order). FiPS's base is one Parameter read by
    the MLPs of all three blocks: it is kept whole on every rank (sharded per block, each block would train a
    copy of its own), while the reconstruction runs the three blocks as three FSDP roots and the fine-tune
    wraps every block, then the model. (Against one process, data-parallel itself differs here by about
    3e-4 after 4 steps, as much as training moves the weights: AdamW normalises the tiny gradients of
    the LM head's unseen tokens, so the comparison that tests sharding is with the unsharded 2-process run.)"""
    path = tmp_path / "recipe.yaml"
    path.write_text(SHARDED_RECIPES[recipe])
    llama = tiny_text_dirs["llama"]
    args = [sys.executable, "-m", "compresscli", "run", str(llama), "--recipe", str(path), "--no-eval", "--device",
            "cpu", "--batch-size", "8", "--max-length", "32", "--calibration-examples", "16", "--nproc", "2", "--json"]
    reports = {}
    for name, flag in (("sharded", "--shard"), ("unsharded", "--no-shard")):
        done = run_cli([*args, "--out", str(tmp_path / name), flag])
        assert done.returncode == 0, done.stderr[-3000:]
        reports[name] = json.loads(done.stdout)["report"]
    assert reports["sharded"]["execution"]["sharded"] and not reports["unsharded"]["execution"]["sharded"]
    assert "- execution: whole-model, 2 processes (gloo), recovery sharded (FSDP2)" in \
        (tmp_path / "sharded" / "report.md").read_text()
    peaks = reports["sharded"]["stages"][-1]["stats"]["peak_rss_bytes_per_rank"]
    assert len(peaks) == 2 and min(peaks) > 100 * 1024**2  # each rank's own, torch and the model in it
    finals = {name: r["stages"][-1]["stats"]["final_loss"] for name, r in reports.items()}
    assert finals["sharded"] == pytest.approx(finals["unsharded"], rel=1e-6)
    same_tensors(tmp_path / "sharded", tmp_path / "unsharded", atol=1e-6)
    written, original = load_file(tmp_path / "sharded" / "model.safetensors"), load_file(llama / "model.safetensors")
    assert (written["lm_head.weight"] - original["lm_head.weight"]).abs().max() > 1e-5  # trained: not a vacuous match
    assert {str(t.dtype) for t in written.values() if t.is_floating_point()} == {"torch.float32"}  # the stored dtype
    if recipe == "fips":
        assert [k for k in written if k.startswith("shared.")] == ["shared.fips.model.layers.0.base"]


def test_recovery_shards_by_itself_only_when_a_rank_would_not_fit(monkeypatch, tiny_text_dirs):
    """The prediction counts a rank's share of the gradients and AdamW moments; the decision compares both
    figures with a rank's share of the host memory (two ranks on this machine share it)."""
    source = open_source(str(tiny_text_dirs["llama"]))
    skeleton = skeleton_of(source)
    recipe = load_recipe("magnitude-50")
    options = RunOptions(device="cpu", evaluate=False, max_length=32, batch_size=8)
    monkeypatch.setattr(distributed, "world", lambda: World(0, 2, 0, "gloo"))
    prediction = predict_memory(source, skeleton, recipe, resolve_targets(recipe, skeleton), options)
    whole, split = prediction.phases["whole-model"], prediction.phases["sharded"]
    model = whole["model"]
    assert whole["stages"] - split["stages"] == 3 * model - 3 * model // 2  # finetune: optimiser state halved
    assert prediction.sharded < prediction.whole_model

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for budget, expected in ((2 * prediction.whole_model, False), (prediction.whole_model + prediction.sharded, True),
                             (prediction.sharded, False)):  # fits / only sharded fits a rank's half / neither
        assert shard_wanted(RunOptions(max_memory=budget), "whole-model", prediction) is expected
    half = prediction.whole_model + prediction.sharded
    assert not shard_wanted(RunOptions(max_memory=half, shard=False), "whole-model", prediction)  # --no-shard
    assert not shard_wanted(RunOptions(max_memory=half), "sequential", prediction)
    with pytest.raises(CompressError, match="block by block"):
        shard_wanted(RunOptions(shard=True), "sequential", prediction)
    monkeypatch.setattr(distributed, "world", lambda: World())
    with pytest.raises(CompressError, match="this is one process.*--nproc N"):
        shard_wanted(RunOptions(shard=True), "whole-model", prediction)


LAUNCHER = '''
"""compress, with a test-only method `explode` that raises on rank 1 (EXPLODE=raise) or sends rank 1 the
SIGINT of a Ctrl-C (EXPLODE=interrupt); records each rank's exit code."""
import os, signal, sys, time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from compresscli.cli import main
from compresscli.methods.base import MethodConfig, register_method


@dataclass
class ExplodeConfig(MethodConfig):
    method = "explode"
    default_targets = ()
    compresses = False

    def needs_data(self):
        return False


@register_method(ExplodeConfig, "raises on rank 1 (test only)")
def explode(model, selected, config, ctx):
    if dist.get_rank() == 1:
        if os.environ["EXPLODE"] == "raise":
            raise RuntimeError("rank 1 exploded")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)  # the KeyboardInterrupt comes first
    return {}


try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code
Path(os.environ["EXIT_DIR"], os.environ["RANK"]).write_text(str(code))
sys.exit(code)
'''


@pytest.mark.parametrize("how, flags, said", [("raise", [], "rank 1 exploded"),
                                              ("interrupt", ["--shard"], "interrupted: nothing was written")])
def test_a_rank_that_fails_mid_run_fails_every_rank_and_writes_nothing(tmp_path, digits_vit_dir, how, flags, said):
    """Rank 1 raises, or gets Ctrl-C's SIGINT, while rank 0 goes on into the next (data-parallel, or sharded)
    fine-tune and waits for it in a collective: both exit non-zero, leaving no OUT, temporary directory or lock."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(LAUNCHER))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - {method: magnitude, targets: [mlp], params: {sparsity: 0.5}}\n"
                      "  - {method: finetune, params: {steps: 2}}\n  - {method: explode}\n"
                      "  - {method: finetune, params: {steps: 50}}\n")
    exits = tmp_path / "exits"
    exits.mkdir()
    out = tmp_path / "runs" / "out"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "EXIT_DIR": str(exits), "EXPLODE": how}
    done = subprocess.run([*TORCHRUN, str(launcher), "run", str(digits_vit_dir), "--recipe", str(recipe), "--data",
                           "digits", "--no-eval", "--device", "cpu", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=REPO)
    assert done.returncode != 0
    assert said in done.stderr
    codes = {p.name: p.read_text() for p in exits.iterdir()}
    assert set(codes) == {"0", "1"} and all(c not in ("0", "None") for c in codes.values()), (codes, done.stderr)
    assert how != "interrupt" or codes["1"] == "130"  # the CLI's exit status for Ctrl-C
    assert not out.exists() and not list(out.parent.iterdir())  # no OUT, no temporary directory, no lock


DST_DRIVER = """
import copy
import sys
import torch
import torch.distributed as dist
from compresscli import CondensedConfig, FinetuneConfig, StageContext, compress_
from compresscli.codecs.condensed.codec import _Condensed
from compresscli.io.checkpoint import load_checkpoint
from compresscli.io.data import prepare_data

if len(sys.argv) > 3:
    dist.init_process_group("gloo")
path, out = sys.argv[1], sys.argv[2]
rank = dist.get_rank() if dist.is_initialized() else 0
ckpt = load_checkpoint(path)
task = ckpt.task()
batcher, splits, _ = prepare_data(ckpt, task, "digits")
torch.manual_seed(0)
model, teacher = ckpt.model, copy.deepcopy(ckpt.model).eval()
ctx = StageContext(teacher=teacher, task=task, train=batcher.batches(splits.train, 16)[:4])
compress_(model, CondensedConfig(sparsity=0.9, update="rigl", every=2, ablate=True, min_salient=0.6),
          lambda m, n: ".mlp.fc" in n, ctx)
stats = compress_(model, FinetuneConfig(steps=8, lr=1e-3), None, ctx)
layers = {n: m for n, m in model.named_modules() if isinstance(m, _Condensed)}
torch.save({"stats": stats, "masks": {n: (m.indices, m.rows) for n, m in layers.items()},
            "values": {n: m.values.detach() for n, m in layers.items()}}, f"{out}/rank{rank}.pt")
if dist.is_initialized():
    dist.destroy_process_group()
"""


def test_condensed_mask_updates_are_identical_on_every_rank_and_match_one_process(tmp_path, digits_vit_dir):
    """condensed (90%, update every 2 steps, SRigL ablation) + 8 finetune steps on the real digits ViT, 2 gloo
    processes splitting each batch: the dense gradients the updates read are summed over the ranks, so both
    ranks choose the same masks (the run checks a checksum at each update) and the masks one process chooses
    on the whole batches."""
    driver = tmp_path / "driver.py"
    driver.write_text(DST_DRIVER)
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    done = run_cli([*TORCHRUN, str(driver), str(digits_vit_dir), str(tmp_path / "two"), "distributed"])
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_cli([sys.executable, str(driver), str(digits_vit_dir), str(tmp_path / "one")])
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    one = torch.load(tmp_path / "one" / "rank0.pt")
    assert ranks[0]["stats"]["mask_updates"] == 2 and ranks[0]["stats"]["mask_changed"] > 0  # steps 2, 4 (< 0.75 * 8)
    for name, (indices, rows) in one["masks"].items():
        for rank in ranks:
            got_indices, got_rows = rank["masks"][name]
            assert torch.equal(got_indices, indices) and (got_rows is None) == (rows is None)
            assert rows is None or torch.equal(got_rows, rows)
            assert torch.allclose(rank["values"][name], one["values"][name], atol=1e-4)
