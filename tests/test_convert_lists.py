"""ImageNet's val set as users download it: a class-folder tree lacking some classes, or Kaggle's flat folder with
`LOC_val_solution.csv`, converted with `--classes-from TRAIN.beton` so its labels are the train file's
(`dptool.class_map`), and `--format list:FILE` (`dptool.label_list`)."""

from __future__ import annotations

import collections
import hashlib
import logging

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dptool.beton import check_same_classes, open_beton, read_image, read_sidecar
from dptool.cli.main import cli
from dptool.convert import WriterParams, convert, partial_paths
from dptool.errors import InputError
from dptool.writer_progress import read_checkpoint

RAW = ["--write-mode", "raw", "--max-res", "32", "--workers", "1"]
PARAMS = WriterParams(max_resolution=32, write_mode="raw", num_workers=1)
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _digest(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def _image(rng, k: int) -> np.ndarray:
    return rng.integers(0, 256, (8 + k % 5, 9 + k % 3, 3), dtype=np.uint8)


def _tree(root, classes: list[str], per_class: int, seed: int) -> dict[str, str]:
    """root/<class>/<i>.png (lossless); {image digest: class name}."""
    rng = np.random.default_rng(seed)
    made = {}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = _image(rng, c * per_class + i)
            Image.fromarray(image).save(root / name / f"{i}.png")
            made[_digest(image)] = name
    return made


def _stored(path) -> collections.Counter:
    """(image digest, class name) of every sample of `path`, its class named by its sidecar."""
    beton = open_beton(path)
    names = beton.sidecar["class_names"]
    return collections.Counter((_digest(read_image(beton, i)), names[int(beton.labels[i])])
                               for i in range(beton.num_samples))


@pytest.fixture
def train(tmp_path):
    """A train .beton of the 4 WNIDS classes (3 images each)."""
    _tree(tmp_path / "train", WNIDS, 3, seed=1)
    out = tmp_path / "train.beton"
    convert(tmp_path / "train", out, params=PARAMS)
    return out


def test_a_val_tree_lacking_a_class_gets_the_train_file_s_labels_and_is_accepted(train, tmp_path, caplog):
    """Without --classes-from, the val tree lacking WNIDS[1] numbers WNIDS[2] as 1 and is refused as a val file
    (the refusal now says how to convert it); with it, every class keeps the train file's label, the one lacking has
    none, and check_same_classes (what `train --val` and `prune --val` call) takes it."""
    val_classes = [WNIDS[0], WNIDS[2], WNIDS[3]]
    made = _tree(tmp_path / "val", val_classes, 2, seed=2)
    plain = tmp_path / "plain.beton"
    convert(tmp_path / "val", plain, params=PARAMS)
    with pytest.raises(InputError, match=f"--classes-from {train}"):
        check_same_classes(open_beton(train), open_beton(plain), "Validation file", "validation")

    with caplog.at_level(logging.WARNING, logger="dptool"):
        convert(tmp_path / "val", tmp_path / "val.beton", params=PARAMS, classes_from=train)
    assert [r.getMessage() for r in caplog.records] == [
        f"1 of the 4 classes of {train} has no samples in {tmp_path / 'val'}; its label is kept with no samples"]
    val, ref = open_beton(tmp_path / "val.beton"), open_beton(train)
    assert val.sidecar["class_names"] == ref.sidecar["class_names"] == WNIDS
    assert val.sidecar["class_counts"] == [2, 0, 2, 2] and val.sidecar["num_classes"] == 4
    assert _stored(tmp_path / "val.beton") == collections.Counter(made.items())  # labels by name, as train's
    assert sorted(set(val.labels.tolist())) == [0, 2, 3]
    check_same_classes(ref, val, "Validation file", "validation")
    assert val.sidecar["source"]["classes_from"]["path"] == str(train)
    shown = run("info", tmp_path / "val.beton").output
    assert f"source: imagefolder {tmp_path / 'val'}, labelled by the classes of {train}\n" in shown, shown


def _kaggle(tmp_path, classes: list[str], per_class: int, seed: int = 3) -> dict[str, str]:
    """Kaggle's layout: a flat folder val/ILSVRC2012_val_<8 digits>.JPEG and LOC_val_solution.csv (header, rows in
    no order, some with several boxes); {digest of the decoded JPEG: class}."""
    rng = np.random.default_rng(seed)
    (tmp_path / "val").mkdir()
    rows, made = [], {}
    for k in range(len(classes) * per_class):
        name = classes[k % len(classes)]
        image_id = f"ILSVRC2012_val_{k + 1:08d}"
        Image.fromarray(_image(rng, k)).save(tmp_path / "val" / f"{image_id}.JPEG", quality=95)
        with Image.open(tmp_path / "val" / f"{image_id}.JPEG") as img:
            made[_digest(np.asarray(img.convert("RGB")))] = name
        boxes = " ".join(f"{name} {b} {b + 1} {b + 5} {b + 6}" for b in range(1 + k % 3))  # 1 to 3 boxes
        rows.append(f"{image_id},{boxes} ")
    rows.reverse()
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return made


def test_kaggle_s_csv_with_several_boxes_a_row_alone_and_with_classes_from(train, tmp_path):
    made = _kaggle(tmp_path, [WNIDS[3], WNIDS[1]], 3)
    csv = tmp_path / "LOC_val_solution.csv"
    result = run("convert", "--format", f"list:{csv}", tmp_path / "val", tmp_path / "alone.beton", *RAW)
    assert result.exit_code == 0, result.output
    alone = read_sidecar(tmp_path / "alone.beton")
    assert alone["class_names"] == [WNIDS[1], WNIDS[3]] and alone["class_counts"] == [3, 3]  # sorted names
    assert alone["source"]["label_list"]["path"] == str(csv) and alone["source"]["format"] == f"list:{csv}"
    assert _stored(tmp_path / "alone.beton") == collections.Counter(made.items())

    result = run("convert", "--format", f"list:{csv}", tmp_path / "val", tmp_path / "val.beton", *RAW,
                 "--classes-from", train)
    assert result.exit_code == 0, result.output
    val = open_beton(tmp_path / "val.beton")
    assert val.sidecar["class_names"] == WNIDS and val.sidecar["class_counts"] == [0, 3, 0, 3]
    assert _stored(tmp_path / "val.beton") == collections.Counter(made.items())
    check_same_classes(open_beton(train), val, "Validation file", "validation")


def test_a_list_of_paths_and_classes_by_tab_comma_or_spaces(tmp_path):
    """A header line and blank lines are left out; paths may be in sub-folders; the three separators mix."""
    made = _tree(tmp_path / "img", ["cat", "dog"], 2, seed=4)
    lines = ["filename,label", "cat/0.png\tcat", "", "cat/1.png,cat", "dog/0.png   dog", "dog/1.png, dog", ""]
    (tmp_path / "labels.txt").write_text("\r\n".join(lines))
    result = run("convert", "--format", f"list:{tmp_path / 'labels.txt'}", tmp_path / "img", tmp_path / "o.beton",
                 *RAW, "--json")
    assert result.exit_code == 0, result.output
    assert read_sidecar(tmp_path / "o.beton")["class_names"] == ["cat", "dog"]
    assert _stored(tmp_path / "o.beton") == collections.Counter(made.items())


def test_a_missing_image_is_skipped_and_listed_or_stops_the_run_naming_its_line(tmp_path):
    made = _tree(tmp_path / "img", ["cat", "dog"], 2, seed=5)
    listing = tmp_path / "labels.csv"
    listing.write_text("cat/0.png,cat\ncat/1.png,cat\ndog/0.png,dog\ndog/1.png,dog\n")
    gone = tmp_path / "img" / "dog" / "0.png"
    with Image.open(gone) as img:
        lost = _digest(np.asarray(img))
    gone.unlink()
    result = run("convert", "--format", f"list:{listing}", tmp_path / "img", tmp_path / "s.beton", *RAW)
    assert result.exit_code == 0, result.output
    reason = f"listed at {listing}:3 but not found"
    assert read_sidecar(tmp_path / "s.beton")["skipped"] == [{"path": str(gone), "reason": reason}]
    assert _stored(tmp_path / "s.beton") == collections.Counter(kv for kv in made.items() if kv[0] != lost)
    result = run("convert", "--format", f"list:{listing}", tmp_path / "img", tmp_path / "f.beton", *RAW,
                 "--on-error", "fail")
    assert result.exit_code == 2 and f"{listing}:3" in result.output and "Traceback" not in result.output, \
        result.output
    assert not (tmp_path / "f.beton").exists()


@pytest.mark.parametrize(
    "content, phrase",
    [
        ("cat/0.png,cat\ncat/1.png cat extra\n", "labels.txt:2 is 'cat/1.png cat extra', not 'relative/path"),
        ("cat/0.png,cat\ncat/1.png,cat,x\n", "labels.txt:2 is"),
        ("cat/0.png\n", "labels.txt:1 is 'cat/0.png', not"),
        ("cat/0.png,cat\n\ncat/./0.png,dog\n", "labels.txt:3 lists 'cat/./0.png' again (first at line 1)"),
        ("../cat/0.png,cat\n", "labels.txt:1: the path '../cat/0.png' is not an image path inside"),
        ("/etc/passwd,cat\n", "labels.txt:1: the path '/etc/passwd'"),
        (b"cat/0.png,cat\ncat/\xff.png,cat\n", "labels.txt:2 is not UTF-8 text"),
        ("\n\n", "lists no images"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000001,\n", "labels.txt:2 is 'ILSVRC2012_val_00000001,', not "
         "'ImageId,PredictionString'"),
        ("nothere/0.png,cat\n", "None of the 1 images of"),
        ("nothere/0.png,cat\nnothere/1.png,dog\n", "None of the 2 images of"),  # not line 1 taken as a header
    ],
)
def test_bad_label_lists_are_one_sentence_with_exit_2(tmp_path, content, phrase):
    _tree(tmp_path / "img", ["cat"], 2, seed=6)
    listing = tmp_path / "labels.txt"
    (listing.write_bytes if isinstance(content, bytes) else listing.write_text)(content)
    result = run("convert", "--format", f"list:{listing}", tmp_path / "img", tmp_path / "o.beton", *RAW)
    assert result.exit_code == 2 and phrase in result.output and "Traceback" not in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "o.beton").exists()


