"""`dptool score`: LM, FM and baselines against plain torch / NumPy references, the scores file, and refusals.

The data (fixture `score_data` in conftest.py): 8 separable source classes, and a target drawn from source
classes 2, 5 and 6 only, so a working method ranks exactly those at the top. Each FFCV loader costs seconds of
compilation, so every scoring run happens once per module and is shared by the tests that inspect it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dptool.beton import fingerprint, open_beton
from dptool.checkpoint import save_checkpoint
from dptool.cli.main import cli
from dptool.errors import InputError
from dptool.features import InferenceOptions
from dptool.models import create_model
from dptool.scores import fingerprint_file, read_scores, write_scores
from dptool.scoring import (
    ScoreOptions,
    check_resolution,
    get_method,
    kmeans,
    list_methods,
    register_method,
    score,
    stored_resolution,
)
from dptool.scoring.fm import nearest, sample_rows
from dptool.surrogate import weights_fingerprint

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167

LOADER = ["--batch-size", "16", "--workers", "1"]
INFERENCE = InferenceOptions(res=16, batch_size=16, workers=1)


def _invoke(*args):
    return CliRunner().invoke(cli, ["score", *map(str, args)])


def _brute_nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Distances to every centroid in float64, arg-min; np.argmin returns the first (smallest) index on ties."""
    d = ((np.asarray(x, np.float64)[:, None, :] - np.asarray(centroids, np.float64)[None]) ** 2).sum(axis=2)
    return d.argmin(axis=1)


