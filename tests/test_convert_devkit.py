"""ImageNet's val set from image-net.org's own download: the flat folder of ILSVRC2012_img_val.tar labelled by the
devkit ILSVRC2012_devkit_t12.tar.gz (or its folder), `--format list:DEVKIT` (`dptool.imagenet_devkit`).

The fake devkit numbers its leaf synsets' ILSVRC2012_IDs in no WNID order (and puts inner synsets between them), so a
reader that took ID - 1, or a synset's position, as the label would store other classes than the test expects."""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import logging
import os
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image
from scipy import io as sio
from test_convert_lists import _digest, _stored, run  # the same CLI runner and image digests

from dptool.beton import check_same_classes, open_beton, read_sidecar
from dptool.convert import WriterParams, convert, partial_paths
from dptool.errors import InputError
from dptool.imagenet_devkit import MAX_ARCHIVE_BYTES
from dptool.writer_progress import read_checkpoint

RAW = ["--write-mode", "raw", "--max-res", "32", "--workers", "1"]
PARAMS = WriterParams(max_resolution=32, write_mode="raw", num_workers=1)
# ILSVRC2012_ID -> WNID of the leaves: no ID is its WNID's sorted index + 1
LEAVES = {1: "n01491361", 2: "n01440764", 3: "n01484850", 4: "n01443537"}
WNIDS = sorted(LEAVES.values())
INNER = [(5, "n00001740", "entity", 2), (6, "n01473806", "aquatic vertebrate", 2)]  # not classes
TRUTH = [3, 1, 4, 2, 2, 4, 1, 3, 1, 4]  # the ID of val image 1, 2, ...
FIELDS = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
          "num_train_images"]
GT = "ILSVRC2012_validation_ground_truth.txt"


def _meta_mat(leaves: dict[int, str]) -> bytes:
    """meta.mat's layout: a (n, 1) struct array `synsets` with the devkit's 8 fields, an inner synset first."""
    rows = [INNER[0]] + [(i, w, f"words of {w}", 0) for i, w in leaves.items()] + INNER[1:]
    synsets = np.empty((len(rows), 1), dtype=[(f, "O") for f in FIELDS])
    for k, (ident, wnid, words, children) in enumerate(rows):
        kids = np.arange(1, children + 1, dtype=np.uint16) if children else np.zeros((1, 0))
        synsets[k, 0] = (ident, wnid, words, f"gloss of {wnid}", children, kids, int(children > 0),
                         0 if children else 1300)
    out = io.BytesIO()
    sio.savemat(out, {"synsets": synsets})
    return out.getvalue()


def _devkit(root, truth=TRUTH, *, meta: bytes | None = None, leave_out: str = "", level: int = 9) -> tuple:
    """root/ILSVRC2012_devkit_t12/{COPYING, data/meta.mat, data/GT, evaluation/demo.val.pred.txt} and the same as
    root/ILSVRC2012_devkit_t12.tar.gz; (folder, archive)."""
    files = {"COPYING": b"terms\n", "data/meta.mat": _meta_mat(LEAVES) if meta is None else meta,
             f"data/{GT}": "".join(f"{t}\n" for t in truth).encode(), "evaluation/demo.val.pred.txt": b"1 2 3 4 5\n"}
    folder = root / "ILSVRC2012_devkit_t12"
    archive = root / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=level) as tar:
        for name, content in files.items():
            if name != leave_out:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(content)
                info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return folder, archive


def _val(root, truth=TRUTH, seed: int = 1) -> dict[int, tuple[str, str]]:
    """root/val/ILSVRC2012_val_<8 digits>.JPEG, the flat folder of ILSVRC2012_img_val.tar; {image number: (digest of
    the decoded JPEG, the WNID of its ground-truth ID)}."""
    rng = np.random.default_rng(seed)
    (root / "val").mkdir()
    made = {}
    for number, ident in enumerate(truth, start=1):
        path = root / "val" / f"ILSVRC2012_val_{number:08d}.JPEG"
        Image.fromarray(rng.integers(0, 256, (8 + number % 5, 9 + number % 3, 3), dtype=np.uint8)).save(
            path, format="JPEG", quality=95)
        with Image.open(path) as img:
            made[number] = (_digest(np.asarray(img.convert("RGB"))), LEAVES[ident])
    return made


def _state(root) -> dict:
    """Every file under root: (size, mtime_ns, sha256), to see that nothing was written, moved or extracted."""
    return {os.path.relpath(os.path.join(d, f), root): (os.stat(os.path.join(d, f)).st_size,
                                                        os.stat(os.path.join(d, f)).st_mtime_ns,
                                                        hashlib.sha256(open(os.path.join(d, f), "rb").read()).digest())
            for d, _, fs in os.walk(root) for f in fs}


