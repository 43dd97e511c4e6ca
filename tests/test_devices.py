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
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", self.allocated))
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
