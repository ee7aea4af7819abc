"""`dptool convert --format coop:SPLIT.json`: CoOp's split files (the paper's downstream splits) on generated data."""

from __future__ import annotations

import collections
import hashlib
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dptool.beton import open_beton, read_image, read_sidecar
from dptool.cli.main import cli

RAW = ["--write-mode", "raw", "--max-res", "64", "--workers", "2"]
NAMES = ["abyssinian", "beagle", "birman"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _digest(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def _coop_dataset(root, seed: int = 0):
    """root/images/<class>/<split>_<i>.png (PNG: lossless) and root/split.json in CoOp's shape. Label 2 has no
    val sample, so val's file still needs all 3 classes from the other splits. Returns {split: [(image, label)]}."""
    rng = np.random.default_rng(seed)
    layout = {"train": [0, 1, 2, 0, 1, 2, 0], "val": [0, 1, 1], "test": [2, 1, 0, 2]}
    split, arrays = {}, {}
    for key, labels in layout.items():
        split[key], arrays[key] = [], []
        for i, label in enumerate(labels):
            image = rng.integers(0, 256, (9 + i, 11, 3), dtype=np.uint8)
            impath = f"{NAMES[label]}/{key}_{i}.png"
            (root / "images" / NAMES[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "images" / impath)
            split[key].append([impath, label, NAMES[label]])
            arrays[key].append((image, label))
    (root / "split.json").write_text(json.dumps(split))
    return arrays


def _stored(path) -> collections.Counter:
    beton = open_beton(path)
    return collections.Counter((_digest(read_image(beton, i)), int(beton.labels[i])) for i in range(beton.num_samples))


@pytest.mark.parametrize("split", ["train", "val", "test", "trainval"])
def test_each_split_holds_its_entries_with_the_file_s_classes(tmp_path, split):
    arrays = _coop_dataset(tmp_path)
    out = tmp_path / f"{split}.beton"
    result = run("convert", "--format", f"coop:{tmp_path / 'split.json'}", tmp_path / "images", out, "--split",
                 split, *RAW, "--json")
    assert result.exit_code == 0, result.output
    parts = ("train", "val") if split == "trainval" else (split,)
    expected = collections.Counter((_digest(img), lab) for p in parts for img, lab in arrays[p])
    assert _stored(out) == expected
    side = read_sidecar(out)
    assert side["class_names"] == NAMES and side["num_classes"] == 3  # val lacks label 2 and keeps it
    assert side["class_counts"] == np.bincount([lab for p in parts for _, lab in arrays[p]], minlength=3).tolist()
    sha = hashlib.sha256((tmp_path / "split.json").read_bytes()).hexdigest()
    assert side["source"]["split"] == split and side["source"]["path"] == str(tmp_path / "images")
    assert side["source"]["split_file"] == {"path": str(tmp_path / "split.json"), "sha256": sha}
    info = run("info", out)
    assert info.exit_code == 0 and f"coop:{tmp_path / 'split.json'}" in info.output and f"({split})" in info.output


def test_output_does_not_depend_on_workers_and_relative_paths_work(tmp_path, monkeypatch):
    _coop_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    for workers in (1, 2):
        result = run("convert", "--format", "coop:split.json", "images", f"w{workers}.beton", "--write-mode",
                     "proportion", "--workers", workers)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "w1.beton").read_bytes() == (tmp_path / "w2.beton").read_bytes()
    assert read_sidecar(tmp_path / "w1.beton")["source"]["split_file"]["path"] == str(tmp_path / "split.json")


def test_a_missing_image_is_skipped_and_listed_or_stops_the_run(tmp_path):
    arrays = _coop_dataset(tmp_path)
    gone = tmp_path / "images" / "beagle" / "train_1.png"
    gone.unlink()
    result = run("convert", "--format", f"coop:{tmp_path / 'split.json'}", tmp_path / "images",
                 tmp_path / "s.beton", *RAW, "--json")
    assert result.exit_code == 0, result.output
    skipped = read_sidecar(tmp_path / "s.beton")["skipped"]
    assert skipped == [{"path": str(gone), "reason": "listed in the split file but not found"}]
    kept = collections.Counter((_digest(img), lab) for k, (img, lab) in enumerate(arrays["train"]) if k != 1)
    assert _stored(tmp_path / "s.beton") == kept

    result = run("convert", "--format", f"coop:{tmp_path / 'split.json'}", tmp_path / "images",
                 tmp_path / "f.beton", *RAW, "--on-error", "fail")
    assert result.exit_code == 2 and str(gone) in result.output and "Traceback" not in result.output
    assert not (tmp_path / "f.beton").exists()


def _write(path, content) -> None:
    path.write_text(content if isinstance(content, str) else json.dumps(content))


GOOD = {"train": [["a/0.png", 0, "cat"], ["a/1.png", 1, "dog"]], "val": [], "test": [["a/2.png", 1, "dog"]]}


@pytest.mark.parametrize(
    "content, extra, phrase",
    [
        ('{"train": [["a/0.png", 0, "cat"]', [], "is not valid JSON"),
        ([["a/0.png", 0, "cat"]], [], "is not a CoOp split file: it is a JSON list"),
        ({"images": []}, [], "is not a CoOp split file: it is an object with keys 'images'"),
        ({"train": {"a/0.png": 0}}, [], "its 'train' is"),
        ({"train": [["a/0.png", 0]]}, [], "train[0] is"),
        ({"train": [["a/0.png", "0", "cat"]]}, [], "not [impath, label, classname]"),
        ({"train": [["a/0.png", -1, "cat"]]}, [], "an integer label from 0"),
        ({"train": [["a/0.png", True, "cat"]]}, [], "train[0] is"),
        ({"train": [["a/0.png", 0, "cat"], ["a/1.png", 1, "dog"]], "test": [["a/2.png", 1, "wolf"]]}, [],
         "label 1 is named 'dog' at train[1] and 'wolf' at test[0]"),
        ({"train": [["a/0.png", 0, "cat"], ["a/1.png", 2, "emu"]]}, [], "label 1 appears in none of its splits"),
        ({"train": [["/etc/a.png", 0, "cat"]]}, [], "has the path '/etc/a.png'"),
        ({"train": [["a/../../x.png", 0, "cat"]]}, [], "without '..' leading out of it"),
        ({"train": [["a/0.png", 1 << 20, "cat"]]}, [], "at most 1048576"),
        (GOOD, ["--split", "validation"], "no split 'validation'; accepted: train, val, test, trainval"),
        ({"train": GOOD["train"]}, ["--split", "trainval"], "has no 'val' split (it has train)"),
        (GOOD, ["--split", "val"], "lists no images in its 'val' split"),
        ({"train": [["b/0.png", 0, "cat"]]}, [], "None of the 1 images of split 'train'"),
    ],
)
def test_bad_split_files_are_one_sentence_with_exit_2(tmp_path, content, extra, phrase):
    (tmp_path / "images" / "a").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(tmp_path / "images" / "a" / f"{k}.png")
    _write(tmp_path / "split.json", content)
    result = run("convert", "--format", f"coop:{tmp_path / 'split.json'}", tmp_path / "images", tmp_path / "o.beton",
                 *RAW, *extra)
    assert result.exit_code == 2, result.output
    assert phrase in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
    assert not (tmp_path / "o.beton").exists()
    if "no split 'validation'" not in phrase:  # every message about the file names it
        assert str(tmp_path / "split.json") in result.output.replace("\n", "")


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--format", "coop:{t}/nosuch.json", "{t}/images"], "nosuch.json does not exist"),
        (["--format", "coop:", "{t}/images"], "needs the split file after the colon"),
        (["--format", "coop:{t}/split.json", "{t}/noimages"], "Image folder {t}/noimages does not exist"),
        (["{t}/split.json"], "is a JSON file; a CoOp split file is given as --format coop:"),
        (["{t}/images", "--split", "train"], "and CoOp split files (--format coop:SPLIT.json)"),
    ],
)
def test_wrong_ways_to_give_a_split_file_are_refused(tmp_path, args, phrase):
    """`--format auto` never reads a split file as something else, nor --split an ImageFolder."""
    _coop_dataset(tmp_path)
    result = run("convert", *[a.format(t=tmp_path) for a in args], tmp_path / "o.beton", *RAW)
    assert result.exit_code == 2, result.output
    assert phrase.format(t=tmp_path) in result.output, result.output
    assert not (tmp_path / "o.beton").exists()


