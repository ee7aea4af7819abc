"""Shared fixtures: tiny generated datasets and .beton files built once per session."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dptool.convert import WriterParams, convert
from dptool.synthetic import separable_images, write_npz

# Under torchrun, a rank that fails waits up to DPTOOL_FAILURE_WAIT_S (15 s) for the others to fail alike before it
# prints its own sentence: on a loaded machine one rank can reach a check later than that, and the torchrun tests that
# count the lines printed would see one sentence a rank. Waiting costs nothing when the ranks agree.
os.environ.setdefault("DPTOOL_FAILURE_WAIT_S", "120")


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


SCORE_SUBSET = (2, 5, 6)  # the source classes the score tests' target is drawn from


@pytest.fixture(scope="session")
def score_data(tmp_path_factory):
    """For the score tests: an 8-class source (24 images/class) and a target drawn from source classes 2, 5, 6
    (15 images each, labels 0..2), raw 16 px .betons, and a ResNet-18 (small stem) checkpoint whose head was fitted
    on the source's features (the body stays random: enough on separable colours, and fast on a CPU)."""
    import types

    import torch

    from dptool.beton import fingerprint, open_beton
    from dptool.checkpoint import save_checkpoint
    from dptool.loaders import IMAGENET_MEAN, IMAGENET_STD
    from dptool.models import create_model, feature_layer

    folder = tmp_path_factory.mktemp("score")
    images, labels = separable_images(8, 40, 16, seed=3)
    within = np.tile(np.arange(40), 8)
    parts = {"source": (within < 24, labels[within < 24], 8)}
    pick = (within >= 24) & (within < 39) & np.isin(labels, SCORE_SUBSET)
    parts["target"] = (pick, np.searchsorted(SCORE_SUBSET, labels[pick]), 3)
    paths = {}
    for name, (mask, lab, n) in parts.items():
        npz = write_npz(folder / f"{name}.npz", images[mask], lab, [f"{name}_{c}" for c in range(n)])
        paths[name] = folder / f"{name}.beton"
        convert(npz, paths[name], params=WriterParams(max_resolution=16, write_mode="raw", num_workers=1))
    torch.manual_seed(0)
    model = create_model("resnet18_small", 8).eval()
    mean = torch.tensor([m * 255 for m in IMAGENET_MEAN]).view(1, 3, 1, 1)
    inv_std = torch.tensor([1 / (s * 255) for s in IMAGENET_STD]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images[parts["source"][0]]).permute(0, 3, 1, 2).float() - mean) * inv_std
    head = feature_layer(model)
    captured = []
    handle = head.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    feats, y = captured[0], torch.from_numpy(parts["source"][1])
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = save_checkpoint(folder / "surrogate.pt", arch="resnet18_small", num_classes=8, state_dict=model.state_dict(),
                           recipe={"val_res": 16}, data_fingerprint=fingerprint(open_beton(paths["source"])), epoch=1)
    return types.SimpleNamespace(folder=folder, source=paths["source"], target=paths["target"], checkpoint=ckpt,
                                 subset=SCORE_SUBSET, mean=mean, inv_std=inv_std)


def score_reference(data, path):
    """Logits, features and labels of every row of `path` from a plain torch forward pass of `score_data`'s
    checkpoint (no FFCV): the reference the score tests compare with."""
    import torch

    from dptool.beton import open_beton, read_image
    from dptool.checkpoint import load_checkpoint
    from dptool.models import feature_layer

    model, _ = load_checkpoint(data.checkpoint)
    model.eval()
    beton = open_beton(path)
    images = np.stack([read_image(beton, i) for i in range(beton.num_samples)])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - data.mean) * data.inv_std
    captured = []
    handle = feature_layer(model).register_forward_pre_hook(lambda _m, inp: captured.append(inp[0]))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    return logits, captured[0].numpy().astype(np.float64), beton.labels


@pytest.fixture(scope="session")
def target_ref(score_data):
    """`score_reference` of the score tests' target."""
    return score_reference(score_data, score_data.target)


@pytest.fixture(scope="session")
def source_ref(score_data):
    """`score_reference` of the score tests' source."""
    return score_reference(score_data, score_data.source)


def make_split_betons(folder, n_classes: int = 4, train_per_class: int = 40, val_per_class: int = 10,
                      size: int = 32, seed: int = 0):
    """Train and validation .beton files drawn from the same separable classes (disjoint samples)."""
    per = train_per_class + val_per_class
    images, labels = separable_images(n_classes, per, size, seed=seed)
    within = np.arange(len(labels)) % per
    names = [f"class_{c}" for c in range(n_classes)]
    params = WriterParams(max_resolution=size, write_mode="raw", num_workers=2, shuffle_seed=seed)
    out = []
    for split, mask in (("train", within < train_per_class), ("val", within >= train_per_class)):
        npz = write_npz(folder / f"{split}.npz", images[mask], labels[mask], names)
        convert(npz, folder / f"{split}.beton", params=params)
        out.append(folder / f"{split}.beton")
    return tuple(out)


@pytest.fixture(scope="session")
def train_val_betons(tmp_path_factory):
    """(train, val) .beton paths: 4 separable classes, 40 + 10 images each, 32 px (read-only)."""
    return make_split_betons(tmp_path_factory.mktemp("split"))


@pytest.fixture
def one_thread():
    """One torch thread: on a busy 2-core machine, two OpenMP threads ran ResNet steps 40x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