def _brute_closest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(K,) float64 squared L2 distance from each centroid to its nearest row of `x`."""
    d = ((np.asarray(x, np.float64)[:, None, :] - np.asarray(centroids, np.float64)[None]) ** 2).sum(axis=2)
    return d.min(axis=0)


@pytest.fixture(scope="module")
def lm_cli(score_data):
    out, png = score_data.folder / "lm.json", score_data.folder / "lm.png"
    result = _invoke("--method", "lm", "--source", score_data.source, "--target", score_data.target, "--model",
                     score_data.checkpoint, "-o", out, "--plot", png, "--json", *LOADER)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out, png


def test_lm_equals_plain_torch_loop(lm_cli, target_ref, score_data):
    _, out, _ = lm_cli
    s = read_scores(out)
    logits, _, labels = target_ref
    pred = logits.argmax(dim=1).numpy()
    assert np.array_equal(s.scores, np.bincount(pred, minlength=8))
    mass = torch.softmax(logits, dim=1).sum(dim=0).double().numpy()
    np.testing.assert_allclose(s.tiebreak, mass, rtol=1e-4, atol=1e-5)
    joint = np.zeros((8, 3), np.int64)
    np.add.at(joint, (pred, labels), 1)
    got = s.extra["joint_histogram"]["counts"]
    assert {int(k): v for k, v in got.items()} == {c: joint[c].tolist() for c in range(8) if joint[c].any()}
    assert s.level == "class" and "softmax" in s.tie_break and s.params["res"] == 16


def test_lm_ranks_the_target_classes_first(lm_cli, score_data):
    summary, out, _ = lm_cli
    s = read_scores(out)
    assert set(s.order()[:3].tolist()) == set(score_data.subset)
    assert {t["id"] for t in summary["top"][:3]} == set(score_data.subset)
    assert summary["zero_score_groups"] == int((s.scores == 0).sum()) >= 5
    assert summary["top"][0]["name"].startswith("source_") and "target inference" in summary["timings"]


def test_scores_file_round_trips_with_fingerprints(lm_cli, score_data, tmp_path):
    _, out, png = lm_cli
    s = read_scores(out)
    assert s.source["fingerprint"] == fingerprint(open_beton(score_data.source))
    assert s.target["fingerprint"] == fingerprint(open_beton(score_data.target))
    assert s.source["num_classes"] == 8 and s.target["num_samples"] == 45
    assert s.surrogate["kind"] == "checkpoint" and s.surrogate["sha256"] == fingerprint_file(score_data.checkpoint)
    copy = write_scores(tmp_path / "again.json", s)
    again = read_scores(copy)
    assert json.loads(copy.read_text())["groups"] == json.loads(out.read_text())["groups"]
    assert again.to_dict() == s.to_dict()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fm_labels(score_data):
    return score("fm", source=score_data.source, target=score_data.target, surrogate=_surrogate(score_data),
                 options=ScoreOptions(inference=INFERENCE, groups="labels", source_sample=0))


@pytest.fixture(scope="module")
def fm_clusters(score_data):
    opts = ScoreOptions(inference=INFERENCE, clusters=8, source_sample=16, seed=1)  # 16 of 24 per class sampled
    return score("fm", source=score_data.source, target=score_data.target, surrogate=_surrogate(score_data),
                 options=opts)


def _surrogate(data):
    from dptool.surrogate import load_surrogate

    return load_surrogate(model=data.checkpoint)


def test_fm_labels_votes_equal_numpy_brute_force(fm_labels, source_ref, target_ref, score_data):
    _, src_feats, src_labels = source_ref
    means = np.stack([src_feats[src_labels == c].mean(axis=0) for c in range(8)])
    np.testing.assert_allclose(fm_labels.centroids, means, rtol=1e-4, atol=1e-4)
    votes = np.bincount(_brute_nearest(target_ref[1], fm_labels.centroids), minlength=8)
    s = fm_labels.scores
    assert s.level == "class" and np.array_equal(s.scores, votes)
    assert set(s.order()[:3].tolist()) == set(score_data.subset)
    assert fm_labels.assignment is None


def test_fm_clusters_votes_and_assignment_equal_brute_force(fm_clusters, source_ref, target_ref, score_data):
    s, cent = fm_clusters.scores, fm_clusters.centroids
    assert s.level == "cluster" and cent.shape == (8, 512)
    sampled = sample_rows(source_ref[2], 8, 16, seed=1)  # k-means ran on these rows' features
    np.testing.assert_allclose(cent, kmeans(source_ref[1][sampled], 8, niter=20, seed=1), rtol=1e-4, atol=1e-4)
    assert np.array_equal(s.scores, np.bincount(_brute_nearest(target_ref[1], cent), minlength=8))
    # every source row, sampled (features reused) or streamed afterwards, is assigned to its nearest centroid
    assert np.array_equal(fm_clusters.assignment, _brute_nearest(source_ref[1], cent))
    assert fm_clusters.assignment.dtype == np.int32 and s.params["sampled_images"] == 128
    # the voted clusters are made of the target's source classes, and they rank first
    voted = np.nonzero(s.scores)[0]
    major = np.asarray(s.extra["majority_class"])
    assert set(major[voted].tolist()) <= set(score_data.subset)
    assert set(s.order()[: len(voted)].tolist()) == set(voted.tolist())
    in_voted = np.isin(fm_clusters.assignment, voted)
    assert np.isin(source_ref[2][in_voted], score_data.subset).mean() >= 0.9
    # ties (here the clusters without a vote) go to the cluster whose centroid is closest to a target feature:
    # tiebreak = minus that squared L2 distance, so the unvoted clusters rank in order of proximity
    closest = _brute_closest(target_ref[1], cent)
    np.testing.assert_allclose(s.tiebreak, -closest, rtol=1e-4, atol=1e-3)  # float32 distance expansion
    unvoted = s.order()[len(voted):]
    assert len(unvoted) >= 2 and np.all(np.diff(closest[unvoted]) > 0)


def test_fm_scores_file_carries_the_assignment(fm_clusters, tmp_path):
    from dptool.scores import load_assignment

    path = fm_clusters.write(tmp_path / "fm.json")
    s = read_scores(path)
    assert np.array_equal(load_assignment(path, s), fm_clusters.assignment)
    assert "closer first" in s.tie_break and s.params["clusters"] == 8


def test_info_shows_scores_and_the_state_of_the_assignment(fm_clusters, lm_cli, score_data, tmp_path):
    _, lm_path, _ = lm_cli
    info = json.loads(CliRunner().invoke(cli, ["info", str(lm_path), "--json"]).output)
    assert (info["kind"], info["method"], info["level"], info["groups"]) == ("scores", "lm", "class", 8)
    assert {t["id"] for t in info["top"][:3]} == set(score_data.subset)
    assert info["source"]["fingerprint"] == fingerprint(open_beton(score_data.source)) and info["assignment"] is None

    path = fm_clusters.write(tmp_path / "fm.json")
    assign = tmp_path / "fm.assign.npy"

    def shown():
        result = CliRunner().invoke(cli, ["info", str(path)])
        assert result.exit_code == 0, result.output
        return result.output

    assert "fm scores of 8 clusters" in shown() and "(present, unchanged)" in shown()
    np.save(assign, (fm_clusters.assignment + 1) % 8)
    assert "(replaced since; prune refuses it)" in shown()
    assign.unlink()
    assert "(missing)" in shown()


def test_nearest_ties_go_to_the_smallest_index(rng):
    x = rng.normal(size=(300, 16)).astype(np.float32)
    cent = rng.normal(size=(20, 16)).astype(np.float32)
    cent[7] = cent[3]  # duplicate centroids: every row nearest to one of them must pick 3
    x[:10] = cent[3]
    idx, dist = nearest(torch.from_numpy(x), cent)
    assert np.array_equal(idx, _brute_nearest(x, cent))
    assert not np.isin(7, idx) and (idx[:10] == 3).all() and dist.dtype == np.float32


def test_el2n_matches_plain_torch(score_data, source_ref):
    """The class score is the mean EL2N over the --source-sample images of the class (20 of 24 here)."""
    run = score("el2n", source=score_data.source, surrogate=_surrogate(score_data),
                options=ScoreOptions(inference=INFERENCE, source_sample=20, seed=2))
    logits, _, labels = source_ref
    err = torch.softmax(logits, dim=1) - torch.nn.functional.one_hot(torch.from_numpy(labels), 8)
    per = torch.linalg.vector_norm(err.double(), dim=1).numpy()
    rows = sample_rows(labels, 8, 20, seed=2)
    expect = np.array([per[rows][labels[rows] == c].mean() for c in range(8)])
    np.testing.assert_allclose(run.scores.scores, expect, atol=1e-5)
    assert run.scores.params["sampled_images"] == 160 and run.scores.extra["images_per_class"] == [20] * 8
    assert run.scores.target is None


def test_random_baseline_is_seeded(score_data, tmp_path):
    docs = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        result = _invoke("--method", "random", "--seed", seed, "--source", score_data.source,
                         "-o", tmp_path / f"{name}.json", "--json")
        assert result.exit_code == 0, result.output
        docs.append(read_scores(tmp_path / f"{name}.json"))
    assert np.array_equal(docs[0].ranks, docs[1].ranks) and not np.array_equal(docs[0].ranks, docs[2].ranks)
    assert sorted(docs[0].scores) == list(range(1, 9)) and docs[0].surrogate is None


def test_sample_rows_caps_each_class():
    labels = np.repeat(np.arange(5), [3, 10, 0, 7, 1])
    rows = sample_rows(labels, 5, 4, seed=0)
    assert np.array_equal(np.bincount(labels[rows], minlength=5), [3, 4, 0, 4, 1])
    assert np.array_equal(rows, np.sort(rows)) and np.array_equal(rows, sample_rows(labels, 5, 4, seed=0))
    assert not np.array_equal(rows, sample_rows(labels, 5, 4, seed=1))  # --seed picks another sample
    assert np.array_equal(sample_rows(labels, 5, 0, seed=0), np.arange(len(labels)))


@pytest.mark.parametrize("spread", [1.0, 0.05])  # no structure (runs all iterations); tight blobs (stops early)
def test_kmeans_equals_faiss_kmeans(rng, spread):
    import faiss

    centres = rng.normal(size=(10, 8)).astype(np.float32)
    x = (centres[rng.integers(10, size=2000)] + spread * rng.normal(size=(2000, 8))).astype(np.float32)
    km = faiss.Kmeans(8, 10, niter=30, seed=5, max_points_per_centroid=10_000)
    km.train(x)
    np.testing.assert_allclose(kmeans(x, 10, niter=30, seed=5, init="random"), km.centroids, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="at least 10 source features"):
        kmeans(x[:5], 10)


def test_kmeans_falls_back_to_the_cpu_where_faiss_cannot_use_a_gpu(rng, monkeypatch, caplog):
    """faiss-gpu installed where no GPU works reports GPUs and fails on first use: here faiss-cpu told it has one
    fails in `index_cpu_to_all_gpus` for real; k-means warns and gives the CPU's centroids."""
    import importlib

    kmeans_mod = importlib.import_module("dptool.scoring.kmeans")  # the package's `kmeans` is the function
    x = rng.normal(size=(500, 8)).astype(np.float32)
    expected = kmeans(x, 6, niter=5, seed=3)
    monkeypatch.setattr(kmeans_mod, "faiss_gpus", lambda: 1)
    with caplog.at_level("WARNING", logger="dptool.scoring.kmeans"):
        got = kmeans(x, 6, niter=5, seed=3)
    assert np.array_equal(got, expected)
    assert "k-means runs on the CPU" in caplog.text


