"""Unusual but legitimate inputs: byte-string class names, hidden and symlinked sub-folders, broken links, huge
labels, FFCV-written files (fields in another order, other field types) and stale sidecars."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dptool.beton import open_beton, read_sidecar, write_sidecar
from dptool.cli.main import cli
from dptool.errors import InputError
from dptool.loaders import eval_loader
from dptool.readers import ImageFolderSource

RAW = ["--write-mode", "raw", "--max-res", "16", "--workers", "1"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _png(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_npz_byte_string_class_names_are_decoded(tmp_path):
    images = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 0, 1]),
             class_names=np.array([b"cat", "caf\u00e9".encode()]))
    assert run("convert", tmp_path / "d.npz", tmp_path / "d.beton", *RAW).exit_code == 0
    assert read_sidecar(tmp_path / "d.beton")["class_names"] == ["cat", "caf\u00e9"]


@pytest.mark.parametrize("names", [np.array("cat"), np.array([["cat", "dog"]])])
def test_npz_class_names_not_1d_refused(tmp_path, names):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.array([0, 1]), class_names=names)
    result = run("convert", tmp_path / "d.npz", tmp_path / "d.beton", *RAW)
    assert result.exit_code == 2 and "1-D" in result.output
    assert not (tmp_path / "d.beton").exists()


@pytest.mark.parametrize("label", [10**9, 2**63 + 5])
def test_npz_huge_label_refused_not_out_of_memory(tmp_path, label):
    labels = np.array([0, label], dtype=np.uint64)
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 8, 8), np.uint8), labels=labels)
    result = run("convert", tmp_path / "d.npz", tmp_path / "d.beton", *RAW)
    assert result.exit_code == 2 and "at most" in result.output


def test_imagefolder_hidden_subfolders_skipped_symlinked_subfolders_followed(tmp_path, monkeypatch):
    _png(tmp_path / "src/a/0.png", 0)
    _png(tmp_path / "src/a/.ipynb_checkpoints/0-checkpoint.png", 0)
    _png(tmp_path / "elsewhere/1.png", 10)
    os.symlink(tmp_path / "elsewhere", tmp_path / "src/a/linked")
    os.symlink(tmp_path / "src/a", tmp_path / "src/a/linked_loop")  # a cycle ends
    os.symlink(tmp_path / "nowhere.png", tmp_path / "src/a/broken.png")
    _png(tmp_path / "src/b/0.png", 20)
    src = ImageFolderSource(tmp_path / "src")
    rel = sorted(os.path.relpath(src.path(i), tmp_path / "src") for i in range(len(src)))
    assert rel == ["a/0.png", "a/broken.png", "a/linked/1.png", "b/0.png"]
    monkeypatch.chdir(tmp_path)  # a relative source: the skipped files are still named by absolute paths
    result = run("convert", "src", tmp_path / "o.beton", *RAW)
    assert result.exit_code == 0, result.output
    side = read_sidecar(tmp_path / "o.beton")
    assert side["class_counts"] == [2, 1]
    assert side["skipped"] == [{"path": str(tmp_path / "src/a/broken.png"), "reason": "broken symbolic link"}]


def _ffcv_write(path, fields, rows):
    from ffcv.writer import DatasetWriter

    class D:
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(D())


def _deep_folder(top, levels: int = 20) -> str:
    """A folder under `top` whose path is longer than PATH_MAX (4096): listing it fails (ENAMETOOLONG) even for
    root, as listing a folder without read permission fails for other users; made through folder descriptors."""
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir("d" * 250, dir_fd=fd)
            fd, old = os.open("d" * 250, os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
    finally:
        os.close(fd)
    return os.path.join(str(top), *["d" * 250] * levels)


def test_a_class_sub_folder_that_cannot_be_read_is_refused_not_dropped(tmp_path):
    """os.walk skipped a folder it could not list without a word: its images were left out unlisted (a whole class
    became 'empty' when it was the class folder itself, unreadable to the user)."""
    _png(tmp_path / "src" / "a" / "0.png", 10)
    _png(tmp_path / "src" / "b" / "0.png", 20)
    deep = _deep_folder(tmp_path / "src" / "b")
    with pytest.raises(InputError) as err:
        ImageFolderSource(tmp_path / "src")
    message = str(err.value)  # the first folder down there whose path is too long
    assert message.startswith(f"Folder {tmp_path / 'src' / 'b' / 'ddd'}")
    assert deep.startswith(message[len("Folder "):message.index(" cannot be read (")])
    assert message.endswith(" (File name too long); its images would be left out: make it readable, or move it out "
                            "of the source.")
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "src"), str(tmp_path / "o.beton"), *RAW])
    assert result.exit_code == 2 and "cannot be read (File name too long)" in result.output, result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*o.beton*"))


def test_ffcv_file_with_label_before_image_yields_images_and_labels(tmp_path):
    from ffcv.fields import IntField, RGBImageField

    rows = [(i % 2, np.full((8, 8, 3), 20 * i, np.uint8)) for i in range(6)]
    _ffcv_write(tmp_path / "f.beton", {"label": IntField(), "image": RGBImageField(write_mode="raw")}, rows)
    (x, y), = list(eval_loader(tmp_path / "f.beton", batch_size=6, res=8, workers=1, mean=(0, 0, 0),
                               std=(1 / 255,) * 3))
    assert x.shape == (6, 3, 8, 8)
    assert y.tolist() == open_beton(tmp_path / "f.beton").labels.tolist()
    assert x[:, 0, 0, 0].round().tolist() == [20.0 * i for i in range(6)]


def test_ffcv_file_with_other_field_types_refused_in_one_sentence(tmp_path):
    from ffcv.fields import BytesField, FloatField, IntField, RGBImageField

    img = np.zeros((8, 8, 3), np.uint8)
    _ffcv_write(tmp_path / "fl.beton", {"image": RGBImageField(), "label": FloatField()}, [(img, 0.0), (img, 1.0)])
    _ffcv_write(tmp_path / "by.beton", {"image": BytesField(), "label": IntField()},
                [(np.zeros(4, np.uint8), 0), (np.zeros(4, np.uint8), 1)])
    assert run("info", tmp_path / "fl.beton").exit_code == 0  # shown, without classes
    result = run("train", tmp_path / "fl.beton", "--arch", "resnet_tiny", "-o", tmp_path / "m.pt")
    assert result.exit_code == 2 and "FloatField" in result.output
    result = run("train", tmp_path / "by.beton", "--arch", "resnet_tiny", "--batch-size", "2",
                 "-o", tmp_path / "m.pt")
    assert result.exit_code == 2 and "BytesField" in result.output


def test_metadata_of_every_ffcv_field_type_read_as_ffcv_reads_it(tmp_path):
    """open_beton lays out the metadata rows itself (importing FFCV costs seconds): for a file holding all seven
    FFCV field types, its table equals FFCV's own Reader's, column for column."""
    import torch
    from ffcv.fields import BytesField, FloatField, IntField, JSONField, NDArrayField, RGBImageField, TorchTensorField
    from ffcv.reader import Reader

    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "weight": FloatField(),
              "blob": BytesField(), "emb": NDArrayField(np.dtype("float32"), (3,)), "meta": JSONField(),
              "t": TorchTensorField(torch.int16, (2,))}
    rows = [(np.full((8, 8, 3), i, np.uint8), i % 2, i / 3, np.arange(i + 1, dtype=np.uint8),
             np.full(3, i, np.float32), {"i": i}, torch.full((2,), i, dtype=torch.int16)) for i in range(5)]
    _ffcv_write(tmp_path / "all.beton", fields, rows)
    ours, theirs = open_beton(tmp_path / "all.beton").metadata, Reader(str(tmp_path / "all.beton")).metadata
    assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes()
    assert open_beton(tmp_path / "all.beton").labels.tolist() == [0, 1, 0, 1, 0]
    assert run("info", tmp_path / "all.beton").exit_code == 0


def test_stale_sidecar_refused(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((6, 8, 8), np.uint8), labels=np.arange(6) % 3)
    np.savez(tmp_path / "b.npz", images=np.zeros((6, 8, 8), np.uint8), labels=np.arange(6) % 2)
    assert run("convert", tmp_path / "a.npz", tmp_path / "a.beton", *RAW).exit_code == 0
    assert run("convert", tmp_path / "b.npz", tmp_path / "b.beton", *RAW).exit_code == 0
    os.replace(tmp_path / "b.beton", tmp_path / "a.beton")  # a.beton.json now describes another file
    result = run("train", tmp_path / "a.beton", "--arch", "resnet_tiny", "-o", tmp_path / "m.pt")
    assert result.exit_code == 2 and "does not describe" in result.output and not (tmp_path / "m.pt").exists()
    info = json.loads(run("info", tmp_path / "a.beton", "--json").output)  # info shows the file without it
    assert info["sidecar_ignored"] and info["sidecar_matches"] is False and info["num_classes"] == 2
    assert "its per-class counts differ" in info["sidecar_problem"]
    assert "shown without it" in run("info", tmp_path / "a.beton").output
    json.loads((tmp_path / "a.beton.json").read_text())  # left as it was
    # a sidecar without per-class counts is still checked against the file's sample count
    side = {k: v for k, v in read_sidecar(tmp_path / "a.beton").items() if k != "class_counts"}
    write_sidecar(tmp_path / "a.beton", {**side, "num_samples": 7})
    with pytest.raises(InputError, match="it records 7 samples, the file holds 6"):
        open_beton(tmp_path / "a.beton")


@pytest.mark.parametrize("key, value, want", [("digests", "x", "an object"), ("class_counts", ["2", 2, 2],
                                                                                    "a list of integers"),
                                               ("num_classes", True, "an integer")])
def test_a_damaged_sidecar_entry_is_named_not_an_internal_error(tmp_path, key, value, want):
    """A hand-edited or damaged sidecar ('digests': "x") stopped verify and info with 'internal error:
    AttributeError' (exit 1); each entry commands read is now checked for its type when the sidecar is read."""
    np.savez(tmp_path / "a.npz", images=np.zeros((6, 8, 8), np.uint8), labels=np.arange(6) % 3)
    assert run("convert", tmp_path / "a.npz", tmp_path / "a.beton", *RAW).exit_code == 0
    side = json.loads((tmp_path / "a.beton.json").read_text())
    (tmp_path / "a.beton.json").write_text(json.dumps({**side, key: value}))
    sentence = (f"Error: Sidecar {tmp_path / 'a.beton.json'} is damaged: its {key!r} is not {want}; delete it or "
                "re-create the .beton.")
    for command in ("info", "verify"):
        result = CliRunner().invoke(cli, [command, str(tmp_path / "a.beton")])
        assert result.exit_code == 2 and result.output.strip() == sentence, result.output