def test_classes_from_refusals(train, tmp_path, tiny_beton):
    """A source class the reference lacks (counted, the first named); a reference without class names; a
    reference that is not there; an output over the reference."""
    _tree(tmp_path / "val", [WNIDS[0], "n99999999", "zz_extra"], 1, seed=7)
    result = run("convert", tmp_path / "val", tmp_path / "o.beton", *RAW, "--classes-from", train)
    assert result.exit_code == 2 and "2 class folders of" in result.output, result.output
    assert "'n99999999', 'zz_extra'" in result.output and f"--classes-from {train}" in result.output

    bare = tmp_path / "bare.beton"
    bare.write_bytes(tiny_beton.read_bytes())  # no sidecar beside it
    result = run("convert", tmp_path / "val", tmp_path / "o.beton", *RAW, "--classes-from", bare)
    assert result.exit_code == 2 and f"--classes-from {bare} names no classes (it has no sidecar)" in result.output, \
        result.output
    result = run("convert", tmp_path / "val", tmp_path / "o.beton", *RAW, "--classes-from", tmp_path / "none.beton")
    assert result.exit_code == 2 and "none.beton" in result.output and "Traceback" not in result.output
    result = run("convert", tmp_path / "val", train, *RAW, "--classes-from", train, "--force")
    assert result.exit_code == 2 and "input" in result.output, result.output
    assert not (tmp_path / "o.beton").exists()