def test_registry():
    assert {"lm", "fm", "random", "el2n"} <= set(list_methods())
    with pytest.raises(ValueError, match="already registered"):
        register_method("lm", help="again")(lambda ctx: None)
    with pytest.raises(InputError, match="choose one of: el2n, fm, lm, random"):
        get_method("flm")
    help_text = _invoke("-h").output
    assert all(m in help_text for m in list_methods()) and "--source-sample" in help_text


def _one_sentence(result, *fragments):
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()
    assert len(message) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in message[0], message[0]


def test_refuses_a_surrogate_with_the_wrong_width(score_data, tmp_path):
    wrong = save_checkpoint(tmp_path / "five.pt", arch="resnet18_small", num_classes=5,
                            state_dict=create_model("resnet18_small", 5).state_dict(), recipe={}, data_fingerprint=None,
                            epoch=0)
    result = _invoke("--source", score_data.source, "--target", score_data.target, "--model", wrong,
                     "--res", 16, "-o", tmp_path / "s.json")
    _one_sentence(result, "outputs 5 class scores", "has 8 classes")
    assert not (tmp_path / "s.json").exists()


def test_refuses_an_empty_target(score_data, tmp_path):
    empty = tmp_path / "empty.beton"
    shutil.copy(score_data.target, empty)
    with open(empty, "r+b") as f:  # header field num_samples (uint64 at byte 8) = 0: a file with no samples
        f.seek(8)
        f.write(np.uint64(0).tobytes())
    result = _invoke("--source", score_data.source, "--target", empty, "--model", score_data.checkpoint,
                     "-o", tmp_path / "s.json")
    _one_sentence(result, "has no samples")


