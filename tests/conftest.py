"""Shared fixtures: tiny generated datasets and .beton files built once per session."""

from __future__ import annotations

import numpy as np
import pytest

from dptool.convert import WriterParams, convert
from dptool.synthetic import separable_images, write_npz


def make_beton(
    folder, name: str, n_classes: int = 4, per_class: int = 40, size: int = 32, seed: int = 0, write_mode: str = "raw"
):
    """Generate separable images and convert them to folder/name.beton (raw pixels by default)."""
    images, labels = separable_images(n_classes, per_class, size, seed=seed)
    npz = write_npz(folder / f"{name}.npz", images, labels, [f"class_{c}" for c in range(n_classes)])
    out = folder / f"{name}.beton"
    params = WriterParams(max_resolution=size, write_mode=write_mode, num_workers=2, shuffle_seed=seed)
    convert(npz, out, params=params)
    return out


@pytest.fixture(scope="session")
def tiny_beton(tmp_path_factory):
    """A 4-class, 160-image, 32 px raw .beton (read-only: copy it before changing anything)."""
    return make_beton(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="session")
def tiny_arrays():
    """The images and labels behind `tiny_beton`, class-sorted (the file itself is shuffled)."""
    return separable_images(4, 40, 32, seed=0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
