"""`dptool convert` of ImageNet's tar files as downloaded, read in place (`dptool.tar_source`): a tar of one tar a class
(ILSVRC2012_img_train.tar) or of an ImageFolder tree gives the .beton of the extracted tree, byte for byte; the flat
val tar is a label list's image folder; a compressed, cut, empty or flat tar is refused in one sentence; an
interrupted conversion of a tar resumes, and one of a changed tar is refused."""

from __future__ import annotations

import gc
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from tarfile import BLOCKSIZE as BLOCK

import numpy as np
import pytest
from PIL import Image
from test_convert_devkit import _devkit, _val
from test_convert_lists import run
from test_convert_resume import ENV, OPTIONS, PARAMS, _interrupt

from dptool.beton import read_sidecar
from dptool.convert import WriterParams, convert, partial_paths
from dptool.errors import InputError
from dptool.readers import ImageFolderSource, UnreadableImage
from dptool.synthetic import separable_images, write_image_folder
from dptool.tar_source import TarSource
from dptool.writer_progress import read_checkpoint

RAW = WriterParams(max_resolution=32, write_mode="raw", num_workers=2)
CLASSES = ["n02", "n01", "n03", "n04"]  # not in sorted order: the labels must be the sorted names'


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tree(root: Path) -> Path:
    """An ImageFolder with what ImageFolder reads and leaves: JPEGs and PNGs, a nested folder, hidden files
    (.DS_Store, AppleDouble ._x), a corrupt image, a zero-byte one, an empty class folder (n04)."""
    rng = np.random.default_rng(5)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        if name == "n04":
            continue
        for i in range(6):
            ext = "JPEG" if i % 2 else "png"
            image = rng.integers(0, 256, (10 + i, 12 + c, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / name / f"{name}_{5 - i}.{ext}")
        (root / name / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (root / name / f"._{name}_1.JPEG").write_bytes(b"\0\5\26\7AppleDouble")
    (root / "n01" / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(root / "n01" / "sub" / "deep.JPEG")
    (root / "n02" / "n02_9.JPEG").write_bytes(b"not a jpeg")
    (root / "n03" / "n03_9.JPEG").write_bytes(b"")
    return root


def _tree_tar(folder: Path, out: Path) -> Path:
    """`tar -cf out train/`: one top folder, folder members included."""
    with tarfile.open(out, "w") as tar:
        tar.add(folder, arcname="train")
    return out


def _tar_of_tars(folder: Path, out: Path) -> Path:
    """ILSVRC2012_img_train.tar's shape: a member NAME.tar per class folder, holding its files (members in reverse
    order: the images are sorted by name, not taken in the tar's order)."""
    with tarfile.open(out, "w") as outer:
        for class_dir in sorted(folder.iterdir(), reverse=True):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for path in sorted(class_dir.rglob("*"), reverse=True):
                    if path.is_file():
                        tar.add(path, arcname=str(path.relative_to(class_dir)))
            _add(outer, f"{class_dir.name}.tar", inner.getvalue())
    return out


def _loaded(source, index):
    try:
        return source.load(index)
    except UnreadableImage as exc:
        return str(exc).split(" (")[0]  # the reason's kind: a file's names its path, a member's bytes do not


def test_a_tar_of_tars_and_a_tree_s_tar_give_the_extracted_tree_s_file(tmp_path):
    """The same images from the folder, a tar of its tree and a tar of one tar a class: the same classes, labels,
    pixels and skipped images, and byte-identical .beton files (two forked workers read the tars)."""
    folder = _tree(tmp_path / "train")
    tars = [_tree_tar(folder, tmp_path / "tree.tar"), _tar_of_tars(folder, tmp_path / "ILSVRC2012_img_train.tar")]
    reference = ImageFolderSource(folder)
    assert reference.class_names == sorted(CLASSES) and len(reference) == 6 * 3 + 3
    for tar in tars:
        source = TarSource(tar)
        assert source.class_names == reference.class_names
        np.testing.assert_array_equal(source.labels, reference.labels)
        for i in range(len(reference)):
            mine, theirs = _loaded(source, i), _loaded(reference, i)
            assert type(mine) is type(theirs) and np.array_equal(mine, theirs), (i, source.describe(i))
        again = pickle.loads(pickle.dumps(source))  # a spawned worker's copy opens the tar for itself
        np.testing.assert_array_equal(again.load(1), reference.load(1))
    assert TarSource(tars[1]).describe(0) == f"{tars[1]}:n01.tar/n01_0.JPEG"
    assert TarSource(tars[0]).describe(len(reference) - 1) == f"{tars[0]}:train/n03/n03_9.JPEG"

    convert(folder, tmp_path / "folder.beton", params=RAW)
    expected = (tmp_path / "folder.beton").read_bytes()
    for tar in tars:
        out = tmp_path / f"{tar.stem}.beton"
        result = run("convert", tar, out, "--write-mode", "raw", "--max-res", "32", "--workers", "2")
        assert result.exit_code == 0, result.output
        assert out.read_bytes() == expected
        side = read_sidecar(out)
        st = tar.stat()
        assert side["source"] == {"path": str(tar), "format": "tar", "split": None, "tar": {
            "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "layout": "class tars" if tar.name.startswith("ILSVRC") else "class folders"}}
        assert side["class_counts"] == [7, 6, 6, 0] and len(side["skipped"]) == 2
        assert {s["path"].split(":")[0] for s in side["skipped"]} == {str(tar)}
        assert f"source: tar {tar}" in run("info", out).output
    assert set(os.listdir(tmp_path)) == {"train", "tree.tar", "ILSVRC2012_img_train.tar", "folder.beton",
                                         "folder.beton.json", "folder.beton.digests.npy", *(
                                             f"{t}.beton{s}" for t in ("tree", "ILSVRC2012_img_train")
                                             for s in ("", ".json", ".digests.npy"))}  # nothing extracted


def test_format_tar_takes_another_name_and_links_are_left_out_with_a_warning(tmp_path, caplog):
    """A tar named otherwise is read with --format tar; a member tar under one top folder (`tar -cf train.tar
    train_tars/`) is a class; a link member (no image bytes) and a file beside the classes are left out, each
    counted in a warning."""
    images = [np.full((8, 8, 3), v, np.uint8) for v in (10, 200)]
    data = [io.BytesIO() for _ in images]
    for image, b in zip(images, data):
        Image.fromarray(image).save(b, "PNG")
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tar:
        _add(tar, "./b.png", data[1].getvalue())
        _add(tar, "./a.png", data[0].getvalue())
        link = tarfile.TarInfo("./c.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a.png"
        tar.addfile(link)
    path = tmp_path / "images.data"
    with tarfile.open(path, "w") as tar:
        _add(tar, "train_tars/cat.tar", inner.getvalue())
        _add(tar, "train_tars/LICENSE", b"terms")
    caplog.set_level("WARNING")
    source = TarSource(path)
    assert source.class_names == ["cat"] and [source.describe(i).split(":")[1] for i in range(2)] == [
        "train_tars/cat.tar/a.png", "train_tars/cat.tar/b.png"]
    np.testing.assert_array_equal(source.load(1), images[1])
    assert "1 links, sparse files or other non-file members are left out" in caplog.text
    assert "1 files beside the class folders are left out" in caplog.text
    result = run("convert", "--format", "tar", path, tmp_path / "o.beton", "--max-res", "8", "--workers", "1")
    assert result.exit_code == 0, result.output


def test_a_class_met_as_a_tar_and_a_folder_and_an_image_appended_again(tmp_path):
    """A class both a member tar and a folder has the images of both (as extracting both into one folder gives);
    an image appended to the tar again (`tar -rf`) is read as its last copy, as extracting the tar keeps it."""
    images = [np.full((4, 4, 3), v, np.uint8) for v in (10, 80, 150, 220)]
    png = []
    for image in images:
        b = io.BytesIO()
        Image.fromarray(image).save(b, "PNG")
        png.append(b.getvalue())
    inner = _members_tar(tmp_path / "n01.tar", {"a.png": png[0]}).read_bytes()
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("n02/x.png", png[2]), ("n01/b.png", png[1]), ("n01.tar", inner), ("n02/x.png", png[3])):
            _add(tar, name, data)
    source = TarSource(path)
    assert source.class_names == ["n01", "n02"] and source.labels.tolist() == [0, 0, 1]
    assert [source.member(i) for i in range(3)] == ["n01.tar/a.png", "n01/b.png", "n02/x.png"]
    for i, want in enumerate((0, 1, 3)):
        np.testing.assert_array_equal(source.load(i), images[want])


def test_an_image_the_tar_no_longer_holds_whole_is_unreadable(tmp_path):
    """The tar cut after it was indexed (rewritten while a conversion runs): its images past the cut are unreadable
    samples saying so, not a decoder's guess at a shorter file."""
    path = _class_tars(tmp_path / "t.tar")
    source = TarSource(path)
    with open(path, "r+b") as f:
        f.truncate(int(source._offsets[-1]) + 10)
    with pytest.raises(UnreadableImage, match=r"only 10 of its \d+ bytes could be read"):
        source.load(len(source) - 1)
    source.load(0)


def _members_tar(path: Path, members: dict[str, bytes], fmt: str = "w") -> Path:
    with tarfile.open(path, fmt) as tar:
        for name, content in members.items():
            _add(tar, name, content)
    return path


def _png() -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(b, "PNG")
    return b.getvalue()


def _cut(path: Path, where: str) -> Path:
    """Cut `path` inside its member named n02.tar's data, its header, the zero padding after its data, or where
    that padding ends."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar if m.name.endswith("n02.tar"))
    at = {"data": member.offset_data + member.size // 2, "header": member.offset + 100,
          "padding": member.offset_data + member.size + 1,
          "end": member.offset_data + -(-member.size // 512) * 512}[where]
    assert where != "padding" or member.size % 512
    path.write_bytes(path.read_bytes()[:at])
    return path


def _damaged(path: Path) -> Path:
    """Its second member's header overwritten (tarfile takes it for the archive's end, and says nothing)."""
    with tarfile.open(path) as tar:
        second = tar.getmembers()[1]
    data = bytearray(path.read_bytes())
    data[second.offset:second.offset + 512] = b"\x55" * 512
    path.write_bytes(bytes(data))
    return path


def _long_name(path: Path, how: str) -> Path:
    """A GNU tar whose second member's name (over 100 characters) is in a long-name header: the member's own header,
    after it, damaged or cut."""
    long = "c/" + "x" * 120 + ".png"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("c/a.png", long, "c/z.png"):
            _add(tar, name, _png())
    with tarfile.open(path) as tar:
        header = tar.getmember(long).offset_data - BLOCK
    data = bytearray(path.read_bytes())
    if how == "damaged":
        data[header:header + BLOCK] = b"\x55" * BLOCK
    path.write_bytes(bytes(data[:header + 100] if how == "cut" else data))
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _class_tars(path: Path) -> Path:
    inner = _members_tar(path.with_suffix(".in"), {"a.png": _png(), "b.png": _png()}).read_bytes()
    return _members_tar(path, {"n01.tar": inner, "n02.tar": inner})


REFUSALS = {
    "gzip": (lambda p: _members_tar(p.with_suffix(".tar.gz"), {"c/a.png": _png()}, "w:gz"),
             ["tar compressed with gzip", "gunzip -k", "uncompressed tar"]),
    "gzip named .tar": (lambda p: _members_tar(p, {"c/a.png": _png()}, "w:gz"), ["tar compressed with gzip"]),
    "xz": (lambda p: _members_tar(p.with_suffix(".txz"), {"c/a.png": _png()}, "w:xz"),
           ["tar compressed with xz", "unxz -k"]),
    "cut in a member": (lambda p: _cut(_class_tars(p), "data"),
                        ["is cut short (a partial download?): it ends inside its member n02.tar"]),
    "cut after a member": (lambda p: _cut(_class_tars(p), "end"),
                           ["is cut short", "ends after its member n02.tar, at", "end-of-archive block"]),
    "cut in a header": (lambda p: _cut(_class_tars(p), "header"),
                        ["is cut short", "ends in the header after its member n01.tar"]),
    "no images": (lambda p: _members_tar(p, {}), ["holds no images"]),
    "only hidden files": (lambda p: _members_tar(p, {"c/.DS_Store": b"x", "c/._a.png": b"y"}), ["holds no images"]),
    "empty file": (lambda p: _write(p, b""), ["is empty"]),
    "not a tar": (lambda p: _write(p, b"PK\3\4" + b"\x99" * 2000), ["is not a tar archive"]),
    "flat images": (lambda p: _members_tar(p, {"ILSVRC2012_val_00000001.JPEG": _png()}),
                    ["no class folders or member tars", "--format list:ILSVRC2012_devkit_t12.tar.gz"]),
    "cut in padding": (lambda p: _cut(_members_tar(p, {"c/a.png": _png(), "c/n02.tar": _png()}), "padding"),
                       ["is cut short", "ends inside its member c/n02.tar"]),
    "damaged header": (lambda p: _damaged(_members_tar(p, {"c/a.png": _png(), "c/b.png": _png()})),
                       ["holds no tar header at byte", "(after its member c/a.png): it is damaged"]),
    "member tar damaged": (lambda p: _members_tar(p, {"n01.tar": b"\x07" * 1024}),
                           ["train.tar:n01.tar is not a tar archive", "named as a class's tar"]),
    "damaged after a long name": (lambda p: _long_name(p, "damaged"), [
        "holds a damaged tar header at byte 1024 (after its member c/a.png)"]),
    "cut after a long name": (lambda p: _long_name(p, "cut"), [
        "is cut short", "ends in the header after its member c/a.png"]),
    "member tar gzipped": (lambda p: _members_tar(p, {"n01.tar": _members_tar(p.with_suffix(".tgz"), {
        "a.png": _png()}, "w:gz").read_bytes()}), ["train.tar:n01.tar is a tar compressed with gzip",
                                                   "a member tar is read in place uncompressed"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_sentence_with_exit_2(tmp_path, case):
    make, phrases = REFUSALS[case]
    path = make(tmp_path / "train.tar")
    result = run("convert", path, tmp_path / "o.beton", "--workers", "1")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert all(p in " ".join(result.output.split()) for p in phrases), result.output
    assert str(path) in result.output and not (tmp_path / "o.beton").exists()


def test_more_classes_than_a_beton_takes_are_refused(tmp_path, monkeypatch):
    from dptool import tar_source

    monkeypatch.setattr(tar_source, "MAX_CLASSES", 2)
    path = _members_tar(tmp_path / "t.tar", {f"c{i}/a.png": _png() for i in range(3)})
    with pytest.raises(InputError, match=r"holds 3 classes, more than the 2"):
        TarSource(path)


def test_the_val_tar_with_the_devkit_is_read_in_place(tmp_path):
    """ILSVRC2012_img_val.tar as downloaded (flat) with the devkit gives the extracted folder's file, byte for byte;
    an image numbered past the ground truth is named in a warning."""
    _, archive = _devkit(tmp_path)
    _val(tmp_path)
    flat = tmp_path / "ILSVRC2012_img_val.tar"
    with tarfile.open(flat, "w") as tar:
        for path in sorted((tmp_path / "val").iterdir()):
            tar.add(path, arcname=path.name)
        tar.add(path, arcname="ILSVRC2012_val_00000011.JPEG")
    params = WriterParams(max_resolution=32, write_mode="raw", num_workers=1)
    convert(tmp_path / "val", tmp_path / "folder.beton", format=f"list:{archive}", params=params)
    result = run("convert", "--format", f"list:{archive}", flat, tmp_path / "tar.beton", "--write-mode", "raw",
                 "--max-res", "32", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tar.beton").read_bytes() == (tmp_path / "folder.beton").read_bytes()
    assert f"1 images of {flat} are past the 10 lines" in result.output, result.output
    side = read_sidecar(tmp_path / "tar.beton")
    assert side["source"]["path"] == str(flat) and side["source"]["tar"]["layout"] == "images"
    assert side["source"]["label_list"]["path"] == str(archive)



def test_a_tar_under_a_top_folder_with_a_list_of_paths_below_it(tmp_path, caplog):
    """A tar under one top folder with a plain list reads the list's paths below it; a first line whose image the tar
    lacks (the next line's it has) and whose class no other line names is a header; a listed image the tar lacks is
    skipped naming its line; a tar holding none of the listed images is refused as the wrong one."""
    _val(tmp_path)
    params = WriterParams(max_resolution=32, write_mode="raw", num_workers=1)
    caplog.set_level("WARNING")
    topped = tmp_path / "val_top.tar"
    with tarfile.open(topped, "w") as tar:
        tar.add(tmp_path / "val", arcname="val", filter=lambda m: None if m.name.endswith("3.JPEG") else m)
    listing = tmp_path / "list.txt"
    listing.write_text("image_file,synset\n" + "".join(f"ILSVRC2012_val_{i:08d}.JPEG n{i % 2}\n"
                                                          for i in range(1, 11)))
    out = tmp_path / "topped.beton"
    convert(topped, out, format=f"list:{listing}", params=params)
    side = read_sidecar(out)
    assert side["num_samples"] == 9 and side["class_names"] == ["n0", "n1"] and side["skipped"] == [{
        "path": f"{topped}:ILSVRC2012_val_00000003.JPEG", "reason": f"listed at {listing}:4 but not found"}]
    assert f"{listing}:1 ('image_file', 'synset') is taken as a header: its image is not in {topped}" in caplog.text
    with pytest.raises(InputError, match=r"None of the 11 images of .* is in .*wrong.tar .*give the folder \(or tar\)"):
        convert(_members_tar(tmp_path / "wrong.tar", {"other.png": _png()}), tmp_path / "w.beton",
                format=f"list:{listing}", params=params)


@pytest.fixture(scope="module")
def big_tar(tmp_path_factory) -> Path:
    """1,600 JPEGs of 64 px in 4 class tars: a few seconds to convert, long enough to be interrupted half way."""
    root = tmp_path_factory.mktemp("tar_resume")
    images, labels = separable_images(4, 400, 64, seed=3)
    write_image_folder(root / "train", images, labels, ["a", "b", "c", "d"], ext="jpg")
    return _tar_of_tars(root / "train", root / "train.tar")


def test_an_interrupted_tar_conversion_resumes_and_a_changed_tar_is_refused(big_tar, tmp_path):
    """kill -9 half way; the tar touched since (its modification time) is refused naming it; put back, the resume
    (one worker, the killed run had two) ends on the bytes of an uninterrupted conversion."""
    reference = tmp_path / "ref.beton"
    convert(big_tar, reference, params=PARAMS)
    out = tmp_path / "out.beton"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dptool", "convert", str(big_tar), str(out), *OPTIONS, "--workers", "2"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, ENV: "0"})
    _interrupt(proc, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and 0 < read_checkpoint(partial_paths(out)[1])["done"] < 1600
    st = big_tar.stat()
    os.utime(big_tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    result = run("convert", big_tar, out, *OPTIONS, "--workers", 1, "--resume")
    assert result.exit_code == 2 and f"but the tar {big_tar} (its size or modification time) changed since" in \
        " ".join(result.output.split()), result.output
    os.utime(big_tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = run("convert", big_tar, out, *OPTIONS, "--workers", 1, "--resume")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == reference.read_bytes()
    assert not any(p.exists() for p in partial_paths(out))


def _gnu_tar(*args) -> None:
    """Run GNU tar (the tests that need it skip where `tar` is not GNU's)."""
    version = subprocess.run(["tar", "--version"], capture_output=True, text=True, check=False).stdout \
        if shutil.which("tar") else ""
    if "GNU tar" not in version:
        pytest.skip("needs GNU tar")
    subprocess.run(["tar", *args], check=True, capture_output=True)


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_a_sparse_member_is_left_out_with_a_warning_not_taken_for_a_cut(tmp_path, caplog, fmt):
    """`tar --sparse` stores a file's zero blocks as holes: the member's data in the tar is shorter than its size. A
    complete tar holding one is read (the sparse image left out, counted in the warning), not refused as cut short."""
    (tmp_path / "train" / "c").mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 3), 90, np.uint8)).save(tmp_path / "train" / "c" / "a.png")
    black = np.zeros((200, 200, 3), np.uint8)
    black[0] = 255
    bmp = io.BytesIO()
    Image.fromarray(black).save(bmp, "BMP")
    data = bmp.getvalue()
    with open(tmp_path / "train" / "c" / "b.bmp", "wb") as f:  # the zero rows between as a hole
        f.write(data[:4096])
        f.seek(len(data) - 4096)
        f.write(data[-4096:])
    if os.stat(f.name).st_blocks * 512 >= len(data):
        pytest.skip("the file system stores no holes")
    path = tmp_path / "sparse.tar"
    _gnu_tar("-C", str(tmp_path), "--sparse", "--hole-detection=raw", f"--format={fmt}", "-cf", str(path), "train")
    with tarfile.open(path) as tar:
        assert tar.getmember("train/c/b.bmp").issparse() and path.stat().st_size < 120_000
    caplog.set_level("WARNING")
    source = TarSource(path)
    assert [source.member(i) for i in range(len(source))] == ["train/c/a.png"]
    np.testing.assert_array_equal(source.load(0), np.full((4, 4, 3), 90, np.uint8))
    assert "1 links, sparse files or other non-file members are left out" in caplog.text


def test_a_damaged_extended_header_is_refused_as_damaged(tmp_path):
    """A PAX extended header whose sparse map is damaged (tarfile raises ValueError on it): one sentence naming the
    tar and where, exit 2, not an internal error."""
    path = tmp_path / "train.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "c/a.png", _png())
        info = tarfile.TarInfo("c/b.png")
        info.size = len(_png())
        info.pax_headers = {"GNU.sparse.map": "0,x", "GNU.sparse.size": "9"}
        tar.addfile(info, io.BytesIO(_png()))
    result = run("convert", path, tmp_path / "o.beton", "--workers", "1")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{path} holds a damaged tar header at byte" in " ".join(result.output.split()), result.output
    assert "(after its member c/a.png)" in result.output and not (tmp_path / "o.beton").exists()


def _bmp_tar(path: Path, value: int) -> Path:
    """A tar of one class of two BMPs of one colour (the same bytes' count whatever the colour)."""
    b = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(b, "BMP")
    return _members_tar(path, {"c/a.bmp": b.getvalue(), "c/b.bmp": b.getvalue()})


def _in_a_forked_process(function):
    """What `function()` returns when called in a forked child (as the writer's workers are), nothing pickled."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    queue = context.SimpleQueue()
    child = context.Process(target=lambda: queue.put(function()))
    child.start()
    got = queue.get()
    child.join()
    return got


def test_workers_read_the_tar_indexed_not_one_put_in_its_place(tmp_path):
    """A tar replaced under its name after it was indexed (a download's rename, another `tar -cf` to the same name):
    the forked workers read the file that was indexed, as the parent does; a copy unpickled elsewhere, which opens the
    path, refuses the other file naming it instead of reading its bytes at the old offsets."""
    path = _bmp_tar(tmp_path / "train.tar", 10)
    source = TarSource(path)
    os.replace(_bmp_tar(tmp_path / "other.tar", 200), path)
    assert source.load(0)[0, 0, 0] == 10
    assert _in_a_forked_process(lambda: int(source.load(1)[0, 0, 0])) == 10
    with pytest.raises(InputError, match=rf"{path} is not the file indexed \(it was replaced since\)"):
        pickle.loads(pickle.dumps(source)).load(0)


def test_a_refused_tar_is_closed(tmp_path):
    """A tar refused after its index was read (no class, no image, a flat tar) leaves no descriptor open: a library
    caller trying many files runs out of none."""
    cases = [_members_tar(tmp_path / "flat.tar", {"a.png": _png()}), _members_tar(tmp_path / "none.tar", {}),
             _members_tar(tmp_path / "hidden.tar", {"c/.a.png": _png()})]
    gc.collect()  # earlier tests' sources, closed when collected
    before = set(os.listdir("/proc/self/fd"))
    for path in cases:
        with pytest.raises(InputError):
            TarSource(path)
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("maker", ["tarfile", "gnu"])
def test_a_hard_link_to_an_image_is_read_as_its_target_as_extracting_gives(tmp_path, maker, caplog):
    """A tree with hard-linked images (a subset made with `cp -al`, a deduplicated copy) is archived with the data
    once and a link member for each other name; extracting gives a file at each name, so the tar is read with the
    target's bytes at the link's name, and equals the extracted tree's file. A symbolic link is still left out."""
    folder = _tree(tmp_path / "train")
    os.link(folder / "n01" / "n01_5.png", folder / "n03" / "linked.png")
    os.link(folder / "n02" / "n02_4.JPEG", folder / "n02" / "z_linked.JPEG")
    os.symlink("../n01/n01_1.png", folder / "n03" / "symbolic.png")
    path = tmp_path / "tree.tar"
    if maker == "gnu":
        _gnu_tar("-C", str(tmp_path), "-cf", str(path), "train")
    else:
        _tree_tar(folder, path)
    with tarfile.open(path) as tar:
        assert sum(m.islnk() for m in tar) == 2
    (folder / "n03" / "symbolic.png").unlink()  # the tree read: what extracting gives, but for the symbolic link
    reference = ImageFolderSource(folder)
    caplog.set_level("WARNING")
    source = TarSource(path)
    assert source.class_names == reference.class_names
    np.testing.assert_array_equal(source.labels, reference.labels)
    for i in range(len(reference)):
        mine, theirs = _loaded(source, i), _loaded(reference, i)
        assert type(mine) is type(theirs) and np.array_equal(mine, theirs), (i, source.describe(i))
    assert "1 links, sparse files or other non-file members are left out" in caplog.text


def test_an_uncompressed_tar_named_as_compressed_is_read(tmp_path):
    """A .tar.gz that is an uncompressed tar (a browser or server that undid the gzip on the way, keeping the name) is
    read as the tar its bytes are: `gunzip -k`, which the refusal of a compressed tar says, fails on it."""
    path = _members_tar(tmp_path / "train.tar.gz", {"c/a.png": _png(), "d/b.png": _png()})
    result = run("convert", path, tmp_path / "o.beton", "--workers", "1", "--max-res", "8")
    assert result.exit_code == 0, result.output
    assert read_sidecar(tmp_path / "o.beton")["class_names"] == ["c", "d"]


def test_a_hard_link_to_no_file_of_the_tar_is_left_out_and_counted(tmp_path, caplog):
    """A hard link whose target the tar lacks is left out and counted with the links; one to a hidden file is read
    (extracting it gives a file that is not hidden); the images around them keep their places."""
    path = _members_tar(tmp_path / "t.tar", {"c/.h.png": _png(), "c/a.png": _png()})
    with tarfile.open(path, "a") as tar:
        for name, target in (("c/l1.png", "c/.h.png"), ("c/l2.png", "c/a.png"), ("c/l3.png", "c/gone.png")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.LNKTYPE, target
            tar.addfile(link)
    caplog.set_level("WARNING")
    source = TarSource(path)
    assert [source.member(i) for i in range(len(source))] == ["c/a.png", "c/l1.png", "c/l2.png"]
    np.testing.assert_array_equal(source.load(1), source.load(0))
    np.testing.assert_array_equal(source.load(2), source.load(0))
    assert "1 links, sparse files or other non-file members are left out" in caplog.text


def _val_tar_samples(tmp_path: Path, arcname: str, beside: dict[str, bytes] | None = None) -> int:
    """Ten val images tarred under `arcname` (with the `beside` members), converted with a plain list naming them
    without that folder: the samples the file holds."""
    _val(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG n{i % 2}\n" for i in range(1, 11)))
    val = tmp_path / "val.tar"
    with tarfile.open(val, "w") as tar:
        tar.add(tmp_path / "val", arcname=arcname)
        for name, data in (beside or {}).items():
            _add(tar, name, data)
    out = tmp_path / "val.beton"
    convert(val, out, format=f"list:{listing}", params=WriterParams(max_resolution=32, write_mode="raw",
                                                                    num_workers=1))
    return read_sidecar(out)["num_samples"]


def test_a_tree_tarred_by_its_full_path_is_read_below_every_common_folder(tmp_path):
    """`tar -cf train.tar ~/data/imagenet/train` stores `home/me/data/imagenet/train/n01/...` (tar drops the leading
    '/'): the classes are the folders below the path every member shares, as the tree extracted at that path has them,
    not one class 'me' holding every image. The same for a label list's tar of images."""
    folder = _tree(tmp_path / "train")
    path = tmp_path / "deep.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(folder, arcname="home/me/data/imagenet/train")
    reference = ImageFolderSource(folder)
    source = TarSource(path)
    assert source.class_names == reference.class_names
    np.testing.assert_array_equal(source.labels, reference.labels)

    assert _val_tar_samples(tmp_path, "home/me/val") == 10


def test_a_tree_under_a_hidden_folder_is_read(tmp_path):
    """`tar -cf train.tar ~/.cache/imagenet/train` (a tree in a cache folder): the hidden folder lies above the
    classes, as the folder it is extracted into does, so nothing is hidden; macOS's AppleDouble `._train` beside the
    tree's folder and `._` files beside images are. The same for a label list's tar of images."""
    folder = _tree(tmp_path / "train")
    path = tmp_path / "cached.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(folder, arcname="root/.cache/imagenet/train")
        _add(tar, "root/.cache/imagenet/._train", b"\0\5\26\7AppleDouble")
    reference = ImageFolderSource(folder)
    source = TarSource(path)
    assert source.class_names == reference.class_names
    np.testing.assert_array_equal(source.labels, reference.labels)

    assert _val_tar_samples(tmp_path, ".cache/val", beside={"._val": b"\0\5\26\7AppleDouble"}) == 10


def test_the_command_that_relabels_a_tar_named_otherwise_names_its_format():
    """The refusal of a file with other classes gives the convert command for its source: a tar or an .npz whose name
    `--format auto` does not know needs its `--format` (auto refused 'images.data' as neither)."""
    from types import SimpleNamespace

    from dptool.beton import classes_from_command

    def command(fmt, path):
        return classes_from_command(SimpleNamespace(sidecar={"source": {"format": fmt, "path": path}}), "train.beton")

    tail = " OUT --classes-from train.beton"
    assert command("tar", "/d/images.data") == "dptool convert --format tar /d/images.data" + tail
    assert command("npz", "/d/arrays.bin") == "dptool convert --format npz /d/arrays.bin" + tail
    assert command("tar", "/d/val.TAR") == "dptool convert /d/val.TAR" + tail
    assert command("imagefolder", "/d/val") == "dptool convert /d/val" + tail


def test_opening_a_source_shows_a_bar_when_asked(tmp_path, capsys):
    """Opening ImageNet reads its whole listing before the first image (a tar's headers: 20 s at its count here,
    warm cache; a folder's 1000 class folders; a stat of every listed image): with `progress` a bar on stderr reaches
    its end, for a tar of class tars, a tree's tar, the folder, and a label list over the folder or the tar; none
    without."""
    from dptool.readers import open_source

    tree = _tree(tmp_path / "tree")
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{c}/{f.name} {c}\n" for c in ("n01", "n03") for f in sorted((tree / c).glob("*.png"))))
    cases = [(_tar_of_tars(tree, tmp_path / "t.tar"), "auto", "indexing t.tar"),
             (_tree_tar(tree, tmp_path / "f.tar"), "auto", "indexing f.tar"),
             (tree, "auto", "listing tree"),
             (tree, f"list:{listed}", "looking for the listed images"),
             (tmp_path / "f.tar", f"list:{listed}", "indexing f.tar")]
    for src, fmt, bar in cases:
        source = open_source(src, format=fmt, progress=True)
        err = capsys.readouterr().err
        assert bar in err and "100%" in err, (src, fmt, err)
        assert len(open_source(src, format=fmt)) == len(source)
        assert capsys.readouterr().err == "", (src, fmt)