def test_refuses_a_resolution_mismatch(score_data, tmp_path):
    from dptool.convert import WriterParams, convert
    from dptool.synthetic import separable_images, write_npz

    images, labels = separable_images(3, 4, 6, seed=0)  # 6 px target, scored at 16 px: 2.7x upscaling
    small = tmp_path / "small.beton"
    convert(write_npz(tmp_path / "small.npz", images, labels), small,
            params=WriterParams(max_resolution=8, write_mode="raw", num_workers=1))
    result = _invoke("--source", score_data.source, "--target", small, "--model", score_data.checkpoint,
                     "-o", tmp_path / "s.json")
    _one_sentence(result, "Resolution mismatch", "stores 6 px", "--res 16", "--allow-upscale")
    files = {"source": open_beton(score_data.source), "target": open_beton(small)}
    assert stored_resolution(files["target"]) == 6
    check_resolution(files, 16, allow_upscale=True)  # accepted when asked for
    check_resolution(files, 12)  # 2x is still accepted


def test_a_surrogate_trained_without_val_is_scored_at_its_training_resolution(score_data, tmp_path):
    """A checkpoint trained without --val records train's unused --val-res default (256); scoring took it as the
    resolution to score at and refused 16 px files for upscaling 16x, though the surrogate never saw 256 px."""
    ckpt = tmp_path / "noval.pt"
    trained = CliRunner().invoke(cli, ["train", str(score_data.source), "-o", str(ckpt), "--arch", "resnet_tiny",
                                       "--epochs", "1", "--batch-size", "32", "--min-res", "16", "--max-res", "16",
                                       "--workers", "1"])
    assert trained.exit_code == 0, trained.output
    result = _invoke("--source", score_data.source, "--target", score_data.target, "--model", ckpt,
                     "-o", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    assert read_scores(tmp_path / "s.json").params["res"] == 16


def test_refusals_before_any_work(score_data, tmp_path):
    exists = tmp_path / "exists.json"
    exists.write_text("keep me")
    base = ["--source", score_data.source, "--target", score_data.target]
    _one_sentence(_invoke(*base, "--model", score_data.checkpoint, "-o", exists), "already exists", "--force")
    assert exists.read_text() == "keep me"
    out = tmp_path / "s.json"
    _one_sentence(_invoke("--source", score_data.source, "--model", score_data.checkpoint, "-o", out),
                  "--method lm needs --target")
    _one_sentence(_invoke(*base, "-o", out), "exactly one of --model")
    _one_sentence(_invoke(*base, "--model", score_data.checkpoint, "--arch", "resnet18", "-o", out), "exactly one")
    _one_sentence(_invoke(*base, "--method", "fm", "--model", score_data.checkpoint, "--feature-layer", "nope",
                          "-o", out), "--feature-layer 'nope'")
    _one_sentence(_invoke(*base, "--arch", "resnet18", "-o", out), "needs --weights")
    _one_sentence(_invoke(*base, "--method", "fm", "--groups", "labels", "--clusters", 4, "--model",
                          score_data.checkpoint, "-o", out), "--clusters applies to --groups clusters")
    _one_sentence(_invoke(*base, "--method", "fm", "--clusters", 17, "--source-sample", 2, "--model",
                          score_data.checkpoint, "-o", out), "--clusters must be between 1 and the 16 sampled")
    assert not out.exists()
    _one_sentence(_invoke(*base, "--model", score_data.checkpoint, "--std", 0.2, 0, 0.2, "-o", out),
                  "--std values must all be > 0", "got 0.2 0.0 0.2")
    (tmp_path / "s.assign.npy").write_bytes(b"keep me")  # FM clusters write s.assign.npy beside s.json
    _one_sentence(_invoke(*base, "--method", "fm", "--model", score_data.checkpoint, "-o", out),
                  "s.assign.npy already exists", "--force")
    assert (tmp_path / "s.assign.npy").read_bytes() == b"keep me" and not out.exists()
    (tmp_path / "s.centroids.npy").write_bytes(b"keep me")  # and FM, clusters or labels, s.centroids.npy
    _one_sentence(_invoke(*base, "--method", "fm", "--groups", "labels", "--model", score_data.checkpoint, "-o", out),
                  "s.centroids.npy already exists", "--force")
    assert (tmp_path / "s.centroids.npy").read_bytes() == b"keep me" and not out.exists()
    model = tmp_path / "surrogate.pt"  # the surrogate is an input: --force never writes over it
    shutil.copy(score_data.checkpoint, model)
    for extra in (["-o", model], ["-o", out, "--plot", model]):
        _one_sentence(_invoke(*base, "--model", model, *extra, "--force"), "is the same file as input")
    assert model.read_bytes() == Path(score_data.checkpoint).read_bytes() and not out.exists()
    if not torch.cuda.is_available():
        _one_sentence(_invoke(*base, "--model", score_data.checkpoint, "--device", "cuda", "-o", out),
                      "--device cuda: torch sees no CUDA device here")


@pytest.mark.parametrize("clusters", [17, 0])
def test_fm_refuses_a_bad_cluster_count_before_reading_images(score_data, monkeypatch, clusters):
    """Checked on every rank before feature extraction (k-means, on rank 0 alone, would leave the others waiting)."""
    import dptool.scoring.fm as fm

    def no_images(*args, **kwargs):
        raise AssertionError("images were read before --clusters was checked")

    monkeypatch.setattr(fm, "stream", no_images)
    opts = ScoreOptions(inference=INFERENCE, clusters=clusters, source_sample=2)  # 2 of each of 8 classes
    with pytest.raises(InputError, match=f"between 1 and the 16 sampled source images .*, got {clusters}"):
        score("fm", source=score_data.source, target=score_data.target, surrogate=_surrogate(score_data),
              options=opts)


def test_out_of_memory_is_not_reported_as_a_resolution_problem():
    from types import SimpleNamespace

    from dptool.scoring.run import _output_width

    def oom(_x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(InputError, match="does not fit in the memory of cpu"):
        _output_width(SimpleNamespace(model=oom), INFERENCE)


def test_a_device_fault_is_not_reported_as_a_resolution_problem():
    """A CUDA fault (raised as a RuntimeError) is the device's, exit 1; a model that cannot take the images' size
    is the user's, exit 2. Both raise RuntimeError, told apart by what CUDA and its libraries say."""
    from types import SimpleNamespace

    from dptool.errors import DptoolError
    from dptool.scoring.run import _output_width

    def raising(message):
        def forward(_x):
            raise RuntimeError(message)
        return SimpleNamespace(model=forward)

    fault = "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported"
    with pytest.raises(DptoolError, match="failed on cpu, a fault of the device .*: CUDA error: an illegal memory "
                                          r"access was encountered \(CUDA_LAUNCH") as err:
        _output_width(raising(fault), INFERENCE)
    assert not isinstance(err.value, InputError) and "\n" not in str(err.value)
    with pytest.raises(InputError, match=f"cannot take {INFERENCE.res}x{INFERENCE.res} images: mat1 and mat2 shapes"):
        _output_width(raising("mat1 and mat2 shapes cannot be multiplied (1x8 and 4x2)"), INFERENCE)


def test_warns_when_the_surrogate_was_trained_on_other_data(score_data, caplog):
    from types import SimpleNamespace

    from dptool.scoring.run import _warn_fingerprint

    src = open_beton(score_data.source)
    real = fingerprint(src)
    with caplog.at_level("WARNING", logger="dptool.scoring.run"):
        _warn_fingerprint(SimpleNamespace(identity={"data_fingerprint": real}), src, real)
        assert not caplog.records
        _warn_fingerprint(SimpleNamespace(identity={"data_fingerprint": "blake2b:other"}), src, real)
    assert len(caplog.records) == 1 and "blake2b:other" in caplog.text and real in caplog.text


def test_fm_default_clusters_count_the_classes_with_samples(score_data, tmp_path):
    """A source whose label range has gaps (a pruned file, a foreign file) gets one cluster per class with samples."""
    from dptool.convert import WriterParams, convert
    from dptool.synthetic import write_npz

    arrays = np.load(Path(score_data.source).with_suffix(".npz"))
    keep = ~np.isin(arrays["labels"], [1, 4])
    npz = write_npz(tmp_path / "gaps.npz", arrays["images"][keep], arrays["labels"][keep],
                    [f"c{c}" for c in range(8)])
    source = tmp_path / "gaps.beton"
    convert(npz, source, params=WriterParams(max_resolution=16, write_mode="raw", num_workers=1))
    run = score("fm", source=source, target=score_data.target, surrogate=_surrogate(score_data),
                options=ScoreOptions(inference=INFERENCE, source_sample=4))
    assert run.scores.level == "cluster" and run.scores.num_groups == 6
    assert len(run.assignment) == keep.sum() and set(np.unique(run.assignment)) <= set(range(6))


def test_fm_options_given_to_another_method_are_refused(score_data, tmp_path):
    """`--method lm --clusters 100` ran LM and ignored --clusters without a word (as --groups, --kmeans-iters and
    --feature-layer); --centroids-from, FM's too, was already refused so."""
    base = ["--source", score_data.source, "--target", score_data.target, "-o", tmp_path / "s.json"]
    model = ["--model", score_data.checkpoint]
    for method, extra, flag in (("lm", [*model, "--clusters", 3], "--clusters"),
                                ("el2n", [*model, "--groups", "labels"], "--groups"),
                                ("random", ["--kmeans-iters", 5], "--kmeans-iters"),
                                ("lm", [*model, "--feature-layer", "fc"], "--feature-layer")):
        _one_sentence(_invoke("--method", method, *base, *extra), f"{flag} applies to --method fm, not to "
                                                                   f"--method {method}")
    assert not list(tmp_path.iterdir())


def test_shared_options_a_method_does_not_read_are_warned_about(score_data, tmp_path):
    """`--method lm --seed 3` ran LM, which draws nothing at random, and said nothing: a user looping over seeds
    saw one result five times. Options the method does not read are named in a warning; the run goes on (scripts
    looping over methods pass them all) and its scores are those without them."""
    base = ["--source", score_data.source, "--target", score_data.target]
    model = ["--model", score_data.checkpoint]
    cases = (("lm", [*model, "--seed", 3, "--source-sample", 4], "--method lm does not use --seed, --source-sample"),
             ("random", [*model, "--res", 16, "--seed", 2], "--method random does not use --model, --res"),
             ("el2n", [*model, "--seed", 2, "--source-sample", 4], None),
             ("fm", [*model, "--seed", 2, "--source-sample", 4, "--clusters", 3], None))
    for method, extra, warning in cases:
        result = _invoke("--method", method, *base, *extra, "-o", tmp_path / f"{method}.json")
        assert result.exit_code == 0, result.output
        warned = [line for line in result.stderr.splitlines() if "does not use" in line]
        assert warned == ([f"WARNING dptool.scoring.pipeline: {warning}; ignored"] if warning else []), warned
    plain = _invoke("--method", "lm", *base, *model, "-o", tmp_path / "plain.json")
    assert plain.exit_code == 0, plain.output
    read = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("lm", "plain")]
    assert read[0]["groups"] == read[1]["groups"] and read[0]["params"] == read[1]["params"]


def test_library_callers_are_told_of_options_a_method_does_not_read(score_data, tmp_path, caplog):
    """From Python, `score_files(method="lm", options=ScoreOptions(clusters=3))` ran LM and dropped `clusters`
    without a word (the refusal and the warnings lived in the CLI). Options set to a value other than their default
    are now named in the CLI's warning (not refused: a script may pass one ScoreOptions to every method). A
    checkpoint path is accepted as the surrogate; an unknown surrogate key is refused."""
    from dptool.scoring import score_files

    common = {"source": score_data.source, "target": score_data.target, "res": 16}
    with pytest.raises(InputError, match="Unknown surrogate key 'checkpoint'; accepted: model, arch"):
        score_files(tmp_path / "s.json", method="lm", surrogate={"checkpoint": score_data.checkpoint}, **common)
    assert not list(tmp_path.iterdir())
    with caplog.at_level("WARNING", logger="dptool.scoring"):
        score_files(tmp_path / "lm.json", method="lm", surrogate=score_data.checkpoint,
                    options=ScoreOptions(inference=InferenceOptions(workers=1), clusters=3, seed=2), **common)
        score_files(tmp_path / "el2n.json", method="el2n", source=score_data.source, res=16,
                    surrogate={"model": score_data.checkpoint, "feature_layer": "fc"})
        score_files(tmp_path / "random.json", method="random", surrogate=score_data.checkpoint, res=16,
                    options=ScoreOptions(seed=2), source=score_data.source)
        score_files(tmp_path / "plain.json", method="lm", surrogate=score_data.checkpoint, **common)
    assert [r.getMessage() for r in caplog.records] == ["--method lm does not use --clusters, --seed; ignored",
                                                        "--method el2n does not use --feature-layer; ignored",
                                                        "--method random does not use --model, --res; ignored"]
    read = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("lm", "plain")]
    assert read[0]["groups"] == read[1]["groups"] and read[0]["surrogate"]["kind"] == "checkpoint"


