"""Output paths are checked before any work: an input's sidecar is never overwritten, even with --force, and a
folder that cannot be written to is named at once rather than when the finished output is renamed into place."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

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
    before = (_digest(out), _digest(f"{out}.digests.npy"))
    with _unwritable(out):
        if os.access(tmp_path, os.W_OK) and not os.access(out, os.W_OK) and os.geteuid() != 0:
            pytest.skip("a read-only file in a writable folder can be replaced by its owner")
        result = CliRunner().invoke(cli, ["convert", str(npz), str(out), "--write-mode", "jpg", "--force"])
        assert result.exit_code == 2 and f"Cannot replace {out}" in result.output, result.output
        assert (_digest(out), _digest(f"{out}.digests.npy")) == before  # all three untouched
        assert read_sidecar(out)["writer"]["write_mode"] == "raw"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.beton", "x.beton.digests.npy", "x.beton.json"]


# --- full disks, kills, SIGTERM and concurrent writers -----------------------------------------------------------

def _dptool_with_file_size_limit(limit: int, *args, cwd=None) -> subprocess.CompletedProcess:
    """Run the CLI with RLIMIT_FSIZE: a write past `limit` bytes fails with EFBIG, as a full disk fails with
    ENOSPC (no root, no mount needed)."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "sys.argv = ['dptool', *sys.argv[1:]]; from dptool.cli.main import main; main()")
    import sys
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_a_full_disk_is_one_sentence_and_leaves_nothing(tiny_beton, tmp_path):
    npz = tiny_beton.with_suffix(".npz")
    out = tmp_path / "x.beton"
    result = _dptool_with_file_size_limit(1 << 20, "convert", npz, out, "--write-mode", "raw")
    assert result.returncode == 2, result.stderr
    assert f"Cannot write {out} (File too large)" in result.stderr and "internal error" not in result.stderr
    assert list(tmp_path.iterdir()) == []
    scores = tmp_path / "s.json"
    assert CliRunner().invoke(cli, ["score", "--method", "random", "--source", str(tiny_beton), "-o",
                                    str(scores)]).exit_code == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _dptool_with_file_size_limit(1 << 20, "prune", tiny_beton, "--scores", scores, "--ratios", "0.25,0.5",
                                          "-o", tmp_path / "p_{ratio}.beton")
    assert result.returncode == 2 and "Cannot write" in result.stderr and "Traceback" not in result.stderr, \
        result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_beton_and_its_sidecar_are_placed_together_or_not_at_all(tiny_beton, tmp_path, monkeypatch):
    """A sidecar that cannot be written (a full disk after the body) leaves neither file, and with --force the
    old pair untouched: never a new .beton beside the old sidecar, nor one without a sidecar."""
    import dptool.sidecar

    npz = tiny_beton.with_suffix(".npz")
    out = tmp_path / "x.beton"
    assert CliRunner().invoke(cli, ["convert", str(npz), str(out), "--write-mode", "raw"]).exit_code == 0
    trio = (_digest(out), _digest(f"{out}.json"), _digest(f"{out}.digests.npy"))
    real = dptool.sidecar.Path.write_text

    def full(self, *a, **k):
        if ".json.tmp-" in self.name:
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(dptool.sidecar.Path, "write_text", full)
    result = CliRunner().invoke(cli, ["convert", str(npz), str(out), "--write-mode", "jpg", "--force"])
    assert result.exit_code == 2 and f"Cannot write {out}.json (No space left on device)" in result.output, \
        result.output
    assert (_digest(out), _digest(f"{out}.json"), _digest(f"{out}.digests.npy")) == trio
    placed = ["x.beton", "x.beton.digests.npy", "x.beton.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == placed
    result = CliRunner().invoke(cli, ["convert", str(npz), str(tmp_path / "y.beton")])
    assert result.exit_code == 2 and sorted(p.name for p in tmp_path.iterdir()) == placed


def test_a_group_renames_each_output_with_its_companion(tmp_path, monkeypatch):
    """Each output is renamed right before its sidecar (never two .betons first): a failure between two renames
    leaves no new .beton beside its old sidecar."""
    import dptool.atomic as atomic
    from dptool.atomic import atomic_output, output_group

    placed, real = [], os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (placed.append(Path(dst).name), real(src, dst)))
    a, b = tmp_path / "a.beton", tmp_path / "b.beton"
    with output_group():
        for p in (a, b):
            with atomic_output(p) as tmp:
                tmp.write_text(p.name)
        for p in (a, b):
            with atomic_output(f"{p}.json", companion_of=p) as tmp:
                tmp.write_text("side " + p.name)
        assert [p for p in tmp_path.iterdir() if not p.name.startswith(".")] == []  # nothing placed yet
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "a.beton": "a.beton", "a.beton.json": "side a.beton", "b.beton": "b.beton", "b.beton.json": "side b.beton"}
    assert placed == ["a.beton", "a.beton.json", "b.beton", "b.beton.json"]
    with pytest.raises(KeyboardInterrupt), output_group():
        with atomic_output(a) as tmp:
            tmp.write_text("new")
        raise KeyboardInterrupt
    assert a.read_text() == "a.beton" and len(list(tmp_path.iterdir())) == 4


