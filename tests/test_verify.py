"""Per-sample digests: recorded by `convert` and `prune`, checked by `dptool verify`, shown by `info`.

The reference digests are computed here from the allocation table and the file's bytes, not through
`dptool.integrity`; damage is made by writing into a copy's sample bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_beton
from test_prune import class_scores_file

from dptool.beton import digests_path, open_beton, sidecar_path
from dptool.cli.main import cli
from dptool.scores import fingerprint_file


def _invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def _reference_digests(path) -> np.ndarray:
    """CRC-32 of each sample's stored bytes, from the allocation table (one allocation per sample here)."""
    b = open_beton(path, require_label=False)
    data = path.read_bytes()
    table = b.alloc_table
    assert len(np.unique(table["sample_id"])) == len(table) == b.num_samples
    out = np.zeros(b.num_samples, np.uint32)
    for sid, ptr, size in zip(table["sample_id"].tolist(), table["ptr"].tolist(), table["size"].tolist()):
        out[sid] = zlib.crc32(data[ptr:ptr + size])
    return out


def _copy(src, folder, name):
    """A copy of `src` with its sidecar and digests file, as a user copies a dataset to another machine."""
    out = folder / name
    for a, b in ((src, out), (sidecar_path(src), sidecar_path(out)), (digests_path(src), digests_path(out))):
        shutil.copy(a, b)
    return out


def _sample_offset(path, sample: int) -> int:
    table = open_beton(path, require_label=False).alloc_table
    row = np.flatnonzero(table["sample_id"] == sample)[0]
    return int(table["ptr"][row]) + int(table["size"][row]) // 2


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify")
    return make_beton(folder, "src", n_classes=4, per_class=20, size=16, write_mode="jpg")


def test_convert_records_the_digest_of_every_sample(written):
    record = json.loads(sidecar_path(written).read_text())["digests"]
    assert record == {"file": digests_path(written).name, "algorithm": "crc32",
                      "sha256": fingerprint_file(digests_path(written))}
    np.testing.assert_array_equal(np.load(digests_path(written)), _reference_digests(written))


def test_verify_passes_an_intact_file_and_names_each_damaged_sample(written, tmp_path):
    result = _invoke("verify", written)
    assert result.exit_code == 0, result.output
    assert "all 80 samples match the crc32 digests" in result.output
    damaged = _copy(written, tmp_path, "damaged.beton")
    with open(damaged, "r+b") as f:
        for sample, patch in ((3, b"\x00" * 8), (41, b"\xff")):  # zeroed in place, and one byte changed
            f.seek(_sample_offset(damaged, sample))
            f.write(patch)
    result = _invoke("verify", damaged)
    assert result.exit_code == 1, result.output
    assert "2 of 80 samples differ from when it was written: 3, 41." in result.output
    as_json = _invoke("verify", damaged, "--json", "--max-listed", 1)
    assert as_json.exit_code == 1
    doc = json.loads(as_json.output)
    assert doc["intact"] is False and len(doc["files"]) == 1
    assert doc["files"][0]["num_damaged"] == 2 and doc["files"][0]["damaged"] == [3]
    assert "1 more" in _invoke("verify", damaged, "--max-listed", 1).output


def test_a_stretch_of_damaged_samples_is_listed_as_a_range(written, tmp_path):
    """A zeroed stretch of a large file was listed index by index (1000 of them on one 5 KB line); runs of three or
    more consecutive samples are now 'first-last'."""
    damaged = _copy(written, tmp_path, "stretch.beton")
    with open(damaged, "r+b") as f:
        for sample in (5, 6, 7, 8, 20, 30, 31):
            f.seek(_sample_offset(damaged, sample))
            f.write(b"\x00" * 8)
    result = _invoke("verify", damaged)
    assert result.exit_code == 1, result.output
    assert "7 of 80 samples differ from when it was written: 5-8, 20, 30, 31." in result.output
    assert "and 3 more." in _invoke("verify", damaged, "--max-listed", 4).output  # 5-8 listed, the rest counted
    assert json.loads(_invoke("verify", damaged, "--json").output)["files"][0]["damaged"] == [5, 6, 7, 8, 20, 30, 31]


