"""`score` under torchrun: two gloo processes on the CPU score shards and give the one-process result.

One torchrun job runs LM and FM (k-means on a sample, so that the gather to rank 0, the broadcast of the
centroids and the streamed assignment of the unsampled rows all run). Shards are uneven (45 target images,
192 source images of which 128 are sampled) and batches are small, so ranks see different batch counts.
The expected values are the plain torch / NumPy references that tests/test_score.py shows a one-process run
equals (LM counts and joint histogram, k-means centroids from the same sampled features, brute-force
assignment and votes), computed here without FFCV so the test does not pay for a third set of loaders.
The driver makes seven dptool calls in a row without an enclosing session, as a user's script would: the group
the first joins must stay for the others, and a rank still finishing one call must not find the next call's output
already written by rank 0 (the random baseline has no collective step to hold rank 0 back).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import score_reference
from test_score import _brute_nearest

from dptool.scores import load_assignment, read_scores
from dptool.scoring import ScoreOptions, kmeans
from dptool.scoring.fm import sample_rows

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167

OPTIONS = {"batch_size": 8, "workers": 1, "clusters": 8, "source_sample": 16, "seed": 1}

DRIVER = """
import sys
from dptool.distributed import world_size
from test_score_ddp import options
from dptool.scoring import score_files

out, source, target, model = sys.argv[1:5]
# No enclosing distributed_session: each call joins torchrun's group, and the group stays for the next call (torch
# cannot join a second time in one torchrun job: it reads the first group's addresses and hangs or fails).
for method in ("lm", "fm"):
    score_files(f"{out}/{method}.json", method=method, source=source, target=target,
                surrogate={"model": model}, options=options(), device="cpu")
    assert world_size() == 2
for i in range(4):
    score_files(f"{out}/../random{i}.json", method="random", source=source, options=options(), device="cpu")
# the groups of fm.json reused: every rank reads its file, only the target is sharded and read
score_files(f"{out}/fm_again.json", method="fm", source=source, target=target, surrogate={"model": model},
            options=options(reuse=f"{out}/fm.json"), device="cpu")
"""


def options(reuse: str | None = None) -> ScoreOptions:
    """The options of the runs: small batches (several per rank), k-means on 16 of 24 images per class; with
    `reuse`, the groups of that FM scores file instead."""
    from dptool.features import InferenceOptions

    o = dict(OPTIONS)
    inference = InferenceOptions(batch_size=o.pop("batch_size"), workers=o.pop("workers"))
    if reuse is not None:
        return ScoreOptions(inference=inference, centroids_from=reuse)
    return ScoreOptions(inference=inference, **o)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a, b) -> None:
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.ranks, b.ranks)
    np.testing.assert_allclose(a.tiebreak, b.tiebreak, rtol=1e-9, atol=1e-9)
    assert a.source == b.source and a.target == b.target and a.tie_break == b.tie_break


def test_two_gloo_processes_equal_one(score_data, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(driver), str(out), str(score_data.source),
           str(score_data.target), str(score_data.checkpoint)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    # references, computed while the two ranks run
    logits, tgt_feats, tgt_labels = score_reference(score_data, score_data.target)
    _, src_feats, src_labels = score_reference(score_data, score_data.source)
    o = options()
    sampled = sample_rows(src_labels, 8, o.source_sample, o.seed)
    centroids = kmeans(src_feats[sampled], o.clusters, niter=o.kmeans_iters, seed=o.seed)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    written = ["fm.assign.npy", "fm.centroids.npy", "fm.json", "fm_again.assign.npy", "fm_again.centroids.npy",
               "fm_again.json", "lm.json"]
    assert sorted(p.name for p in out.iterdir()) == written  # rank 0 alone wrote

    lm = read_scores(out / "lm.json")
    pred = logits.argmax(dim=1).numpy()
    assert np.array_equal(lm.scores, np.bincount(pred, minlength=8)) and lm.params["world_size"] == 2
    np.testing.assert_allclose(lm.tiebreak, torch.softmax(logits, 1).sum(0).double().numpy(), rtol=1e-4, atol=1e-5)
    joint = np.zeros((8, 3), np.int64)
    np.add.at(joint, (pred, tgt_labels), 1)
    got = {int(k): v for k, v in lm.extra["joint_histogram"]["counts"].items()}
    assert got == {c: joint[c].tolist() for c in range(8) if joint[c].any()}

    fm = read_scores(out / "fm.json")
    assignment = load_assignment(out / "fm.json", fm)
    assert np.array_equal(assignment, _brute_nearest(src_feats, centroids))
    assert np.array_equal(fm.scores, np.bincount(_brute_nearest(tgt_feats, centroids), minlength=8))
    assert int(fm.scores.sum()) == 45 and fm.params["sampled_images"] == 128 and fm.params["world_size"] == 2
    assert fm.extra["cluster_sizes"] == np.bincount(assignment, minlength=8).tolist()
    again = read_scores(out / "fm_again.json")
    _same(again, fm)
    assert np.array_equal(load_assignment(out / "fm_again.json", again), assignment)
    assert again.params["centroids_from"]["path"] == str(out / "fm.json") and again.params["world_size"] == 2