def test_outputs_reach_the_disk_before_their_rename(tiny_beton, tmp_path, monkeypatch):
    """Each temporary file is fsync'ed before it is renamed, the folder after; a delayed write error that shows
    only at fsync (NFS, a quota) is one sentence and leaves neither file, and so is a failing disk (EIO)."""
    import errno

    from dptool import atomic
    from dptool.atomic import atomic_output, output_group

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else st.st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    a = tmp_path / "a.beton"
    with output_group():
        with atomic_output(a) as tmp:
            tmp.write_text("body")
        with atomic_output(f"{a}.json", companion_of=a) as tmp:
            tmp.write_text("side")
    inodes = [a.stat().st_ino, Path(f"{a}.json").stat().st_ino]
    assert events == [("fsync", inodes[0]), ("fsync", inodes[1]), ("replace", inodes[0]), ("replace", inodes[1]),
                      ("fsync", "dir")]

    def delayed_enospc(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", delayed_enospc)
    b = tmp_path / "b.beton"
    with pytest.raises(InputError, match=r"Cannot write .*b\.beton \(No space left on device\)"), output_group():
        with atomic_output(b) as tmp:
            tmp.write_text("body")
        with atomic_output(f"{b}.json", companion_of=b) as tmp:
            tmp.write_text("side")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.beton", "a.beton.json"]

    def failing_disk(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic.os, "fsync", failing_disk)
    result = CliRunner().invoke(cli, ["score", "--method", "random", "--source", str(tiny_beton),
                                      "-o", str(tmp_path / "s.json")])
    assert result.exit_code == 1 and "Cannot write" in result.output and "Input/output error" in result.output, \
        result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.beton", "a.beton.json"]


def test_an_output_that_cannot_be_opened_for_reading_is_still_placed(tmp_path, monkeypatch):
    """A temporary file its writer may not read back (a umask of 0o277, an insert-only AFS ACL) is fsync'ed through a
    write descriptor; one that cannot be opened at all is placed unflushed, as before fsync was added, not lost."""
    import errno

    from dptool import atomic
    from dptool.atomic import atomic_output

    real_open, real_fsync, synced = os.open, os.fsync, []
    denied = {os.O_RDONLY}

    def open_(path, flags, *args):
        if ".tmp-" in os.fspath(path) and flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args)

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "open", open_)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with atomic_output(tmp_path / "a.json") as tmp:
        tmp.write_text("a")
    assert (tmp_path / "a.json").read_text() == "a" and synced == [False, True]  # the file, then the folder
    denied.add(os.O_WRONLY)
    synced.clear()
    with atomic_output(tmp_path / "b.json") as tmp:
        tmp.write_text("b")
    assert (tmp_path / "b.json").read_text() == "b" and synced == [True]  # the folder only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_temporary_files_of_killed_runs_are_removed_or_named(tmp_path, caplog):
    import dptool.atomic as atomic

    out = tmp_path / "x.beton"
    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = tmp_path / f".x.beton.tmp-{dead.pid}-{atomic._TAG}-0123abcd"  # this machine's, its process gone
    other = tmp_path / ".x.beton.tmp-1-ffffffff-0123abcd"  # another machine's or container's: maybe alive
    old = tmp_path / f".x.beton.tmp-{dead.pid}"  # an older dptool's
    unrelated = tmp_path / ".x.beton.tmp-notes"
    for p in (mine, other, old, unrelated):
        p.write_bytes(b"partial")
    with caplog.at_level("WARNING"):
        check_output_path(out, force=False)
    assert not mine.exists() and other.exists() and old.exists() and unrelated.exists()
    assert str(other) in caplog.text and str(old) in caplog.text and "removed" in caplog.text
    names = {atomic.temp_path_for(out).name for _ in range(3)}
    assert len(names) == 3  # unique per call: two writers never share a temporary file, whatever their PIDs