def test_the_plot_through_a_linked_folder_cannot_replace_the_scores_file(score_data, tmp_path):
    """`--plot here/s.json -o s.json --force`, `here` a link to the folder: the plot was compared with the scores
    file by its spelling only, and the PNG renamed last replaced the scores file just written (exit 0)."""
    out = tmp_path / "s.json"
    base = ["--method", "random", "--source", score_data.source, "-o", out]
    assert _invoke(*base).exit_code == 0
    (tmp_path / "here").symlink_to(tmp_path)
    _one_sentence(_invoke(*base, "--force", "--plot", tmp_path / "here" / "s.json"),
                  "is the same path as the scores file")
    assert read_scores(out).method == "random"


def test_the_plot_cannot_take_the_place_of_a_file_written_beside_the_scores(score_data, tmp_path):
    """`--plot s.centroids.npy` (or s.assign.npy) with `-o s.json`: the PNG was renamed over the centroids just
    written, and the run reported success with a scores file whose centroids were gone."""
    out = tmp_path / "s.json"
    base = ["--method", "fm", "--source", score_data.source, "--target", score_data.target, "--model",
            score_data.checkpoint, "--batch-size", 16, "--workers", 1, "-o", out]
    for name in ("s.centroids.npy", "s.assign.npy"):
        _one_sentence(_invoke(*base, "--plot", tmp_path / name), f"{name} is the same path as",
                      "written beside the scores file")
    # `--plot` = `-o`: the scores file is this run's output, not an input (the refusal said 'as input s.json')
    result = _invoke(*base, "--plot", out)
    _one_sentence(result, "is the same path as the scores file")
    assert "input" not in result.output
    assert not list(tmp_path.iterdir())