def test_the_fake_devkit_is_read_by_torchvision_as_the_real_one(tmp_path, monkeypatch):
    """torchvision's own devkit reader (its md5 check of the real download left out) finds in the fake archive the
    leaves' WNIDs and each val image's WNID by its ID, as dptool must."""
    from torchvision.datasets import imagenet

    _, archive = _devkit(tmp_path)
    (tmp_path / "tv").mkdir()
    (tmp_path / "tv" / archive.name).write_bytes(archive.read_bytes())
    monkeypatch.setattr(imagenet, "_verify_archive", lambda *args: None)
    imagenet.parse_devkit_archive(str(tmp_path / "tv"))
    wnid_to_classes, val_wnids = imagenet.load_meta_file(str(tmp_path / "tv"))
    assert sorted(wnid_to_classes) == WNIDS and val_wnids == [LEAVES[t] for t in TRUTH]


@pytest.mark.parametrize("given", ["archive", "folder", "data"])
def test_each_val_image_gets_the_wnid_of_its_ground_truth_id(tmp_path, given):
    """The archive, the extracted devkit and its data/ folder: every image's class is the WNID its ID names in
    meta.mat, classes are the sorted WNIDs of all leaf synsets, the sha256 recorded is the archive's (or the two
    files'), and neither the devkit nor the image folder is changed."""
    folder, archive = _devkit(tmp_path)
    made = _val(tmp_path)
    devkit = {"archive": archive, "folder": folder, "data": folder / "data"}[given]
    before = _state(tmp_path)
    out = tmp_path / "out" / "val.beton"
    out.parent.mkdir()
    result = run("convert", "--format", f"list:{devkit}", tmp_path / "val", out, *RAW)
    assert result.exit_code == 0, result.output
    assert _state(tmp_path) == {**before, **{k: v for k, v in _state(tmp_path).items() if k.startswith("out")}}
    side = read_sidecar(out)
    assert side["class_names"] == WNIDS and side["class_counts"] == [2, 3, 2, 3], side
    assert _stored(out) == collections.Counter(made.values())
    if given == "archive":
        expected = hashlib.sha256(archive.read_bytes()).hexdigest()
    else:
        h = hashlib.sha256()
        for name in ("meta.mat", GT):
            content = (folder / "data" / name).read_bytes()
            h.update(f"{name}\0{len(content)}\0".encode() + content)
        expected = h.hexdigest()
    assert side["source"]["label_list"] == {"path": str(devkit), "sha256": expected}
    assert side["source"]["format"] == f"list:{devkit}"


def test_with_classes_from_a_missing_image_skipped_naming_its_ground_truth_line(tmp_path):
    """With --classes-from TRAIN (a class more than the devkit's leaves, sorted among them), each image has TRAIN's
    label of its ID's WNID and `train --val` takes the file; a missing image is skipped, its reason naming the ground
    truth's line."""
    folder, archive = _devkit(tmp_path)
    made = _val(tmp_path)
    train_classes = sorted([*WNIDS, "n01482330"])
    rng = np.random.default_rng(2)
    for name in train_classes:
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "train" / name / "0.png")
    train = tmp_path / "train.beton"
    convert(tmp_path / "train", train, params=PARAMS)
    gone = tmp_path / "val" / "ILSVRC2012_val_00000003.JPEG"
    gone.unlink()
    result = run("convert", "--format", f"list:{archive}", tmp_path / "val", tmp_path / "val.beton", *RAW,
                 "--classes-from", train)
    assert result.exit_code == 0, result.output
    side = read_sidecar(tmp_path / "val.beton")
    assert side["class_names"] == train_classes and side["class_counts"] == [2, 2, 0, 2, 3], side
    assert _stored(tmp_path / "val.beton") == collections.Counter(v for k, v in made.items() if k != 3)
    reason = f"listed at {archive}/ILSVRC2012_devkit_t12/data/{GT}:3 but not found"
    assert side["skipped"] == [{"path": str(gone), "reason": reason}], side["skipped"]
    check_same_classes(open_beton(train), open_beton(tmp_path / "val.beton"), "Validation file", "validation")


def _val_archive(tmp_path):
    """ILSVRC2012_img_val.tar (its JPEG members), given where the devkit belongs."""
    path = tmp_path / "ILSVRC2012_img_val.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("ILSVRC2012_val_00000001.JPEG")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"jpg"))
    return path


