"""`dptool prune`: the exact kept classes for a scores file and ratio (ties included), several ratios in one pass,
the validation split, FM sample-level pruning, sidecars, and every refusal (exit 2, one sentence, no file)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_beton

import dptool.prune as prune_mod
import dptool.subset as subset_mod
from dptool.beton import fingerprint, open_beton, read_image, read_sidecar, write_sidecar
from dptool.cli.main import cli
from dptool.convert import WriterParams, convert
from dptool.errors import InputError
from dptool.prune import kept_samples, output_paths, prune
from dptool.scores import Scores, fingerprint_file, write_scores
from dptool.synthetic import separable_images, write_npz

# Class order by rank: 2 and 0 tie at 5 (tie-break .2 > .1), then 5, then 1 and 3 tie at 0 with equal tie-break
# values (class id decides), then 4.
CLASS_SCORES = [5, 0, 5, 0, 0, 2]
CLASS_TIEBREAK = [0.1, 0.3, 0.2, 0.3, 0.0, 0.0]
ORDER = [2, 0, 5, 1, 3, 4]


def run(*args):
    return CliRunner().invoke(cli, ["prune", *[str(a) for a in args]], catch_exceptions=False)


def one_sentence(output: str) -> bool:
    """A single error line (Click may put its usage lines above it) and no traceback."""
    errors = [line for line in output.strip().splitlines() if line.startswith("Error:")]
    return len(errors) == 1 and errors[0].endswith(".") and "Traceback" not in output


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_dict(beton_path, **changes) -> dict:
    b = open_beton(beton_path)
    return {"path": str(beton_path), "fingerprint": b.sidecar["fingerprint"], "num_samples": b.num_samples,
            "num_classes": b.num_classes, **changes}


def class_scores_file(path, beton_path, scores=CLASS_SCORES, tiebreak=CLASS_TIEBREAK, **source_changes) -> Path:
    n = len(scores)
    s = Scores(method="lm", level="class", ids=np.arange(n), names=[f"class_{i}" for i in range(n)],
               scores=np.asarray(scores, float), tiebreak=np.asarray(tiebreak, float),
               source=source_dict(beton_path, **source_changes), tie_break="summed softmax, then class id")
    return write_scores(path, s, force=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Source (6 classes x 25, 32 px raw), its validation split, class-level and cluster-level scores."""
    folder = tmp_path_factory.mktemp("prune")
    train = make_beton(folder, "train", n_classes=6, per_class=25, size=32, seed=7)
    val = make_beton(folder, "val", n_classes=6, per_class=6, size=32, seed=8)
    scores = class_scores_file(folder / "lm.json", train)
    n = open_beton(train).num_samples
    assign = np.random.default_rng(0).integers(0, 4, n)
    fm = Scores(method="fm", level="cluster", ids=np.arange(4), names=[f"cluster {i}" for i in range(4)],
                scores=np.array([3.0, 1.0, 0.0, 2.0]), tiebreak=np.zeros(4), source=source_dict(train),
                tie_break="cluster id", params={"k": 4})
    fm_path = write_scores(folder / "fm.json", fm, assignment=assign)
    return {"folder": folder, "train": train, "val": val, "scores": scores, "fm": fm_path, "assign": assign}


