"""`dptool convert --resume` of the sources other than an ImageFolder: a torchvision dataset kept as arrays
(FashionMNIST), one kept as image files (DTD) and a CoOp split. Each is killed half way (SIGKILL of its process
group), changed and refused naming what changed, put back and resumed to the bytes of an uninterrupted conversion."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_convert_resume import ENV, OPTIONS, PARAMS, _interrupt, run

from dptool.convert import convert, partial_paths
from dptool.errors import InputError
from dptool.synthetic import separable_images
from dptool.writer_progress import read_checkpoint

NAMES = ["banded", "dotted", "grid", "zigzag"]


@pytest.fixture(scope="module")
def images():
    """1,600 images of 64 px in 4 classes: a few seconds to convert, long enough to be interrupted half way."""
    return separable_images(4, 400, 64, seed=3)


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def _fashion_mnist(root: Path, images) -> Path:
    """torchvision's FashionMNIST files (its idx format, any image size) under root; returns the images file."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    gray = images[0].mean(axis=3).astype(np.uint8)
    for prefix, x, y in (("train", gray, images[1]), ("t10k", gray[:4], images[1][:4])):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x, 0x803)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, 0x801)
    return raw / "train-images-idx3-ubyte"


def _dtd(root: Path, images) -> Path:
    """torchvision's DTD layout (root/dtd/dtd/images/<class>/*.jpg, labels/<split>1.txt) with every image in each
    split; returns the images folder."""
    data = root / "dtd" / "dtd"
    (data / "labels").mkdir(parents=True)
    lines = []
    for i, (image, label) in enumerate(zip(*images)):
        (data / "images" / NAMES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(data / "images" / NAMES[label] / f"{NAMES[label]}_{i:04d}.jpg")
        lines.append(f"{NAMES[label]}/{NAMES[label]}_{i:04d}.jpg\n")
    for split in ("train", "val", "test"):
        (data / "labels" / f"{split}1.txt").write_text("".join(lines))
    return data / "images"


def _coop(root: Path, images) -> Path:
    """root/images/<class>/*.jpg and root/split.json in CoOp's shape, every image in train, a few in test;
    returns the split file."""
    split = {"train": [], "val": [], "test": []}
    for i, (image, label) in enumerate(zip(*images)):
        (root / "images" / NAMES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / NAMES[label] / f"{i:04d}.jpg")
        split["train"].append([f"{NAMES[label]}/{i:04d}.jpg", int(label), NAMES[label]])
    split["test"] = split["train"][:4]
    (root / "split.json").write_text(json.dumps(split))
    return root / "split.json"


def _killed_half_way(source_args: list, out: Path) -> bytes:
    """A conversion (two workers, a record after every chunk) killed with its process group once it recorded 100
    samples; the partial file's bytes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dptool", "convert", *map(str, source_args), str(out), *OPTIONS, "--workers", "2"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, ENV: "0"},
    )
    _interrupt(proc, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    partial, state_path = partial_paths(out)
    assert not out.exists() and 0 < read_checkpoint(state_path)["done"] < 1600
    return partial.read_bytes()


def _refused(source_args: list, out: Path, partial_bytes: bytes) -> str:
    """The resume's refusal (exit 2, one sentence), the partial left as it was."""
    result = run("convert", *source_args, out, *OPTIONS, "--workers", 1, "--resume")
    assert result.exit_code == 2 and "changed since" in result.output and "Traceback" not in result.output, \
        result.output
    assert partial_paths(out)[0].read_bytes() == partial_bytes and not out.exists()
    return result.output


def _resumed(source_args: list, out: Path, reference: Path) -> None:
    """The resume (one worker, the killed run had two) ends on the uninterrupted conversion's bytes."""
    result = run("convert", *source_args, out, *OPTIONS, "--workers", 1, "--resume")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == reference.read_bytes()
    assert not any(p.exists() for p in partial_paths(out))


def test_torchvision_arrays_resume_and_a_changed_array_is_refused(images, tmp_path):
    """FashionMNIST keeps its images as one array: a byte of it changed, with the file's size and modification
    time kept, is seen (the array is hashed, not the file's size and time) and named."""
    images_file = _fashion_mnist(tmp_path / "data", images)
    source = ["--format", "torchvision:FashionMNIST", tmp_path / "data"]
    reference = tmp_path / "ref.beton"
    convert(tmp_path / "data", reference, format="torchvision:FashionMNIST", params=PARAMS)
    out = tmp_path / "out.beton"
    partial_bytes = _killed_half_way(source, out)
    original, st = images_file.read_bytes(), images_file.stat()
    changed = bytearray(original)
    changed[-1] ^= 0xFF  # the last image, which the killed run has likely not written yet
    images_file.write_bytes(bytes(changed))
    os.utime(images_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    message = _refused(source, out, partial_bytes)
    assert "but the torchvision dataset (its image and label arrays) changed since" in message, message
    images_file.write_bytes(original)
    _resumed(source, out, reference)


def test_torchvision_files_resume_and_a_changed_image_is_refused(images, tmp_path):
    """DTD keeps a list of image files: one rewritten is named as the dataset's files changing; put back (bytes
    and modification time) the resume goes on."""
    folder = _dtd(tmp_path / "data", images)
    source = ["--format", "torchvision:DTD", tmp_path / "data"]
    reference = tmp_path / "ref.beton"
    convert(tmp_path / "data", reference, format="torchvision:DTD", params=PARAMS)
    out = tmp_path / "out.beton"
    partial_bytes = _killed_half_way(source, out)
    image = folder / "zigzag" / "zigzag_1599.jpg"
    shutil.copy2(image, tmp_path / "kept.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    message = _refused(source, out, partial_bytes)
    assert "but the torchvision dataset (its image files, their labels, sizes or modification times) changed" \
        in message, message
    shutil.copy2(tmp_path / "kept.jpg", image)
    _resumed(source, out, reference)


def test_coop_resume_and_an_edited_split_file_or_changed_image_is_refused(images, tmp_path):
    """A CoOp split: an edit of the split file (even of a split not converted: its classes are the whole file's)
    is named as the split file; a changed image as the images the split lists."""
    split_file = _coop(tmp_path, images)
    source = ["--format", f"coop:{split_file}", tmp_path / "images"]
    reference = tmp_path / "ref.beton"
    convert(tmp_path / "images", reference, format=f"coop:{split_file}", params=PARAMS)
    out = tmp_path / "out.beton"
    partial_bytes = _killed_half_way(source, out)
    original = split_file.read_bytes()
    doc = json.loads(original)
    doc["test"] = doc["test"][:2]
    split_file.write_text(json.dumps(doc))
    message = _refused(source, out, partial_bytes)
    assert f"but the split file {split_file} changed since" in message, message
    split_file.write_bytes(original)
    image = tmp_path / "images" / "zigzag" / "1599.jpg"
    shutil.copy2(image, tmp_path / "kept.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    message = _refused(source, out, partial_bytes)
    assert "but the images the split lists (their paths, labels, sizes or modification times) changed since" \
        in message and "split file" not in message, message
    shutil.copy2(tmp_path / "kept.jpg", image)
    _resumed(source, out, reference)


def test_a_torchvision_dataset_dptool_cannot_identify_records_no_progress(images, tmp_path, monkeypatch, caplog):
    """A torchvision whose dataset keeps its files where dptool does not look (another version, here DTD's list
    renamed): dptool cannot tell a changed dataset, so it records no progress to resume, and says so; an
    interrupted conversion leaves nothing, rather than a partial that a resume would mix with changed images."""
    import torchvision.datasets as tvd

    class DTD(tvd.DTD):  # its name: torchvision reads the files under root/dtd
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._files = self._image_files
            del self._image_files

        def __getitem__(self, index):
            return self.loader(self._files[index]).convert("RGB"), self._labels[index]

    monkeypatch.setattr(tvd, "DTD", DTD)
    monkeypatch.setenv(ENV, "0")
    folder = _dtd(tmp_path / "data", (images[0][::5], images[1][::5]))
    late = int(np.random.default_rng(0).permutation(320)[-10])  # written after many records would have been made
    broken = f"{NAMES[images[1][late * 5]]}_{late:04d}.jpg"
    (folder / NAMES[images[1][late * 5]] / broken).write_bytes(b"not a jpeg")  # stops the run under --on-error fail
    out = tmp_path / "out.beton"
    with pytest.raises(InputError, match=broken):
        convert(tmp_path / "data", out, format="torchvision:DTD", params=PARAMS, on_error="fail")
    assert not any(p.exists() for p in (out, *partial_paths(out)))
    caplog.set_level("WARNING")
    with pytest.raises(InputError, match=broken):
        convert(tmp_path / "data", out, format="torchvision:DTD", params=PARAMS, on_error="fail", resume=True)
    assert "no progress is recorded: an interrupted conversion" in caplog.text
    assert "cannot tell whether the torchvision dataset (dptool finds neither its list of image files" in caplog.text
    assert not any(p.exists() for p in (out, *partial_paths(out)))