def test_fm_with_a_self_supervised_checkpoint(score_data, tmp_path):
    """FM from a MoCo v2 file of the checkpoint's backbone equals FM from the checkpoint (features are the classifier's
    input); LM and EL2N, which need class scores, refuse a backbone without a classifier."""
    from test_surrogate import _self_supervised_files

    from dptool.checkpoint import load_checkpoint

    net, _ = load_checkpoint(score_data.checkpoint)
    moco = _self_supervised_files(net, tmp_path)["moco_v2"]
    common = ["--source", score_data.source, "--target", score_data.target, "--res", 16, *LOADER,
              "--method", "fm", "--clusters", 8, "--source-sample", 16, "--seed", 1]
    for name, surrogate in (("ckpt", ["--model", score_data.checkpoint]),
                            ("moco", ["--arch", "resnet18_small", "--weights", moco])):
        result = _invoke(*common, *surrogate, "-o", tmp_path / f"{name}.json")
        assert result.exit_code == 0, result.output
    ours, theirs = read_scores(tmp_path / "moco.json"), read_scores(tmp_path / "ckpt.json")
    np.testing.assert_array_equal(ours.scores, theirs.scores)
    np.testing.assert_array_equal(ours.tiebreak, theirs.tiebreak)
    assert (tmp_path / "moco.assign.npy").read_bytes() == (tmp_path / "ckpt.assign.npy").read_bytes()
    assert ours.surrogate["weights_prefix"] == "encoder_q." and ours.surrogate["num_classes"] is None
    for method in ("lm", "el2n"):
        result = _invoke("--method", method, "--source", score_data.source, "--target", score_data.target,
                         "--arch", "resnet18_small", "--weights", moco, "-o", tmp_path / f"{method}.json")
        _one_sentence(result, f"--method {method} needs the surrogate's class scores", "moco_v2.pth.tar",
                      "without a classifier")
        assert not (tmp_path / f"{method}.json").exists()