def test_resume_refuses_a_changed_label_list_or_classes_from(train, tmp_path, monkeypatch):
    """A conversion from a list stopped half way (a missing image under --on-error fail, a record after every
    chunk): a resume after an edit of the list (a line added at its end), or with another --classes-from file, or
    without it, is refused naming what changed; with the same ones it continues (and stops at the same image)."""
    rng = np.random.default_rng(8)
    (tmp_path / "flat").mkdir()
    order = np.random.default_rng(0).permutation(400)
    late = int(order[300])  # the missing image comes after several chunks of 32
    lines = []
    for k in range(400):
        name = WNIDS[k % 4]
        if k != late:
            Image.fromarray(_image(rng, k)).save(tmp_path / "flat" / f"{k}.png")
        lines.append(f"{k}.png {name}\n")
    listing = tmp_path / "labels.txt"
    listing.write_text("".join(lines))
    fmt = f"list:{listing}"

    monkeypatch.setenv("DPTOOL_CONVERT_CHECKPOINT_SECONDS", "0")
    out = tmp_path / "out.beton"
    with pytest.raises(InputError, match=f"{listing}:{late + 1}"):
        convert(tmp_path / "flat", out, format=fmt, params=PARAMS, on_error="fail", classes_from=train)
    partial, state_path = partial_paths(out)
    assert 0 < read_checkpoint(state_path)["done"] < 400
    before = partial.read_bytes()

    options = ["--format", fmt, tmp_path / "flat", out, *RAW, "--on-error", "fail", "--resume"]
    listing.write_text("".join(lines) + "\n")  # the same images: only the list's bytes differ
    result = run("convert", *options, "--classes-from", train)
    assert result.exit_code == 2 and f"but the label list {listing} changed since" in result.output, result.output
    assert "the images the list names" not in result.output and "--classes-from" not in result.output
    listing.write_text("".join(lines))

    other = tmp_path / "other.beton"  # the same class names, other images: another fingerprint
    _tree(tmp_path / "other", WNIDS, 1, seed=9)
    convert(tmp_path / "other", other, params=PARAMS)
    result = run("convert", *options, "--classes-from", other)
    assert result.exit_code == 2 and "but the --classes-from file (or its classes) changed since" in result.output, \
        result.output
    result = run("convert", *options)  # without it: the labels are the list's own (sorted names: the same here)
    assert result.exit_code == 2 and "--classes-from file (or its classes) changed since" in result.output, \
        result.output
    assert partial.read_bytes() == before and not out.exists()

    result = run("convert", *options, "--classes-from", train)  # the same: continued, to the same missing image
    assert result.exit_code == 2 and f"{listing}:{late + 1} but not found" in result.output, result.output
    assert "changed since" not in result.output


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--format", "list:", "IMG", "o.beton"], "--format list: needs the label list after the colon"),
        (["--format", "list:LIST", "IMG", "o.beton", "--split", "val"], "--split applies to torchvision datasets"),
        (["--format", "list:nothere.csv", "IMG", "o.beton"], "Label list nothere.csv does not exist"),
        (["--format", "list:LIST", "noimages", "o.beton"], "Image folder noimages does not exist"),
    ],
)
def test_wrong_ways_to_give_a_label_list_are_refused(tmp_path, monkeypatch, args, phrase):
    _tree(tmp_path / "img", ["cat"], 1, seed=11)
    (tmp_path / "labels.csv").write_text("cat/0.png,cat\n")
    monkeypatch.chdir(tmp_path)
    args = [a.replace("LIST", "labels.csv").replace("IMG", "img") for a in args]
    result = run("convert", *args, *RAW)
    assert result.exit_code == 2 and phrase in result.output and "Traceback" not in result.output, result.output


