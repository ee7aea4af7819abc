"""Byte-copy subsets of .beton files: a stock FFCV Loader reads them, pixels and labels equal the source's,
pages are packed like FFCV's, several outputs in one pass equal separate runs, failures leave nothing."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_beton

import dptool.subset as subset_mod
from dptool._ffcv import import_ffcv
from dptool.beton import open_beton
from dptool.errors import InputError
from dptool.subset import sample_extents, write_subset, write_subsets


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mixed_beton(tmp_path_factory):
    """8 classes x 90 images of 64 px, half raw, half JPEG ('proportion' mode): about 5 MB, several 2 MiB pages."""
    return make_beton(tmp_path_factory.mktemp("mixed"), "mixed", n_classes=8, per_class=90, size=64, seed=3,
                      write_mode="proportion")


@pytest.fixture(scope="module")
def jpg_beton(tmp_path_factory):
    return make_beton(tmp_path_factory.mktemp("jpg"), "jpg", n_classes=3, per_class=20, size=32, seed=5,
                      write_mode="jpg")


def load_all(path, *, os_cache: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every image and label of `path` in file order through a stock FFCV Loader (SimpleRGBImageDecoder)."""
    loader_mod = import_ffcv("ffcv.loader")
    decoders = import_ffcv("ffcv.fields.decoders")
    pipelines = {"image": [decoders.SimpleRGBImageDecoder()], "label": [decoders.IntDecoder()]}
    loader = loader_mod.Loader(str(path), batch_size=128, num_workers=2, order=loader_mod.OrderOption.SEQUENTIAL,
                               os_cache=os_cache, drop_last=False, pipelines=pipelines)
    images, labels = [], []
    for im, lab in loader:  # the loader reuses its batch buffers: copy
        images.append(np.array(im, copy=True))
        labels.append(np.array(lab, copy=True).reshape(-1))
    return np.concatenate(images), np.concatenate(labels)