@pytest.mark.parametrize(
    "case, phrase",
    [
        ("no meta", "ILSVRC2012_devkit_t12.tar.gz holds no data/meta.mat; --format list: takes"),
        ("no truth folder", f"ILSVRC2012_devkit_t12 holds no data/meta.mat and data/{GT};"),
        ("id 0", f"data/{GT}:4 is '0', not the ILSVRC2012_ID of one of the 4 leaf synsets of"),
        ("inner id", f"data/{GT}:4 is '5', not the ILSVRC2012_ID of one of the 4 leaf synsets"),
        ("id 1001", f"data/{GT}:4 is '1001', not"),
        ("not a number", f"data/{GT}:4 is 'n01440764', not"),
        ("a blank line", f"data/{GT}:4 is '', not"),
        ("not a mat file", "data/meta.mat cannot be read as a MATLAB file"),
        ("no synsets", "data/meta.mat holds no struct array 'synsets' with fields ILSVRC2012_ID, WNID, num_children"),
        ("truncated", "ILSVRC2012_devkit_t12.tar.gz cannot be read as a tar archive"),
        ("val images", "ILSVRC2012_img_val.tar holds the val images (ILSVRC2012_val_00000001.JPEG), not the devkit"),
        ("sorted val", "it holds class folders, as torchvision's ImageNet sorts the val images"),
        ("cut in its first member", "ILSVRC2012_devkit_t12.tar.gz cannot be read as a tar archive"),
        ("zip", "ILSVRC2012_devkit_t12.zip is a zip archive; --format list: takes a label list, or"),
        ("gzipped list", "val.txt.gz cannot be read as a tar archive (file could not be opened successfully: -"),
        ("nan num_children", "data/meta.mat: synset 1 has no integer ILSVRC2012_ID, WNID text and integer"),
    ],
)
def test_devkits_without_its_files_or_with_a_line_that_is_no_leaf_s_id_are_refused(tmp_path, case, phrase):
    """One sentence, exit 2, no output; the archive as the folder is read (the archive is the one refused unless
    the case is the folder's)."""
    truth = list(TRUTH)
    truth[3] = {"id 0": "0", "inner id": "5", "id 1001": "1001", "not a number": "n01440764",
                "a blank line": ""}.get(case, truth[3])
    meta = {"not a mat file": b"MATLAB 5.0 MAT-file, but cut", "no synsets": None}.get(case)
    if case == "no synsets":
        out = io.BytesIO()
        sio.savemat(out, {"classes": np.arange(3)})
        meta = out.getvalue()
    if case == "nan num_children":  # a double field, as MATLAB stores numbers, that is no integer
        synsets = sio.loadmat(io.BytesIO(_meta_mat(LEAVES)))["synsets"]
        synsets[0, 0]["num_children"] = np.array([[np.nan]])
        out = io.BytesIO()
        sio.savemat(out, {"synsets": synsets})
        meta = out.getvalue()
    folder, archive = _devkit(tmp_path, truth, meta=meta,
                              leave_out={"no meta": "data/meta.mat", "no truth folder": f"data/{GT}"}.get(case, ""))
    _val(tmp_path)
    if case == "truncated":  # a download cut short: the first members are there, the rest is not
        archive.write_bytes(archive.read_bytes()[:-200])
    if case == "cut in its first member":  # cut so short that tarfile cannot tell it is a tar archive
        archive.write_bytes(archive.read_bytes()[:100])
    devkit = {"no truth folder": folder, "val images": _val_archive(tmp_path)}.get(case, archive)
    if case == "zip":  # the devkit repacked as a zip archive
        devkit = tmp_path / "ILSVRC2012_devkit_t12.zip"
        with zipfile.ZipFile(devkit, "w") as z:
            for name in ("data/meta.mat", f"data/{GT}"):
                z.write(folder / name, f"ILSVRC2012_devkit_t12/{name}")
    if case == "gzipped list":  # a label list compressed, not a devkit
        devkit = tmp_path / "val.txt.gz"
        devkit.write_bytes(gzip.compress(b"ILSVRC2012_val_00000001.JPEG n01440764\n"))
    image_dir = tmp_path / "val"
    if case == "sorted val":  # torchvision moved each image into its WNID's folder
        image_dir = tmp_path / "sorted"
        for k, ident in enumerate(TRUTH, start=1):
            (image_dir / LEAVES[ident]).mkdir(parents=True, exist_ok=True)
            os.rename(tmp_path / "val" / f"ILSVRC2012_val_{k:08d}.JPEG",
                      image_dir / LEAVES[ident] / f"ILSVRC2012_val_{k:08d}.JPEG")
    result = run("convert", "--format", f"list:{devkit}", image_dir, tmp_path / "o.beton", *RAW)
    assert result.exit_code == 2 and phrase in result.output and "Traceback" not in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "o.beton").exists()