def test_quoted_csv_fields_are_read_as_csv_reads_them(tmp_path):
    """A CSV writer quotes a path holding a comma (or every field): the quotes are not part of the path or the
    class, so no image is skipped and no class '"cat"' is made."""
    made = _tree(tmp_path / "img", ["cat", "dog"], 2, seed=12)
    (tmp_path / "img" / "cat" / "0.png").rename(tmp_path / "img" / "cat" / "a, b.png")
    lines = ['"filename","label"', '"cat/a, b.png",cat', '"cat/1.png","cat"', '"dog/0.png", "dog"',
             'dog/1.png\t"dog"']
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    result = run("convert", "--format", f"list:{tmp_path / 'labels.csv'}", tmp_path / "img", tmp_path / "o.beton",
                 *RAW)
    assert result.exit_code == 0, result.output
    side = read_sidecar(tmp_path / "o.beton")
    assert side["class_names"] == ["cat", "dog"] and side["skipped"] == [], side
    assert _stored(tmp_path / "o.beton") == collections.Counter(made.items())


def test_a_header_of_other_words_is_not_a_missing_image_of_a_class_of_its_own(tmp_path):
    """'file_path,label_name' is no image of the folder and no other line names 'label_name': a header, left out
    (one warning), not a skipped image and a class with no samples that `--val` would count as one too many. A
    missing first image whose class other lines name is still skipped and listed."""
    made = _tree(tmp_path / "img", ["cat", "dog"], 2, seed=13)
    listing = tmp_path / "labels.csv"
    listing.write_text("file_path,label_name\ncat/0.png,cat\ncat/1.png,cat\ndog/0.png,dog\ndog/1.png,dog\n")
    result = run("convert", "--format", f"list:{listing}", tmp_path / "img", tmp_path / "o.beton", *RAW)
    assert result.exit_code == 0, result.output
    assert f"{listing}:1 ('file_path', 'label_name') is taken as a header" in result.output, result.output
    side = read_sidecar(tmp_path / "o.beton")
    assert side["class_names"] == ["cat", "dog"] and side["skipped"] == [], side
    assert _stored(tmp_path / "o.beton") == collections.Counter(made.items())

    listing.write_text("cat/9.png,cat\ncat/0.png,cat\ndog/0.png,dog\n")  # a missing image, not a header
    result = run("convert", "--format", f"list:{listing}", tmp_path / "img", tmp_path / "m.beton", *RAW)
    assert result.exit_code == 0, result.output
    side = read_sidecar(tmp_path / "m.beton")
    assert side["class_names"] == ["cat", "dog"] and side["class_counts"] == [1, 1], side
    assert side["skipped"] == [{"path": str(tmp_path / "img" / "cat" / "9.png"),
                                "reason": f"listed at {listing}:1 but not found"}]