def test_verify_refuses_what_it_cannot_check(written, tmp_path):
    bare = tmp_path / "bare.beton"
    shutil.copy(written, bare)  # no sidecar: as FFCV's own writer leaves a file
    result = _invoke("verify", bare)
    assert result.exit_code == 2 and "has no recorded digests" in result.output
    missing = _copy(written, tmp_path, "missing.beton")
    digests_path(missing).unlink()
    result = _invoke("verify", missing)
    assert result.exit_code == 2 and "is missing; copy it with the .beton and its sidecar" in result.output
    replaced = _copy(written, tmp_path, "replaced.beton")
    np.save(digests_path(replaced), np.zeros(80, np.uint32))
    result = _invoke("verify", replaced)
    assert result.exit_code == 2 and "was replaced since" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("new_label", [1, -(1 << 62)], ids=["another-class", "negative"])
def test_verify_reports_a_damaged_label_table_instead_of_blaming_the_sidecar(written, tmp_path, new_label):
    """A label changed in place made verify refuse the file (exit 2) as having a sidecar 'left from another file:
    delete it', or 'negative labels', instead of reporting that the file is not as written (exit 1)."""
    damaged = _copy(written, tmp_path, "labels.beton")
    b = open_beton(damaged)
    meta = b.metadata.dtype
    sample = int(np.flatnonzero(b.labels != new_label)[0])
    label_field = meta.names[b.field_names.index("label")]  # FFCV names the metadata columns f0, f1, ...
    label_at = b.data_start - (b.num_samples - sample) * meta.itemsize + meta.fields[label_field][1]
    with open(damaged, "r+b") as f:
        f.seek(label_at)
        f.write(np.array([new_label], "<i8").tobytes())
    result = _invoke("verify", damaged)
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (f"{damaged}: its fingerprint differs from the one its sidecar recorded (its "
                                     "tables or sampled bytes changed).")


def test_a_symlinked_beton_keeps_its_sidecar_and_digests(written, tmp_path):
    """A .beton linked into another folder (ln -s /data/train.beton .) was read as if FFCV's own writer had written
    it: verify refused it ('no recorded digests'), info showed no class names, and prune wrote classes named 0..C-1
    into the pruned file's sidecar. The sidecar and digests file are now found beside the file the link points to."""
    scores = class_scores_file(tmp_path / "lm.json", written, scores=[3, 0, 2, 1], tiebreak=[0, 0, 0, 0])
    (tmp_path / "project").mkdir()
    link = tmp_path / "project" / "linked.beton"
    link.symlink_to(written)
    result = _invoke("verify", link)
    assert result.exit_code == 0, result.output
    assert "all 80 samples match the crc32 digests" in result.output
    info = json.loads(_invoke("info", link, "--json").output)
    assert [c["name"] for c in info["classes"]] == [f"class_{c}" for c in range(4)]
    assert info["sidecar"] == str(sidecar_path(written)) and info["sidecar_matches"] is True
    assert info["digests"] == {"path": str(digests_path(written)), "state": "present, unchanged"}
    out = tmp_path / "project" / "p.beton"
    result = _invoke("prune", link, "--scores", scores, "--ratio", 0.5, "-o", out)
    assert result.exit_code == 0 and "digests are read from them" not in result.output, result.output
    assert json.loads(sidecar_path(out).read_text())["class_names"] == [f"class_{c}" for c in range(4)]
    # a sidecar beside the link is the link's own, as for any file
    shutil.copy(sidecar_path(written), sidecar_path(link))
    digests_path(written).rename(tmp_path / "elsewhere.npy")
    try:
        assert "linked.beton.digests.npy, which the sidecar of" in _invoke("verify", link).output
    finally:
        (tmp_path / "elsewhere.npy").rename(digests_path(written))


def test_a_beton_reached_through_a_chain_of_relative_links_keeps_its_sidecar(written, tmp_path):
    """A link to a link (project/train.beton -> ../data/train.beton, itself a link to the file moved to another
    disk, its sidecar and digests file left beside it) lost them: only the end of the chain was looked beside."""
    for folder in ("data", "disk", "project"):
        (tmp_path / folder).mkdir()
    data = _copy(written, tmp_path / "data", "train.beton")
    data.rename(tmp_path / "disk" / "train.beton")
    data.symlink_to("../disk/train.beton")
    link = tmp_path / "project" / "train.beton"
    link.symlink_to("../data/train.beton")
    result = _invoke("verify", link)
    assert result.exit_code == 0 and "all 80 samples match the crc32 digests" in result.output, result.output
    info = json.loads(_invoke("info", link, "--json").output)
    assert info["sidecar"] == str(sidecar_path(data)) and info["sidecar_matches"] is True
    assert info["digests"] == {"path": str(digests_path(data)), "state": "present, unchanged"}