def test_sigterm_stops_a_write_like_ctrl_c(tmp_path):
    """SIGTERM (kill, timeout, a scheduler) mid-write: exit 143, one line, no output or temporary file left."""
    import signal
    import sys
    import time

    from dptool.synthetic import separable_images, write_npz

    images, labels = separable_images(10, 300, 64, seed=1)
    write_npz(tmp_path / "big.npz", images, labels)
    out = tmp_path / "big.beton"
    proc = subprocess.Popen([sys.executable, "-m", "dptool", "convert", str(tmp_path / "big.npz"), str(out),
                             "--write-mode", "jpg", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(_children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # until both writer workers are encoding
    assert proc.poll() is None and len(_children(proc.pid)) == 2, "conversion finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err and err.strip().endswith("Terminated."), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npz"]


def test_a_signal_between_two_renames_waits_until_the_pair_is_placed(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, SIGHUP) arriving while a group is renamed into place acts once every output is placed:
    never a new .beton beside its old sidecar."""
    import signal

    import dptool.atomic as atomic

    a = tmp_path / "a.beton"
    for p in (a, tmp_path / "a.beton.json"):
        p.write_text("old")
    real = os.replace

    def replace_then_interrupt(src, dst):
        real(src, dst)
        os.kill(os.getpid(), signal.SIGINT)  # lands between the .beton's rename and its sidecar's

    monkeypatch.setattr(atomic.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt), atomic.output_group():
        for p, comp in ((a, None), (tmp_path / "a.beton.json", a)):
            with atomic.atomic_output(p, companion_of=comp) as tmp:
                tmp.write_text("new")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.beton": "new", "a.beton.json": "new"}


def test_a_companion_of_a_companion_is_placed(tmp_path):
    from dptool.atomic import atomic_output, output_group

    chain = (("a", None), ("a.json", "a"), ("a.json.sig", "a.json"), ("x", "y"), ("y", "x"))
    with output_group():
        for name, comp in chain:
            with atomic_output(tmp_path / name, companion_of=comp and tmp_path / comp) as tmp:
                tmp.write_text(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name, _ in chain)


def test_sigterm_to_the_process_group_exits_143_not_a_worker_error(tmp_path):
    """`kill -TERM -PGID` (a closed terminal's SIGHUP, systemd, slurm) also reaches the writer's workers, which
    die of it: the command still reports the stop, not "a writer worker stopped unexpectedly"."""
    import signal
    import sys
    import time

    from dptool.synthetic import separable_images, write_npz

    images, labels = separable_images(10, 600, 48, seed=1)
    write_npz(tmp_path / "big.npz", images, labels)
    out = tmp_path / "big.beton"
    proc = subprocess.Popen([sys.executable, "-m", "dptool", "convert", str(tmp_path / "big.npz"), str(out),
                             "--write-mode", "jpg", "--workers", "2"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(_children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # until both writer workers are encoding
    assert proc.poll() is None and len(_children(proc.pid)) == 2, "conversion finished before it could be stopped"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().endswith("Terminated.") and "worker" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npz"]


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (from /proc)."""
    kids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(stat.split("/")[2]))
    return kids


def test_outputs_in_one_folder_reached_by_two_paths_do_not_wait_for_each_other(tmp_path):
    """`-o s.json --plot here/s.png`, `here` a link to the same folder: the folder was locked once per spelling, and
    the second flock waited for the first, held by the same process, for ever."""
    import sys

    (tmp_path / "here").symlink_to(tmp_path)
    script = ("import sys; from pathlib import Path; from dptool.atomic import atomic_output, output_group\n"
              "with output_group():\n"
              "    for p in sys.argv[1:]:\n"
              "        with atomic_output(p) as tmp:\n"
              "            Path(tmp).write_text(p)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.json"), str(tmp_path / "here" / "s.png")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "s.json", "s.png"]


def test_an_output_folder_removed_during_the_run_is_one_sentence(tiny_beton, tmp_path, monkeypatch):
    """The folder is checked before any work; one removed during the run (hours of training under torchrun, a
    cleanup script) stopped train at its first checkpoint with 'internal error: FileNotFoundError: ...
    .a.jsonl.tmp-PID-HOST-RANDOM' (exit 1), naming the temporary file instead of the folder."""
    import dptool.train

    folder = tmp_path / "out"
    folder.mkdir()
    real = dptool.train._train_epoch

    def epoch_then_remove_the_folder(*args, **kwargs):
        record = real(*args, **kwargs)
        shutil.rmtree(folder)
        return record

    monkeypatch.setattr(dptool.train, "_train_epoch", epoch_then_remove_the_folder)
    out = folder / "a.pt"
    result = CliRunner().invoke(cli, ["train", str(tiny_beton), "-o", str(out), "--arch", "resnet_tiny", "--epochs",
                                      "1", "--batch-size", "32", "--min-res", "16", "--max-res", "16", "--workers",
                                      "1"])
    assert result.exit_code == 2 and "internal error" not in result.output and ".tmp-" not in result.output
    assert "its folder " + str(folder) + " was removed during the run" in result.output


@pytest.mark.parametrize("command", [
    ["info", "{m}", "--json"], ["verify", "{m}", "--json"], ["convert", "{m}", "{o}", "--json"],
    ["score", "--method", "random", "--source", "{m}", "-o", "{o}", "--json"],
    ["prune", "{m}", "--scores", "{m}", "--ratio", "0.5", "-o", "{o}", "--json"],
    ["train", "{m}", "-o", "{o}", "--json"],
    ["finetune", "{m}", "{m}", "{m}", "--json"], ["bench", "pretrain", "{m}", "--json"],
    ["bench", "loader", "{m}", "--json"], ["demo", "--quick", "--workdir", "{f}", "--json"]])
def test_a_json_command_that_fails_leaves_stdout_empty(tmp_path, command):
    """The README's contract for scripts: with --json, stdout holds the one JSON document of a command that
    succeeded and nothing when it fails; the exit code says it failed and stderr why, in one sentence, as without
    --json (`info --json` included: its errors are no JSON either)."""
    (tmp_path / "file").write_text("")
    args = [a.format(m=tmp_path / "missing", o=tmp_path / "out", f=tmp_path / "file") for a in command]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and result.stdout == "", result.output
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("Error:")] == lines[-1:]


