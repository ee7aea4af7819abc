"""Output paths are checked before any work: an input's sidecar is never overwritten, even with --force, and a
folder that cannot be written to is named at once rather than when the finished output is renamed into place."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from dptool.atomic import check_output_path
from dptool.beton import read_sidecar
from dptool.cli.main import cli
from dptool.errors import InputError


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@contextlib.contextmanager
def _unwritable(path):
    """Make a folder (or file) unchangeable for this process (chmod, or as root `chattr +i`), or skip the test."""
    mode = path.stat().st_mode & 0o777
    path.chmod(0o555 if path.is_dir() else 0o444)
    flagged = False
    try:
        if os.access(path, os.W_OK):  # root ignores modes: an immutable file or folder stops it too
            flagged = shutil.which("chattr") is not None and subprocess.run(
                ["chattr", "+i", str(path)], capture_output=True).returncode == 0
            if not flagged:
                pytest.skip("cannot make a path unwritable here (root without chattr)")
        yield path
    finally:
        if flagged:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(mode)


@pytest.fixture
def data(tiny_beton, tmp_path):
    beton = tmp_path / "src.beton"
    shutil.copy(tiny_beton, beton)
    shutil.copy(f"{tiny_beton}.json", f"{beton}.json")
    return beton


def test_an_inputs_sidecar_is_refused_as_output_even_with_force(data):
    side = f"{data}.json"
    before = _digest(side)
    with pytest.raises(InputError, match="same file as the sidecar of input"):
        check_output_path(side, force=True, inputs=(data,))
    commands = [
        ["score", "--method", "random", "--source", str(data), "-o", side, "--force"],
        ["train", str(data), "--arch", "resnet_tiny", "--epochs", "1", "-o", side, "--force"],
    ]
    for command in commands:
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2, result.output
        assert "sidecar of input" in result.output and "Traceback" not in result.output
    assert _digest(side) == before


def test_an_unwritable_folder_is_named_before_any_work(data, tiny_beton, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    npz = tiny_beton.with_suffix(".npz")  # the arrays `tiny_beton` was converted from
    with _unwritable(folder):
        with pytest.raises(InputError, match="Cannot write to folder"):
            check_output_path(folder / "out.beton", force=False)
        for command in (["train", str(data), "--arch", "resnet_tiny", "--epochs", "1", "-o", str(folder / "m.pt")],
                        ["convert", str(npz), str(folder / "x.beton")],
                        ["score", "--method", "random", "--source", str(data), "-o", str(folder / "s.json")]):
            result = CliRunner().invoke(cli, command)
            assert result.exit_code == 2, result.output
            assert f"Cannot write to folder {folder}" in result.output, result.output
        assert list(folder.iterdir()) == []
    long = tmp_path / ("n" * 240 + ".beton")  # fits a file name, not with the temporary suffix
    with pytest.raises(InputError, match="is too long: its temporary name"):
        check_output_path(long, force=False)


def test_demo_in_an_unwritable_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    with _unwritable(folder):
        for workdir, phrase in ((folder / "demo", "Cannot create --workdir"), (folder, "Cannot write to folder")):
            result = CliRunner().invoke(cli, ["demo", "--quick", "--workdir", str(workdir)])
            assert result.exit_code == 2 and phrase in result.output, result.output
        assert list(folder.iterdir()) == []


def test_an_output_that_cannot_be_replaced_leaves_no_temporary_file(tiny_beton, tmp_path):
    npz = tiny_beton.with_suffix(".npz")
    out = tmp_path / "x.beton"
    assert CliRunner().invoke(cli, ["convert", str(npz), str(out), "--write-mode", "raw"]).exit_code == 0
    before = _digest(out)
    with _unwritable(out):
        if os.access(tmp_path, os.W_OK) and not os.access(out, os.W_OK) and os.geteuid() != 0:
            pytest.skip("a read-only file in a writable folder can be replaced by its owner")
        result = CliRunner().invoke(cli, ["convert", str(npz), str(out), "--write-mode", "jpg", "--force"])
        assert result.exit_code == 2 and f"Cannot replace {out}" in result.output, result.output
        assert _digest(out) == before and read_sidecar(out)["writer"]["write_mode"] == "raw"  # both untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.beton", "x.beton.json"]