def check_layout(path) -> None:
    """FFCV's layout rules: page-aligned data region, no sample across a page, table at the end, full pages."""
    b = open_beton(path, require_label=False)
    ps, table = b.page_size, b.alloc_table
    ptr, end = table["ptr"].astype(np.int64), (table["ptr"] + table["size"]).astype(np.int64)
    first_page = -(-b.data_start // ps) * ps
    assert ptr.min() >= first_page
    assert np.all(ptr // ps == (end - 1) // ps)
    alloc_ptr = int(b.header["alloc_table_ptr"])
    assert alloc_ptr % ps == 0 and end.max() <= alloc_ptr
    assert b.file_size == alloc_ptr + table.nbytes
    assert np.unique(table["sample_id"]).tolist() == list(range(b.num_samples))


def check_stored_bytes(src_path, out_path, indices) -> None:
    """Metadata rows equal the source's except pointers; each sample's stored bytes equal the source's."""
    src, out = open_beton(src_path), open_beton(out_path)
    assert out.num_samples == len(indices) and out.page_size == src.page_size
    assert out.field_descriptors.tobytes() == src.field_descriptors.tobytes()
    np.testing.assert_array_equal(out.labels, src.labels[indices])
    for name in ("mode", "width", "height"):
        np.testing.assert_array_equal(out.metadata["f0"][name], src.metadata["f0"][name][indices])
    s_size = dict(zip(src.alloc_table["ptr"].tolist(), src.alloc_table["size"].tolist()))
    o_size = dict(zip(out.alloc_table["ptr"].tolist(), out.alloc_table["size"].tolist()))
    s_bytes, o_bytes = Path(src_path).read_bytes(), Path(out_path).read_bytes()
    for k, i in enumerate(indices):
        sp, op = int(src.metadata["f0"]["data_ptr"][i]), int(out.metadata["f0"]["data_ptr"][k])
        assert s_size[sp] == o_size[op]
        assert s_bytes[sp:sp + s_size[sp]] == o_bytes[op:op + o_size[op]]


def test_loader_reads_pixel_identical_subsets_of_a_multipage_mixed_file(mixed_beton, tmp_path):
    src = open_beton(mixed_beton)
    modes = set(src.metadata["f0"]["mode"].tolist())
    assert modes == {0, 1}, "the source should hold JPEG (0) and raw (1) images"
    assert len(np.unique(src.alloc_table["ptr"] // src.page_size)) >= 3, "the source should span several pages"
    rng = np.random.default_rng(0)
    kept = np.sort(rng.choice(src.num_samples, int(0.45 * src.num_samples), replace=False))  # file order
    shuffled = rng.permutation(src.num_samples)[:500]  # any order works too
    outs = {tmp_path / "kept.beton": kept, tmp_path / "shuffled.beton": shuffled}
    results = write_subsets(mixed_beton, outs)
    assert [r.num_samples for r in results] == [len(kept), len(shuffled)]
    assert results[1].num_pages >= 2
    for path, idx in outs.items():
        check_layout(path)
        check_stored_bytes(mixed_beton, path, idx)

    src_images, src_labels = load_all(mixed_beton, os_cache=True)
    np.testing.assert_array_equal(src_labels, src.labels)
    for path, idx in outs.items():
        # process cache reads whole pages (page = address >> log2(page_size)): exercises the page packing
        images, labels = load_all(path, os_cache=path.name == "kept.beton")
        np.testing.assert_array_equal(labels, src_labels[idx])
        np.testing.assert_array_equal(images, src_images[idx])


@pytest.mark.parametrize("which", ["raw", "jpg"])
def test_stored_bytes_are_copied_as_they_are(which, tiny_beton, jpg_beton, tmp_path):
    path = tiny_beton if which == "raw" else jpg_beton
    src = open_beton(path)
    indices = np.flatnonzero(src.labels % 2 == 0)
    result = write_subset(path, tmp_path / "out.beton", indices)
    assert result.num_samples == len(indices) and result.bytes == (tmp_path / "out.beton").stat().st_size
    check_layout(tmp_path / "out.beton")
    check_stored_bytes(path, tmp_path / "out.beton", indices)


def test_several_outputs_in_one_pass_equal_separate_runs(mixed_beton, tmp_path):
    src = open_beton(mixed_beton)
    subsets = {tmp_path / f"one_{c}.beton": np.flatnonzero(src.labels < c) for c in (2, 5, 8)}
    write_subsets(mixed_beton, subsets)
    for path, idx in subsets.items():
        separate = tmp_path / f"sep_{path.name}"
        write_subset(mixed_beton, separate, idx)
        assert sha256(separate) == sha256(path)
        # the lockstep step changes nothing in the output
        for step in (1, 1 << 40):
            other = tmp_path / f"step_{step}_{path.name}"
            write_subsets(mixed_beton, {other: idx}, step=step)
            assert sha256(other) == sha256(path)


def test_bytes_read_counts_a_sample_kept_by_several_outputs_once(mixed_beton, tmp_path):
    src = open_beton(mixed_beton)
    table = src.alloc_table
    assert np.bincount(table["sample_id"].astype(np.int64)).max() == 1  # one allocation per sample
    size_of = np.zeros(src.num_samples, np.int64)
    size_of[table["sample_id"].astype(np.int64)] = table["size"].astype(np.int64)
    a, b = np.arange(0, 400), np.arange(300, 650)[::-1]  # samples 300..399 are in both
    results = write_subsets(mixed_beton, {tmp_path / "a.beton": a, tmp_path / "b.beton": b})
    distinct = int(size_of[np.union1d(a, b)].sum())
    assert [r.bytes_read for r in results] == [distinct, distinct]
    assert distinct < sum(r.data_bytes for r in results) == int(size_of[a].sum() + size_of[b].sum())


def test_copy_through_user_memory_where_the_kernel_cannot(mixed_beton, tmp_path, monkeypatch):
    """Another file system (EXDEV) or an old kernel: the pread + pwrite fallback writes the same bytes."""
    idx = np.arange(0, open_beton(mixed_beton).num_samples, 3)
    kernel = write_subset(mixed_beton, tmp_path / "kernel.beton", idx)

    def no_kernel_copy(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", no_kernel_copy)
    user = write_subset(mixed_beton, tmp_path / "user.beton", idx)
    assert sha256(tmp_path / "user.beton") == sha256(tmp_path / "kernel.beton")
    assert user.bytes == kernel.bytes


def test_pages_are_packed_with_whole_samples_at_every_boundary(tiny_beton, tmp_path):
    """The page packing planned with pages of 8 KiB (the 3 KiB samples of `tiny_beton` fill 2 of each page), so
    that every one of its ~50 page ends is tested: no sample crosses one, none overlap, pages are filled."""
    b = open_beton(tiny_beton)
    ps = 8192
    small = dataclasses.replace(b, page_size=ps)
    kept = np.random.default_rng(1).permutation(b.num_samples)[:101]
    order_by_sample = np.argsort(b.alloc_table["sample_id"], kind="stable")
    plan = subset_mod._plan(small, tmp_path / "x.beton", kept, sample_extents(b), order_by_sample)
    ptr = plan.alloc["ptr"].astype(np.int64)
    end = ptr + plan.alloc["size"].astype(np.int64)
    assert len(ptr) == 101 and plan.data_start % ps == 0 and ptr.min() >= plan.data_start
    assert np.all(ptr // ps == (end - 1) // ps) and np.all(ptr[1:] >= end[:-1]) and end.max() <= plan.data_end
    assert np.bincount((ptr - plan.data_start) // ps).tolist() == [2] * 50 + [1]


def test_keeping_everything_reproduces_every_sample(tiny_beton, tmp_path):
    src = open_beton(tiny_beton)
    out = tmp_path / "all.beton"
    write_subset(tiny_beton, out, np.arange(src.num_samples))
    check_stored_bytes(tiny_beton, out, np.arange(src.num_samples))


def test_source_is_unchanged(mixed_beton, tmp_path):
    before = sha256(mixed_beton)
    src = open_beton(mixed_beton)
    header, metadata, table = src.header.tobytes(), src.metadata.tobytes(), src.alloc_table.tobytes()
    write_subsets(src, {tmp_path / "a.beton": np.arange(0, 700, 3), tmp_path / "b.beton": np.arange(5)})
    assert sha256(mixed_beton) == before
    # nor the Beton object in memory (it is reused for the validation split, fingerprints, further subsets)
    assert (src.header.tobytes(), src.metadata.tobytes(), src.alloc_table.tobytes()) == (header, metadata, table)


def test_interrupted_write_leaves_nothing(mixed_beton, tmp_path, monkeypatch):
    real, calls = subset_mod._copy_run, []

    def failing(writer, src, dst, n):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(writer, src, dst, n)

    monkeypatch.setattr(subset_mod, "_copy_run", failing)
    with pytest.raises(KeyboardInterrupt):
        write_subsets(mixed_beton, {tmp_path / "a.beton": np.arange(600), tmp_path / "b.beton": np.arange(9)})
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_samples_with_several_allocations_keep_every_field(tmp_path):
    """A file with an image, a bytes field and a label: pointers of every data field are rewritten."""
    fields = import_ffcv("ffcv.fields")
    writer_mod = import_ffcv("ffcv.writer")
    rng = np.random.default_rng(2)
    data = [(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), rng.integers(0, 255, 5 + i, dtype=np.uint8), i)
            for i in range(40)]
    path = tmp_path / "multi.beton"
    writer = writer_mod.DatasetWriter(str(path), {"image": fields.RGBImageField(write_mode="raw"),
                                                  "blob": fields.BytesField(), "label": fields.IntField()},
                                      num_workers=1)
    writer.from_indexed_dataset(data, chunksize=10)
    src = open_beton(path)
    assert sample_extents(src)[2].max() == 2
    keep = np.array([39, 3, 17, 0, 22])
    write_subset(path, tmp_path / "out.beton", keep)
    out = open_beton(tmp_path / "out.beton")
    check_layout(tmp_path / "out.beton")
    raw = (tmp_path / "out.beton").read_bytes()
    for k, i in enumerate(keep):
        image, blob, label = data[i]
        row = out.metadata[k]
        assert int(row["f2"]) == label
        p = int(row["f0"]["data_ptr"])
        assert raw[p:p + image.nbytes] == image.tobytes()
        p, n = int(row["f1"]["ptr"]), int(row["f1"]["size"])
        assert raw[p:p + n] == blob.tobytes()


def test_a_file_without_data_regions(tmp_path):
    """Numbers-only fields live in the metadata table: the subset has no data pages at all."""
    fields = import_ffcv("ffcv.fields")
    writer_mod = import_ffcv("ffcv.writer")
    data = [(float(i) / 2, i) for i in range(30)]
    path = tmp_path / "numbers.beton"
    writer = writer_mod.DatasetWriter(str(path), {"x": fields.FloatField(), "label": fields.IntField()},
                                      num_workers=1)
    writer.from_indexed_dataset(data, chunksize=10)
    result = write_subset(path, tmp_path / "out.beton", np.array([7, 2, 29]))
    out = open_beton(tmp_path / "out.beton")
    assert result.num_pages == 0 and len(out.alloc_table) == 0
    assert out.labels.tolist() == [7, 2, 29] and out.metadata["f0"].tolist() == [3.5, 1.0, 14.5]


@pytest.mark.parametrize("indices, message", [
    (np.array([], dtype=np.int64), "holds no samples"),
    (np.array([0, 160]), r"must be in \[0, 160\)"),
    (np.array([-1, 3]), r"must be in \[0, 160\)"),
    (np.array([1, 2, 1]), "repeat a sample"),
    (np.array([0.5, 1.0]), "1-D array of integers"),
])
def test_bad_indices_are_refused(tiny_beton, tmp_path, indices, message):
    with pytest.raises(InputError, match=message):
        write_subset(tiny_beton, tmp_path / "out.beton", indices)
    assert list(tmp_path.iterdir()) == []


def test_output_checks(tiny_beton, tmp_path):
    with pytest.raises(InputError, match="same (file|path) as input"):
        write_subset(tiny_beton, tiny_beton, np.arange(3))
    out = tmp_path / "out.beton"
    out.write_bytes(b"old")
    with pytest.raises(InputError, match="--force"):
        write_subset(tiny_beton, out, np.arange(3))
    assert out.read_bytes() == b"old"
    write_subset(tiny_beton, out, np.arange(3), force=True)
    assert open_beton(out).num_samples == 3
