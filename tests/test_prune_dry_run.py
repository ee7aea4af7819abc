"""`dptool prune --dry-run`: the numbers a real prune then writes (samples, bytes, classes, ties; class and FM
cluster scores, with --val), nothing written or removed, every check still refusing, existing outputs marked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_prune import REFUSALS, data, one_sentence, run  # noqa: F401 (data: the fixture)

from dptool.atomic import _TAG
from dptool.prune import PrunePlan, prune

COMPARED = ("output", "split", "ratio", "kept_groups", "num_samples", "num_classes_kept", "bytes", "tie_score", "tied",
            "tied_kept")


def snapshot(folder) -> dict:
    """Every entry under `folder` with its size and mtime, and each folder's own mtime (a file created and removed
    again, such as a probe, changes it)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        out[root] = os.stat(root).st_mtime_ns
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
    return out


def plan_then_prune(args, tmp_path) -> tuple[dict, dict]:
    """The --dry-run --json document (checking that it wrote nothing), then the real prune's."""
    before = snapshot(tmp_path)
    dry = run(*args, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert snapshot(tmp_path) == before
    real = run(*args, "--json")
    assert real.exit_code == 0, real.output
    return json.loads(dry.stdout), json.loads(real.stdout)


def check_same(plan: dict, done: dict) -> None:
    assert plan["dry_run"] is True
    assert [{k: f[k] for k in COMPARED} for f in plan["files"]] == [{k: f[k] for k in COMPARED} for f in done["files"]]
    assert plan["bytes_to_write"] == done["bytes_written"] == sum(os.path.getsize(f["output"]) for f in done["files"])
    assert plan["bytes_to_read"] == done["bytes_read"]
    for f in plan["files"]:
        assert f["share"] == f["num_samples"] / f["source_samples"]
        assert f["speedup"] == f["source_samples"] / f["num_samples"]
        assert f["exists"] is False


def test_class_scores_with_val_plan_what_prune_writes(data, tmp_path):  # noqa: F811
    args = [data["train"], "--scores", data["scores"], "--ratios", "0.2,0.5,0.8", "-o", tmp_path / "p_{ratio}.beton",
            "--val", data["val"], "--val-out", tmp_path / "v_{ratio}.beton"]
    plan, done = plan_then_prune(args, tmp_path)
    check_same(plan, done)
    # ORDER 2, 0, 5, 1, 3, 4 (test_prune): 25 training and 6 validation samples a class
    assert [(f["split"], f["kept_groups"], f["num_samples"], f["source_samples"]) for f in plan["files"]] == [
        ("train", 5, 125, 150), ("train", 3, 75, 150), ("train", 1, 25, 150),
        ("val", 5, 30, 36), ("val", 3, 18, 36), ("val", 1, 6, 36)]
    assert [f["speedup"] for f in plan["files"]] == [1.2, 2.0, 6.0] * 2
    assert (plan["files"][0]["tied"], plan["files"][0]["tied_kept"]) == (3, 2)  # 1, 3, 4 score 0; 1 and 3 kept
    assert plan["groups"] == 6 and plan["level"] == "class" and plan["method"] == "lm"


def test_fm_cluster_scores_plan_what_prune_writes(data, tmp_path):  # noqa: F811
    args = [data["train"], "--scores", data["fm"], "--ratios", "0.25,0.5", "-o", tmp_path / "p_{ratio}.beton"]
    plan, done = plan_then_prune(args, tmp_path)
    check_same(plan, done)
    counts = [int((data["assign"] == c).sum()) for c in range(4)]  # scores 3, 1, 0, 2: clusters 0, 3, 1, 2 kept
    assert [f["num_samples"] for f in plan["files"]] == [counts[0] + counts[3] + counts[1], counts[0] + counts[3]]
    assert plan["level"] == "cluster" and [f["kept_groups"] for f in plan["files"]] == [3, 2]


def test_the_table_gives_a_row_per_output_train_then_val(data, tmp_path):  # noqa: F811
    result = run(data["train"], "--scores", data["scores"], "--ratios", "0.5,0.8", "-o", tmp_path / "p_{ratio}.beton",
                 "--val", data["val"], "--val-out", tmp_path / "v_{ratio}.beton", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "dry run, nothing written: lm scores, 6 classes with samples"
    assert lines[1].split() == ["split", "ratio", "classes", "kept", "samples", "of", "share", "speed-up", "size",
                                "output"]
    rows = [line.split() for line in lines[2:6]]
    assert [r[:7] for r in rows] == [["train", "0.5", "3", "75", "150", "50.0%", "2.00x"],
                                     ["train", "0.8", "1", "25", "150", "16.7%", "6.00x"],
                                     ["val", "0.5", "3", "18", "36", "50.0%", "2.00x"],
                                     ["val", "0.8", "1", "6", "36", "16.7%", "6.00x"]]
    assert [r[-1] for r in rows] == [str(tmp_path / n) for n in ("p_0.5.beton", "p_0.8.beton", "v_0.5.beton",
                                                                  "v_0.8.beton")]
    assert "to write (.beton files)" in lines[6]
    assert "ratio 0.8: the cut fell among the 2 classes scoring 5; 1 of them kept" in result.output
    assert list(tmp_path.iterdir()) == []


def test_existing_outputs_are_marked_not_replaced(data, tmp_path):  # noqa: F811
    out = tmp_path / "p.beton"
    out.write_bytes(b"keep me")
    args = [data["train"], "--scores", data["scores"], "--ratio", "0.5", "-o", out, "--dry-run"]
    for extra, said in (([], "1 output exists: prune refuses it without --force"),
                        (["--force"], "1 output exists: --force replaces it")):
        result = run(*args, *extra)
        assert result.exit_code == 0, result.output
        assert said in result.output
        doc = json.loads(run(*args, *extra, "--json").stdout)
        assert doc["files"][0]["exists"] is True and doc["force"] == bool(extra)
    assert out.read_bytes() == b"keep me" and [p.name for p in tmp_path.iterdir()] == ["p.beton"]


def test_a_stale_temporary_file_is_left_alone(data, tmp_path):  # noqa: F811
    """A real prune removes the temporary file a killed run of this machine left; a dry run removes nothing."""
    stale = tmp_path / f".p.beton.tmp-{2**22 - 1}-{_TAG}-0123abcd"
    stale.write_bytes(b"x")
    before = snapshot(tmp_path)
    result = run(data["train"], "--scores", data["scores"], "--ratio", "0.5", "-o", tmp_path / "p.beton",
                 "--dry-run")
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path) == before and stale.exists()


@pytest.mark.parametrize("extra, phrase", REFUSALS)
def test_every_refusal_of_prune_refuses_a_dry_run(data, tmp_path, extra, phrase):  # noqa: F811
    fmt = {"t": tmp_path, "val": data["val"], "train": data["train"], "scores": data["scores"]}
    args = [data["train"], "--scores", data["scores"]]
    if "-o" not in extra:
        args += ["-o", tmp_path / "out.beton"]
    result = run(*args, *[a.format(**fmt) for a in extra], "--dry-run")
    assert result.exit_code == 2, result.output
    assert phrase in result.output and one_sentence(result.output)
    assert list(tmp_path.iterdir()) == []


def test_val_with_cluster_scores_and_scores_of_another_source_refuse_a_dry_run(data, tmp_path):  # noqa: F811
    result = run(data["train"], "--scores", data["fm"], "--ratio", "0.5", "-o", tmp_path / "p.beton", "--val",
                 data["val"], "--val-out", tmp_path / "v.beton", "--dry-run")
    assert result.exit_code == 2 and "--val needs class-level scores" in result.output
    result = run(data["val"], "--scores", data["scores"], "--ratio", "0.5", "-o", tmp_path / "p.beton", "--dry-run")
    assert result.exit_code == 2 and "computed for 150 samples but" in result.output and one_sentence(result.output)
    assert list(tmp_path.iterdir()) == []


def test_library_dry_run_returns_a_plan(data, tmp_path):  # noqa: F811
    plan = prune(data["train"], data["scores"], tmp_path / "p.beton", keep=2, dry_run=True)
    assert isinstance(plan, PrunePlan) and plan.to_dict()["dry_run"] is True
    (f,) = plan.files
    assert (f.kept_groups, f.num_samples, f.share) == (2, 50, 50 / 150) and list(tmp_path.iterdir()) == []


def test_the_space_each_file_system_needs_and_has(data, tmp_path, monkeypatch):  # noqa: F811
    args = [data["train"], "--scores", data["scores"], "--ratios", "0.5,0.8", "-o", tmp_path / "p_{ratio}.beton",
            "--val", data["val"], "--val-out", tmp_path / "v_{ratio}.beton", "--dry-run"]
    doc = json.loads(run(*args, "--json").stdout)
    (space,) = doc["space"]  # every output in one folder
    assert space["folder"] == str(tmp_path) and space["bytes_to_write"] == doc["bytes_to_write"]
    assert space["free_bytes"] > 0
    assert "prune would fail there" not in run(*args).output
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=doc["bytes_to_write"] - 1))
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert f"{tmp_path}: {doc['bytes_to_write'] / 1e6:.1f} MB to write but" in result.output
    assert "prune would fail there when the disk fills" in result.output


