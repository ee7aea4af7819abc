"""`score` under torchrun: two gloo processes on the CPU score shards and give the one-process result.

One torchrun job runs LM and FM (k-means, sampled source so that the gather, broadcast and the streamed
assignment of the unsampled rows all run); the same calls in this process give the reference. Shards are
uneven (45 target images, 192 source images with 128 sampled) and batches are small, so ranks see different
batch counts and sizes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from dptool.scores import load_assignment, read_scores
from dptool.scoring import ScoreOptions, score_files

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167

OPTIONS = {"batch_size": 8, "workers": 1, "clusters": 8, "source_sample": 16, "seed": 1}

DRIVER = """
import json, sys
from dptool.distributed import distributed_session, world_size
from test_score_ddp import options
from dptool.scoring import score_files

out, source, target, model = sys.argv[1:5]
with distributed_session():
    assert world_size() == 2
    for method in ("lm", "fm"):
        score_files(f"{out}/{method}.json", method=method, source=source, target=target,
                    surrogate={"model": model}, options=options(), device="cpu")
"""


def options() -> ScoreOptions:
    """The options of both runs: small batches (several per rank), k-means on 16 of 24 images per class."""
    from dptool.features import InferenceOptions

    o = dict(OPTIONS)
    return ScoreOptions(inference=InferenceOptions(batch_size=o.pop("batch_size"), workers=o.pop("workers")), **o)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a, b) -> None:
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.ranks, b.ranks)
    np.testing.assert_allclose(a.tiebreak, b.tiebreak, rtol=1e-9, atol=1e-9)
    assert a.source == b.source and a.target == b.target and a.tie_break == b.tie_break


def test_two_gloo_processes_equal_one(score_data, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    single.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(driver), str(ddp), str(score_data.source),
           str(score_data.target), str(score_data.checkpoint)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    for method in ("lm", "fm"):  # the one-process reference, computed while the two ranks run
        score_files(single / f"{method}.json", method=method, source=score_data.source, target=score_data.target,
                    surrogate={"model": score_data.checkpoint}, options=options(), device="cpu")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert sorted(p.name for p in ddp.iterdir()) == ["fm.assign.npy", "fm.json", "lm.json"]  # rank 0 alone wrote

    lm_ddp, lm_one = read_scores(ddp / "lm.json"), read_scores(single / "lm.json")
    _same(lm_ddp, lm_one)
    assert lm_ddp.extra["joint_histogram"] == lm_one.extra["joint_histogram"]
    assert lm_ddp.params["world_size"] == 2 and lm_one.params["world_size"] == 1

    fm_ddp, fm_one = read_scores(ddp / "fm.json"), read_scores(single / "fm.json")
    _same(fm_ddp, fm_one)
    assert fm_ddp.extra["cluster_sizes"] == fm_one.extra["cluster_sizes"]
    assert np.array_equal(load_assignment(ddp / "fm.json", fm_ddp), load_assignment(single / "fm.json", fm_one))
    assert int(fm_ddp.scores.sum()) == 45 and fm_ddp.params["sampled_images"] == 128