def test_imagefolder_order_does_not_follow_the_directory_listing_order(tmp_path, monkeypatch):
    """A folder reached twice (a sub-folder and a link to it) is read under the name sorted first, whatever order
    the file system lists sub-folders in (ext4 lists by a per-file-system hash, tmpfs newest first): the sample
    order, the .beton's bytes and its fingerprint are those of the tree, not of the disk it was copied to."""
    from dptool.beton import fingerprint

    for i in range(3):
        _png(tmp_path / f"src/a/sub/{i}.png", 10 * i)
    os.symlink("sub", tmp_path / "src/a/alias")
    _png(tmp_path / "src/a/b.png", 100)
    _png(tmp_path / "src/c/0.png", 200)
    real_walk = os.walk

    def walk(order):
        def listed(top, **kwargs):
            for here, dirs, names in real_walk(top, **kwargs):
                dirs.sort(reverse=order == "reversed")  # in place: os.walk descends in the list's order
                yield here, dirs, names
        return listed

    paths, files = {}, {}
    for order in ("sorted", "reversed"):
        monkeypatch.setattr(os, "walk", walk(order))
        src = ImageFolderSource(tmp_path / "src")
        paths[order] = [os.path.relpath(src.path(i), tmp_path / "src") for i in range(len(src))]
        files[order] = tmp_path / f"{order}.beton"
        assert run("convert", tmp_path / "src", files[order], *RAW).exit_code == 0
    assert paths["sorted"] == paths["reversed"] == ["a/alias/0.png", "a/alias/1.png", "a/alias/2.png", "a/b.png",
                                                    "c/0.png"]
    assert files["sorted"].read_bytes() == files["reversed"].read_bytes()
    assert fingerprint(files["sorted"]) == fingerprint(files["reversed"])


