"""`dptool convert --resume`: a conversion interrupted (SIGKILL, Ctrl-C, an error) continues to the bytes of an
uninterrupted one, whatever the workers; a resume of another source or options is refused; the partial file is
never taken for an output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dptool._ffcv import import_ffcv
from dptool.beton import read_sidecar
from dptool.cli.main import cli
from dptool.convert import WriterParams, convert, partial_paths
from dptool.errors import InputError
from dptool.loaders import usable_cpus
from dptool.synthetic import separable_images, write_image_folder
from dptool.writer import SkipSample, write_beton
from dptool.writer_progress import Checkpoints, read_checkpoint

OPTIONS = ["--max-res", "48", "--write-mode", "proportion", "--compress-prob", "0.5"]
PARAMS = WriterParams(max_resolution=48, write_mode="proportion", compress_probability=0.5, num_workers=1)
ENV = "DPTOOL_CONVERT_CHECKPOINT_SECONDS"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder of 1,600 JPEGs: a few seconds to convert, long enough to be interrupted half way."""
    root = tmp_path_factory.mktemp("resume") / "src"
    images, labels = separable_images(4, 400, 64, seed=3)
    write_image_folder(root, images, labels, ["a", "b", "c", "d"], ext="jpg")
    return root


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> bytes:
    """The uninterrupted conversion, one worker."""
    out = tmp_path_factory.mktemp("ref") / "ref.beton"
    convert(folder, out, params=PARAMS)
    return out.read_bytes()


def _start(folder: Path, out: Path, workers: int) -> subprocess.Popen:
    """A conversion in its own process group, recording its progress after every chunk."""
    return subprocess.Popen(
        [sys.executable, "-m", "dptool", "convert", str(folder), str(out), *OPTIONS, "--workers", str(workers)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, ENV: "0"},
    )


def _interrupt(proc: subprocess.Popen, out: Path, sig: int, at_least: int = 100) -> str:
    """Send `sig` to the conversion's process group once its progress record holds `at_least` samples; its
    stderr."""
    _, state_path = partial_paths(out)
    deadline = time.monotonic() + 120
    state = None
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            state = read_checkpoint(state_path)
        except InputError:  # replaced while read
            state = None
        if state is not None and state["done"] >= at_least:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the conversion ended before it could be interrupted"
    os.killpg(proc.pid, sig)
    return proc.communicate(timeout=60)[1]