@pytest.fixture(scope="module")
def vit_data(tmp_path_factory):
    """32 px source (4 classes, 2 images each) and target (2 classes), a vit_b_16 made for 32 px images with a
    4-way head saved as a torchvision state dict, and the same weights resampled to 64 px as a dptool checkpoint."""
    import types

    from conftest import make_beton

    from dptool.models import resize_vit

    folder = tmp_path_factory.mktemp("vit")
    source = make_beton(folder, "source", n_classes=4, per_class=2, size=32)
    target = make_beton(folder, "target", n_classes=2, per_class=2, size=32, seed=1)
    torch.manual_seed(0)
    net = create_model("vit_b_16", 4, image_size=32)
    torch.save(net.state_dict(), folder / "vit32.pth")
    loaded = weights_fingerprint(net)
    resize_vit(net, 64)
    vit64 = save_checkpoint(folder / "vit64.pt", arch="vit_b_16", num_classes=4, state_dict=net.state_dict(),
                            recipe={}, data_fingerprint=None, epoch=0, image_size=64)
    return types.SimpleNamespace(folder=folder, source=source, target=target, vit32=folder / "vit32.pth",
                                 vit64=vit64, loaded=loaded)


def test_a_vit_scores_at_another_res_with_its_position_embeddings_resampled(vit_data, tmp_path):
    """A ViT made for 32 px, scored at --res 64: it scored nothing before (torchvision's size assertion, 'internal
    error', exit 1); now its position embeddings are resampled, with a warning, and the scores are those of the same
    weights resampled beforehand; the scores file records the size the weights were made for and the resampling,
    and names the loaded weights by their fingerprint. A --res that no patch grid fits is refused in one sentence."""
    common = ["--method", "lm", "--source", vit_data.source, "--target", vit_data.target, "--allow-upscale",
              "--batch-size", 4, "--workers", 1]
    result = _invoke(*common, "--arch", "vit_b_16", "--weights", vit_data.vit32, "--res", 64, "-o", tmp_path / "a.json")
    assert result.exit_code == 0, result.output
    assert "made for 32 px images; its position embeddings are resampled (bicubic) to --res 64" in result.output
    result = _invoke(*common, "--model", vit_data.vit64, "--res", 64, "-o", tmp_path / "b.json")
    assert result.exit_code == 0 and "resampled" not in result.output, result.output
    ours, theirs = read_scores(tmp_path / "a.json"), read_scores(tmp_path / "b.json")
    np.testing.assert_array_equal(ours.scores, theirs.scores)
    np.testing.assert_allclose(ours.tiebreak, theirs.tiebreak, rtol=1e-5)
    assert ours.params["res"] == 64
    assert ours.surrogate["image_size"] == 32 and ours.surrogate["resampled_to"] == 64
    assert ours.surrogate["weights"] == vit_data.loaded != theirs.surrogate["weights"]
    assert theirs.surrogate["image_size"] == 64 and "resampled_to" not in theirs.surrogate
    _one_sentence(_invoke(*common, "--model", vit_data.vit64, "--res", 40, "-o", tmp_path / "c.json"),
                  "--res must be a multiple of 16", "got 40")


