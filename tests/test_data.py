import numpy as np
import pytest
import torch

from compresscli.io.data import Batcher, fit_images, load_examples, split
from compresscli.core.errors import DataError


@pytest.mark.parametrize("spec", ["digits", "mnist1d", "pydoc"])
def test_splits_are_disjoint_complete_and_stable(spec):
    examples = load_examples(spec)
    a, b = split(examples), split(load_examples(spec))
    if examples.texts is not None:
        parts = [set(a.eval.texts), set(a.calibration.texts), set(a.train.texts)]
        assert a.eval.texts == b.eval.texts
    else:
        flat = lambda ex: {tuple(x.flatten().tolist()) for x in ex.images}  # noqa: E731
        parts = [flat(a.eval), flat(a.calibration), flat(a.train)]
        assert torch.equal(a.eval.images, b.eval.images)
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(a.eval) + len(a.calibration) + len(a.train) == len(examples)


def test_digits_is_the_real_dataset():
    examples = load_examples("digits")
    assert examples.images.shape == (1797, 1, 8, 8) and 0 <= examples.images.min() and examples.images.max() <= 1
    assert sorted(examples.labels.unique().tolist()) == list(range(10))


def test_fit_images_channels_size_and_normalisation():
    grey = torch.rand(2, 1, 8, 8)
    out = fit_images(grey, (3, 16, 16), [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert out.shape == (2, 3, 16, 16) and torch.equal(out[:, 0], out[:, 1])
    same = fit_images(grey, (1, 8, 8), [0.5], [0.5])
    assert torch.allclose(same, (grey - 0.5) / 0.5)


def test_text_file_and_image_folder(tmp_path):
    from PIL import Image

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"This is paragraph number {i}, long enough to be kept as prose." for i in range(30)))
    assert len(load_examples(f"text:{text}")) == 30
    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "imgs" / label / f"{i}.png")
    images = load_examples(f"imagefolder:{tmp_path / 'imgs'}")
    assert images.images.shape[:2] == (6, 3) and images.labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("spec, needle", [("text:/no/such.txt", "no such text file"), ("digitz", "did you mean 'digits'"),
                                          ("imagefolder:/no/dir", "no such image folder")])
def test_bad_data_specs(spec, needle):
    with pytest.raises(DataError, match=needle):
        load_examples(spec)


def test_modality_mismatch_is_named():
    batcher = Batcher("image", image_cfg={"input_size": [1, 8, 8], "mean": [0.5], "std": [0.5]})
    with pytest.raises(DataError, match="holds text but the model reads images"):
        batcher.batches(load_examples("pydoc"), 4, limit=4)
