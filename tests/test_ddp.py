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
    assert result["effective_lr"] == pytest.approx(0.125 * 16 / 256)  # --lr per 256 images
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
    assert (ckpt["recipe"]["nnodes"], ckpt["recipe"]["nproc_per_node"]) == (1, 2)  # how --resume's refusal names it


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
    assert result["optimizer"] == "sgd" and result["lr"] == pytest.approx(0.125 * 8 * 2 / 256)  # as train scales --lr
    for row in result["rows"]:
        assert row["images"] == 2 * 2 * 2 * 8  # ranks x rounds x steps x batch per rank
        assert row["samples"] == 160 and row["ideal_speedup"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
    # a batch larger than one rank's 80 samples gives each rank no batch: refused, not an endless wait
    big = [*cmd[:cmd.index("--batch-size") + 1], "100", *cmd[cmd.index("--batch-size") + 2:-3]]
    big[big.index("--master_port") + 1] = str(_free_port())
    proc = subprocess.run(big, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "--batch-size 100 is larger than the samples each of the 2" in proc.stderr


_EVAL_SCRIPT = """
import json, sys
import torch
from dptool import distributed as dist
from dptool.loaders import eval_loader
from dptool.models import create_model
from dptool.steps import evaluate

with dist.distributed_session() as device:
    torch.manual_seed(0)
    model = create_model("resnet_tiny", 4)
    model.train()
    with torch.no_grad():  # one training-mode pass per rank on its own batch, as DDP's last step leaves them:
        model(torch.randn(8, 3, 16, 16) * (1 + 4 * dist.rank()))  # each rank's BatchNorm statistics differ
    rank0 = {k: v.clone() for k, v in model.state_dict().items()} if dist.rank() == 0 else None
    val = sys.argv[1]
    metrics = evaluate(model, eval_loader(val, batch_size=16, res=16, workers=1, distributed=True), device, "fp32")
    same = all(torch.equal(model.state_dict()[k], rank0[k]) for k in rank0) if rank0 else None
    # what each rank evaluated with: its buffers' sum, gathered (equal on both ranks when rank 0's were used)
    mine = torch.tensor([float(sum(b.double().sum() for b in model.buffers()))], dtype=torch.float64)
    sums = [torch.zeros_like(mine) for _ in range(2)]
    torch.distributed.all_gather(sums, mine)
    if dist.rank() == 0:  # rank 0's model alone, over the whole file, without the process group
        model.eval()
        hits = n = 0
        with torch.no_grad():
            for x, y in eval_loader(val, batch_size=16, res=16, workers=1):
                hits += int(model(x).argmax(1).eq(y).sum())
                n += len(y)
        print(json.dumps({"metrics": metrics, "reference": hits / n, "rank0_unchanged": same,
                          "buffer_sums": [float(t) for t in sums]}))
    dist.barrier()
"""


def test_validation_under_torchrun_is_of_rank_0s_model(tmp_path, train_val_betons):
    """After a DDP step every rank holds its own BatchNorm statistics; evaluation must use rank 0's (the model
    rank 0 checkpoints) on every rank, so that the summed top-1 is that model's top-1 over the whole file."""
    script = tmp_path / "eval_ddp.py"
    script.write_text(_EVAL_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(train_val_betons[1])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["rank0_unchanged"] and out["metrics"]["val_images"] == 40
    assert out["buffer_sums"][0] == out["buffer_sums"][1]
    assert out["metrics"]["val_top1"] == out["reference"]


def test_a_validation_file_smaller_than_the_process_count_is_refused(tmp_path, train_val_betons):
    """Each rank validates every world-th image: a 1-image file leaves rank 1 none. One sentence, exit 2 (it was
    'indices ... select no samples', from rank 1 alone, though no indices were given)."""
    import numpy as np

    from dptool.convert import WriterParams, convert
    from dptool.synthetic import write_npz

    npz = write_npz(tmp_path / "one.npz", np.zeros((1, 16, 16, 3), np.uint8), np.array([0]),
                    [f"class_{c}" for c in range(4)])
    one = tmp_path / "one.beton"
    convert(npz, one, params=WriterParams(max_resolution=16, write_mode="raw", num_workers=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dptool", "train", str(train_val_betons[0]), "--val", str(one),
           "-o", str(tmp_path / "m.pt"), "--arch", "resnet_tiny", "--epochs", "1", "--batch-size", "8",
           "--min-res", "16", "--max-res", "16", "--val-res", "16", "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "select no samples" not in proc.stderr, proc.stderr[-3000:]
    # every rank refuses at once (torchrun may stop the other before it prints)
    assert f"Error: Validation file {one} holds 1 image(s), fewer than the 2 processes" in proc.stderr
    assert not (tmp_path / "m.pt").exists()


GLOO_PEER_GONE = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                  "[127.0.0.1]:23438. This is typically caused by a remote worker crashing. Check the logs of the "
                  "remote worker before reporting an error.")


def test_a_rank_whose_peer_ended_names_itself_not_an_internal_error(tiny_beton, tmp_path, monkeypatch):
    """When one rank failed (a full disk at rank 0's checkpoint, a k-means error), every other rank's collective
    failed with gloo's 'Connection closed by peer' and printed 'internal error: RuntimeError: [.../pair.cc:561] ...
    (rerun with --debug for the traceback)', burying the one real message among world - 1 of these. Each now says
    in one sentence, naming its rank, that it stopped with the process that ended; outside torchrun nothing changes."""
    import dptool.cli.train

    def peer_gone(*args, **kwargs):
        raise RuntimeError(GLOO_PEER_GONE)

    monkeypatch.setattr(dptool.cli.train, "train", peer_gone)
    args = ["train", str(tiny_beton), "-o", str(tmp_path / "a.pt"), "--arch", "resnet_tiny"]
    from click.testing import CliRunner

    from dptool.cli.main import cli

    with monkeypatch.context() as env:
        env.setenv("WORLD_SIZE", "2")
        env.setenv("RANK", "1")
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "internal error" not in result.output and "pair.cc" not in result.output
    assert result.output.startswith("Error: rank 1: stopped because its connection to another process of this "
                                    "torchrun job failed (Connection closed by peer [127.0.0.1]:23438)")
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, args)  # one process: a gloo error there is dptool's own
    assert result.exit_code == 1 and "internal error: RuntimeError" in result.output


def test_warnings_are_printed_by_rank_0_alone(tiny_beton, tmp_path, monkeypatch):
    """Every rank runs the same checks, so every rank printed the same warnings (a surrogate trained on other data,
    another run's temporary file beside the output): world copies of each under torchrun. Ranks other than 0 now
    print errors only, unless -v asks for their logs."""
    from click.testing import CliRunner

    from dptool.cli.main import cli

    scores = tmp_path / "s.json"
    assert CliRunner().invoke(cli, ["score", "--method", "random", "--source", str(tiny_beton), "-o",
                                    str(scores)]).exit_code == 0
    out = tmp_path / "p.beton"
    (tmp_path / ".p.beton.tmp-1-00000000-00000000").write_bytes(b"")  # another machine's: named in a warning

    def prune(rank: int, *verbose: str):
        with monkeypatch.context() as env:
            env.setenv("WORLD_SIZE", "2")
            env.setenv("RANK", str(rank))
            return CliRunner().invoke(cli, [*verbose, "prune", str(tiny_beton), "--scores", str(scores), "--ratio",
                                            "0.5", "-o", str(out), "--force"])

    assert "is the temporary file of another" in prune(0).output
    result = prune(1)
    assert result.exit_code == 0 and "WARNING" not in result.output
    assert "is the temporary file of another" in prune(1, "-v").output


def test_more_processes_than_gpus_is_refused_in_one_sentence(monkeypatch):
    """Under torchrun each process takes the GPU of its LOCAL_RANK: a rank beyond the GPUs would stop in
    torch.cuda.set_device with CUDA's bare 'invalid device ordinal'."""
    import torch

    from dptool import distributed
    from dptool.errors import InputError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda _: pytest.fail("set_device was called"))
    with pytest.raises(InputError, match=r"local rank 1 but this machine has 1 GPU\(s\).*--nproc_per_node"):
        distributed.init_from_env()


def _torchrun_summary(stderr: str) -> dict[int, int]:
    """rank -> exit code of every failed rank in torchrun's closing summary."""
    import re

    return {int(r): int(c) for r, c in re.findall(r"rank\s*:\s*(\d+) \(local_rank.*?\n.*?exitcode\s*:\s*(-?\d+)",
                                                  stderr, flags=re.S)}


def test_a_user_error_every_rank_hits_is_printed_once(tmp_path, tiny_beton):
    """Every rank runs the same checks before any collective, so a missing --val printed the same sentence once per
    rank (8 identical lines on 8 GPUs, then torchrun's summary); rank 0 now prints it once for the job. The others
    still fail: torchrun's summary lists both ranks, neither with exit code 0."""
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    # each rank waits this long for the other to fail alike: on a loaded machine one rank can reach the check 15 s
    # (the default) after the other, and each then prints its own sentence, naming its rank
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DPTOOL_FAILURE_WAIT_S": "120"}
    train = ["-m", "dptool", "train", str(tiny_beton), "-o", str(tmp_path / "m.pt"), "--arch", "resnet_tiny"]
    for extra, said in ((["--val", str(tmp_path / "missing.beton")], f"File {tmp_path / 'missing.beton'} does not"),
                        (["--bogus"], "No such option '--bogus'")):  # a usage error: usage line, hint, sentence
        cmd = [*base, "--master_port", str(_free_port()), *train, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and errors[0].startswith(f"Error: {said}"), proc.stderr  # no "Error: rank 0: ..."
        assert sum(line.startswith("Usage:") for line in proc.stderr.splitlines()) == (1 if "bogus" in said else 0)
        codes = _torchrun_summary(proc.stderr)
        assert proc.returncode != 0 and sorted(codes) == [0, 1] and 0 not in codes.values(), proc.stderr
        assert codes[0] == 2  # the rank that printed is torchrun's "first observed failure"


def test_a_rank_that_asks_between_the_first_ranks_two_counts_still_prints_once(monkeypatch):
    """The first rank with a report counts it in torchrun's store with two calls (its report, then one more distinct
    report in the job), and a rank failing alike at the same moment (a check right after a collective, such as an input
    that differs between machines) could ask in between: it read no report counted yet, ended its wait as for two
    different ones, and printed its own 'Error: rank 1: ...' (2 runs in 30 of the two-machine score case). Here rank
    0 stands between its two calls in a real store: rank 1 must still find that both failed alike and print once."""
    import hashlib
    from datetime import timedelta

    import torch.distributed as tdist

    from dptool import rank_failures

    port = _free_port()
    server = tdist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1", "MASTER_PORT": str(port),
                        "MASTER_ADDR": "127.0.0.1", "TORCHELASTIC_USE_AGENT_STORE": "True",
                        "TORCHELASTIC_RUN_ID": "between", "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(rank_failures, "_AGENT_STORE", [])  # this test's store, not one a test before connected to
    report = "exit 2\nError: The source src.beton differs between the processes of this torchrun job\n"
    prefix = "dptool/failure/between/0/"
    server.compare_set(prefix + "failed_rank", "", "0")  # rank 0's report_failure, up to its first count
    server.add(prefix + "failed", 1)
    server.add(prefix + "same/" + hashlib.sha256(report.encode()).hexdigest()[:32], 1)  # not yet its "kinds"
    shown: list[bool] = []
    rank_failures.report_failure(report, shown.append, wait_s=60)
    assert shown == [False]  # printed as the job's sentence, not naming rank 1
    assert server.add(prefix + "seen", 0) == 1  # and rank 0, waiting until every rank has seen it, is told


_PER_RANK_SCRIPT = """
import os, sys
from dptool.cli.main import main

os.environ["DPTOOL_FAILURE_WAIT_S"] = "3"  # how long a failing rank waits for the others to fail alike
rank, beton, mode = int(os.environ["RANK"]), sys.argv[1], sys.argv[2]
val = {"differ": f"missing{rank}.beton", "one": "missing.beton" if rank == 1 else beton}[mode]
sys.argv = ["dptool", "train", beton, "--val", val, "-o", "m.pt", "--arch", "resnet_tiny", "--epochs", "1",
            "--batch-size", "8", "--min-res", "16", "--max-res", "16", "--val-res", "16", "--workers", "1"]
main()
"""


_EXIT_SCRIPT = """
import atexit, os
from datetime import timedelta
import torch.distributed as tdist
from dptool import rank_failures

server = tdist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), is_master=True, timeout=timedelta(seconds=30),
                        wait_for_workers=False)
# registered before the client exists, so run after every exit handler dptool registers with it (last in, first out)
atexit.register(lambda: print("client at the end:", rank_failures._AGENT_STORE, flush=True))
print("client:", rank_failures._agent_store() is not None, flush=True)
"""


def test_the_store_client_is_dropped_by_the_exit_handlers(tmp_path):
    """Left to the interpreter's teardown, dptool's client of torchrun's store ended a rank by SIGABRT ('terminate
    called without an active exception') after its work was done: 11 of 20 two-rank runs on a loaded machine (0 of 20
    when the client was dropped before). It must be gone once the exit handlers have run."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "exit"}
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["client: True", "client at the end: [None]"], proc.stdout


def test_an_error_the_ranks_do_not_share_is_printed_by_each_rank_naming_it(tmp_path, tiny_beton):
    """Printing once is for a failure every rank shares: two different sentences are printed by both ranks, each
    naming its rank, and an error one rank alone hits (a file missing on one machine) is printed by that rank."""
    script = tmp_path / "per_rank.py"
    script.write_text(_PER_RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for mode, expected in (("differ", {"Error: rank 0: File missing0.beton does not exist.",
                                       "Error: rank 1: File missing1.beton does not exist."}),
                           ("one", {"Error: rank 1: File missing.beton does not exist."})):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(script), str(tiny_beton), mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        said = [line for line in proc.stderr.splitlines() if "does not exist" in line]
        assert proc.returncode != 0 and sorted(said) == sorted(expected), proc.stderr


def test_a_rank_named_error_names_the_rank_after_error_once(tiny_beton, tmp_path, monkeypatch):
    """Where the ranks cannot be asked (WORLD_SIZE set by another launcher: no torchrun agent store), every rank prints
    its own error naming itself, right after "Error: ": not inside an internal error's "RuntimeError: ", and after a
    usage error's usage lines."""
    from click.testing import CliRunner

    import dptool.cli.train
    from dptool.cli.main import cli

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(dptool.cli.train, "train", boom)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    result = CliRunner().invoke(cli, ["train", str(tiny_beton), "-o", str(tmp_path / "a.pt"), "--arch", "resnet_tiny"])
    assert result.exit_code == 1 and result.output.startswith("Error: rank 1: internal error: RuntimeError: boom (")
    result = CliRunner().invoke(cli, ["train", str(tiny_beton), "--bogus"])
    lines = result.output.splitlines()
    assert result.exit_code == 2 and lines[0].startswith("Usage: ") and "train" in lines[0]
    assert lines[-1].startswith("Error: rank 1: No such option '--bogus'")


def _hosts(tmp_path, name: str, host0, host1) -> None:
    """The folders `host0` and `host1` of two simulated machines, each holding its copy of a .beton (and its sidecar)
    under `name`: `host0`'s file on machine 0, `host1`'s on machine 1 (None: that machine lacks it)."""
    for node, beton in enumerate((host0, host1)):
        (tmp_path / f"host{node}").mkdir()
        if beton is not None:
            shutil.copy(beton, tmp_path / f"host{node}" / name)
            shutil.copy(f"{beton}.json", tmp_path / f"host{node}" / f"{name}.json")


def _two_agents(tmp_path, args: list[str], timeout: float = 90, env: dict | None = None
                ) -> list[subprocess.CompletedProcess]:
    """`args` run as two machines would run them: two torchrun agents (`--nnodes 2 --nproc_per_node 1`, static
    rendezvous, node ranks 0 and 1), each started in its own folder `host0`, `host1` (made by the caller) as on two
    hosts without a shared file system. An agent still running after `timeout` seconds is killed and the test fails:
    a hang, not a slow run (this job takes seconds)."""
    import signal

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DPTOOL_FAILURE_WAIT_S": "120",  # as above
           **(env or {})}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "dptool", *args], cwd=tmp_path / f"host{node}", env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            for node in (0, 1)]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a torchrun agent was still running after {timeout} s: {done and done[0].stderr[-2000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return done


def test_a_rank_that_fails_before_joining_stops_the_other_machines(tmp_path, tiny_beton):
    """On two machines (two torchrun agents), a file one machine lacks is refused by the command line there, before
    the process group: the other machine's rank waited in init_process_group for torch's 30 minutes, since its agent
    is not told that another machine's process ended. It now stops at once, naming the rank that failed first, and
    that rank prints its own error, naming itself; both agents exit non-zero."""
    _hosts(tmp_path, "src.beton", tiny_beton, None)  # on the machine of rank 0 only
    agents = _two_agents(tmp_path, ["score", "--method", "random", "--source", "src.beton", "-o", "r.json"])
    said = [[line for line in a.stderr.splitlines() if line.startswith("Error:")] for a in agents]
    missing = "Error: rank 1: Invalid value for '--source': File 'src.beton' does not exist."
    assert said[1] == [missing], agents[1].stderr
    assert said[0] == ["Error: rank 0: stopped before starting its work: rank 1 of this torchrun job failed first, "
                       "and printed why (on its machine, when it runs on another)."], agents[0].stderr
    assert all(a.returncode != 0 for a in agents)
    assert not (tmp_path / "host0" / "r.json").exists()


def test_an_error_every_rank_hits_is_printed_once_on_each_machine(tmp_path, tiny_beton):
    """On two machines an error every rank hits alike was printed by rank 0 alone: the other machine's torchrun output
    held its failure summary and no sentence saying why, and its rank waited 15 s for a stop that its agent, not told
    of rank 0's end, never sent. Each machine's first process now prints it (once per torchrun output) and exits."""
    _hosts(tmp_path, "src.beton", tiny_beton, tiny_beton)
    agents = _two_agents(tmp_path, ["train", "src.beton", "--val", "missing.beton", "-o", "m.pt", "--arch",
                                    "resnet_tiny"])
    for node, agent in enumerate(agents):
        said = [line for line in agent.stderr.splitlines() if line.startswith("Error:")]
        assert said == ["Error: File missing.beton does not exist."], agent.stderr[-2000:]
        assert agent.returncode != 0 and _torchrun_summary(agent.stderr) == {node: 2}, agent.stderr[-2000:]


def test_a_rank_that_fails_alone_after_the_group_formed_ends_the_job_without_waiting(tmp_path, tiny_beton):
    """A rerun without --force on two machines is refused on rank 0 alone (the checkpoint is on its machine only),
    after the process group formed: rank 0 waited FAILURE_WAIT_S (15 s; 120 s in these tests) for the other rank to
    fail alike, while that rank, past its checks, waited in DDP's set-up for rank 0. Rank 0 now sees that the other
    rank passed a point it never reached and prints its error at once, naming itself; the other rank stops as it
    did, naming itself and the lost connection; both agents exit non-zero."""
    _hosts(tmp_path, "src.beton", tiny_beton, tiny_beton)
    (tmp_path / "host0" / "m.pt").write_bytes(b"an earlier run's checkpoint")
    agents = _two_agents(tmp_path, ["train", "src.beton", "-o", "m.pt", "--arch", "resnet_tiny", "--min-res", "16",
                                    "--max-res", "16", "--batch-size", "8", "--workers", "1"], timeout=60)
    said = [[line for line in a.stderr.splitlines() if line.startswith("Error:")] for a in agents]
    assert said[0] == ["Error: rank 0: Output m.pt already exists; pass --force to overwrite it."], agents[0].stderr
    assert len(said[1]) == 1 and said[1][0].startswith("Error: rank 1: stopped because its connection to another "
                                                       "process of this torchrun job failed"), agents[1].stderr
    assert all(a.returncode != 0 for a in agents)
    assert (tmp_path / "host0" / "m.pt").read_bytes() == b"an earlier run's checkpoint"
    assert not (tmp_path / "host1" / "m.pt").exists()


_IO_ERROR_ON_RANK_0 = """
import errno, os
if os.environ.get("RANK") == "0":  # rank 0's disk fails when its checkpoint is placed
    _replace = os.replace
    def _full(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) in ("m.pt", "r.json", "b.json"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(dst))
        return _replace(src, dst, *args, **kwargs)
    os.replace = _full
"""


def test_a_checkpoint_rank_0_cannot_write_ends_the_job_without_waiting(tmp_path, tiny_beton):
    """Rank 0 alone writes the checkpoint: when that fails (a disk error, here os.replace failing with EIO in rank 0's
    process), the other ranks wait in the epoch's closing barrier, and rank 0 waited FAILURE_WAIT_S for them to
    fail alike. They now mark that they passed the epoch's end, and rank 0 prints its error at once."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(_IO_ERROR_ON_RANK_0)
    _hosts(tmp_path, "src.beton", tiny_beton, tiny_beton)
    agents = _two_agents(tmp_path, ["train", "src.beton", "-o", "m.pt", "--arch", "resnet_tiny", "--min-res", "16",
                                    "--max-res", "16", "--batch-size", "8", "--workers", "1", "--epochs", "1"],
                         timeout=60, env={"PYTHONPATH": str(tmp_path / "inject")})
    said = [[line for line in a.stderr.splitlines() if line.startswith("Error:")] for a in agents]
    assert said[0] == ["Error: rank 0: Cannot replace m.pt (Input/output error); remove it or choose another output "
                       "path."], agents[0].stderr
    assert len(said[1]) == 1 and said[1][0].startswith("Error: rank 1: stopped because its connection to another "
                                                       "process of this torchrun job failed"), agents[1].stderr
    assert all(a.returncode != 0 for a in agents)
    assert not (tmp_path / "host0" / "m.pt").exists() and not (tmp_path / "host1" / "m.pt").exists()


def test_scores_rank_0_cannot_write_end_the_job_without_waiting(tmp_path, tiny_beton):
    """As for train's checkpoint: score's other ranks wait in the barrier after rank 0's writing, and rank 0, failing
    to write the scores file, waited FAILURE_WAIT_S for them to fail alike; they now mark that they passed it."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(_IO_ERROR_ON_RANK_0)
    _hosts(tmp_path, "src.beton", tiny_beton, tiny_beton)
    agents = _two_agents(tmp_path, ["score", "--method", "random", "--source", "src.beton", "-o", "r.json"],
                         timeout=60, env={"PYTHONPATH": str(tmp_path / "inject")})
    said = [[line for line in a.stderr.splitlines() if line.startswith("Error:")] for a in agents]
    assert len(said[0]) == 1 and said[0][0].startswith("Error: rank 0: Cannot replace r.json (Input/output error)"), \
        agents[0].stderr
    assert len(said[1]) == 1 and said[1][0].startswith("Error: rank 1: stopped because its connection to another "
                                                       "process of this torchrun job failed"), agents[1].stderr
    assert all(a.returncode != 0 for a in agents)
    assert not (tmp_path / "host0" / "r.json").exists()


def test_a_rank_failing_after_the_others_succeeded_ends_without_waiting(tmp_path, tiny_beton):
    """bench's --json-out is written by rank 0 after the last collective, when the other ranks have succeeded and
    exited: rank 0, failing to write it, waited FAILURE_WAIT_S for them to fail alike. A rank that succeeds now says
    so in torchrun's store, and rank 0 prints its error at once; the other rank printed nothing and exited 0."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(_IO_ERROR_ON_RANK_0)
    _hosts(tmp_path, "src.beton", tiny_beton, tiny_beton)
    agents = _two_agents(tmp_path, ["bench", "pretrain", "src.beton", "--arch", "resnet_tiny", "--res", "16",
                                    "--batch-size", "8", "--steps", "1", "--rounds", "1", "--workers", "1",
                                    "--json-out", "b.json"], timeout=60, env={"PYTHONPATH": str(tmp_path / "inject")})
    said = [[line for line in a.stderr.splitlines() if line.startswith("Error:")] for a in agents]
    assert len(said[0]) == 1 and said[0][0].startswith("Error: rank 0: Cannot replace b.json (Input/output error)"), \
        agents[0].stderr
    assert said[1] == [] and agents[1].returncode == 0, agents[1].stderr
    assert agents[0].returncode != 0 and not (tmp_path / "host0" / "b.json").exists()


@pytest.mark.slow  # two torchrun jobs of two agents each: 19 to 30 s here
def test_resume_on_two_machines_reads_rank_0s_checkpoint(tmp_path, train_val_betons):
    """On two machines without a shared file system, rank 0 writes the checkpoint on its own, and every rank read it
    to resume: the other machine's rank failed ('Cannot resume: checkpoint m.pt does not exist'), or would continue
    from whatever copy it had. Rank 0 now reads and checks it and sends it to the others: the resume runs, and the
    other machine still holds no output."""
    train, _ = train_val_betons
    _hosts(tmp_path, "train.beton", train, train)
    # --lr-peak-epoch 0.5: the peak a 1-epoch run caps it at, which extending the run must keep (89fc577)
    args = ["train", "train.beton", "-o", "m.pt", "--arch", "resnet_tiny", "--batch-size", "8", "--min-res", "16",
            "--max-res", "16", "--workers", "1", "--lr-peak-epoch", "0.5", "--json"]
    for epochs, resume in (("1", []), ("2", ["--resume"])):
        agents = _two_agents(tmp_path, [*args, "--epochs", epochs, *resume])
        assert [a.returncode for a in agents] == [0, 0], agents[0].stderr[-2000:] + agents[1].stderr[-2000:]
        result = json.loads(agents[0].stdout[agents[0].stdout.index("{"):])  # node 0 runs rank 0, which prints
        assert result["world_size"] == 2 and result["start_epoch"] == int(epochs) - 1 and not agents[1].stdout
    assert sorted(p.name for p in (tmp_path / "host1").iterdir()) == ["train.beton", "train.beton.json"]
    ckpt = read_checkpoint(tmp_path / "host0" / "m.pt")
    assert ckpt["epoch"] == 2 and [h["epoch"] for h in ckpt["extra"]["history"]] == [0, 1]
    assert (ckpt["recipe"]["nnodes"], ckpt["recipe"]["nproc_per_node"]) == (2, 1)  # how --resume's refusal names it


def test_a_training_file_that_differs_between_machines_is_refused(tmp_path, tiny_beton, train_val_betons):
    """On two machines each rank reads its own machine's copy of the training file; a copy that differed (here
    another file of as many images and classes) was trained on without a word, its gradients averaged with rank 0's,
    and the checkpoint recorded rank 0's fingerprint alone. Every rank now refuses it alike, naming the file."""
    train, _ = train_val_betons
    _hosts(tmp_path, "train.beton", train, tiny_beton)
    agents = _two_agents(tmp_path, ["train", "train.beton", "-o", "m.pt", "--arch", "resnet_tiny", "--batch-size",
                                    "8", "--min-res", "16", "--max-res", "16", "--workers", "1", "--epochs", "1"])
    for agent in agents:
        said = [line for line in agent.stderr.splitlines() if line.startswith("Error:")]
        assert len(said) == 1 and said[0].startswith("Error: The training file train.beton differs between the "
                                                     "processes of this torchrun job"), agent.stderr[-2000:]
        assert "rank 1 (on machine 1)" in said[0] and agent.returncode != 0, agent.stderr[-2000:]
    assert not (tmp_path / "host0" / "m.pt").exists()


def test_a_source_that_differs_between_machines_is_refused_by_score(tmp_path, tiny_beton, train_val_betons):
    """score on two machines summed each rank's share of its own machine's copy of the source: a copy that differed
    gave a scores file mixing two files under rank 0's fingerprint, written without a word. It is refused alike."""
    train, _ = train_val_betons
    _hosts(tmp_path, "src.beton", tiny_beton, train)
    agents = _two_agents(tmp_path, ["score", "--method", "random", "--source", "src.beton", "-o", "r.json"])
    for agent in agents:
        said = [line for line in agent.stderr.splitlines() if line.startswith("Error:")]
        assert len(said) == 1 and said[0].startswith("Error: The source src.beton differs between the processes of "
                                                     "this torchrun job"), agent.stderr[-2000:]
        assert agent.returncode != 0, agent.stderr[-2000:]
    assert not (tmp_path / "host0" / "r.json").exists()


def test_a_file_that_differs_between_machines_is_refused_by_bench_pretrain(tmp_path, tiny_beton, train_val_betons):
    """bench pretrain on two machines measured each machine's copy of a file: a copy of another size gave the ranks
    other step counts, and one that differed otherwise a measure of two files. It is refused alike."""
    train, _ = train_val_betons
    _hosts(tmp_path, "a.beton", tiny_beton, train)
    agents = _two_agents(tmp_path, ["bench", "pretrain", "a.beton", "--arch", "resnet_tiny", "--res", "16",
                                    "--batch-size", "8", "--steps", "1", "--rounds", "1", "--workers", "1"])
    for agent in agents:
        said = [line for line in agent.stderr.splitlines() if line.startswith("Error:")]
        assert len(said) == 1 and said[0].startswith("Error: The file a.beton differs between the processes of "
                                                     "this torchrun job"), agent.stderr[-2000:]
        assert agent.returncode != 0, agent.stderr[-2000:]


def test_a_failure_wait_that_is_not_a_number_still_prints_the_error(tmp_path):
    """DPTOOL_FAILURE_WAIT_S is read while an error is printed under torchrun: a value such as '15s' replaced the
    error ('missing.beton does not exist.', exit 2) by a ValueError traceback on every rank (exit 1). A value
    that is not a number of seconds now leaves the default wait."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dptool", "info", "missing.beton"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DPTOOL_FAILURE_WAIT_S": "15s"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].endswith(" missing.beton does not exist."), proc.stderr[-3000:]
    assert "rank" not in errors[0], proc.stderr[-3000:]  # printed once for the job, by rank 0
    assert "ValueError" not in proc.stderr and _torchrun_summary(proc.stderr).get(0) == 2, proc.stderr[-3000:]