def _unreadable(path):
    """Replace `path` by a file that exists but cannot be read, even by root (chmod 000 stops only other users):
    /proc/self/mem is a regular file whose first page is unmapped, so reading it fails with EIO, as a bad disk."""
    path.unlink(missing_ok=True)
    path.symlink_to("/proc/self/mem")
    with pytest.raises(OSError):
        path.read_bytes()


@pytest.mark.skipif(not os.path.isfile("/proc/self/mem"), reason="needs Linux's /proc/self/mem")
def test_an_unreadable_sidecar_or_digests_file_is_named_as_unreadable(written, tmp_path):
    """verify and prune stopped with 'internal error: PermissionError' (exit 1) on a digests file that could not be
    read, and every command called an unreadable sidecar 'not valid JSON' and said to delete it."""
    scores = class_scores_file(tmp_path / "lm.json", written, scores=[3, 0, 2, 1], tiebreak=[0, 0, 0, 0])
    digests = _copy(written, tmp_path, "digests.beton")
    _unreadable(digests_path(digests))
    result = _invoke("verify", digests)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"Error: Digests file {digests_path(digests)} of {digests} cannot be read "
                                     "(Input/output error); make it readable, or copy it again with the .beton and "
                                     "its sidecar.")
    # prune goes on as with a lost digests file: the outputs' digests are read back from them
    out = tmp_path / "p.beton"
    result = _invoke("prune", digests, "--scores", scores, "--ratio", 0.5, "-o", out)
    assert result.exit_code == 0, result.output
    assert "cannot be read (Input/output error)" in result.output
    np.testing.assert_array_equal(np.load(digests_path(out)), _reference_digests(out))

    side = _copy(written, tmp_path, "side.beton")
    _unreadable(sidecar_path(side))
    for args in (("verify", side), ("info", side), ("prune", side, "--scores", scores, "--ratio", 0.5, "-o",
                                                      tmp_path / "q.beton")):
        result = _invoke(*args)
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (f"Error: Sidecar {sidecar_path(side)} cannot be read (Input/output "
                                         "error); make it readable, or delete it to use the .beton without it.")


def test_prune_carries_the_source_digests_over(written, tmp_path):
    scores = class_scores_file(tmp_path / "lm.json", written, scores=[3, 0, 2, 1], tiebreak=[0, 0, 0, 0])
    source = _reference_digests(written)
    out = tmp_path / "p.beton"
    result = _invoke("prune", written, "--scores", scores, "--ratio", 0.5, "-o", out)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(digests_path(out)), _reference_digests(out))
    kept = np.isin(open_beton(written).labels, [0, 2])
    assert sorted(np.load(digests_path(out)).tolist()) == sorted(source[kept].tolist())
    assert _invoke("verify", out).exit_code == 0
    info = _invoke("info", out, "--json")
    assert json.loads(info.output)["digests"] == {"path": str(digests_path(out)), "state": "present, unchanged"}

    # a source whose digests file was lost: pruning goes on, and the outputs' digests are read back from them
    lost = _copy(written, tmp_path, "lost.beton")
    digests_path(lost).unlink()
    again = tmp_path / "again.beton"
    result = CliRunner().invoke(cli, ["prune", str(lost), "--scores", str(scores), "--ratio", "0.5", "-o",
                                      str(again)])
    assert result.exit_code == 0, result.output
    assert "The pruned files' digests are read from them instead" in result.output
    assert digests_path(again).read_bytes() == digests_path(out).read_bytes()


def test_an_existing_digests_file_needs_force(written, tmp_path):
    npz = written.with_name("src.npz")
    out = tmp_path / "c.beton"
    np.save(digests_path(out), np.zeros(1, np.uint32))
    result = _invoke("convert", npz, out)
    assert result.exit_code == 2 and "c.beton.digests.npy already exists; pass --force" in result.output
    assert not out.exists() and not sidecar_path(out).exists()
    assert _invoke("convert", npz, out, "--force").exit_code == 0
    assert _invoke("verify", out).exit_code == 0


