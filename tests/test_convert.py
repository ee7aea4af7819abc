"""`dptool convert` and `dptool info` on generated data: round trips, messy folders, refusals."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dptool.beton import fingerprint, open_beton, read_image, read_sidecar
from dptool.cli.main import cli
from dptool.convert import WriterParams, convert
from dptool.errors import DptoolError, InputError
from dptool.synthetic import separable_images, write_image_folder, write_npz
from dptool.writer import SkipSample, write_beton

RAW = ["--write-mode", "raw", "--max-res", "64", "--workers", "2"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _digest(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def test_imagefolder_round_trip_is_exact_in_raw_mode(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(15, 16, 20, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 5)
    names = ["cat", "dog", "emu"]
    write_image_folder(tmp_path / "src", images, labels, names, ext="png")
    result = run("convert", tmp_path / "src", tmp_path / "out.beton", *RAW, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["num_samples"] == 15 and summary["num_classes"] == 3 and summary["skipped"] == []

    beton = open_beton(tmp_path / "out.beton")
    expected = {_digest(img): int(lab) for img, lab in zip(images, labels)}
    stored = {_digest(read_image(beton, i)): int(beton.labels[i]) for i in range(beton.num_samples)}
    assert stored == expected
    side = read_sidecar(tmp_path / "out.beton")
    assert side["class_names"] == names and side["class_counts"] == [5, 5, 5]
    assert side["fingerprint"] == fingerprint(beton)
    # shuffled with the seed: not class-sorted, and the same seed gives the same file
    assert list(beton.labels) != sorted(beton.labels)
    run("convert", tmp_path / "src", tmp_path / "again.beton", *RAW)
    assert open_beton(tmp_path / "again.beton").labels.tolist() == beton.labels.tolist()


def test_jpeg_mode_decodes_within_tolerance(tmp_path):
    images, labels = separable_images(2, 4, 48, seed=3, noise=0.0)
    npz = write_npz(tmp_path / "d.npz", images, labels)
    convert(
        npz,
        tmp_path / "j.beton",
        params=WriterParams(max_resolution=48, write_mode="jpg", jpeg_quality=95, num_workers=1),
    )
    beton = open_beton(tmp_path / "j.beton")
    order = np.random.default_rng(0).permutation(len(images))  # the writer's shuffle with seed 0
    for pos, src_index in enumerate(order):
        diff = np.abs(read_image(beton, pos).astype(int) - images[src_index].astype(int))
        assert diff.mean() < 3.0
        assert beton.labels[pos] == labels[src_index]


def _messy_folder(root):
    good = root / "good"
    good.mkdir(parents=True)
    (root / "empty").mkdir()
    rgb = np.full((8, 8, 3), 100, np.uint8)
    Image.fromarray(rgb).save(good / "rgb.png")
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(good / "gray.png")
    Image.fromarray(rgb).convert("P").save(good / "palette.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(good / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(good / "cmyk.jpg", quality=100)
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(good / "deep16.png")
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "notes.txt").write_text("not an image")
    (bad / "garbage.jpg").write_bytes(os.urandom(300))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad / "full.jpg")
    data = (bad / "full.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "full.jpg").unlink()
    Image.new("1", (10_000, 9_000)).save(bad / "bomb.png")  # 90 Mpx, a few KB on disk
    Image.fromarray(np.zeros((2, 600, 3), np.uint8)).save(bad / "sliver.png")  # 0 px tall at --max-res 256
    Image.fromarray(rgb).save(bad / "fine.png")


def test_many_empty_class_folders_are_warned_about_in_one_line(tmp_path, caplog):
    """An ImageNet val tree extracted in part (300 of its 1000 class folders empty) printed one warning per folder;
    now one line names the first five and counts the rest; a single empty folder keeps its own sentence."""
    import logging

    images, labels = separable_images(2, 2, 8, seed=0)
    write_image_folder(tmp_path / "src", images, labels, ["n00", "n09"])
    for c in range(1, 9):
        (tmp_path / "src" / f"n0{c}").mkdir()
    with caplog.at_level(logging.WARNING, logger="dptool"):
        result = convert(tmp_path / "src", tmp_path / "e.beton", params=WriterParams(write_mode="raw", num_workers=1))
    assert result.num_classes == 10 and result.num_samples == 4
    warned = [r.getMessage() for r in caplog.records if "empty" in r.getMessage()]
    assert warned == [f"8 class folders of {tmp_path / 'src'} are empty (n01, n02, n03, n04, n05 and 3 more); their "
                      "labels are kept with no samples"]
    caplog.clear()
    for c in range(2, 9):
        (tmp_path / "src" / f"n0{c}").rmdir()
    with caplog.at_level(logging.WARNING, logger="dptool"):
        convert(tmp_path / "src", tmp_path / "one.beton", params=WriterParams(write_mode="raw", num_workers=1))
    assert [r.getMessage() for r in caplog.records if "empty" in r.getMessage()] == [
        f"class folder {tmp_path / 'src' / 'n01'} is empty; its label 1 is kept with no samples"]


def test_messy_folder_converts_what_it_can_and_lists_the_rest(tmp_path, caplog):
    _messy_folder(tmp_path / "src")
    result = convert(tmp_path / "src", tmp_path / "m.beton", params=WriterParams(write_mode="raw", num_workers=2))
    reasons = {os.path.basename(s["path"]): s["reason"] for s in result.skipped}
    assert set(reasons) == {"zero.jpg", "notes.txt", "garbage.jpg", "truncated.jpg", "bomb.png", "sliver.png"}
    assert "zero-byte" in reasons["zero.jpg"] and "bomb" in reasons["bomb.png"]
    assert reasons["sliver.png"] == "its 600x2 px image would be 0 px on its short side at --max-res 256"
    assert "empty" in caplog.text  # the empty class folder is warned about

    beton = open_beton(tmp_path / "m.beton")
    side = read_sidecar(tmp_path / "m.beton")
    assert side["class_names"] == ["bad", "empty", "good"]  # the empty class keeps its label
    assert side["class_counts"] == [1, 0, 6] and beton.num_samples == 7
    assert len(side["skipped"]) == 6
    pixels = sorted(_digest(read_image(beton, i)) for i in range(beton.num_samples))
    white_red = np.zeros((8, 8, 3), np.uint8)
    white_red[:4] = (255, 0, 0)
    white_red[4:] = 255
    for expected in (np.full((8, 8, 3), 77, np.uint8), white_red, np.full((8, 8, 3), 255, np.uint8)):
        assert _digest(expected) in pixels
    for i in range(beton.num_samples):
        assert read_image(beton, i).shape == (8, 8, 3)


def test_imagefolder_paths_with_odd_names_are_read_and_described(tmp_path, monkeypatch):
    """Paths are held as bytes and offsets: a non-UTF-8 name, a space, a nested folder and a long name all come
    back as the file they were, in the order of the sorted paths, also with the source given as `.`."""
    from dptool.readers import ImageFolderSource

    names = [b"a b.png", b"\xff\xfe.png", b"deep/er/x.png", b"n" * 200 + b".png"]
    for k, name in enumerate(names):
        path = os.path.join(os.fsencode(tmp_path), b"src", b"cls", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), 40 * k, np.uint8)).save(path, format="PNG")
    source = ImageFolderSource(tmp_path / "src")
    expected = sorted(os.path.join(str(tmp_path / "src" / "cls"), os.fsdecode(n)) for n in names)
    assert [source.describe(i) for i in range(len(source))] == expected
    for i, path in enumerate(expected):
        k = names.index(os.fsencode(os.path.relpath(path, tmp_path / "src" / "cls")))
        assert source.load(i)[0, 0, 0] == 40 * k
    monkeypatch.chdir(tmp_path / "src")
    here = ImageFolderSource(".")
    assert [os.path.realpath(here.describe(i)) for i in range(len(here))] == expected
    assert np.array_equal(here.load(3), source.load(3))


def test_on_error_fail_names_the_file_and_leaves_nothing(tmp_path):
    _messy_folder(tmp_path / "src")
    result = run("convert", tmp_path / "src", tmp_path / "f.beton", *RAW, "--on-error", "fail")
    assert result.exit_code == 2
    assert "Cannot read" in result.output and "bad" in result.output
    assert not (tmp_path / "f.beton").exists() and not (tmp_path / "f.beton.json").exists()
    assert not glob.glob(str(tmp_path / ".f.beton*"))


def test_npz_with_class_names_and_grayscale(tmp_path):
    gray = np.arange(6 * 10 * 10, dtype=np.uint8).reshape(6, 10, 10)
    write_npz(tmp_path / "g.npz", gray, np.array([0, 1, 2, 0, 1, 2]), ["a", "b", "c"])
    result = run("convert", tmp_path / "g.npz", tmp_path / "g.beton", *RAW, "--json")
    assert result.exit_code == 0, result.output
    beton = open_beton(tmp_path / "g.beton")
    assert beton.class_names == ["a", "b", "c"]
    stored = {_digest(read_image(beton, i)) for i in range(6)}
    assert stored == {_digest(np.repeat(g[..., None], 3, axis=2)) for g in gray}


def test_npz_labels_with_gaps_keep_their_classes_with_a_warning(tmp_path, caplog):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    write_npz(tmp_path / "gaps.npz", images, np.array([0, 3, 3, 0]))
    result = convert(tmp_path / "gaps.npz", tmp_path / "gaps.beton", params=WriterParams(write_mode="raw"))
    assert result.num_classes == 4 and read_sidecar(tmp_path / "gaps.beton")["class_counts"] == [2, 0, 0, 2]
    assert "2 of its 4 classes have no samples" in caplog.text


def _write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_torchvision_split_lacking_a_class_is_refused_not_misnamed(tmp_path):
    """OxfordIIITPet names only the breeds its split holds but keeps the labels: names would shift by one."""
    base = tmp_path / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    lines = []
    for image_id, label in (("Abyssinian_1", 1), ("Birman_1", 3)):  # breed 2 (Bengal) absent from this split
        Image.fromarray(np.full((8, 8, 3), 10 * label, np.uint8)).save(base / "images" / f"{image_id}.jpg")
        lines.append(f"{image_id} {label} 1 1")
    (base / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    result = run("convert", "--format", "torchvision:OxfordIIITPet", tmp_path, tmp_path / "pet.beton", "--split",
                 "test")
    assert result.exit_code == 2 and "names 2 classes but its labels go up to 2" in result.output, result.output
    assert not (tmp_path / "pet.beton").exists()


def test_torchvision_fashionmnist_from_disk(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    train_y = np.arange(12) % 10
    for prefix, x, y in (("train", train_x, train_y), ("t10k", train_x[:4], train_y[:4])):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x, 0x803)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, 0x801)
    result = run(
        "convert",
        "--format",
        "torchvision:FashionMNIST",
        tmp_path,
        tmp_path / "fm.beton",
        *RAW,
        "--split",
        "train",
        "--json",
    )
    assert result.exit_code == 0, result.output
    beton = open_beton(tmp_path / "fm.beton")
    assert beton.num_samples == 12 and beton.num_classes == 10 and beton.class_names[0] == "T-shirt/top"
    stored = {_digest(read_image(beton, i)): int(beton.labels[i]) for i in range(12)}
    assert stored == {_digest(np.repeat(x[..., None], 3, axis=2)): int(y) for x, y in zip(train_x, train_y)}


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["convert", "{t}/missing", "{t}/o.beton"], "does not exist"),
        (["convert", "--format", "parquet", "{t}", "{t}/o.beton"], "Unknown format"),
        (["convert", "--format", "torchvision:CIFAR10", "{t}", "{t}/o.beton"], "not on disk"),
        (["convert", "--format", "torchvision:Imagenette9", "{t}", "{t}/o.beton"], "Unknown torchvision dataset"),
        (["convert", "{t}/d.npz", "{t}/d.npz"], "same"),
        (["convert", "{t}/d.npz", "{t}/nofolder/o.beton"], "does not exist"),
        (["info", "{t}/d.npz"], "not a .beton"),
        (["info", "{t}/missing.beton"], "does not exist"),
        (["info", "{t}/d.beton.json"], "d.beton.json is the sidecar of"),
        (["info", "{t}/other.json"], "is JSON but not a dptool scores file"),
        (["info", "{t}/empty"], "empty is empty; info reads .beton files, dptool scores files, checkpoints and"),
        (["convert", "{t}/notes.txt", "{t}/o.beton"], "is a file but not an .npz"),
        (["convert", "{t}/x.beton", "{t}/o.beton"], "x.beton is already an FFCV .beton, what convert writes; convert "
                                                    "reads an ImageFolder tree"),
        (["convert", "--format", "npz", "{t}", "{t}/o.beton"], "--format npz takes an .npz file"),
        (["convert", "{t}/nokeys.npz", "{t}/o.beton"], "must hold arrays 'images' and 'labels' (missing 'labels')"),
        (["convert", "{t}/d.npz", "{t}/o.beton", "--split", "test"], "--split applies to torchvision datasets"),
    ],
)
def test_user_errors_are_one_sentence_with_exit_2(tmp_path, args, phrase):
    images, labels = separable_images(2, 2, 8)
    write_npz(tmp_path / "d.npz", images, labels)
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "x.beton").write_bytes(b"a file a conversion wrote")
    np.savez(tmp_path / "nokeys.npz", images=images)
    (tmp_path / "d.beton.json").write_text("{}")
    (tmp_path / "other.json").write_text('{"a": 1}')
    (tmp_path / "empty").write_bytes(b"")
    result = run(*[a.format(t=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert phrase in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3


def test_a_max_res_beyond_ffcv_s_largest_page_is_refused(tmp_path):
    """--max-res 20000 asked for 8 GiB pages, which FFCV's header cannot hold: 'internal error: OverflowError'."""
    images, labels = separable_images(2, 2, 8)
    npz = write_npz(tmp_path / "d.npz", images, labels)
    with pytest.raises(InputError, match=r"^--max-res must be from 8 to 13377 \(FFCV's pages, at most 2 GiB, hold "
                                         r"four raw images\), got 20000\.$"):
        convert(npz, tmp_path / "o.beton", params=WriterParams(max_resolution=20000, num_workers=1))
    result = run("convert", npz, tmp_path / "o.beton", "--max-res", "20000")
    assert result.exit_code == 2
    assert result.output.strip().endswith("Error: Invalid value for '--max-res': 20000 is not in the range "
                                          "8<=x<=13377.")
    assert not list(tmp_path.glob("o.beton*"))