def test_the_sidecar_may_not_replace_the_split_file(tmp_path):
    _coop_dataset(tmp_path)
    os.rename(tmp_path / "split.json", tmp_path / "pets.beton.json")
    before = (tmp_path / "pets.beton.json").read_bytes()
    result = run("convert", "--format", f"coop:{tmp_path / 'pets.beton.json'}", tmp_path / "images",
                 tmp_path / "pets.beton", *RAW, "--force")
    assert result.exit_code == 2 and "would write its sidecar over" in result.output, result.output
    assert (tmp_path / "pets.beton.json").read_bytes() == before


def test_tilde_in_the_split_file_is_expanded(tmp_path, monkeypatch):
    _coop_dataset(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    result = run("convert", "--format", "coop:~/split.json", tmp_path / "images", tmp_path / "t.beton", *RAW)
    assert result.exit_code == 0, result.output
    assert read_sidecar(tmp_path / "t.beton")["source"]["split_file"]["path"] == str(tmp_path / "split.json")


def test_auto_does_not_read_a_coop_dataset_folder_as_an_imagefolder(tmp_path):
    """stanford_cars/ holds cars_train/, cars_test/ and split_zhou_StanfordCars.json: `--format auto` would have
    made a 2-class file of it (the sub-folders as classes); it names the split file instead."""
    _coop_dataset(tmp_path)
    os.rename(tmp_path / "split.json", tmp_path / "split_zhou_Pets.json")
    result = run("convert", tmp_path, tmp_path / "o.beton", *RAW)
    assert result.exit_code == 2 and f"--format coop:{tmp_path / 'split_zhou_Pets.json'}" in result.output, \
        result.output
    assert not (tmp_path / "o.beton").exists()
    result = run("convert", "--format", "imagefolder", tmp_path, tmp_path / "o.beton", *RAW, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["num_classes"] == 1, result.output
