"""`score --method fm --centroids-from`: FM groups of one run reused for another target, reading only that target.

A reused run must give exactly what a fresh run with the same clustering options gives, and must refuse a file
whose centroids are not points of this source in this surrogate's feature space at this resolution.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_score import _one_sentence

from dptool.checkpoint import load_checkpoint, save_checkpoint
from dptool.cli.main import cli
from dptool.convert import WriterParams, convert
from dptool.errors import InputError
from dptool.features import InferenceOptions
from dptool.scores import fingerprint_file, load_centroids, read_scores, write_scores
from dptool.scoring import ScoreOptions, score
from dptool.surrogate import load_surrogate
from dptool.synthetic import write_npz

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167

INFERENCE = InferenceOptions(res=16, batch_size=16, workers=1)
CLUSTERING = {"clusters": 8, "source_sample": 16, "seed": 1}
LOADER = ["--batch-size", "16", "--workers", "1"]


@pytest.fixture(scope="module")
def second_target(score_data):
    """A second target: source classes 0 and 1 (the first target has 2, 5 and 6)."""
    with np.load(score_data.folder / "source.npz") as z:
        images, labels = z["images"], z["labels"]
    keep = labels < 2
    out = score_data.folder / "target2.beton"
    if not out.exists():
        convert(write_npz(score_data.folder / "target2.npz", images[keep], labels[keep], ["a", "b"]), out,
                params=WriterParams(max_resolution=16, write_mode="raw", num_workers=1))
    return out


@pytest.fixture(scope="module")
def first_runs(score_data, tmp_path_factory):
    """FM on the first target, clusters and class means, written as scores files with their centroids."""
    folder = tmp_path_factory.mktemp("first")
    sur = load_surrogate(model=score_data.checkpoint)
    paths = {}
    for name, opts in (("clusters", ScoreOptions(inference=INFERENCE, **CLUSTERING)),
                       ("labels", ScoreOptions(inference=INFERENCE, groups="labels", source_sample=0))):
        run = score("fm", source=score_data.source, target=score_data.target, surrogate=sur, options=opts)
        paths[name] = run.write(folder / f"fm_{name}.json")
    return paths


def _streamed(monkeypatch):
    """The files FM streams images of, recorded around the real `stream`."""
    import dptool.scoring.fm as fm

    seen, real = [], fm.stream

    def recording(surrogate, beton, *args, **kwargs):
        seen.append(str(beton.path))
        return real(surrogate, beton, *args, **kwargs)

    monkeypatch.setattr(fm, "stream", recording)
    return seen


@pytest.mark.parametrize("groups", ["clusters", "labels"])
def test_reused_groups_give_what_a_fresh_run_gives(score_data, second_target, first_runs, groups, monkeypatch):
    sur = load_surrogate(model=score_data.checkpoint)
    opts = (ScoreOptions(inference=INFERENCE, **CLUSTERING) if groups == "clusters"
            else ScoreOptions(inference=INFERENCE, groups="labels", source_sample=0))
    fresh = score("fm", source=score_data.source, target=second_target, surrogate=sur, options=opts)
    seen = _streamed(monkeypatch)
    reused = score("fm", source=score_data.source, target=second_target, surrogate=sur,
                   options=ScoreOptions(inference=INFERENCE, centroids_from=str(first_runs[groups])))
    assert set(seen) == {str(second_target)}  # the source was not read again
    a, b = fresh.scores, reused.scores
    assert a.level == b.level == ("cluster" if groups == "clusters" else "class")
    for name in ("ids", "scores", "tiebreak", "ranks"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.names == b.names and a.extra == b.extra and a.target == b.target
    assert np.array_equal(fresh.centroids, reused.centroids)
    assert (fresh.assignment is None) == (reused.assignment is None)
    if fresh.assignment is not None:
        assert np.array_equal(fresh.assignment, reused.assignment)
    params = dict(b.params)
    origin = params.pop("centroids_from")
    assert params == a.params and origin["sha256"] == fingerprint_file(first_runs[groups])
    # the two targets differ, and so do their scores: the reused run did score the second target
    assert not np.array_equal(read_scores(first_runs[groups]).scores, b.scores)


def _invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def test_cli_takes_resolution_from_the_file_and_prune_and_info_read_the_result(score_data, second_target, tmp_path):
    base = ["score", "--method", "fm", "--source", score_data.source, "--model", score_data.checkpoint, *LOADER]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    made = _invoke(*base, "--target", score_data.target, "--res", 12, "--clusters", 6, "-o", first)
    assert made.exit_code == 0, made.output
    result = _invoke(*base, "--target", second_target, "--centroids-from", first, "-o", second, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["res"] == 12  # not the checkpoint's 16: the groups were made at 12 px
    assert "source features" not in summary["timings"] and "load centroids" in summary["timings"]
    s = read_scores(second)
    assert s.num_groups == 6 and s.params["clusters"] == 6 and s.params["centroids_from"]["path"] == str(first)
    assert np.array_equal(load_centroids(second, s), load_centroids(first, read_scores(first)))
    info = _invoke("info", second)
    assert info.exit_code == 0 and "centroids: " in info.output and "(present, unchanged)" in info.output
    pruned = _invoke("prune", score_data.source, "--scores", second, "--keep", 2, "-o", tmp_path / "p.beton")
    assert pruned.exit_code == 0, pruned.output
    _one_sentence(_invoke(*base, "--target", second_target, "--centroids-from", first, "--res", 16,
                          "-o", tmp_path / "other.json"), "was made with --res 12", "this run has 16")


def test_the_same_weights_loaded_another_way_are_accepted(score_data, second_target, first_runs, tmp_path):
    model, _ = load_checkpoint(score_data.checkpoint)
    weights = tmp_path / "state.pt"
    torch.save(model.state_dict(), weights)
    result = _invoke("score", "--method", "fm", "--source", score_data.source, "--target", second_target,
                     "--arch", "resnet18_small", "--weights", weights, "--centroids-from", first_runs["clusters"],
                     "-o", tmp_path / "s.json", *LOADER)
    assert result.exit_code == 0, result.output


def test_the_feature_layer_defaults_to_the_file_s(score_data, second_target, tmp_path):
    base = ["score", "--method", "fm", "--source", score_data.source, "--model", score_data.checkpoint, *LOADER]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    made = _invoke(*base, "--target", score_data.target, "--feature-layer", "fc", "-o", first)
    assert made.exit_code == 0, made.output
    result = _invoke(*base, "--target", second_target, "--centroids-from", first, "-o", second)
    assert result.exit_code == 0, result.output
    assert read_scores(second).surrogate["feature_layer"] == "fc"


def test_the_default_feature_layer_is_the_one_named(score_data, second_target, first_runs, tmp_path):
    """A file made without --feature-layer used the classifier `fc`: naming it is the same layer, another is not."""
    base = ["score", "--method", "fm", "--source", score_data.source, "--model", score_data.checkpoint,
            "--target", second_target, "--centroids-from", first_runs["clusters"], *LOADER]
    assert "feature_layer" not in read_scores(first_runs["clusters"]).surrogate
    named = _invoke(*base, "--feature-layer", "fc", "-o", tmp_path / "named.json")
    assert named.exit_code == 0, named.output
    _one_sentence(_invoke(*base, "--feature-layer", "avgpool", "-o", tmp_path / "other.json"),
                  "another surrogate (--feature-layer fc, this one has avgpool)")
    assert not (tmp_path / "other.json").exists()


def _copy_scores(src, folder, name, edit=None):
    """A copy of scores file `src` (and the files beside it) in `folder` as `name`, its JSON changed by `edit`."""
    doc = json.loads(src.read_text())
    for key in ("assignment", "centroids"):
        if doc.get(key):
            shutil.copy(src.with_name(doc[key]), folder / doc[key])
    if edit:
        edit(doc)
    out = folder / name
    out.write_text(json.dumps(doc))
    return out


def test_refusals_name_the_file_and_what_differs(score_data, second_target, first_runs, tmp_path):
    fm = first_runs["clusters"]
    base = ["score", "--source", score_data.source, "--target", second_target, "--model", score_data.checkpoint,
            "-o", tmp_path / "out.json", *LOADER]
    _one_sentence(_invoke(*base, "--method", "lm", "--centroids-from", fm), "applies to --method fm")
    _one_sentence(_invoke(*base, "--method", "fm", "--centroids-from", fm, "--clusters", 4),
                  "--clusters cannot be combined with --centroids-from")
    _one_sentence(_invoke(*base, "--method", "fm", "--centroids-from", fm, "--seed", 3), "--seed cannot")

    random = tmp_path / "random.json"
    assert _invoke("score", "--method", "random", "--source", score_data.source, "-o", random).exit_code == 0
    _one_sentence(_invoke(*base, "--method", "fm", "--centroids-from", random), "takes an FM scores file")

    def other_source(doc):
        doc["source"]["fingerprint"] = "blake2b:0000"

    def written_before_centroids(doc):
        del doc["centroids"], doc["centroids_sha256"]

    moved = _copy_scores(fm, tmp_path, "other_source.json", other_source)
    _one_sentence(_invoke(*base, "--method", "fm", "--centroids-from", moved), "was made from source",
                  "not from")
    old = _copy_scores(fm, tmp_path, "old.json", written_before_centroids)
    _one_sentence(_invoke(*base, "--method", "fm", "--centroids-from", old), "names no centroids file")

    state, _ = load_checkpoint(score_data.checkpoint)
    sd = {k: v.clone() for k, v in state.state_dict().items()}
    sd["fc.weight"] += 1e-3
    other = save_checkpoint(tmp_path / "other.pt", arch="resnet18_small", num_classes=8, state_dict=sd,
                            recipe={"val_res": 16}, data_fingerprint=None, epoch=1)
    _one_sentence(_invoke("score", "--method", "fm", "--source", score_data.source, "--target", second_target,
                          "--model", other, "--centroids-from", fm, "-o", tmp_path / "out.json", *LOADER),
                  "another surrogate", "weights fingerprint")

    replaced = _copy_scores(fm, tmp_path, "replaced.json")
    cent = tmp_path / json.loads(replaced.read_text())["centroids"]
    np.save(cent, np.load(cent) + 1)
    _one_sentence(_invoke(*base, "--method", "fm", "--centroids-from", replaced), "Centroids file",
                  "replaced since")
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.assign.npy").exists()


def test_write_scores_checks_the_centroids(first_runs, tmp_path):
    s = read_scores(first_runs["clusters"])
    with pytest.raises(InputError, match="one centroid row per group"):
        write_scores(tmp_path / "s.json", s, assignment=np.zeros(s.source["num_samples"], np.int32),
                     centroids=np.zeros((s.num_groups - 1, 4), np.float32))
    with pytest.raises(InputError, match="NaN or infinite values"):
        write_scores(tmp_path / "s.json", s, assignment=np.zeros(s.source["num_samples"], np.int32),
                     centroids=np.full((s.num_groups, 4), np.nan, np.float32))
    assert not list(tmp_path.iterdir())


def test_clustering_options_given_at_their_default_are_refused_too(score_data, second_target, first_runs, tmp_path):
    """`--groups clusters` against class-mean groups, `--seed 0` against groups made with seed 1: the default value,
    but given; the run would not do what it says (class-level scores, seed 1), so it is refused as any value is."""
    base = ["score", "--method", "fm", "--source", score_data.source, "--target", second_target, "--model",
            score_data.checkpoint, "-o", tmp_path / "out.json", *LOADER]
    _one_sentence(_invoke(*base, "--centroids-from", first_runs["labels"], "--groups", "clusters"),
                  "--groups cannot be combined with --centroids-from")
    _one_sentence(_invoke(*base, "--centroids-from", first_runs["clusters"], "--seed", 0), "--seed cannot")
    _one_sentence(_invoke(*base, "--centroids-from", first_runs["clusters"], "--source-sample", 256),
                  "--source-sample cannot")
    assert not list(tmp_path.iterdir())


def test_a_scores_file_of_another_method_is_refused_as_such(score_data, second_target, tmp_path):
    """LM scores at 40 px (upscaled): their --res must not become this run's default and be refused as an upscale."""
    lm = tmp_path / "lm.json"
    made = _invoke("score", "--method", "lm", "--source", score_data.source, "--target", score_data.target,
                   "--model", score_data.checkpoint, "--res", 40, "--allow-upscale", "-o", lm, *LOADER)
    assert made.exit_code == 0, made.output
    _one_sentence(_invoke("score", "--method", "fm", "--source", score_data.source, "--target", second_target,
                          "--model", score_data.checkpoint, "--centroids-from", lm, "-o", tmp_path / "out.json",
                          *LOADER), "takes an FM scores file", "holds lm scores")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.json"]
