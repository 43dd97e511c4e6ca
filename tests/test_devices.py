"""Device discipline: every tensor a solver, codec or comparison makes lives where its inputs live.

Checked twice: on a CUDA device simulated on the CPU (tests/simulated_cuda.py: CPU memory reporting
cuda:0, mixing it with CPU tensors fails as on a GPU), so these fail on any machine when a tensor is
made on the default device; and on a real GPU (`gpu`-marked, skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from compresscli.codecs.sparse import encoding
from compresscli.methods.solvers.obs import MaskSpec, sparsegpt
from compresscli.model.metrics import compare_outputs
from compresscli.model.tasks import CausalLM, ImageClassification, TextEncoder
from simulated_cuda import SimulatedCuda, on_cuda

SPECS = [MaskSpec(0.5), MaskSpec(0.5, n_m=(2, 4)), MaskSpec(0.5, fan_in=True)]
SPEC_IDS = ["unstructured", "2:4", "fan-in"]


def _layer_problem(rows=12, cols=40, n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cols, generator=g)
    return torch.randn(rows, cols, generator=g), 2 / n * x.T @ x


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_obs_solver_keeps_its_inputs_device(spec):
    weight, hessian = _layer_problem()
    expected = sparsegpt(weight, hessian, spec, blocksize=16)
    with SimulatedCuda() as cuda:
        pruned, keep = sparsegpt(*on_cuda((weight, hessian)), spec, blocksize=16)
        assert cuda.is_cuda(pruned) and cuda.is_cuda(keep)
    assert torch.equal(pruned, expected[0]) and torch.equal(keep, expected[1])


@pytest.mark.parametrize("fmt", ["bitmask", "csr"])
def test_sparse_encoding_keeps_its_inputs_device(fmt):
    weight = torch.randn(9, 21)
    mask = torch.rand(9, 21) > 0.6
    mask[4] = False  # an empty row
    with SimulatedCuda() as cuda:
        used, tensors = encoding.encode(*on_cuda((weight, mask)), fmt)
        assert used == fmt and all(cuda.is_cuda(t) for t in tensors.values()), \
            {k: t.device for k, t in tensors.items()}
        dense, decoded = encoding.decode(fmt, tensors, (9, 21))
        assert cuda.is_cuda(dense) and cuda.is_cuda(decoded)
    assert torch.equal(decoded, mask) and torch.equal(dense, weight * mask)


def _text_batch(batch=3, tokens=7, vocab=50):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": torch.randint(0, vocab, (batch, tokens), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("task, outputs", [
    (TextEncoder(), lambda b: torch.randn(*b["input_ids"].shape, 16)),
    (CausalLM(), lambda b: torch.randn(*b["input_ids"].shape, 50)),
    (ImageClassification(), lambda b: torch.randn(len(b["labels"]), 4)),
], ids=["text-encoder", "causal-lm", "image-classification"])
def test_comparing_outputs_on_the_gpu_with_batches_on_the_host(task, outputs):
    """The block-by-block runner keeps its batches on the host and computes the outputs on the device."""
    torch.manual_seed(0)
    batches = [{"labels": torch.randint(0, 4, (3,))} if task.modality == "image" else _text_batch() for _ in range(2)]
    triples = [(b, outputs(b), outputs(b)) for b in batches]
    expected = compare_outputs(task, triples)
    with SimulatedCuda():
        got = compare_outputs(task, [(b, *on_cuda((o, c))) for b, o, c in triples])
    assert got == expected


# ----------------------------------------------------------------------------- on a real GPU

@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_obs_solver_on_the_gpu(spec):
    weight, hessian = _layer_problem()
    pruned, keep = sparsegpt(weight.cuda(), hessian.cuda(), spec, blocksize=16)
    expected, expected_keep = sparsegpt(weight, hessian, spec, blocksize=16)
    assert pruned.is_cuda and torch.equal(keep.cpu(), expected_keep)
    assert torch.allclose(pruned.cpu(), expected, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bitmask", "csr"])
def test_sparse_encoding_on_the_gpu(fmt):
    weight, mask = torch.randn(9, 21, device="cuda"), torch.rand(9, 21, device="cuda") > 0.6
    _, tensors = encoding.encode(weight, mask, fmt)
    assert all(t.is_cuda for t in tensors.values())
    dense, decoded = encoding.decode(fmt, tensors, (9, 21))
    assert torch.equal(decoded, mask) and torch.equal(dense, weight * mask)


@pytest.mark.gpu
@pytest.mark.parametrize("task, width", [(TextEncoder(), 16), (CausalLM(), 50)], ids=["text-encoder", "causal-lm"])
def test_comparing_outputs_on_the_gpu(task, width):
    batches = [_text_batch() for _ in range(2)]
    triples = [(b, torch.randn(3, 7, width), torch.randn(3, 7, width)) for b in batches]
    got = compare_outputs(task, [(b, o.cuda(), c.cuda()) for b, o, c in triples])
    assert got == pytest.approx(compare_outputs(task, triples))


# ----------------------------------------------------------------------------- GPU memory figures

class FakeCudaMemory:
    """torch.cuda's memory figures for a pretend GPU: what is allocated now, the peak since the last reset."""

    def __init__(self, free: int = 80 * 1024**3):
        self.allocated = self.peak = 0
        self.free = free

    def use(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def install(self, monkeypatch) -> "FakeCudaMemory":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                            lambda device=None: setattr(self, "peak", self.allocated))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.free, 80 * 1024**3))
        return self