def test_a_broken_link_among_the_class_folders_is_refused_not_dropped(tmp_path):
    """A class folder that is a link to a disk not mounted (or a folder moved away) was left out without a word:
    the classes after it took its label, so the file's labels differed from a conversion made while it was there.
    A class folder that is a working link is read as any other."""
    _png(tmp_path / "src/a/0.png", 10)
    _png(tmp_path / "elsewhere/b/0.png", 20)
    os.symlink(tmp_path / "elsewhere/b", tmp_path / "src/b")
    _png(tmp_path / "src/d/0.png", 40)
    assert run("convert", tmp_path / "src", tmp_path / "ok.beton", *RAW).exit_code == 0
    assert read_sidecar(tmp_path / "ok.beton")["class_names"] == ["a", "b", "d"]
    os.symlink(tmp_path / "unmounted/c", tmp_path / "src/c")
    result = run("convert", tmp_path / "src", tmp_path / "o.beton", *RAW)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip() == (
        f"Error: Source folder {tmp_path / 'src'} holds the broken link 'c' (to {tmp_path / 'unmounted/c'}): as a "
        "class folder, its class would be left out and the labels of the classes after it shifted; repair the link "
        "(mount its disk, say) or remove it."), result.output
    assert not list(tmp_path.glob("*o.beton*"))