def test_fit_resolution_leaves_the_callers_vit_alone_and_the_default_res_is_its_own(vit_data):
    """The resampled ViT is a copy around the same tensors (the caller's module keeps its 2x2 grid); the default
    --res of a ViT is the size it was made for, or, where that would upscale the source more than 2x, the source's
    stored resolution rounded down to a multiple of 16."""
    from dptool.scoring.run import default_res, fit_resolution
    from dptool.surrogate import load_surrogate

    sur = load_surrogate(arch="vit_b_16", weights=vit_data.vit32)
    source = open_beton(vit_data.source)
    assert default_res(sur, source) == 32
    same = fit_resolution(sur, 32)
    assert same.model is sur.model and same.identity == {**sur.identity, "image_size": 32}
    big = fit_resolution(sur, 64)
    assert big.model.encoder.pos_embedding.shape == (1, 17, 768) and big.model.image_size == 64
    assert sur.model.encoder.pos_embedding.shape == (1, 5, 768) and sur.model.image_size == 32
    assert big.model.conv_proj.weight is sur.model.conv_proj.weight
    assert "resampled_to" not in sur.identity and big.identity["weights"] == sur.identity["weights"]
    assert default_res(big, source) == 64  # made for 64 px now: 2x the source's 32 px is accepted
    assert default_res(fit_resolution(sur, 80), source) == 32  # 80 px would be 2.5x


def test_the_resampling_warning_names_allow_upscale_where_the_vits_own_size_needs_it(vit_data, caplog):
    """The warning of a resampled ViT names the --res that scores at its own size; where that size upscales the
    source more than 2x, --res alone is refused, and the hint adds --allow-upscale (it named --res 80 alone)."""
    from dptool.scoring.run import check_resolution, fit_resolution
    from dptool.surrogate import load_surrogate

    made_for_32 = load_surrogate(arch="vit_b_16", weights=vit_data.vit32)
    made_for_80 = fit_resolution(made_for_32, 80)
    files = {"source": open_beton(vit_data.source)}
    with pytest.raises(InputError, match="pass --allow-upscale"):
        check_resolution(files, 80)
    caplog.clear()
    with caplog.at_level("WARNING", logger="dptool"):
        fit_resolution(made_for_80, 32, files)
        fit_resolution(made_for_80, 32, files, allow_upscale=True)
        fit_resolution(made_for_32, 48, files)
    hints = [r.getMessage().rsplit("(", 1)[1] for r in caplog.records]
    assert hints == ["--res 80 --allow-upscale scores at its own)", "--res 80 scores at its own)",
                     "--res 32 scores at its own)"], hints


class _SizeChecked(torch.nn.Module):
    """A model that asserts its input size, as timm's ViTs do."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 8)

    def forward(self, x):
        assert x.shape[-1] == 16, f"Input height ({x.shape[-1]}) doesn't match model (16)."
        return self.fc(self.body(x).mean((2, 3)))


def test_a_models_assertion_about_its_input_size_is_the_users_error(score_data, tmp_path, monkeypatch):
    """A surrogate that asserts its input size (torchvision's and timm's ViTs do) is refused in one sentence (exit 2)
    at a --res it cannot take, by FM too, which does not read the class scores (it was 'internal error', exit 1)."""
    import sys
    import types

    from dptool.scoring.run import _output_width

    module = types.ModuleType("size_checked")
    module.make = _SizeChecked
    monkeypatch.setitem(sys.modules, "size_checked", module)
    for method in ("fm", "lm"):
        result = _invoke("--method", method, "--source", score_data.source, "--target", score_data.target,
                         "--model-factory", "size_checked:make", "--res", 32, "--allow-upscale", *LOADER,
                         "-o", tmp_path / f"{method}.json")
        _one_sentence(result, "cannot take 32x32 images", "Input height (32) doesn't match model (16)")
    wrong = types.SimpleNamespace(model=lambda _x: (_ for _ in ()).throw(AssertionError("Wrong image height!")))
    with pytest.raises(InputError, match="cannot take 16x16 images: Wrong image height!"):
        _output_width(wrong, INFERENCE)


def test_a_plot_that_is_not_a_png_path_is_refused(score_data, tmp_path):
    """`--plot surrogate.pt --force` (a slip of the path onto a file that is no input of this run) replaced the
    checkpoint with a PNG, exit 0; every --plot (score, info, bench) now takes a .png path only, and an existing
    file there only when it is a PNG."""
    out = tmp_path / "s.json"
    model = tmp_path / "surrogate.pt"
    shutil.copy(score_data.checkpoint, model)
    base = ["--method", "random", "--source", score_data.source, "-o", out, "--force"]
    _one_sentence(_invoke(*base, "--plot", model), f"--plot {model} does not end in .png")
    assert model.read_bytes() == Path(score_data.checkpoint).read_bytes() and not out.exists()
    fake = tmp_path / "scores.png"
    fake.write_text("keep me")
    _one_sentence(_invoke(*base, "--plot", fake), "exists and is not a PNG")
    assert fake.read_text() == "keep me" and not out.exists()
    assert _invoke(*base, "--plot", tmp_path / "s.png").exit_code == 0
    assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG")