def test_each_run_in_a_process_reports_its_own_gpu_peak(monkeypatch):
    from compresscli.core.resources import PeakMemory
    from compresscli.engine.options import RunOptions
    from compresscli.engine.report import execution

    gpu = FakeCudaMemory().install(monkeypatch)
    options = RunOptions(device="cuda")
    figures = []
    for used in (6 * 1024**3, 1024**3):  # a sweep: a large point, then a small one
        peak = PeakMemory("cuda")
        gpu.use(used)
        figures.append(execution("whole-model", peak, None, options)["gpu_peak_bytes"])
        gpu.use(-used)
    assert figures == [6 * 1024**3, 1024**3]
    assert PeakMemory("cpu").gpu_peak() is None


# ----------------------------------------------------------------------------- the mode on a GPU

MAGNITUDE = "stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5, scope: layer}\n"


def _predicted(path, monkeypatch, **options):
    from compresscli.engine.options import RunOptions
    from compresscli.engine.planning import resolve_targets
    from compresscli.engine.prediction import predict_memory
    from compresscli.engine.recipe import parse_recipe
    from compresscli.io.source import open_source, skeleton_of

    source, recipe = open_source(path), parse_recipe(MAGNITUDE)
    skeleton = skeleton_of(source)
    options = RunOptions(device="cuda", max_memory=64 * 1024**3, calibration_examples=16, eval_examples=16, **options)
    return predict_memory(source, skeleton, recipe, resolve_targets(recipe, skeleton), options), recipe, options


def test_a_model_that_fits_the_host_but_not_the_gpu_runs_block_by_block_on_it(tiny_text_dirs, monkeypatch):
    from compresscli.core.errors import CompressError
    from compresscli.engine.prediction import choose_mode

    gpu = FakeCudaMemory().install(monkeypatch)
    prediction, recipe, options = _predicted(tiny_text_dirs["llama"], monkeypatch)
    whole, sequential = prediction.gpu["whole-model"], prediction.gpu["sequential"]
    assert sequential < whole and prediction.whole_model <= options.memory_budget()
    assert prediction.phases["sequential"]["next unit"] > 0  # the unit read ahead, on the host
    gpu.free = whole  # fits exactly
    assert choose_mode(prediction, options, recipe) == "whole-model"
    gpu.free = whole - 1  # the host has room, the GPU does not: one unit at a time on the GPU
    assert choose_mode(prediction, options, recipe) == "sequential"
    gpu.free = sequential - 1
    with pytest.raises(CompressError, match="on the GPU"):
        choose_mode(prediction, options, recipe)


def test_the_next_unit_is_read_ahead_and_loads_the_same_weights(tiny_text_dirs):
    from compresscli.engine.block_reader import StreamedModel
    from compresscli.io.source import open_source

    source = open_source(tiny_text_dirs["llama"])
    plain = StreamedModel(source, None, torch.device("cpu"), read_ahead=False)
    ahead = StreamedModel(source, None, torch.device("cpu"), read_ahead=True)
    try:
        for i in range(len(plain.blocks)):
            expected = plain.load_block(i).state_dict()
            got = ahead.load_block(i).state_dict()
            ahead.prefetch([i + 1])
            assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
        assert ahead.read_ahead.served == sum(1 for n in source.index.names() if n.startswith(
            tuple(b.name + "." for b in ahead.blocks[1:]))) > 0
    finally:
        ahead.close()


@pytest.mark.gpu
@pytest.mark.parametrize("sequential", [True, False], ids=["block-by-block", "whole-model"])
def test_a_run_on_the_gpu_writes_and_evaluates_what_the_cpu_run_does(tiny_text_dirs, tmp_path, sequential):
    from compresscli.engine.options import RunOptions
    from compresscli.engine.recipe import parse_recipe
    from compresscli.engine.run import compress_source
    from compresscli.io.source import open_source

    def run(device):
        options = RunOptions(device=device, sequential=sequential, calibration_examples=16, eval_examples=16)
        return compress_source(open_source(tiny_text_dirs["llama"]), parse_recipe(MAGNITUDE), tmp_path / device,
                               options, force=True).report

    gpu, cpu = run("cuda"), run("cpu")
    assert gpu["execution"]["gpu_peak_bytes"] > 0 and gpu["device"].startswith("cuda")
    for m_gpu, m_cpu in zip(gpu["eval"]["metrics"], cpu["eval"]["metrics"]):
        assert m_gpu["compressed"] == pytest.approx(m_cpu["compressed"], rel=1e-2)


# ----------------------------------------------------------------------------- TF32

def test_tf32_on_cuda_runs_but_never_in_the_solver_and_the_check_allows_for_it(monkeypatch):
    from compresscli.core import precision
    from compresscli.engine.verify import output_tolerance
    from compresscli.methods.solvers import obs

    seen = []
    monkeypatch.setattr(obs, "inverse_cholesky", lambda *a, **k: seen.append(torch.get_float32_matmul_precision())
                        or torch.eye(a[0].shape[0]))
    before = torch.get_float32_matmul_precision()
    with precision.tf32_on(torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before  # the CPU: unchanged
    with precision.tf32_on(torch.device("cuda")):
        assert torch.get_float32_matmul_precision() == "high"
        sparsegpt(*_layer_problem(), MaskSpec(0.5))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert output_tolerance(torch.float32, 6) == pytest.approx(3 * 2**-10 * 7**0.5)
    assert seen == ["highest"] and torch.get_float32_matmul_precision() == before
    assert output_tolerance(torch.float32, 6) == 1e-4  # float32 without TF32: the fixed floor
