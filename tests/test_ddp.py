"""DDP: two gloo processes on the CPU train on a pruned file, rank 0 alone writes, metrics sum exactly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from dptool.beton import read_sidecar, write_sidecar
from dptool.checkpoint import read_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_processes(tmp_path, train_val_betons):
    train, val = train_val_betons
    pruned = tmp_path / "pruned.beton"
    shutil.copy(train, pruned)
    side = {k: v for k, v in read_sidecar(train).items() if k not in ("format", "version")}
    write_sidecar(pruned, {**side, "pruning": {"kept_classes": [0, 1, 3], "ratio": 0.25}})
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dptool", "train", str(pruned), "--val", str(val), "-o",
           str(out), "--arch", "resnet18", "--epochs", "1", "--batch-size", "8", "--min-res", "16", "--max-res",
           "16", "--val-res", "16", "--val-batch-size", "16", "--workers", "1", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = proc.stdout.index("{")
    result = json.loads(proc.stdout[start:])  # exactly one JSON document: rank 0 alone prints
    assert result["world_size"] == 2 and result["effective_batch_size"] == 16 and result["pruned"]
    assert result["effective_lr"] == pytest.approx(0.5 * 16 / 256)
    final = result["final"]
    assert final["train_images"] == 160  # 80 per rank, summed
    assert final["val_images"] == 30 and final["val_images_all"] == 40  # exact shards: no padding duplicates
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.jsonl", "ddp.pt", "pruned.beton",
                                                          "pruned.beton.json"]
    lines = [json.loads(line) for line in (tmp_path / "ddp.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines] == ["config", "epoch"] and lines[0]["world_size"] == 2
    ckpt = read_checkpoint(out)
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert ckpt["extra"]["kept_classes"] == [0, 1, 3]


def test_bench_pretrain_under_torchrun_sums_ranks_and_prints_once(tmp_path, tiny_beton):
    """Two gloo ranks train with DDP: images are summed over ranks, rank 0 alone prints and writes the JSON."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dptool", "bench", "pretrain", str(tiny_beton), str(tiny_beton),
           "--arch", "resnet18", "--small-input", "--res", "16", "--batch-size", "8", "--steps", "2", "--rounds",
           "2", "--workers", "1", "--json", "--json-out", str(tmp_path / "bench.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])  # exactly one JSON document: rank 0 alone prints
    assert result == json.loads((tmp_path / "bench.json").read_text())
    assert result["world_size"] == 2 and result["batch_size"] == 8
    for row in result["rows"]:
        assert row["images"] == 2 * 2 * 2 * 8  # ranks x rounds x steps x batch per rank
        assert row["samples"] == 160 and row["ideal_speedup"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
    # a batch larger than one rank's 80 samples gives each rank no batch: refused, not an endless wait
    big = [*cmd[:cmd.index("--batch-size") + 1], "100", *cmd[cmd.index("--batch-size") + 2:-3]]
    big[big.index("--master_port") + 1] = str(_free_port())
    proc = subprocess.run(big, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "--batch-size 100 is larger than the samples each of the 2" in proc.stderr
