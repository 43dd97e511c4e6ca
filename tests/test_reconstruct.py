"""`reconstruct` recovers every compression method block by block, keeping its masks and codecs;
`finetune` and `reconstruct` share one training loop."""
import copy

import pytest
import torch

from compresscli import StageContext, compress_
from compresscli.model.architecture import detect
from compresscli.core.errors import DivergedError
from compresscli.methods import METHODS
from compresscli.methods.reconstruct import ReconstructConfig
from compresscli.codecs import CompressedModule
from compresscli.engine.recipe import make_config
from compresscli.model.tasks import task_for
from compresscli.training.loop import TrainConfig, train
from conftest import tiny_timm

QUICK = {"steps": 2, "round_steps": 2, "final_steps": 2, "rounds": 2}  # short settings, where a method has them
COMPRESSING = [name for name in METHODS if METHODS.get(name).config_cls.compresses]


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return [{"pixel_values": x[i:i + 8], "labels": torch.randint(0, 5, (8,), generator=g)} for i in range(0, n, 8)]


def _context(model):
    return StageContext(teacher=copy.deepcopy(model).eval(), task=task_for("timm", model), calibration=_images(),
                        train=_images(seed=1), device=torch.device("cpu"))


def _structure(model):
    """What a recovery stage must not change: every compressed layer's codec and quantization grid, its buffers
    (masks, indices, maps) and where its weights are zero."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, CompressedModule):
            found[f"{name}.codec"] = (module.codec, module.codec_params().get("quant"))
            for key, buffer in module.named_buffers(recurse=False):
                found[f"{name}.{key}"] = buffer.clone()
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and hasattr(module, "mask"):  # (a quantized dense layer's
                # zeros are weights that rounded to 0, which training may move: not pruned ones)
                found[f"{name}.zeros"] = weight.detach() == 0
    return found


@pytest.mark.parametrize("method", COMPRESSING)
def test_reconstruct_lowers_the_block_loss_and_keeps_the_structure(method):
    torch.manual_seed(0)
    model = tiny_timm()
    ctx = _context(model)
    cls = METHODS.get(method).config_cls
    fields = set(cls.__dataclass_fields__)
    config = make_config(method, {k: v for k, v in QUICK.items() if k in fields})
    names = set(detect(model).groups[config.default_targets[0]])
    compress_(model, config, lambda m, n: n in names, ctx)
    before = _structure(model)
    assert before, f"{method} made no compressed layer"
    stats = compress_(model, ReconstructConfig(steps=30, lr=1e-3, batch_size=8),
                      lambda m, n: n in set(detect(model).groups["blocks"]), ctx)
    assert stats["blocks"] == 2 and stats["final_loss"] < stats["first_loss"]
    after = _structure(model)
    for key, value in before.items():
        if key.endswith(".zeros"):  # a pruned weight is never revived
            assert not (value & ~after[key]).any(), key
        elif key.endswith(".codec"):  # the same codec, its values on the same grid
            assert value == after[key], key
        else:
            assert torch.equal(value, after[key]), key


def test_train_compressed_only_trains_the_compressed_layers():
    model = tiny_timm()
    ctx = _context(model)
    compress_(model, make_config("magnitude", {"sparsity": 0.5}), lambda m, n: n.endswith("mlp.fc1"), ctx)
    attention = model.blocks[0].attn.qkv.weight.detach().clone()
    fc1 = model.blocks[0].mlp.fc1.weight.detach().clone()
    compress_(model, ReconstructConfig(steps=5, lr=1e-2, train="compressed"), None, ctx)
    assert torch.equal(model.blocks[0].attn.qkv.weight, attention)
    assert not torch.equal(model.blocks[0].mlp.fc1.weight, fc1)


def test_the_shared_loop_stops_on_a_nan_loss():
    weight = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(DivergedError, match=r"toy diverged at step \d.*lower it; nothing was written"):
        train([weight], [1.0, float("nan")], lambda modules, x: ((weight * x).sum(), None), TrainConfig(4, 0.1),
              torch.device("cpu"), label="toy", fix="lower it")