def test_kaggle_s_csv_with_further_columns_or_ids_that_end_in_jpeg(tmp_path):
    """A Kaggle-style CSV whose header goes on after 'ImageId,PredictionString' (a 'Usage' column) is Kaggle's
    CSV still, and an ImageId that already ends in '.JPEG' is not looked for as 'X.JPEG.JPEG'."""
    made = _kaggle(tmp_path, [WNIDS[0], WNIDS[2]], 2)
    csv = tmp_path / "LOC_val_solution.csv"
    rows = csv.read_text().splitlines()[1:]
    csv.write_text("ImageId,PredictionString,Usage\n" + "".join(
        f"{r.split(',')[0] + ('.JPEG' if k % 2 else '')},{r.split(',')[1]},Public\n" for k, r in enumerate(rows)))
    result = run("convert", "--format", f"list:{csv}", tmp_path / "val", tmp_path / "o.beton", *RAW)
    assert result.exit_code == 0, result.output
    side = read_sidecar(tmp_path / "o.beton")
    assert side["class_names"] == [WNIDS[0], WNIDS[2]] and side["skipped"] == [], side
    assert _stored(tmp_path / "o.beton") == collections.Counter(made.items())


def test_windows_paths_are_read_with_slashes_and_cannot_lead_out(tmp_path):
    """'cat\\0.png' (a list written on Windows) names img/cat/0.png, not a file 'cat\\0.png' missing from img;
    '..\\x.png' leads out of the folder and is refused as '../x.png' is."""
    made = _tree(tmp_path / "img", ["cat", "dog"], 1, seed=14)
    listing = tmp_path / "labels.txt"
    listing.write_text("cat\\0.png\tcat\ndog\\0.png\tdog\n")
    result = run("convert", "--format", f"list:{listing}", tmp_path / "img", tmp_path / "o.beton", *RAW)
    assert result.exit_code == 0, result.output
    assert read_sidecar(tmp_path / "o.beton")["skipped"] == []
    assert _stored(tmp_path / "o.beton") == collections.Counter(made.items())
    listing.write_text("cat\\0.png\tcat\n..\\img\\dog\\0.png\tdog\n")
    result = run("convert", "--format", f"list:{listing}", tmp_path / "img", tmp_path / "x.beton", *RAW)
    assert result.exit_code == 2 and f"{listing}:2: the path '../img/dog/0.png' is not" in result.output, \
        result.output


def test_a_list_s_class_the_reference_lacks_is_named_with_the_list(train, tmp_path):
    """The classes of a list source are its lines': the refusal names the list, not the image folder, in the
    singular for one class."""
    _tree(tmp_path / "img", [WNIDS[0]], 2, seed=15)
    listing = tmp_path / "labels.txt"
    listing.write_text(f"{WNIDS[0]}/0.png,{WNIDS[0]}\n{WNIDS[0]}/1.png,n99999999\n")
    result = run("convert", "--format", f"list:{listing}", tmp_path / "img", tmp_path / "o.beton", *RAW,
                 "--classes-from", train)
    assert result.exit_code == 2, result.output
    assert (f"1 class of {listing} is not a class of --classes-from {train} ('n99999999'); give the reference "
            "file of the same dataset, or remove it from the source.") in result.output, result.output