def test_resume_refuses_a_changed_devkit(tmp_path, monkeypatch):
    """A conversion stopped half way (a missing image under --on-error fail, a record after every chunk): a resume
    with a devkit archive of other bytes (the same files, compressed at another level: the images and labels are the
    same) is refused naming it; with the same archive it continues, to the same missing image."""
    truth = [1 + (k * 7) % 4 for k in range(100)]
    folder, archive = _devkit(tmp_path, truth)
    _val(tmp_path, truth)
    (tmp_path / "val" / "ILSVRC2012_val_00000090.JPEG").unlink()
    monkeypatch.setenv("DPTOOL_CONVERT_CHECKPOINT_SECONDS", "0")
    out = tmp_path / "out.beton"
    with pytest.raises(InputError, match=f"{GT}:90 but not found"):
        convert(tmp_path / "val", out, format=f"list:{archive}", params=PARAMS, on_error="fail")
    partial, state_path = partial_paths(out)
    assert 0 < read_checkpoint(state_path)["done"] < 100
    before = partial.read_bytes()
    options = ["--format", f"list:{archive}", tmp_path / "val", out, *RAW, "--on-error", "fail", "--resume"]

    original = archive.read_bytes()
    (tmp_path / "other").mkdir()
    _devkit(tmp_path / "other", truth, level=1)
    archive.write_bytes((tmp_path / "other" / archive.name).read_bytes())
    assert archive.read_bytes() != original
    result = run("convert", *options)
    assert result.exit_code == 2 and f"but the label list {archive} changed since" in result.output, result.output
    assert partial.read_bytes() == before and not out.exists()

    archive.write_bytes(original)
    result = run("convert", *options)
    assert result.exit_code == 2 and f"{GT}:90 but not found" in result.output, result.output
    assert "changed since" not in result.output


@pytest.mark.parametrize("first", ["devkit files", "one big member"])
def test_an_archive_too_large_for_a_devkit_is_refused_without_being_read_through(tmp_path, first):
    """A tar of more than MAX_ARCHIVE_BYTES (a sparse member of zeros, as ILSVRC2012_img_train.tar's 138 GB would be
    given by mistake), the devkit's two files first or not, is refused in one sentence naming its size, not hashed
    or read through as a devkit."""
    folder, _ = _devkit(tmp_path)
    _val(tmp_path)
    path = tmp_path / "ILSVRC2012_img_train.tar"
    with open(path, "wb") as f:
        if first == "devkit files":
            with tarfile.open(fileobj=f, mode="w") as tar:
                for name in ("data/meta.mat", f"data/{GT}"):
                    tar.add(folder / name, f"ILSVRC2012_devkit_t12/{name}")
            f.seek(f.tell() - 1024)  # over the end-of-archive blocks
        info = tarfile.TarInfo("n01440764.tar")
        info.size = MAX_ARCHIVE_BYTES + 1
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.truncate(f.tell() + info.size + (-info.size % 512) + 1024)  # sparse: no disk written
    result = run("convert", "--format", f"list:{path}", tmp_path / "val", tmp_path / "o.beton", *RAW)
    assert result.exit_code == 2 and f"Archive {path} is 0.3 GiB" in result.output, result.output
    assert "too large for ImageNet's devkit" in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "o.beton").exists()


def test_val_images_past_the_ground_truth_s_last_line_are_named_in_a_warning(tmp_path, caplog):
    """A ground truth cut short (8 lines for 10 images): the 8 are converted, and a warning counts the 2 left out and
    names the first."""
    _, archive = _devkit(tmp_path, TRUTH[:8])
    made = _val(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dptool"):
        convert(tmp_path / "val", tmp_path / "o.beton", format=f"list:{archive}", params=PARAMS)
    assert _stored(tmp_path / "o.beton") == collections.Counter(v for k, v in made.items() if k <= 8)
    assert [r.getMessage() for r in caplog.records if "past the" in r.getMessage()] == [
        f"2 images of {tmp_path / 'val'} are past the 8 lines of {archive}/ILSVRC2012_devkit_t12/data/{GT} (the "
        "first: ILSVRC2012_val_00000009.JPEG) and are left out: is the ground truth cut short?"]