def test_ctrl_c_while_a_checkpoint_is_written_is_a_stop_not_an_internal_error(tiny_beton, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which stops as Ctrl-C does) landing while torch.save writes a checkpoint: torch's zip
    writer turned the KeyboardInterrupt into 'internal error: RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos ...' (exit 1) instead of the stop it is (exit 130)."""
    import builtins
    import signal

    import dptool.checkpoint

    writes = []

    class InterruptedFile:
        """The checkpoint's file, whose third write is met by a real SIGINT, as Ctrl-C in the terminal sends it."""

        def __init__(self, f):
            self._f = f

        def write(self, data):
            writes.append(len(data))
            if len(writes) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def interrupted_open(*args, **kwargs):
        return InterruptedFile(builtins.open(*args, **kwargs))  # noqa: SIM115 (closed by the wrapper's __exit__)

    monkeypatch.setattr(dptool.checkpoint, "open", interrupted_open, raising=False)
    out = tmp_path / "a.pt"
    result = CliRunner().invoke(cli, ["train", str(tiny_beton), "-o", str(out), "--arch", "resnet_tiny", "--epochs",
                                      "1", "--batch-size", "32", "--min-res", "16", "--max-res", "16", "--workers",
                                      "1"])
    assert len(writes) >= 3, "the checkpoint was not written through the file given to torch.save"
    assert result.exit_code == 130 and "internal error" not in result.output, result.output
    assert "Aborted!" in result.output and sorted(p.name for p in tmp_path.iterdir()) == []