def test_names_that_are_not_utf8_are_printed_as_their_bytes(tmp_path):
    """A class folder and a file named in Latin-1 (an old archive's 'café', 'résumé'): the conversion and `info`
    printed them through a stdout that refuses the surrogates Python holds such names as, and ended in 'internal
    error: UnicodeEncodeError' (exit 1) after the file was written; they are printed as the bytes they are, as ls
    does, and the file is read as any other."""
    root = os.fsencode(tmp_path / "src")
    _png(os.path.join(root, b"caf\xe9", b"0.png"), 10)
    _png(os.path.join(root, b"tea", b"0.png"), 20)
    with open(os.path.join(root, b"caf\xe9", b"r\xe9sum\xe9.txt"), "wb") as f:
        f.write(b"notes")
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "src"), str(tmp_path / "o.beton"), *RAW])
    assert result.exit_code == 0, result.output
    assert os.path.join(root, b"caf\xe9", b"r\xe9sum\xe9.txt") + b": not a readable image" in result.stdout_bytes
    assert read_sidecar(tmp_path / "o.beton")["class_counts"] == [1, 1]
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "o.beton")])
    assert result.exit_code == 0 and b" caf\xe9\n" in result.stdout_bytes, result.output


def test_what_imagenet_s_own_odd_files_become(tmp_path):
    """ImageNet's train set holds 22 CMYK JPEGs (Adobe's inverted CMYK) and a PNG named .JPEG; class folders may
    hold a .DS_Store; a class folder name may hold spaces and any Unicode. Each CMYK and greyscale JPEG is read
    as the RGB it shows, the PNG by its content (exactly), the .DS_Store left out, and the names kept as they are."""
    from dptool.beton import read_image

    colour = np.zeros((16, 16, 3), np.uint8)
    colour[...] = (200, 50, 120)
    os.makedirs(tmp_path / "src/n01 with space")
    os.makedirs(tmp_path / "src/n02 caf\u00e9 \u2615")
    Image.fromarray(colour).convert("CMYK").save(tmp_path / "src/n01 with space/cmyk.JPEG", quality=100)
    assert b"Adobe" in (tmp_path / "src/n01 with space/cmyk.JPEG").read_bytes()  # the marker ImageNet's carry
    Image.fromarray(colour).save(tmp_path / "src/n01 with space/png.JPEG", format="PNG")
    Image.fromarray(colour).convert("L").save(tmp_path / "src/n02 caf\u00e9 \u2615/gray.JPEG", quality=100)
    (tmp_path / "src/n02 caf\u00e9 \u2615/.DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(100))
    result = run("convert", tmp_path / "src", tmp_path / "o.beton", *RAW, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["skipped"] == [], result.output
    beton = open_beton(tmp_path / "o.beton")
    assert beton.class_names == ["n01 with space", "n02 caf\u00e9 \u2615"]
    assert beton.num_samples == 3
    by_label = sorted(((int(beton.labels[i]), read_image(beton, i).astype(int)) for i in range(3)), key=lambda t: t[0])
    gray = int(np.asarray(Image.fromarray(colour).convert("L"))[0, 0])
    assert by_label[2][0] == 1 and (by_label[2][1] == gray).all()
    first, second = by_label[0][1], by_label[1][1]  # the PNG exact, the CMYK JPEG within its rounding
    png, cmyk = (first, second) if (first == colour).all() else (second, first)
    assert (png == colour).all() and np.abs(cmyk - colour).max() <= 2
    assert "n02 caf\u00e9 \u2615" in run("info", tmp_path / "o.beton").output


@pytest.mark.parametrize("command", [["info"], ["bench", "loader"], ["bench", "pretrain"]])
def test_an_image_folder_given_for_a_file_names_what_is_accepted(tmp_path, command):
    """The image folder where its converted .beton belongs (or, for `info`, any file it reads) said only
    'src is not a file.'"""
    _png(tmp_path / "src" / "cat" / "0.png", 10)
    result = CliRunner().invoke(cli, [*command, str(tmp_path / "src")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{tmp_path / 'src'} is a folder" in result.output
    want = (f"`dptool convert {tmp_path / 'src'} OUT.beton`" if command != ["info"] else
            "info reads .beton files, dptool scores files, checkpoints and train or finetune logs")
    assert want in result.output, result.output