def test_existing_output_needs_force_and_truncated_beton_is_refused(tiny_beton, tmp_path):
    images, labels = separable_images(2, 3, 8)
    write_npz(tmp_path / "d.npz", images, labels)
    out = tmp_path / "o.beton"
    assert run("convert", tmp_path / "d.npz", out, *RAW).exit_code == 0
    before = out.read_bytes()
    again = run("convert", tmp_path / "d.npz", out, *RAW)
    assert again.exit_code == 2 and "--force" in again.output and out.read_bytes() == before
    assert run("convert", tmp_path / "d.npz", out, *RAW, "--force").exit_code == 0

    cut = tmp_path / "cut.beton"
    cut.write_bytes(tiny_beton.read_bytes()[: tiny_beton.stat().st_size // 2])
    result = run("info", cut)
    assert result.exit_code == 2 and "truncated" in result.output
    # cut by whole allocation-table rows (24 bytes each): the table is well formed but lacks the last samples
    cut.write_bytes(tiny_beton.read_bytes()[: tiny_beton.stat().st_size - 24 * 3])
    result = run("info", cut)
    # (which samples: FFCV appends each worker's table rows in the order the workers finish)
    assert result.exit_code == 2 and "3 samples have no allocation, the first is sample" in result.output


def test_an_output_whose_sidecar_would_replace_an_input_is_refused(tmp_path):
    images, labels = separable_images(2, 3, 8)
    write_npz(tmp_path / "d.npz", images, labels)
    notes = tmp_path / "notes.json"
    notes.write_text("mine")
    result = run("convert", tmp_path / "d.npz", tmp_path / "notes", *RAW)
    assert result.exit_code == 2 and "notes.json already exists; pass --force" in result.output
    assert notes.read_text() == "mine" and not (tmp_path / "notes").exists()
    result = run("convert", tmp_path / "d.npz", tmp_path / "d.npz.x", *RAW)  # fine: a new name
    assert result.exit_code == 0, result.output


def test_an_output_inside_a_class_folder_of_the_source_is_refused(tmp_path):
    """It would be read back as that class's images on the next run (--force); beside the class folders, or in a
    hidden folder (no class), it is not read."""
    images, labels = separable_images(2, 3, 8)
    write_image_folder(tmp_path / "src", images, labels, ["cat", "dog"])
    inside = tmp_path / "src" / "cat" / "out.beton"
    result = run("convert", tmp_path / "src", inside, *RAW)
    assert result.exit_code == 2 and "is inside the class folder 'cat' of the source" in result.output
    assert not list((tmp_path / "src" / "cat").glob("*out.beton*"))
    # a class folder that is a link to a folder elsewhere is read all the same (it was not refused)
    (tmp_path / "dogs").mkdir()
    for f in (tmp_path / "src" / "dog").iterdir():
        f.rename(tmp_path / "dogs" / f.name)
    (tmp_path / "src" / "dog").rmdir()
    (tmp_path / "src" / "dog").symlink_to(tmp_path / "dogs")
    result = run("convert", tmp_path / "src", tmp_path / "dogs" / "out.beton", *RAW)
    assert result.exit_code == 2 and "is inside the class folder 'dog' of the source" in result.output, result.output
    assert not list((tmp_path / "dogs").glob("*out.beton*"))
    # nor in a hidden folder inside a class folder, which ImageFolder leaves out as well (it was refused)
    for fine in (tmp_path / "src" / "out.beton", tmp_path / "src" / ".cache" / "out.beton",
                 tmp_path / "src" / "cat" / ".cache" / "out.beton"):
        fine.parent.mkdir(exist_ok=True)
        result = run("convert", tmp_path / "src", fine, *RAW)
        assert result.exit_code == 0 and open_beton(fine).num_samples == 6, result.output


def _ffcv_single_worker(data, path, order, params: WriterParams) -> bytes:
    """The file FFCV's own DatasetWriter writes with one worker (its only deterministic layout)."""
    from dptool._ffcv import import_ffcv

    writer = import_ffcv("ffcv.writer").DatasetWriter(str(path), params.fields(), num_workers=1,
                                                      page_size=params.resolved_page_size())
    writer.from_indexed_dataset(data, indices=order, chunksize=30)
    return path.read_bytes()


@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_write_beton_writes_ffcvs_single_worker_bytes_with_any_worker_count(tmp_path, mode):
    """dptool's writer with 2 workers gives the bytes of FFCV's writer with 1, over several pages (a sample that
    does not fit in what is left of a page starts the next one)."""
    images, labels = separable_images(4, 100, 48)
    data = [(image, int(label)) for image, label in zip(images, labels)]
    order = np.random.default_rng(0).permutation(len(data))
    params = WriterParams(max_resolution=48, write_mode=mode, num_workers=2, page_size=1 << 21)
    skipped = write_beton(data, tmp_path / "ours.beton", order, params)
    theirs = _ffcv_single_worker(data, tmp_path / "ffcv.beton", order, params)
    ours = (tmp_path / "ours.beton").read_bytes()
    assert skipped == {} and len(ours) == len(theirs) and ours == theirs
    beton = open_beton(tmp_path / "ours.beton")
    if mode == "raw":  # 400 x 6.9 kB: two pages of 2 MiB
        assert len(np.unique(beton.alloc_table["ptr"] // beton.page_size)) == 2
        assert np.array_equal(read_image(beton, 5), images[order[5]])
    assert np.array_equal(beton.labels, labels[order])


def test_page_layout_places_like_ffcvs_allocator(tmp_path):
    """`_PageLayout` against FFCV's own `MemoryAllocator` and `handle_sample`, with samples of two allocations (no
    FFCV field makes two, but the allocator allows them): a sample whose second part does not fit starts over on the
    next page, and the bytes of its abandoned first part stay in the file, in both."""
    from dptool._ffcv import import_ffcv
    from dptool.writer import _Chunk, _PageLayout

    allocator_type = import_ffcv("ffcv.memory_allocator").MemoryAllocator
    handle_sample = import_ffcv("ffcv.writer").handle_sample
    alloc_type = import_ffcv("ffcv.types").ALLOC_TABLE_TYPE

    class Parts:  # an FFCV-style field: allocates each size and fills it with the sample's number
        def encode(self, destination, value, malloc):
            number, sizes = value
            for size in sizes:
                destination[0], buffer = malloc(size)
                buffer[:] = number % 251 + 1

    rng = np.random.default_rng(0)
    samples = [[int(x) for x in rng.integers(1, 400, rng.integers(1, 3))] for _ in range(60)]
    page, start = 1000, 100
    path = tmp_path / "ffcv.bin"
    path.write_bytes(bytes(start))
    metadata = np.zeros(len(samples), dtype=[("f0", "<u8")])
    allocator = allocator_type(str(path), start, page)
    with allocator:
        for i, sizes in enumerate(samples):
            handle_sample(((i, sizes),), i, ["f0"], metadata, allocator, {"f0": Parts()})
    theirs = path.read_bytes()

    layout = _PageLayout(start, page)
    ours = bytearray(layout.offset)
    abandoned = 0
    for i, sizes in enumerate(samples):
        chunk = _Chunk(rows=np.zeros(1, dtype=[("f0", [("ptr", "<u8")])]), sizes=[sizes], skipped=[])
        writes = layout.place_chunk(chunk, i, [("f0", "ptr")])
        abandoned += len(writes) - len(sizes)
        for number, offset in writes:
            ours[len(ours):] = bytes(max(0, offset + sizes[number] - len(ours)))
            ours[offset:offset + sizes[number]] = bytes([i % 251 + 1]) * sizes[number]
    ours[len(ours):] = bytes(layout.end - len(ours))
    assert abandoned > 0 and layout.page > 5
    assert bytes(ours) == theirs
    assert np.array_equal(np.concatenate(layout.table), np.array(allocator.allocations, dtype=alloc_type))


def test_proportion_mode_is_drawn_per_sample_not_per_worker(tmp_path):
    """FFCV draws raw-or-JPEG from each forked worker's copy of one generator; here the draw is the sample's:
    1 and 3 workers give the same bytes, about `compress_probability` of the samples are JPEG, another seed
    draws others."""
    images, labels = separable_images(2, 100, 16)
    data = [(image, int(label)) for image, label in zip(images, labels)]
    order = np.arange(len(data))
    files = {}
    for workers, seed in ((1, 0), (3, 0), (2, 1)):
        params = WriterParams(max_resolution=16, write_mode="proportion", compress_probability=0.3,
                              num_workers=workers, shuffle_seed=seed)
        write_beton(data, tmp_path / f"{workers}.beton", order, params)
        files[workers, seed] = open_beton(tmp_path / f"{workers}.beton")
    assert (tmp_path / "1.beton").read_bytes() == (tmp_path / "3.beton").read_bytes()
    jpeg = {key: b.metadata["f0"]["mode"] == 0 for key, b in files.items()}  # FFCV's IMAGE_MODES: jpg = 0
    assert 40 <= jpeg[1, 0].sum() <= 80  # 200 draws at p = 0.3: mean 60, sd 6.5
    assert not np.array_equal(jpeg[1, 0], jpeg[2, 1])


class _Flaky:
    """Samples 0-39; 7 and 23 are skipped; 30 raises a plain error (a bug in the dataset, not a bad file)."""

    def __init__(self, broken: bool):
        self.images, _ = separable_images(1, 40, 8)
        self.broken = broken

    def __getitem__(self, index):
        if index in (7, 23):
            raise SkipSample(f"sample {index} is unreadable")
        if self.broken and index == 30:
            raise ValueError("dataset bug")
        return self.images[index], index % 3


def test_skipped_samples_are_left_out_in_one_pass_and_errors_reach_the_caller(tmp_path):
    heard = []
    order = np.arange(40)[::-1].copy()
    skipped = write_beton(_Flaky(False), tmp_path / "s.beton", order, WriterParams(write_mode="raw", num_workers=2),
                          on_skip=lambda i, why: heard.append(i))
    assert skipped == {23: "sample 23 is unreadable", 7: "sample 7 is unreadable"} and heard == [23, 7]
    beton = open_beton(tmp_path / "s.beton")
    kept = [i for i in order if i not in (7, 23)]
    assert beton.num_samples == 38 and beton.labels.tolist() == [i % 3 for i in kept]
    assert np.array_equal(read_image(beton, 37), _Flaky(False).images[kept[37]])
    with pytest.raises(ValueError, match="dataset bug"):  # FFCV's writer waited forever for the dead worker
        write_beton(_Flaky(True), tmp_path / "b.beton", order, WriterParams(write_mode="raw", num_workers=2))


class _TwoArgs(Exception):
    """Pickles, but cannot be rebuilt from its args (its __init__ takes two)."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


class _Dies:
    """Sample 20 kills its worker, raises an exception that cannot be unpickled, or is skipped like all others."""

    def __init__(self, how: str):
        self.how, self.images = how, separable_images(1, 40, 8)[0]

    def __getitem__(self, index):
        if self.how == "skip all":
            raise SkipSample("unreadable")
        if index == 20:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise _TwoArgs("a", "b")
        return self.images[index], 0


@pytest.mark.parametrize("how, error, message", [
    ("kill", DptoolError, "A writer worker stopped unexpectedly"),
    ("raise", DptoolError, "_TwoArgs: a/b"),
    ("skip all", InputError, r"None of the 40 samples could be read \(the first: unreadable\)"),
])
def test_a_dead_worker_or_odd_error_is_reported_as_such(tmp_path, how, error, message):
    with pytest.raises(error, match=message):
        write_beton(_Dies(how), tmp_path / "x.beton", np.arange(40), WriterParams(write_mode="raw", num_workers=2))


def test_page_size_must_be_one_ffcv_accepts():
    assert WriterParams(page_size=1 << 22).resolved_page_size() == 1 << 22
    for bad in (3_000_000, 1 << 20, 1 << 32):
        with pytest.raises(InputError, match="power of two from 2 MiB up to 2 GiB"):
            WriterParams(page_size=bad).resolved_page_size()


def test_a_sample_larger_than_a_page_is_an_input_error(tmp_path):
    big = [(np.zeros((1000, 1000, 3), np.uint8), 0)]
    with pytest.raises(InputError, match="more than a page of 2097152"):
        write_beton(big, tmp_path / "x.beton", np.arange(1), WriterParams(write_mode="raw", max_resolution=1000,
                                                                          page_size=1 << 21))


def test_two_conversions_with_several_workers_give_the_same_file(tmp_path):
    """The same folder converted twice with 2 workers: the same bytes and fingerprint (FFCV's writer laid samples
    out in the order its workers finished, so the fingerprint, and a scores file's match, changed run to run)."""
    images, labels = separable_images(4, 60, 24, seed=3)
    write_image_folder(tmp_path / "src", images, labels, ["a", "b", "c", "d"], ext="jpg")
    for name in ("a", "b"):
        result = run("convert", tmp_path / "src", tmp_path / f"{name}.beton", "--write-mode", "jpg", "--max-res",
                     "24", "--workers", "2", "--json")
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a.beton").read_bytes() == (tmp_path / "b.beton").read_bytes()
    assert read_sidecar(tmp_path / "a.beton")["fingerprint"] == read_sidecar(tmp_path / "b.beton")["fingerprint"]


def test_uncompressed_npz_images_are_memory_mapped(tmp_path):
    """np.savez's images are mapped, not read (memory flat in N); a compressed file is read whole; same pixels."""
    from dptool.readers import NpzSource

    images, labels = separable_images(3, 4, 8)
    np.savez(tmp_path / "plain.npz", images=images, labels=labels)
    np.savez_compressed(tmp_path / "packed.npz", images=images, labels=labels)
    plain, packed = NpzSource(tmp_path / "plain.npz"), NpzSource(tmp_path / "packed.npz")
    assert isinstance(plain.images, np.memmap) and not isinstance(packed.images, np.memmap)
    assert np.array_equal(plain.images, images) and np.array_equal(packed.images, images)
    assert np.array_equal(plain.load(5), packed.load(5))

    # damage zipfile would notice is noticed: a changed pixel (CRC-32), a header promising more images than stored
    raw = bytearray((tmp_path / "plain.npz").read_bytes())
    at = bytes(raw).find(images.tobytes())
    raw[at + 10] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(raw))
    with pytest.raises(InputError, match="not a readable .npz file.*CRC"):
        NpzSource(tmp_path / "flipped.npz")
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (len(images) + 1, *images.shape[1:])})
    member.write(images.tobytes())
    with zipfile.ZipFile(tmp_path / "lying.npz", "w") as z:
        z.writestr("images.npy", member.getvalue())
        z.writestr("labels.npy", _npy_bytes(np.append(labels, 0)))
    with pytest.raises(InputError, match="not a readable .npz file"):
        NpzSource(tmp_path / "lying.npz")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_info_json_lists_classes(tiny_beton):
    result = run("info", tiny_beton, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["num_samples"] == 160 and info["num_classes"] == 4
    assert [c["count"] for c in info["classes"]] == [40] * 4
    assert info["fields"] == {"image": "RGBImageField", "label": "IntField"}
    assert info["writer"]["write_mode"] == "raw"


def test_interrupted_convert_leaves_nothing_behind(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) mid-write: a prompt exit with one line, no
    worker tracebacks, no output or temporary file left (stopped before its first progress record, the partial
    file holds nothing to resume), no worker left running."""
    images, labels = separable_images(10, 300, 64, seed=1)
    write_npz(tmp_path / "big.npz", images, labels)
    out = tmp_path / "big.beton"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dptool", "convert", str(tmp_path / "big.npz"), str(out), "--write-mode", "jpg",
         "--workers", "2"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as a terminal's foreground command gets it: a test run started in the background of a script
        # ignores SIGINT, and its children would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not glob.glob(str(tmp_path / ".big.beton.partial")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "conversion finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)  # FFCV's writer (used before) once kept it waiting forever
    # 130, or -SIGINT where the Ctrl-C landed inside an eval() of a string (torch's import, when the machine is
    # slow): CPython then ends the process by SIGINT after dptool's exit(130); a shell shows 130 for both
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err and err.strip().endswith("Aborted!"), \
        (proc.returncode, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npz"]
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(pid, str(tmp_path))]


@pytest.mark.parametrize("where", ["_resume_from", "Checkpoints"])
def test_a_ctrl_c_just_after_the_partial_file_is_made_leaves_nothing(tmp_path, monkeypatch, where):
    """Ctrl-C between the partial file's creation and the write (the instant the file appears, when the test above
    interrupts): the empty partial file is removed with the rest, not left beside the source."""
    import dptool.convert as convert_module

    images, labels = separable_images(2, 4, 16, seed=3)
    npz = write_npz(tmp_path / "src.npz", images, labels)

    def interrupted(*args, **kwargs):
        assert (tmp_path / ".out.beton.partial").is_file()  # made, and the Ctrl-C lands now
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(npz, tmp_path / "out.beton", params=WriterParams(max_resolution=16, num_workers=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.npz"]


def test_a_ctrl_c_while_the_partial_file_is_locked_leaves_nothing(tmp_path, monkeypatch):
    """A real SIGINT between the partial file's creation and its lock (where one landed under load): held back
    until the lock is taken, then the empty file is removed."""
    import fcntl

    images, labels = separable_images(2, 4, 16, seed=3)
    npz = write_npz(tmp_path / "src.npz", images, labels)
    flock = fcntl.flock

    def interrupted_flock(fd, operation):
        signal.raise_signal(signal.SIGINT)
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", interrupted_flock)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's foreground command has it
    try:
        with pytest.raises(KeyboardInterrupt):
            convert(npz, tmp_path / "out.beton", params=WriterParams(max_resolution=16, num_workers=1))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.npz"]


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:  # gone meanwhile
        return False


def test_every_command_has_help():
    result = run("--help")
    assert result.exit_code == 0
    listing = result.output.split("Commands:")[1].splitlines()
    commands = [line.split()[0] for line in listing if re.match(r"  \S", line)]  # not a wrapped line's rest
    assert "convert" in commands and "info" in commands
    for name in commands:
        sub = run(name, "-h")
        assert sub.exit_code == 0 and "Usage:" in sub.output
        assert len(sub.output.split("Usage:")[1].strip().splitlines()) > 2


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "dptool", "--help"], capture_output=True, text=True, check=True)
    assert "convert" in out.stdout


def test_the_fingerprint_reads_the_pixels(tmp_path):
    """Same labels and sizes, other pixels (raw mode: every byte differs): other fingerprints."""
    images, labels = separable_images(3, 10, 16, seed=5)
    prints = []
    for name, pixels in (("a", images), ("b", 255 - images)):
        npz = write_npz(tmp_path / f"{name}.npz", pixels, labels)
        convert(npz, tmp_path / f"{name}.beton", params=WriterParams(max_resolution=16, write_mode="raw"))
        prints.append(read_sidecar(tmp_path / f"{name}.beton")["fingerprint"])
    assert prints[0] != prints[1]
    assert prints[0] == fingerprint(tmp_path / "a.beton")
    # a file of at most 64 samples has every sample's bytes read: one edited image in the middle shows
    edited = tmp_path / "edited.beton"
    edited.write_bytes((tmp_path / "a.beton").read_bytes())
    row = open_beton(edited).alloc_table[15]
    with open(edited, "r+b") as f:
        f.seek(int(row["ptr"]))
        first = f.read(1)
        f.seek(int(row["ptr"]))
        f.write(bytes([first[0] ^ 0xFF]))
    assert fingerprint(edited) != prints[0]


def test_negative_labels_are_refused(tmp_path):
    from dptool._ffcv import import_ffcv

    fields, writer_mod = import_ffcv("ffcv.fields"), import_ffcv("ffcv.writer")
    path = tmp_path / "neg.beton"
    writer = writer_mod.DatasetWriter(str(path), {"image": fields.RGBImageField(write_mode="raw"),
                                                  "label": fields.IntField()}, num_workers=1)
    writer.from_indexed_dataset([(np.zeros((4, 4, 3), np.uint8), label) for label in (0, 1, -1, 2)])
    with pytest.raises(InputError, match=r"negative labels \(the smallest is -1\)"):
        open_beton(path)
    result = run("info", path)
    assert result.exit_code == 2 and "negative labels" in result.output


def test_help_examples_keep_their_line_breaks():
    """An example's `\\` continuation must reach the help text: a bare backslash-newline in a docstring joins the
    two lines with the indentation between them (`... rn50.pth         --centroids-from ...`)."""
    for name in ("convert", "info", "score", "prune", "train", "finetune", "bench", "demo"):
        text = run(name, "-h").output.split("Options:")[0]
        joined = [line for line in text.splitlines() if re.search(r"\S {6,}--", line)]
        assert not joined, f"{name}: {joined}"


def test_split_help_names_every_split_accepted():
    """SUN397 takes only --split all; --help named train, test and val. CoOp files also take trainval."""
    from dptool.coop import SPLITS
    from dptool.readers import TORCHVISION_FORMATS

    options = run("convert", "-h").output.split("Options:")[1]
    text = " ".join(options.split("--split")[1].split("--preset")[0].split())
    for splits in [*(s for _, s, _ in TORCHVISION_FORMATS.values()), SPLITS]:
        for split in splits:
            assert re.search(rf"\b{split}\b", text), f"--split help does not name {split!r}: {text}"


def test_command_lists_give_whole_sentences():
    """Click cut each command's line in `dptool -h` to the width ("... to an FFCV .beton with a...")."""
    for args in (["-h"], ["bench", "-h"]):
        listing = " ".join(run(*args).output.split("Commands:")[1].split())
        assert "..." not in listing, listing
        assert "JSON sidecar." in listing or "speed-up over the first." in listing


def test_workers_default_to_the_cpus_the_process_may_run_on(tmp_path, monkeypatch):
    """`convert --workers 0` counted every core of the machine (os.cpu_count()), not the CPUs of the process's
    affinity (taskset, a cpuset, Slurm) as the loaders' --workers does; NUMBA_NUM_THREADS stands for a one-CPU set.
    A --workers above those CPUs starts the processes asked for (processes, unlike the loaders' Numba threads, can
    outnumber the CPUs), and the bytes are the same."""
    import numba

    images, labels = separable_images(2, 4, 16, seed=0)
    write_image_folder(tmp_path / "src", images, labels, ["a", "b"])
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 1)
    out, more = tmp_path / "a.beton", tmp_path / "b.beton"
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "src"), str(out), "--max-res", "16"])
    assert result.exit_code == 0, result.output
    assert read_sidecar(out)["writer"]["num_workers"] == 1
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "src"), str(more), "--max-res", "16", "--workers",
                                      "2"])
    assert result.exit_code == 0, result.output
    assert read_sidecar(more)["writer"]["num_workers"] == 2 and more.read_bytes() == out.read_bytes()
