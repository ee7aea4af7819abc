"""The benchmark scripts' command lines: `--help` shows every default, and a bad argument is refused with argparse's
usage line (exit 2, no traceback) before any data is generated or any model trained."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def _run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout)


def _options_with_defaults(script: str) -> list[str]:
    """Options given a default other than None or a flag's False, read from the script's add_argument calls."""
    found = []
    for node in ast.walk(ast.parse((BENCH / script).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            kw = {k.arg: k.value for k in node.keywords}
            default = kw.get("default")
            if default is None or (isinstance(default, ast.Constant) and default.value in (None, False)):
                continue
            found.append(node.args[0].value)
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script):
    run = _run(script, "--help")
    assert run.returncode == 0, run.stderr
    blocks = re.split(r"\n(?=  -)", run.stdout)  # one block per option, help text included
    for option in _options_with_defaults(script):
        block = next(b for b in blocks if re.match(rf"  (-\w+, )?{re.escape(option)}\b", b))
        assert "default:" in block, f"{script} --help shows no default for {option}: {block!r}"


@pytest.mark.parametrize("script, args, says", [
    ("bench_convert.py", ["--write-mode", "foo", "--workdir", "{tmp}"], "--write-mode"),  # FFCV's writer hung on it
    ("bench_convert_resume.py", ["--old", "{tmp}", "--workdir", "{tmp}"], "holds no dptool/ package"),
    ("bench_train.py", ["--arch", "foo"], "--arch 'foo'"),
    ("bench_train.py", ["--images", "8", "--classes", "10"], "--images (8) must be at least --classes"),
    ("bench_score.py", ["--arch", "foo"], "--arch 'foo'"),
    ("bench_score.py", ["--device", "cuda:x"], "--device must be cpu or cuda[:N]"),  # GPU: a traceback
    ("transfer_experiment.py", ["--methods", "foo", "--workdir", "{tmp}"], "--methods"),
    ("transfer_experiment.py", ["--ratios", "0", "1.5", "--workdir", "{tmp}"], "--ratios must each be in [0, 1)"),
    ("bench_scale.py", ["--commands", "convert_npz,prune_lm", "--workdir", "{tmp}"], "add score_lm"),
])
def test_bad_argument_is_a_usage_error(script, args, says, tmp_path):
    work = tmp_path / "work"
    run = _run(script, *(a.replace("{tmp}", str(work)) for a in args), timeout=60)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert says in run.stderr.splitlines()[-1]
    assert not work.exists()  # refused before any work


def test_cuda_device_without_gpu_is_a_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for script in ("bench_train.py", "bench_score.py"):
        run = _run(script, "--device", "cuda", timeout=60)
        assert run.returncode == 2, run.stderr[-2000:]
        assert "torch sees no CUDA device" in run.stderr.splitlines()[-1]
    run = _run("bench_kernels.py", "--gpu", "--no-cpu", timeout=60)
    assert run.returncode == 2 and "--gpu needs CuPy" in run.stderr.splitlines()[-1], run.stderr[-2000:]


def test_convert_workdir_is_created(tmp_path):
    work = tmp_path / "new" / "work"
    run = _run("bench_convert.py", "--images", "4", "--classes", "2", "--repeats", "1", "--workers", "1",
               "--max-res", "16", "--workdir", str(work), "--json-out", str(tmp_path / "convert.json"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert work.is_dir() and (tmp_path / "convert.json").is_file()


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "transfer_experiment.py"])  # its --out is a stem
def test_json_output_is_named_json_out(script):
    """One name for the same thing: every script that writes one JSON file takes it as --json-out."""
    assert "--json-out" in _run(script, "--help").stdout