def test_a_utf16_list_as_excel_saves_unicode_text_is_read(tmp_path):
    """Excel's 'Unicode Text' is a TSV in UTF-16 with its byte order mark (and CRLF): read as the UTF-8 one is."""
    made = _tree(tmp_path / "img", ["cat", "dog"], 1, seed=16)
    listing = tmp_path / "labels.txt"
    listing.write_bytes("filename\tlabel\r\ncat/0.png\tcat\r\ndog/0.png\tdog\r\n".encode("utf-16"))
    result = run("convert", "--format", f"list:{listing}", tmp_path / "img", tmp_path / "o.beton", *RAW)
    assert result.exit_code == 0, result.output
    side = read_sidecar(tmp_path / "o.beton")
    assert side["class_names"] == ["cat", "dog"] and side["skipped"] == [], side
    assert side["source"]["label_list"]["sha256"] == hashlib.sha256(listing.read_bytes()).hexdigest()
    assert _stored(tmp_path / "o.beton") == collections.Counter(made.items())


def test_the_reference_s_classes_a_list_lacks_are_counted_against_the_list(train, tmp_path, caplog):
    """The classes of a list source are its lines': TRAIN's classes it names no image of are counted against the list
    (the folder may hold their images, unlisted), in the singular for one class, as the refusal names them."""
    _kaggle(tmp_path, [WNIDS[0], WNIDS[2], WNIDS[3]], 2)
    csv = tmp_path / "LOC_val_solution.csv"
    with caplog.at_level(logging.WARNING, logger="dptool"):
        convert(tmp_path / "val", tmp_path / "val.beton", format=f"list:{csv}", params=PARAMS, classes_from=train)
    assert [r.getMessage() for r in caplog.records] == [
        f"1 of the 4 classes of {train} has no samples in {csv}; its label is kept with no samples"]
    caplog.clear()
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(line for line in lines if WNIDS[2] not in line) + "\n")  # its images stay in val/
    with caplog.at_level(logging.WARNING, logger="dptool"):
        convert(tmp_path / "val", tmp_path / "val2.beton", format=f"list:{csv}", params=PARAMS, classes_from=train)
    assert [r.getMessage() for r in caplog.records] == [
        f"2 of the 4 classes of {train} have no samples in {csv}; their labels are kept with no samples"]
    assert read_sidecar(tmp_path / "val2.beton")["class_counts"] == [2, 0, 0, 2]


def test_a_val_list_converted_without_classes_from_is_told_the_command_that_converts_it(train, tmp_path):
    """The refusal of a val file with other classes gives the command for its own source: a list's needs
    `--format list:FILE` (the bare 'dptool convert SRC OUT' read Kaggle's flat folder as an ImageFolder)."""
    _kaggle(tmp_path, [WNIDS[0], WNIDS[2], WNIDS[3]], 2)
    csv = tmp_path / "LOC_val_solution.csv"
    plain = tmp_path / "plain.beton"
    convert(tmp_path / "val", plain, format=f"list:{csv}", params=PARAMS)
    command = f"dptool convert --format list:{csv} {tmp_path / 'val'} OUT --classes-from {train}"
    with pytest.raises(InputError) as refused:
        check_same_classes(open_beton(train), open_beton(plain), "Validation file", "validation")
    assert str(refused.value).endswith(command + "."), refused.value
    scores = tmp_path / "lm.json"
    from dptool.scores import Scores, write_scores
    ref = open_beton(train)
    write_scores(scores, Scores(method="lm", level="class", ids=np.arange(4), names=WNIDS, scores=np.arange(4.0),
                                tiebreak=np.zeros(4), tie_break="class id",
                                source={"path": str(train), "fingerprint": ref.sidecar["fingerprint"],
                                        "num_samples": ref.num_samples, "num_classes": 4}))
    for dry in ((), ("--dry-run",)):
        result = run("prune", train, "--scores", scores, "--ratio", "0.5", "-o", tmp_path / "p.beton", "--val", plain,
                     "--val-out", tmp_path / "pv.beton", *dry)
        assert result.exit_code == 2 and result.output.strip().endswith(command + ")."), result.output
    # an ImageFolder val: no --format; a path with a space is quoted as a shell needs it
    _tree(tmp_path / "val tree", [WNIDS[0], WNIDS[2]], 1, seed=5)
    convert(tmp_path / "val tree", tmp_path / "tree.beton", params=PARAMS)
    with pytest.raises(InputError) as refused:
        check_same_classes(ref, open_beton(tmp_path / "tree.beton"), "Validation file", "validation")
    assert str(refused.value).endswith(f"dptool convert '{tmp_path / 'val tree'}' OUT --classes-from {train}.")
