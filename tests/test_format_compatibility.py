"""Files written before still load: the format-version-1 checkpoints in tests/fixtures/format-v1 (written by the
code before the package was redrawn, one per codec) load with today's code in both forms and compute what they
computed then."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import compresscli
from compresscli.codecs.base import compressed_layers

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "format-v1"
CASES = sorted(p.stem for p in (FIXTURES / "expected").iterdir())
V1_CODECS = {"sparse_linear", "sparse_conv2d", "condensed_linear", "condensed_conv2d", "fips_linear", "rps_linear",
             "rps_conv2d", "rps_embedding"}


def _output(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if "pixel_values" in saved:
            return model(saved["pixel_values"])
        return model(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).last_hidden_state


@pytest.mark.parametrize("trainable", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("case", CASES)
def test_a_version_1_checkpoint_loads_and_computes_what_it_did(case, trainable):
    saved = load_file(FIXTURES / "expected" / f"{case}.safetensors")
    model = compresscli.load(FIXTURES / case, trainable=trainable)
    torch.testing.assert_close(_output(model, saved), saved["expected"], rtol=0, atol=1e-5)


def test_the_fixtures_cover_every_codec_of_version_1():
    seen = {layer.codec for case in CASES for layer in compressed_layers(compresscli.load(FIXTURES / case)).values()}
    assert seen == V1_CODECS