def test_verify_max_listed_zero_counts_without_a_list(written, tmp_path):
    damaged = _copy(written, tmp_path, "damaged.beton")
    with open(damaged, "r+b") as f:
        for sample in (5, 7):
            f.seek(_sample_offset(damaged, sample))
            f.write(b"\x00" * 8)
    result = _invoke("verify", damaged, "--max-listed", 0)
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[0] == f"{damaged}: 2 of 80 samples differ from when it was written."


def test_an_input_s_digests_file_is_never_an_output(written, tmp_path):
    source = _copy(written, tmp_path, "source.beton")
    before = digests_path(source).read_bytes()
    scores = class_scores_file(tmp_path / "lm.json", source, scores=[3, 0, 2, 1], tiebreak=[0, 0, 0, 0])
    result = _invoke("prune", source, "--scores", scores, "--ratio", 0.5, "-o", digests_path(source), "--force")
    assert result.exit_code == 2 and "is the same file as the digests file of input" in result.output, result.output
    assert digests_path(source).read_bytes() == before
    info = _invoke("info", source)
    assert "(present, unchanged; `dptool verify` checks them)" in info.output
    named = _invoke("info", digests_path(source))
    assert named.exit_code == 2 and f"is the digests file of {source}; run `dptool info {source}`" in named.output
    digests_path(source).unlink()
    assert "source.beton.digests.npy (missing)" in _invoke("info", source).output


def test_an_output_is_never_another_output_s_digests_file(written, tmp_path):
    """prune's --val-out named as -o's digests file would overwrite them (verify then refuses -o): refused first."""
    source = _copy(written, tmp_path, "source.beton")
    val = _copy(written, tmp_path, "val.beton")
    scores = class_scores_file(tmp_path / "lm.json", source, scores=[3, 0, 2, 1], tiebreak=[0, 0, 0, 0])
    out = tmp_path / "p.beton"
    result = _invoke("prune", source, "--scores", scores, "--ratio", 0.5, "-o", out, "--val", val,
                     "--val-out", digests_path(out))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"Error: Output {digests_path(out)} looks like a digests file; give a .beton path."
    assert not out.exists() and not digests_path(out).exists()


def test_several_files_are_checked_together(written, tmp_path):
    """One intact and one damaged file: both reported, exit 1; a file without digests among them is refused before
    any sample is read (exit 2, nothing else printed)."""
    intact = _copy(written, tmp_path, "intact.beton")
    damaged = _copy(written, tmp_path, "damaged.beton")
    with open(damaged, "r+b") as f:
        f.seek(_sample_offset(damaged, 10))
        f.write(b"\x00" * 4)
    result = _invoke("verify", intact, damaged)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"{intact}: all 80 samples match") and lines[1] == (
        f"{damaged}: 1 of 80 samples differ from when it was written: 10.")
    doc = json.loads(_invoke("verify", intact, "--json").output)
    assert doc["intact"] is True and [f["path"] for f in doc["files"]] == [str(intact)]
    (tmp_path / "link.beton").symlink_to(intact)  # pathlib drops "/./": the other spelling is given as a string
    again = json.loads(_invoke("verify", intact, f"{tmp_path}/./intact.beton", tmp_path / "link.beton", damaged,
                               intact, "--json").output)
    assert [f["path"] for f in again["files"]] == [str(intact), str(damaged)]  # a file named twice is read once
    for companion in (sidecar_path(intact), digests_path(intact)):
        named = _invoke("verify", intact, companion)
        assert named.exit_code == 2 and f"of {intact}; give the .beton files (dptool verify DIR/*.beton)." in \
            named.output, named.output
    bare = tmp_path / "bare.beton"
    shutil.copy(written, bare)
    refused = _invoke("verify", intact, bare)
    assert refused.exit_code == 2 and refused.output.strip().splitlines() == [
        f"Error: {bare} has no recorded digests (it was written by FFCV's own writer, or by a dptool before they "
        "were recorded), so there is nothing to verify it against."]