def test_sigkill_then_resume_with_other_workers_is_byte_identical(folder, reference, tmp_path):
    """kill -9 of the whole process group mid-write; garbage written after the record (as a killed run may leave:
    chunks placed but not recorded) is cut away; the resume with another worker count ends on the reference's
    bytes, fingerprint and sidecar."""
    out = tmp_path / "out.beton"
    partial, state_path = partial_paths(out)
    proc = _start(folder, out, workers=2)
    _interrupt(proc, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and partial.exists() and state_path.exists()
    state = read_checkpoint(state_path)
    assert 0 < state["done"] < 1600
    position = state["offset"] + state["page"] * (1 << 21) + state["used"]
    page_end = state["offset"] + (state["page"] + 1) * (1 << 21)
    start = max(position, page_end - 300_000)
    with open(partial, "r+b") as f:  # garbage after the recorded data: where the resume writes, and in the tail of
        f.seek(start)                 # the page, which no sample fills (zero in an uninterrupted file)
        f.write(b"\xab" * (page_end - start))
    assert run("convert", folder, out, *OPTIONS, "--workers", 1, "--resume").exit_code == 0
    assert out.read_bytes() == reference
    assert not partial.exists() and not state_path.exists()
    side = read_sidecar(out)
    assert side["num_samples"] == 1600 and side["class_counts"] == [400] * 4


def test_ctrl_c_keeps_the_partial_and_resume_continues(folder, reference, tmp_path):
    """Ctrl-C exits 130 naming the kept partial; a rerun without --resume is refused (not started over
    silently); with --resume (and two workers, as many as convert may use on two CPUs) it ends on the reference's
    bytes."""
    out = tmp_path / "out.beton"
    partial, state_path = partial_paths(out)
    proc = _start(folder, out, workers=1)
    err = _interrupt(proc, out, signal.SIGINT)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"kept in {partial}" in err and "--resume" in err, err
    assert not out.exists() and partial.exists() and state_path.exists()
    again = run("convert", folder, out, *OPTIONS)
    assert again.exit_code == 2 and "--resume" in again.output and "interrupted conversion" in again.output
    assert partial.exists() and state_path.exists()
    workers = min(2, usable_cpus())  # another count than the interrupted run's where the CPUs allow it
    assert run("convert", folder, out, *OPTIONS, "--workers", workers, "--resume").exit_code == 0
    assert out.read_bytes() == reference


BROKEN_MTIME = 1_700_000_000_000_000_000


def _put_broken(folder: Path) -> Path:
    """A file that cannot be read, last in the listing, always with the same size and modification time."""
    bad = folder / "d" / "zz_broken.jpg"
    bad.write_bytes(b"not a jpeg")
    os.utime(bad, ns=(BROKEN_MTIME, BROKEN_MTIME))
    return bad


def _failed_half_way(folder: Path, out: Path, monkeypatch) -> dict:
    """A conversion stopped by an error half way (a file that cannot be read, under --on-error fail), its progress
    recorded after every chunk: the partial is kept, as after a kill."""
    monkeypatch.setenv(ENV, "0")
    order = np.random.default_rng(0).permutation(1601)
    assert list(order).index(1600) > 200  # the broken file (last in the listing) comes well after a few chunks
    bad = _put_broken(folder)
    try:
        with pytest.raises(InputError, match="zz_broken.jpg"):
            convert(folder, out, params=PARAMS, on_error="fail")
    finally:
        bad.unlink()
    state = read_checkpoint(partial_paths(out)[1])
    assert state is not None and 0 < state["done"] < 1601
    return state


def test_resume_refuses_another_source_or_options(folder, tmp_path, monkeypatch):
    """Each change is named; the partial and its record are left as they were."""
    out = tmp_path / "out.beton"
    partial, state_path = partial_paths(out)
    _failed_half_way(folder, out, monkeypatch)
    before = partial.read_bytes()
    bad = _put_broken(folder)  # the same source as the interrupted run: only the option differs
    try:
        for extra, named in ((["--max-res", "40"], "the writer options"), (["--seed", "1"], "--seed"),
                             (["--on-error", "skip"], "--on-error"), (["--write-mode", "jpg"], "the writer options")):
            options = ["--on-error", "fail", *OPTIONS, "--workers", 1, "--resume", *extra]
            result = run("convert", folder, out, *options)
            assert result.exit_code == 2 and f"but {named}" in result.output, result.output
            assert "changed since" in result.output and "the source" not in result.output, result.output
        os.utime(bad, ns=(1, 1))  # the file rewritten: the same size, another modification time
        result = run("convert", folder, out, "--on-error", "fail", *OPTIONS, "--resume")
        assert result.exit_code == 2 and "but the source (its files" in result.output, result.output
    finally:
        bad.unlink()
    result = run("convert", folder, out, "--on-error", "fail", *OPTIONS, "--resume")  # a file less
    assert result.exit_code == 2 and "but the source (its files" in result.output, result.output
    assert partial.read_bytes() == before and state_path.exists() and not out.exists()


def test_a_partial_is_never_taken_for_an_output(folder, reference, tmp_path, monkeypatch):
    """The partial file's header is left zero until the end: verify, info and the other readers refuse it. A
    later run writing the same output does not sweep it away; --force without --resume starts over."""
    out = tmp_path / "out.beton"
    partial, state_path = partial_paths(out)
    _failed_half_way(folder, out, monkeypatch)
    assert partial.name == ".out.beton.partial"
    for command in (("verify", partial), ("info", partial)):
        result = run(*command)
        assert result.exit_code == 2 and "not a usable file" in result.output, result.output
    bad = _put_broken(folder)
    try:  # the same source and options as the interrupted run: resumed, it fails on the same file again
        result = run("convert", folder, out, *OPTIONS, "--workers", 1, "--on-error", "fail", "--resume")
    finally:
        bad.unlink()
    assert result.exit_code == 2 and "zz_broken.jpg" in result.output and partial.exists()
    monkeypatch.delenv(ENV)
    assert run("convert", folder, out, *OPTIONS, "--workers", 2, "--force").exit_code == 0
    assert out.read_bytes() == reference and not partial.exists() and not state_path.exists()


def test_info_and_verify_name_a_partial_and_its_record(folder, tmp_path, monkeypatch):
    """A user who finds the hidden partial file or its record learns what it is, how far it got and what to do (one
    sentence, exit 2), from info and verify alike; with an unreadable record or none, what is left to do."""
    out = tmp_path / "out.beton"
    partial, state_path = partial_paths(out)
    state = _failed_half_way(folder, out, monkeypatch)
    done = f"({state['done']} of 1601 samples done)"
    for path, what in ((partial, "the partial file"), (state_path, "the progress record")):
        for command in ("info", "verify"):
            result = run(command, path)
            assert result.exit_code == 2 and "Traceback" not in result.output, result.output
            assert f"{path} is {what} of an interrupted conversion to {out} {done}, not a usable file" \
                in result.output, result.output
            assert "with --resume to continue it, or with --force instead" in result.output, result.output
    record = state_path.read_bytes()
    state_path.write_bytes(record[:100])
    result = run("info", partial)
    assert result.exit_code == 2 and f"its progress record {state_path.name} cannot be read" in result.output
    assert "--resume" not in result.output and "with --force to start over" in result.output, result.output
    state_path.unlink()
    result = run("verify", partial)
    assert result.exit_code == 2 and "with no progress record to continue from" in result.output, result.output
    state_path.write_bytes(record)
    partial.unlink()
    result = run("info", state_path)
    assert result.exit_code == 2 and f"its partial file {partial.name} is gone" in result.output, result.output
    partial.write_bytes(b"")
    result = run("info", partial)
    assert result.exit_code == 2 and f"its partial file {partial.name} is empty" in result.output, result.output
    other = tmp_path / "other.partial"  # not named as a partial (no leading dot): as any other file
    other.write_bytes(bytes(4096))  # a zero header, as a partial has
    result = run("info", other)
    assert result.exit_code == 2 and "not a .beton;" in result.output, result.output


def test_resume_without_a_partial_starts_from_the_beginning(folder, reference, tmp_path):
    out = tmp_path / "out.beton"
    assert run("convert", folder, out, *OPTIONS, "--workers", 2, "--resume").exit_code == 0
    assert out.read_bytes() == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.beton", "out.beton.digests.npy", "out.beton.json"]


def test_a_second_run_on_the_same_output_is_refused_while_one_runs(folder, tmp_path):
    out = tmp_path / "out.beton"
    proc = _start(folder, out, workers=1)
    try:
        deadline = time.monotonic() + 60
        while not partial_paths(out)[1].exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None
        result = run("convert", folder, out, *OPTIONS, "--resume")
        assert result.exit_code == 2 and "Another dptool is converting" in result.output
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert json.loads(json.dumps(read_checkpoint(partial_paths(out)[1])["done"])) > 0


class _Skipping:
    """A dataset whose every 7th sample cannot be read (SkipSample): the file keeps room for their metadata rows,
    which must stay zero."""

    def __init__(self):
        self.images, self.labels = separable_images(4, 60, 40, seed=9)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        if index % 7 == 3:
            raise SkipSample(f"sample {index} is unreadable")
        return self.images[index], int(self.labels[index])


def _record(tmp_path: Path) -> Checkpoints:
    return Checkpoints(tmp_path / "record.npz", identity="run", every_seconds=0)


def test_a_write_stopped_by_its_caller_resumes_over_garbage_to_the_same_bytes(tmp_path):
    """Stopped half way (the caller's on_skip raises, as --on-error fail does), the metadata rows after those
    recorded and the data after the record overwritten with garbage: the resume (other workers) gives the bytes of
    an uninterrupted write, skipped samples' room in the metadata zero, and the same skip list."""
    data = _Skipping()
    order = np.random.default_rng(1).permutation(len(data))
    params = WriterParams(max_resolution=40, write_mode="jpg", num_workers=2, page_size=1 << 21)
    expected_skips = write_beton(data, tmp_path / "ref.beton", order, params)
    reference = (tmp_path / "ref.beton").read_bytes()

    heard = []

    def stop_late(index, reason):
        heard.append(index)
        if len(heard) == 20:
            raise KeyboardInterrupt

    partial = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        write_beton(data, partial, order, params, on_skip=stop_late, checkpoints=_record(tmp_path))
    state = read_checkpoint(tmp_path / "record.npz")
    assert 0 < state["done"] < len(order) and state["skipped"]
    position = state["offset"] + state["page"] * (1 << 21) + state["used"]
    types = import_ffcv("ffcv.types")
    rows_at = types.HeaderType.itemsize + 2 * types.FieldDescType.itemsize  # after the header and descriptors
    row = types.get_metadata_type(list(params.fields().values())).itemsize
    with open(partial, "r+b") as f:
        f.seek(rows_at + row * state["kept"])  # garbage over every metadata row not recorded
        f.write(b"\xee" * (row * (len(order) - state["kept"])))
        f.seek(position)
        f.write(b"\xab" * 100_000)
    resumed = Checkpoints(tmp_path / "record.npz", identity="run", every_seconds=0,
                          resume_from=read_checkpoint(tmp_path / "record.npz"))
    skips = write_beton(data, partial, order, replace(params, num_workers=3), checkpoints=resumed)
    assert partial.read_bytes() == reference
    assert skips == expected_skips


def test_a_record_of_the_whole_write_finishes_it_without_encoding_again(tmp_path):
    """The record made once every sample is written (before the tables and header, and the read-back of a
    conversion): a resume from it only writes the tables and the header, over a file whose end is garbage."""
    data = _Skipping()
    order = np.arange(len(data))
    params = WriterParams(max_resolution=40, write_mode="raw", num_workers=2)
    path = tmp_path / "x.beton"
    write_beton(data, path, order, params, checkpoints=_record(tmp_path))
    reference = path.read_bytes()
    state = read_checkpoint(tmp_path / "record.npz")
    assert state["done"] == len(order)
    with open(path, "r+b") as f:
        f.write(b"\xff" * 64)  # the header
        f.seek(len(reference) - 100)
        f.write(b"\xab" * 5000)  # the allocation table, and past the end
    skipped = write_beton(_Unreadable(), path, order, params,
                          checkpoints=Checkpoints(tmp_path / "record.npz", "run", resume_from=state))
    assert path.read_bytes() == reference and len(skipped) == len(state["skipped"])


class _Unreadable:
    """A dataset that may not be read at all: a resume from a record of the whole write must not."""

    def __len__(self):
        return 240

    def __getitem__(self, index):
        raise AssertionError("read again")


def test_a_missing_output_with_an_interrupted_conversion_beside_it_says_how_to_finish_it(folder, tmp_path,
                                                                                         monkeypatch):
    """`info out.beton` (or any command reading it) where only the hidden `.out.beton.partial` is: 'does not
    exist' alone left the user to find the partial and the resume; now one sentence says both (exit 2)."""
    out = tmp_path / "out.beton"
    partial, _ = partial_paths(out)
    state = _failed_half_way(folder, out, monkeypatch)
    scores = tmp_path / "s.json"
    scores.write_text("{}")
    for command in (("info", out), ("verify", out), ("prune", out, "--scores", scores, "--ratio", "0.5", "-o",
                                                       tmp_path / "p.beton"),
                    ("score", "--method", "random", "--source", out, "-o", scores, "--force"),
                    ("train", out, "-o", tmp_path / "m.pt", "--arch", "resnet_tiny", "--epochs", "1")):
        result = run(*command)
        assert result.exit_code == 2 and "Traceback" not in result.output, (command, result.output)
        assert f"{out} does not exist yet; {partial} is the partial file of an interrupted conversion to {out} " \
               f"({state['done']} of 1601 samples done)" in " ".join(result.output.split()), (command, result.output)
        assert "with --resume to continue it" in result.output, (command, result.output)
    assert not out.exists() and partial.exists() and not (tmp_path / "m.pt").exists()
