"""FFCV loader pipelines: shapes, dtypes, normalisation, crops, subsets, threads and bad input."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from dptool.convert import WriterParams, convert
from dptool.errors import InputError
from dptool.loaders import IMAGENET_MEAN, IMAGENET_STD, eval_loader, inference_loader, train_loader
from dptool.synthetic import write_npz

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167


@pytest.fixture(autouse=True)
def _collect_loaders():
    """Collect dropped FFCV loaders inside the test, where numba #167's finalizer noise is filtered."""
    yield
    gc.collect()


def _denormalise(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (x * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _file_order(n: int, seed: int = 0) -> np.ndarray:
    """Row i of a converted file holds source sample order[i] (convert shuffles with this permutation)."""
    return np.random.default_rng(seed).permutation(n)


def test_train_loader_batches(tiny_beton):
    threads = torch.get_num_threads()
    loader = train_loader(tiny_beton, batch_size=32, res=24, workers=2, seed=1, channels_last=True)
    assert len(loader) == 5 and loader.resolution == 24
    seen = []
    for x, y in loader:
        assert x.shape == (32, 3, 24, 24) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (32,) and y.dtype == torch.int64
        assert torch.get_num_threads() == threads
        seen.append(y)
    labels = torch.cat(seen).numpy()
    assert np.array_equal(np.bincount(labels, minlength=4), [40, 40, 40, 40])  # each sample once per epoch
    assert torch.get_num_threads() == threads
    loader.set_resolution(16)  # progressive resizing: next epoch at the new size, same compiled code
    x, _ = next(iter(loader))
    assert x.shape == (32, 3, 16, 16)


def test_inference_loader_is_the_stored_image(tiny_beton, tiny_arrays):
    """At the stored resolution the centre square crop of a square image is the image itself."""
    images, labels = tiny_arrays
    order = _file_order(len(labels))
    xs, ys = zip(*inference_loader(tiny_beton, batch_size=64, res=32, workers=2))
    got, got_labels = _denormalise(torch.cat(xs)), torch.cat(ys).numpy()
    assert np.array_equal(got_labels, labels[order])
    assert np.abs(got.astype(int) - images[order].astype(int)).max() <= 1  # float round-trip only


def test_inference_crop_of_wide_images_and_indices(tmp_path):
    """A 24x40 image yields its centre 24x24 square; `indices` picks exactly those rows, in order."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(6, 24, 40, 3), dtype=np.uint8)
    labels = np.arange(6) % 2
    npz = write_npz(tmp_path / "wide.npz", images, labels, ["a", "b"])
    out = tmp_path / "wide.beton"
    convert(npz, out, params=WriterParams(max_resolution=40, write_mode="raw", num_workers=1, shuffle_seed=None))
    loader = inference_loader(out, batch_size=4, res=24, workers=1, indices=[5, 1, 2],
                              mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    xs, ys = zip(*loader)
    x = torch.cat(xs)
    assert torch.cat(ys).tolist() == [1, 1, 0]
    got = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, images[[5, 1, 2], :, 8:32])


def test_eval_loader_subset_and_short_last_batch(tiny_beton, tiny_arrays):
    _, labels = tiny_arrays
    file_labels = labels[_file_order(len(labels))]
    keep = np.flatnonzero(file_labels != 2)
    loader = eval_loader(tiny_beton, batch_size=50, res=32, workers=2, indices=keep)
    ys = [y for _, y in loader]
    assert [len(y) for y in ys] == [50, 50, 20]
    assert np.array_equal(torch.cat(ys).numpy(), file_labels[keep])


def test_bad_input(tmp_path, tiny_beton):
    with pytest.raises(InputError, match="does not exist"):
        train_loader(tmp_path / "missing.beton", batch_size=8, res=32)
    (tmp_path / "junk.beton").write_bytes(b"not a beton" * 10)
    with pytest.raises(InputError, match="not a .beton"):
        eval_loader(tmp_path / "junk.beton", batch_size=8, res=32)
    with pytest.raises(InputError, match="larger than the 160 samples"):
        train_loader(tiny_beton, batch_size=161, res=32)
    with pytest.raises(InputError, match=r"must lie in \[0, 160\)"):
        eval_loader(tiny_beton, batch_size=8, res=32, indices=[0, 160])