def test_a_name_too_long_for_the_temporary_file_is_refused_as_prune_refuses_it(data, tmp_path):  # noqa: F811
    """prune finds it by creating its probe file; a dry run, which creates none, from the folder's name limit."""
    out = tmp_path / f"{'a' * 240}.beton"
    for extra in (["--dry-run"], []):
        result = run(data["train"], "--scores", data["scores"], "--ratio", "0.5", "-o", out, *extra)
        assert result.exit_code == 2 and one_sentence(result.output)
        assert f"Output name {out.name} is too long: its temporary name" in result.output
        assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_a_file_is_refused_as_prune_refuses_it(data, tmp_path):  # noqa: F811
    """`exists()` holds for a file: the dry run passed a 'folder' that is an executable file (os.access gave it
    write and search rights), where prune's probe fails with ENOTDIR."""
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    for extra in (["--dry-run"], []):
        result = run(data["train"], "--scores", data["scores"], "--ratio", "0.5", "-o", script / "p.beton", *extra)
        assert result.exit_code == 2 and one_sentence(result.output)
        assert f"Cannot write to folder {script} of output {script / 'p.beton'} (Not a directory)" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["run.sh"]


def test_a_path_too_long_for_the_temporary_file_is_refused_as_prune_refuses_it(data, tmp_path):  # noqa: F811
    """A folder and name within the limits whose temporary file's path is over PATH_MAX: the dry run, which checked
    the name alone, passed; prune's probe fails (ENAMETOOLONG), and said the 100-byte name was too long."""
    folder = tmp_path
    while len(os.fsencode(str(folder))) < 3900:
        folder = folder / ("d" * 200)
    folder.mkdir(parents=True)
    out = folder / ("p" * (4090 - len(os.fsencode(str(folder))) - len(".beton")) + ".beton")  # 4090 bytes
    for extra in (["--dry-run"], []):
        result = run(data["train"], "--scores", data["scores"], "--ratio", "0.5", "-o", out, *extra)
        assert result.exit_code == 2 and one_sentence(result.output)
        assert f"Output path {out} is too long: its temporary file's path is" in result.output
        assert "over the limit of 4095" in result.output
        assert list(folder.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root, to run as another real user with the effective user root")
def test_write_access_is_the_effective_users_as_for_prune(data, tmp_path):  # noqa: F811
    """open(2) checks the effective ids, os.access by default the real ones: with the real user nobody and the
    effective user root (a setuid start), the dry run refused a folder that only root may write to, which prune
    writes. (From Python: Click's own `readable` checks of the inputs use the real ids.)"""
    folder = tmp_path / "rootonly"
    folder.mkdir(mode=0o755)
    code = ("import sys; from dptool.prune import prune; "
            "prune(sys.argv[1], sys.argv[2], sys.argv[3], ratio=0.5, dry_run=sys.argv[4] == 'dry')")
    for how in ("dry", "real"):
        done = subprocess.run([sys.executable, "-c", code, str(data["train"]), str(data["scores"]),
                               str(folder / "p.beton"), how], capture_output=True, text=True,
                              preexec_fn=lambda: os.setresuid(65534, 0, 0))
        assert done.returncode == 0, done.stderr
    assert (folder / "p.beton").exists()


def test_outputs_that_are_one_file_through_a_linked_folder_are_refused(data, tmp_path):  # noqa: F811
    """-o out/p.beton --val-out alias/p.beton, alias a link to out: the dry run planned two files and prune
    reported two, but the validation file replaced the training one (p.beton held the 18 validation samples)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "alias").symlink_to("out")
    for extra in (["--dry-run"], []):
        result = run(data["train"], "--scores", data["scores"], "--ratio", "0.5", "-o", tmp_path / "out/p.beton",
                     "--val", data["val"], "--val-out", tmp_path / "alias/p.beton", *extra)
        assert result.exit_code == 2 and one_sentence(result.output)
        assert (f"Outputs {tmp_path / 'out/p.beton'} and {tmp_path / 'alias/p.beton'} are the same file"
                in result.output)
        assert list((tmp_path / "out").iterdir()) == []


def test_stale_temporary_files_prune_removes_count_as_free_space(data, tmp_path, monkeypatch):  # noqa: F811
    """prune removes the temporary files that killed runs of this machine left before it writes (its space is
    free to it); the dry run counted only the free space, and said a prune that fits would fail, without naming the
    files."""
    stale = tmp_path / f".p.beton.tmp-{2**22 - 1}-{_TAG}-0123abcd"  # no process has that PID
    stale.write_bytes(bytes(3_000_000))
    args = [data["train"], "--scores", data["scores"], "--ratio", "0.5", "-o", tmp_path / "p.beton"]
    doc = json.loads(run(*args, "--dry-run", "--json").stdout)
    (space,) = doc["space"]
    assert space["stale_bytes"] == 3_000_000 and space["replaced_bytes"] == 0
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=doc["bytes_to_write"] - 1))
    result = run(*args, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "prune would fail there" not in result.output
    free = (doc["bytes_to_write"] - 1 + 3_000_000) / 1e6
    assert f"{free:.1f} MB free in {tmp_path} (3.0 MB of it stale temporary files prune removes)" in result.output
    assert f"{stale} (3000000 bytes) was left by an interrupted run; a run writing" in result.output
    assert stale.exists()
    monkeypatch.undo()
    assert run(*args).exit_code == 0 and not stale.exists()  # as the dry run said


def test_the_space_line_says_the_files_force_replaces_are_freed_after(data, tmp_path, monkeypatch):  # noqa: F811
    """Each output is written in full before the file it replaces goes: their space does not count as free."""
    out = tmp_path / "p.beton"
    out.write_bytes(bytes(1_000_000))
    args = [data["train"], "--scores", data["scores"], "--ratio", "0.5", "-o", out, "--dry-run", "--force"]
    doc = json.loads(run(*args, "--json").stdout)
    assert doc["space"][0]["replaced_bytes"] == 1_000_000 and doc["space"][0]["stale_bytes"] == 0
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=doc["bytes_to_write"] - 1))
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert ("prune would fail there when the disk fills (the 1.0 MB of the files --force replaces are freed only "
            "after the new ones are written)") in result.output


def test_a_val_lacking_kept_classes_shows_the_classes_it_holds(data, tmp_path):  # noqa: F811
    """A val set lacking classes (`convert --classes-from`): its rows give the kept classes it holds samples of, as
    prune's summary does ('18 samples, 2 classes, 3 classes kept'), not only the classes kept."""
    from dptool.convert import WriterParams, convert
    from dptool.synthetic import separable_images, write_npz

    images, labels = separable_images(6, 4, 32, seed=9)
    keep = labels != 0  # class_0 missing, as an ImageNet val folder lacking a class
    npz = write_npz(tmp_path / "val.npz", images[keep], labels[keep] - 1, [f"class_{c}" for c in range(1, 6)])
    val = tmp_path / "val_lacking.beton"
    convert(npz, val, params=WriterParams(max_resolution=32, write_mode="raw", num_workers=1),
            classes_from=data["train"])
    args = [data["train"], "--scores", data["scores"], "--ratios", "0.5,0.8", "-o", tmp_path / "p_{ratio}.beton",
            "--val", val, "--val-out", tmp_path / "v_{ratio}.beton"]
    result = run(*args, "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split()[:6] == ["split", "ratio", "classes", "kept", "with", "samples"]
    # ORDER 2, 0, 5, ...: 0.5 keeps classes 2, 0, 5 (the val set holds 2 and 5), 0.8 keeps class 2
    assert [line.split()[:5] for line in lines[2:6]] == [["train", "0.5", "3", "3", "75"],
                                                         ["train", "0.8", "1", "1", "25"],
                                                         ["val", "0.5", "3", "2", "8"],
                                                         ["val", "0.8", "1", "1", "4"]]
    plan, done = plan_then_prune(args, tmp_path)
    check_same(plan, done)
    assert [f["num_classes_kept"] for f in plan["files"]] == [3, 1, 2, 1]
    assert "v_0.5.beton: 8 samples, 2 classes, 3 classes kept" in run(*args, "--force").output