def check_samples(out, src, indices) -> None:
    """The output holds exactly the source samples `indices`, in that order, with equal labels and pixels."""
    o, s = open_beton(out), open_beton(src)
    assert o.num_samples == len(indices)
    np.testing.assert_array_equal(o.labels, s.labels[indices])
    for k in range(0, len(indices), max(1, len(indices) // 12)):
        np.testing.assert_array_equal(read_image(o, k), read_image(s, int(indices[k])))


@pytest.mark.parametrize("ratio, kept", [(0.0, ORDER), (0.25, ORDER[:4]), (0.4, ORDER[:4]), (0.5, ORDER[:3]),
                                         (0.6, ORDER[:2]), (0.8, ORDER[:1])])
def test_class_pruning_keeps_the_top_classes_with_ties(data, tmp_path, ratio, kept):
    out = tmp_path / "p.beton"
    result = run(data["train"], "--scores", data["scores"], "--ratio", ratio, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    src = open_beton(data["train"])
    expected = np.flatnonzero(np.isin(src.labels, kept))
    check_samples(out, data["train"], expected)
    side = read_sidecar(out)
    pruning = side["pruning"]
    assert pruning["kept_classes"] == sorted(kept) and pruning["kept_groups"] == len(kept)
    assert pruning["ratio"] == ratio and pruning["level"] == "class" and pruning["method"] == "lm"
    assert pruning["scores_fingerprint"] == fingerprint_file(data["scores"])
    assert pruning["source_fingerprint"] == src.sidecar["fingerprint"]
    assert Path(pruning["source"]) == Path(data["train"]).resolve()
    assert side["num_classes"] == 6 and side["class_names"] == src.class_names
    assert side["num_samples"] == len(expected) and side["fingerprint"] == fingerprint(out)
    assert side["class_counts"] == [25 if c in kept else 0 for c in range(6)]
    assert side["writer"] == src.sidecar["writer"]
    (f,) = doc["files"]
    assert f["num_samples"] == len(expected) and f["num_classes_kept"] == len(kept)
    assert doc["bytes_written"] == out.stat().st_size and doc["mb_per_second"] > 0


def test_keep_and_human_summary(data, tmp_path):
    out = tmp_path / "k.beton"
    result = run(data["train"], "--scores", data["scores"], "--keep", 2, "-o", out)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("kept 50 samples, 2 classes;") and "MB written" in last and "MB/s" in last
    pruning = read_sidecar(out)["pruning"]
    assert pruning["kept_classes"] == [0, 2] and pruning["ratio"] == pytest.approx(4 / 6)


def test_classes_without_samples_are_neither_kept_nor_counted(data, tmp_path):
    """A file pruned to 3 classes, scored again: the 3 empty classes would otherwise fill the ratio's quota."""
    p3 = tmp_path / "p3.beton"
    assert run(data["train"], "--scores", data["scores"], "--keep", 3, "-o", p3).exit_code == 0  # classes 2, 0, 5
    # the empty classes 1 and 3 outrank class 5 here; counted, ratio 0.5 would keep 2, 0 and 1 (2 with samples)
    scores = class_scores_file(tmp_path / "p3.json", p3, scores=[5, 4, 6, 4, 0, 1])
    result = run(p3, "--scores", scores, "--ratio", 0.5, "-o", tmp_path / "half.beton", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["empty_groups"] == 3 and doc["files"][0]["kept_groups"] == 1  # round_half_up(1.5) of 3 removed
    assert read_sidecar(tmp_path / "half.beton")["pruning"]["kept_classes"] == [2]
    result = run(p3, "--scores", scores, "--keep", 3, "-o", tmp_path / "all.beton")
    assert result.exit_code == 0 and "3 of the 6 classes have no samples in" in result.output  # the warning
    assert read_sidecar(tmp_path / "all.beton")["class_counts"] == [25, 0, 25, 0, 0, 25]
    assert read_sidecar(tmp_path / "all.beton")["pruning"]["ratio"] == 0.0  # all 3 classes with samples kept
    result = run(p3, "--scores", scores, "--keep", 4, "-o", tmp_path / "four.beton")
    assert result.exit_code == 2 and "--keep must be in [1, 3] (the groups with samples), got 4." in result.output


def test_a_cut_among_equal_scores_says_how_many_the_tie_break_kept(data, tmp_path):
    """Most of ImageNet's 1000 classes score 0 for LM on a small target, so a ratio's cut falls among them; prune said
    nothing of it. Scores 5, 0, 5, 0, 0, 2 (order 2, 0, 5, 1, 3, 4): 0.2 keeps 2 of the 3 zeros, 0.5 cuts between
    scores 2 and 0, 0.8 keeps one of the two classes scoring 5."""
    out = tmp_path / "t_{ratio}.beton"
    result = run(data["train"], "--scores", data["scores"], "--ratios", "0.2,0.5,0.8", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    files = {f["ratio"]: f for f in json.loads(result.stdout)["files"]}
    assert [(files[r]["tie_score"], files[r]["tied"], files[r]["tied_kept"]) for r in (0.2, 0.5, 0.8)] == [
        (0.0, 3, 2), (None, 0, 0), (5.0, 2, 1)]
    result = run(data["train"], "--scores", data["scores"], "--ratios", "0.2,0.5,0.8", "-o", out, "--force")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "ratio 0.2: the cut fell among the 3 classes scoring 0; 2 of them kept, picked by the tie-break" in lines
    assert "ratio 0.8: the cut fell among the 2 classes scoring 5; 1 of them kept, picked by the tie-break" in lines
    assert not any(line.startswith("ratio 0.5") for line in lines)
    assert lines[-1] == "ties broken by summed softmax, then class id"
    # the pruned file's sidecar keeps it, and info shows it
    sides = {r: read_sidecar(tmp_path / f"t_{r}.beton")["pruning"] for r in ("0.2", "0.5", "0.8")}
    assert sides["0.2"]["tie_at_cut"] == {"score": 0.0, "groups": 3, "kept": 2} and "tie_at_cut" not in sides["0.5"]
    shown = CliRunner().invoke(cli, ["info", str(tmp_path / "t_0.2.beton")]).output
    assert "pruned: ratio 0.2, 5 groups kept (2 of the 3 scoring 0 picked by the tie-break), scores " in shown
    # groups without samples are not among the tied: 3 classes of a file pruned to 3, all scoring 0
    p3 = tmp_path / "p3.beton"
    assert run(data["train"], "--scores", data["scores"], "--keep", 3, "-o", p3).exit_code == 0
    flat = class_scores_file(tmp_path / "flat.json", p3, scores=[0] * 6, tiebreak=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    result = run(p3, "--scores", flat, "--keep", 1, "-o", tmp_path / "one.beton")
    assert result.exit_code == 0, result.output
    assert "the cut fell among the 3 classes scoring 0; 1 of them kept" in result.output
    # a cut between two scores says nothing of ties
    result = run(data["train"], "--scores", data["scores"], "--keep", 3, "-o", tmp_path / "three.beton")
    assert result.exit_code == 0 and "tie" not in result.output


def test_info_shows_a_pruning_record_it_cannot_read_in_full_without_failing(data, tmp_path):
    """info read the sidecar's tie_at_cut blindly: one edited by hand ({"groups": 3}, a score of null) stopped it with
    "internal error: KeyError" (exit 1), where the rest of the pruning record is shown as it is; and a --keep prune's
    ratio read 0.16666666666666666 where prune's own summary says 0.166667."""
    out = tmp_path / "k.beton"
    assert run(data["train"], "--scores", data["scores"], "--keep", 5, "-o", out).exit_code == 0
    side = read_sidecar(out)
    for tie in ({"groups": 3}, {"score": None, "groups": 3, "kept": 1}, {"score": "0", "groups": 3, "kept": 1}, 7):
        write_sidecar(out, {**side, "pruning": {**side["pruning"], "tie_at_cut": tie}})
        result = CliRunner().invoke(cli, ["info", str(out)])
        assert result.exit_code == 0, result.output
        assert "pruned: ratio 0.166667, 5 groups kept, scores " in result.output
    write_sidecar(out, side)
    assert "pruned: ratio 0.166667, 5 groups kept (2 of the 3 scoring 0 picked by the tie-break), scores " in (
        CliRunner().invoke(cli, ["info", str(out)]).output)


def test_several_ratios_in_one_pass_equal_separate_runs(data, tmp_path):
    before = {k: sha256(data[k]) for k in ("train", "val", "scores")}
    result = run(data["train"], "--scores", data["scores"], "--ratios", "0.2,0.5,0.8",
                 "-o", tmp_path / "multi_{ratio}.beton",
                 "--val", data["val"], "--val-out", tmp_path / "v_{ratio}.beton")
    assert result.exit_code == 0, result.output
    for r in ("0.2", "0.5", "0.8"):
        single = tmp_path / f"single_{r}.beton"
        assert run(data["train"], "--scores", data["scores"], "--ratio", r, "-o", single).exit_code == 0
        multi = tmp_path / f"multi_{r}.beton"
        assert sha256(multi) == sha256(single)
        assert read_sidecar(multi)["pruning"] == read_sidecar(single)["pruning"]
        kept = read_sidecar(multi)["pruning"]["kept_classes"]
        val_out = open_beton(tmp_path / f"v_{r}.beton")
        v = open_beton(data["val"])
        check_samples(val_out.path, data["val"], np.flatnonzero(np.isin(v.labels, kept)))
        assert read_sidecar(val_out.path)["pruning"]["kept_classes"] == kept
    assert {k: sha256(data[k]) for k in ("train", "val", "scores")} == before  # inputs untouched


def test_bytes_read_and_one_source_fingerprint(data, tmp_path, monkeypatch):
    """Nested ratios read each kept sample once; a source without a sidecar is fingerprinted once per prune."""
    source = tmp_path / "nosidecar.beton"
    shutil.copy(data["train"], source)
    calls = []
    real = prune_mod.fingerprint

    def counting(beton):
        calls.append(Path(getattr(beton, "path", beton)).name)
        return real(beton)

    monkeypatch.setattr(prune_mod, "fingerprint", counting)
    result = prune(source, data["scores"], tmp_path / "p_{ratio}.beton", ratios=[0.2, 0.5, 0.8])
    assert calls.count(source.name) == 1
    src = open_beton(source)
    size_of = np.zeros(src.num_samples, np.int64)
    size_of[src.alloc_table["sample_id"].astype(np.int64)] = src.alloc_table["size"].astype(np.int64)
    widest = np.flatnonzero(np.isin(src.labels, ORDER[:5]))  # ratio 0.2 keeps a superset of the others
    assert result.bytes_read == int(size_of[widest].sum())
    assert src.sidecar is None
    assert {read_sidecar(f.output)["pruning"]["source_fingerprint"] for f in result.files} == {real(source)}


def test_fm_cluster_scores_prune_samples_by_assignment(data, tmp_path):
    out = tmp_path / "fm.beton"
    result = prune(data["train"], data["fm"], out, ratio=0.5)
    expected = np.flatnonzero(np.isin(data["assign"], [0, 3]))  # cluster scores 3, 1, 0, 2 -> top two: 0, 3
    check_samples(out, data["train"], expected)
    pruning = read_sidecar(out)["pruning"]
    assert pruning["level"] == "cluster" and pruning["kept_clusters"] == [0, 3] and "kept_classes" not in pruning
    src = open_beton(data["train"])
    assert read_sidecar(out)["class_counts"] == np.bincount(src.labels[expected], minlength=6).tolist()
    assert result.files[0].num_classes_kept == len(np.unique(src.labels[expected]))


def test_kept_samples_and_output_paths():
    assert kept_samples(np.array([3, 0, 1, 3, 2]), np.array([3, 1])).tolist() == [0, 2, 3]
    assert output_paths("a_{ratio}.beton", [0.2, 0.6]) == [Path("a_0.2.beton"), Path("a_0.6.beton")]
    with pytest.raises(InputError, match="must contain"):
        output_paths("a.beton", [0.2, 0.6])


REFUSALS = [
    (["--ratio", "1.5"], r"--ratio must be in [0, 1), got 1.5."),
    (["--ratio", "-0.2"], r"--ratio must be in [0, 1), got -0.2."),
    (["--ratio", "0.95"], "removes all 6 groups"),
    (["--keep", "0"], "--keep must be in [1, 6], got 0."),
    (["--ratio", "0.5", "--keep", "2"], "exactly one"),
    ([], "exactly one"),
    (["--ratios", "0.2,0.2", "-o", "{t}/r_{{ratio}}.beton"], "more than once"),
    (["--ratios", "0.2,x"], "comma-separated numbers"),
    # a value of --ratios was refused as "--ratio ...", an option the command line did not hold
    (["--ratios", "0.2,1", "-o", "{t}/r_{{ratio}}.beton"], r"--ratios value must be in [0, 1), got 1.0."),
    (["--ratios", "0.2,0.95", "-o", "{t}/r_{{ratio}}.beton"], "--ratios value 0.95 removes all 6 groups"),
    (["--ratios", "0.2,0.4"], "must contain {ratio}"),
    (["--ratio", "0.5", "--val", "{val}"], "--val and --val-out go together"),
    (["--ratio", "0.5", "--val", "{val}", "--val-out", "{t}/out.beton"], "would both be"),
    (["--ratios", "0.2,0.2000001", "-o", "{t}/r_{{ratio}}.beton"], "would both be"),
    (["--ratio", "0.5", "-o", "{train}"], "same file as input"),
    (["--ratio", "0.5", "-o", "{scores}"], "same file as input"),
    (["--ratio", "0.5", "-o", "{t}/nofolder/out.beton"], "does not exist"),
]


@pytest.mark.parametrize("extra, phrase", REFUSALS)
def test_refusals_are_one_sentence_exit_2_and_leave_nothing(data, tmp_path, extra, phrase):
    fmt = {"t": tmp_path, "val": data["val"], "train": data["train"], "scores": data["scores"]}
    args = [data["train"], "--scores", data["scores"]]
    if "-o" not in extra:
        args += ["-o", tmp_path / "out.beton"]
    result = run(*args, *[a.format(**fmt) for a in extra])
    assert result.exit_code == 2, result.output
    assert phrase in result.output
    assert one_sentence(result.output)
    assert list(tmp_path.iterdir()) == []


def _refuse(data, tmp_path, scores, *extra) -> str:
    result = run(data["train"], "--scores", scores, "--ratio", "0.5", "-o", tmp_path / "out.beton", *extra)
    assert result.exit_code == 2, result.output
    assert one_sentence(result.output)
    assert not (tmp_path / "out.beton").exists() and not (tmp_path / "out.beton.json").exists()
    return result.output


def test_scores_of_another_source_are_refused(data, tmp_path):
    from dptool.beton import _fingerprint_without_samples

    n = len(CLASS_SCORES)
    other = write_scores(tmp_path / "other.json", Scores(
        method="lm", level="class", ids=np.arange(n), names=[f"class_{i}" for i in range(n)],
        scores=np.asarray(CLASS_SCORES, float), tiebreak=np.asarray(CLASS_TIEBREAK, float), tie_break="class id",
        source=source_dict(data["train"], fingerprint="blake2b:0123", path="/elsewhere/in_train.beton")))
    said = _refuse(data, tmp_path, other)
    # named as `dptool info` names each: the message listed the file's current and pre-2026-11-29 fingerprints as
    # "differs from A or B", the second one no command shows
    assert ("it was computed on /elsewhere/in_train.beton (fingerprint blake2b:0123), not on "
            f"{data['train']} (fingerprint {fingerprint(open_beton(data['train']))}); score this source first") in said
    assert _fingerprint_without_samples(open_beton(data["train"])) not in said
    seven = class_scores_file(tmp_path / "seven.json", data["train"], scores=[1] * 7, tiebreak=[0] * 7,
                              num_classes=7)
    assert "computed for 7 classes but" in _refuse(data, tmp_path, seven)
    fewer = class_scores_file(tmp_path / "fewer.json", data["train"], num_samples=10)
    assert "computed for 10 samples but" in _refuse(data, tmp_path, fewer)


def test_scores_recording_the_older_kind_of_fingerprint_still_match(data, tmp_path):
    """Scores made before the fingerprint read sample bytes recorded the older kind: both are computed from the
    file, so those still prune it, and a sidecar's claim alone never makes another file match."""
    from dptool.beton import _fingerprint_without_samples

    src = open_beton(data["train"])
    for recorded in (_fingerprint_without_samples(src), fingerprint(src)):
        scores = class_scores_file(tmp_path / "s.json", data["train"], fingerprint=recorded)
        result = run(data["train"], "--scores", scores, "--ratio", "0.5", "-o", tmp_path / "p.beton", "--force")
        assert result.exit_code == 0, result.output
    claimed = tmp_path / "claimed.beton"  # another file whose sidecar claims the training file's fingerprint
    shutil.copy(data["val"], claimed)
    side = {k: v for k, v in read_sidecar(data["val"]).items() if k not in ("format", "version")}
    # (its sample count and class counts stay the file's own: a sidecar that contradicts them is refused on opening)
    write_sidecar(claimed, {**side, "fingerprint": fingerprint(src)})
    scores = class_scores_file(tmp_path / "s.json", data["train"], num_samples=open_beton(claimed).num_samples)
    result = run(claimed, "--scores", scores, "--ratio", "0.5", "-o", tmp_path / "q.beton")
    assert result.exit_code == 2 and "belongs to another source" in result.output, result.output


def test_val_with_cluster_scores_is_refused(data, tmp_path):
    out = _refuse(data, tmp_path, data["fm"], "--val", data["val"], "--val-out", tmp_path / "v.beton")
    assert "--val needs class-level scores" in out
    assert not (tmp_path / "v.beton").exists()


def test_val_of_other_classes_is_refused(data, tmp_path):
    """Same number of classes, other names: pruning it by label number would keep the wrong classes."""
    images, labels = separable_images(6, 4, 32, seed=9)
    npz = write_npz(tmp_path / "other.npz", images, labels, [f"other_{c}" for c in range(6)])
    other = tmp_path / "other.beton"
    convert(npz, other, params=WriterParams(max_resolution=32, write_mode="raw", num_workers=1))
    out = _refuse(data, tmp_path, data["scores"], "--val", other, "--val-out", tmp_path / "v.beton")
    assert "label 0 is 'other_0' there, 'class_0' here" in out
    assert not (tmp_path / "v.beton").exists()


def test_broken_scores_files_are_refused(data, tmp_path):
    (tmp_path / "bad.json").write_text("{")
    assert "not valid JSON" in _refuse(data, tmp_path, tmp_path / "bad.json")
    fm = tmp_path / "fm.json"
    shutil.copy(data["fm"], fm)  # its assignment file is not beside the copy
    assert f"fm.assign.npy, but {tmp_path / 'fm.assign.npy'} does not exist" in _refuse(data, tmp_path, fm)
    linked = tmp_path / "linked.json"  # a link finds it beside the file it points to, as a linked .beton does
    linked.symlink_to(data["fm"])
    result = run(data["train"], "--scores", linked, "--ratio", "0.5", "-o", tmp_path / "linked.beton")
    assert result.exit_code == 0, result.output
    check_samples(tmp_path / "linked.beton", data["train"], np.flatnonzero(np.isin(data["assign"], [0, 3])))


def test_a_scores_file_reached_through_a_chain_of_links_finds_its_assignment(data, tmp_path):
    """A link to a link to the scores file lost the assignment beside the middle one (only the end of the chain was
    looked beside), and `info` looked beside the link only, calling the file prune reads 'missing'."""
    (tmp_path / "runs").mkdir()
    middle = tmp_path / "runs" / "fm.json"
    shutil.copy(data["fm"], tmp_path / "fm_moved.json")
    shutil.copy(Path(data["fm"]).with_name("fm.assign.npy"), tmp_path / "runs" / "fm.assign.npy")
    middle.symlink_to("../fm_moved.json")
    link = tmp_path / "fm.json"
    link.symlink_to("runs/fm.json")
    result = run(data["train"], "--scores", link, "--ratio", "0.5", "-o", tmp_path / "linked.beton")
    assert result.exit_code == 0, result.output
    check_samples(tmp_path / "linked.beton", data["train"], np.flatnonzero(np.isin(data["assign"], [0, 3])))
    info = json.loads(CliRunner().invoke(cli, ["info", str(link), "--json"]).output)
    assert info["assignment"] == {"path": str(tmp_path / "runs" / "fm.assign.npy"), "state": "present, unchanged"}


def test_an_unreadable_assignment_file_is_one_sentence(data, tmp_path):
    """It stopped prune with 'internal error: PermissionError' (exit 1). /proc/self/mem stands for a file that
    cannot be read even by root (its first page is unmapped: EIO, as from a failing disk)."""
    if not os.path.isfile("/proc/self/mem"):
        pytest.skip("needs Linux's /proc/self/mem")
    fm = tmp_path / "fm.json"
    shutil.copy(data["fm"], fm)
    (tmp_path / "fm.assign.npy").symlink_to("/proc/self/mem")
    out = _refuse(data, tmp_path, fm)
    assert out.strip() == (f"Error: Assignment file {tmp_path / 'fm.assign.npy'} of scores file {fm} cannot be read "
                           "(Input/output error); make it readable.")


def test_existing_output_needs_force(data, tmp_path):
    out = tmp_path / "out.beton"
    out.write_bytes(b"keep me")
    assert "already exists; pass --force" in _refuse_existing(data, out)
    assert out.read_bytes() == b"keep me"
    result = run(data["train"], "--scores", data["scores"], "--ratio", "0.5", "-o", out, "--force")
    assert result.exit_code == 0 and open_beton(out).num_samples == 75


def test_an_output_whose_sidecar_is_an_input_is_refused_even_with_force(data, tmp_path):
    scores = tmp_path / "lm.json"
    shutil.copy(data["scores"], scores)
    before = scores.read_bytes()
    for extra in ([], ["--force"]):  # -o lm: its sidecar lm.json is the scores file
        result = run(data["train"], "--scores", scores, "--ratio", "0.5", "-o", tmp_path / "lm", *extra)
        assert result.exit_code == 2 and one_sentence(result.output)
        assert "would write its sidecar over" in result.output
    assert scores.read_bytes() == before and not (tmp_path / "lm").exists()
    side = f"{data['train']}.json"
    result = run(data["train"], "--scores", scores, "--ratio", "0.5", "-o", side, "--force")
    assert result.exit_code == 2 and "same file as the sidecar of input" in result.output
    (tmp_path / "out.beton.json").write_text("mine")  # a stray sidecar is an existing output too
    assert "out.beton.json already exists; pass --force" in _refuse_existing(data, tmp_path / "out.beton")
    assert (tmp_path / "out.beton.json").read_text() == "mine"


def test_the_assignment_of_a_moved_scores_file_is_an_input(data, tmp_path):
    shutil.copy(data["fm"], tmp_path / "moved.json")  # names fm.assign.npy, beside it
    shutil.copy(data["folder"] / "fm.assign.npy", tmp_path / "fm.assign.npy")
    before = (tmp_path / "fm.assign.npy").read_bytes()
    result = run(data["train"], "--scores", tmp_path / "moved.json", "--ratio", "0.5", "-o",
                 tmp_path / "fm.assign.npy", "--force")
    assert result.exit_code == 2 and "as input" in result.output and one_sentence(result.output)
    assert (tmp_path / "fm.assign.npy").read_bytes() == before


def _refuse_existing(data, out) -> str:
    result = run(data["train"], "--scores", data["scores"], "--ratio", "0.5", "-o", out)
    assert result.exit_code == 2 and one_sentence(result.output)
    return result.output


def test_interrupted_prune_leaves_nothing_under_the_final_names(data, tmp_path, monkeypatch):
    before = sha256(data["train"])

    def interrupted(writer, src, dst, n):
        raise KeyboardInterrupt

    monkeypatch.setattr(subset_mod, "_copy_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune(data["train"], data["scores"], tmp_path / "p_{ratio}.beton", ratios=[0.2, 0.6], val=data["val"],
              val_output=tmp_path / "v_{ratio}.beton")
    assert list(tmp_path.iterdir()) == []
    assert sha256(data["train"]) == before


def test_info_score_random_and_prune_never_import_torch_or_ffcv(tiny_beton, tmp_path):
    """The commands that need no model read FFCV's tables with NumPy: no seconds of torch/FFCV imports, no
    600 MB process (checked in a fresh interpreter, as a user runs them)."""
    import subprocess
    import sys

    script = f"""
import sys
from dptool.cli.main import main
for argv in (["info", {str(tiny_beton)!r}],
             ["score", "--method", "random", "--source", {str(tiny_beton)!r}, "-o", {str(tmp_path / 's.json')!r}],
             ["prune", {str(tiny_beton)!r}, "--scores", {str(tmp_path / 's.json')!r}, "--ratio", "0.5",
              "-o", {str(tmp_path / 'p.beton')!r}]):
    sys.argv = ["dptool", "-q", *argv]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, (argv, exc.code)
print(sorted(m for m in ("torch", "ffcv", "numba", "cv2") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
    assert open_beton(tmp_path / "p.beton").num_samples == 80


def test_help_states_how_a_ratio_is_rounded():
    """A ratio giving a fractional group count (0.5 of 3): the README said rounded half up, --help did not."""
    text = " ".join(run("--help").output.split())
    assert "rounded half up" in text and "[0, 1)" in text


def test_human_output_says_one_class_not_one_classes(tmp_path):
    """A pruned file of one class (and a one-image conversion) read '1 classes', '1 images', '1 samples' in the
    summaries of convert, score, prune and info; a count of one takes the singular."""
    import re

    from dptool.synthetic import write_image_folder

    images, labels = separable_images(3, 4, 16, seed=0)
    write_image_folder(tmp_path / "src", images, labels, ["a", "b", "c"])
    images, labels = separable_images(1, 1, 16, seed=0)
    write_image_folder(tmp_path / "one", images, labels, ["a"])
    runner = CliRunner()
    commands = [["convert", tmp_path / "src", tmp_path / "b.beton", "--max-res", "16"],
                ["convert", tmp_path / "one", tmp_path / "o.beton", "--max-res", "16"],
                ["info", tmp_path / "o.beton"],
                ["score", "--method", "random", "--source", tmp_path / "b.beton", "-o", tmp_path / "s.json"],
                ["prune", tmp_path / "b.beton", "--scores", tmp_path / "s.json", "--ratio", "0.67", "-o",
                 tmp_path / "p.beton"],
                ["info", tmp_path / "p.beton"]]
    outputs = []
    for command in commands:
        result = runner.invoke(cli, [str(a) for a in command])
        assert result.exit_code == 0, (command, result.output)
        outputs.append(result.output)
    text = "\n".join(outputs)
    assert not re.search(r"\b1 (classes|images|samples|files|groups|clusters)\b", text), text
    assert "1 image, 1 class," in outputs[1] and "1 sample," in outputs[2]
    assert "1 class, 1 class kept" in outputs[4] and "kept 4 samples, 1 class;" in outputs[4]
    assert "pruned: ratio 0.67, 1 group kept" in outputs[5]


def test_info_of_a_file_pruned_from_many_classes_lists_the_kept_ones(tmp_path):
    """A pruned ImageNet file (1000 classes, 600 kept) was listed by its first 50 label ids, 20 of them pruned away
    with count 0; beyond 50 classes info lists the classes with samples and sums up the rest. 60 classes here, the
    30 even ones kept."""
    source = make_beton(tmp_path, "many", n_classes=60, per_class=2, size=8)
    scores = class_scores_file(tmp_path / "even.json", source, scores=[1 - c % 2 for c in range(60)],
                               tiebreak=[0.0] * 60)
    out = tmp_path / "even.beton"
    assert run(source, "--scores", scores, "--keep", 30, "-o", out).exit_code == 0
    result = CliRunner().invoke(cli, ["info", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("classes:"))
    assert lines[start] == "classes: 60 (30 with samples, 2 to 2 each, median 2)"
    rows = [line.split() for line in lines[start + 1:start + 31]]
    assert [int(r[0]) for r in rows] == list(range(0, 60, 2)) and {r[1] for r in rows} == {"2"}
    assert lines[start + 31] == "  ... 30 classes without samples (use --json for all)"
    full = CliRunner().invoke(cli, ["info", str(source)]).output.splitlines()
    assert "  ... 10 more with samples (use --json for all)" in full
