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
from dptool.cli.main import cli
from dptool.errors import InputError


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@contextlib.contextmanager
def _unwritable(folder):
    """Make `folder` unwritable for this process (chmod, or as root `chattr +i`), or skip the test."""
    folder.chmod(0o555)
    flagged = False
    try:
        if os.access(folder, os.W_OK):  # root ignores modes: an immutable folder stops it too
            flagged = shutil.which("chattr") is not None and subprocess.run(
                ["chattr", "+i", str(folder)], capture_output=True).returncode == 0
            if not flagged:
                pytest.skip("cannot make a folder unwritable here (root without chattr)")
        yield folder
    finally:
        if flagged:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


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
