"""benchmarks/gpu_check.sh runs only where a GPU is lent, rarely and for minutes: what it runs must fit today's code.

Checked here without a GPU and without running anything heavy: the shell syntax, every `dptool` command and option it
uses (against the Click commands), every option it gives a benchmark script (against that script's argparse
options, read with `ast`), the test files it names, the library calls of its inline Python (against their
signatures), and that an output it writes into the repository is overwritten (`--force`), not refused on a rerun.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TEXT = SCRIPT.read_text()
LINES = TEXT.replace("\\\n", " ").splitlines()  # continuation lines joined
OUTPUT_OPTIONS = ("--json-out", "--plot", "-o", "--output")


def _dptool_commands() -> list[list[str]]:
    return [shlex.split(line.split("-m dptool ", 1)[1]) for line in LINES if "-m dptool " in line]


def _script_commands() -> list[tuple[str, list[str]]]:
    found = []
    for line in LINES:
        match = re.search(r"(benchmarks/\w+\.py)(.*)$", line)
        if match and '"$PY"' in line:
            found.append((match.group(1), shlex.split(match.group(2))))
    return found


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("name", ["gpu_check.sh", "gpu_wheels.sh"])
def test_scripts_parse(name):
    run = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / name)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_dptool_commands_exist_with_their_options():
    from dptool.cli.main import cli

    commands = _dptool_commands()
    assert len(commands) >= 2  # bench pretrain and bench loader
    for tokens in commands:
        cmd, path = cli, []
        with click.Context(cli) as ctx:
            while isinstance(cmd, click.Group):
                path.append(tokens.pop(0))
                cmd = cmd.get_command(ctx, path[-1])
                assert cmd is not None, f"gpu_check.sh runs `dptool {' '.join(path)}`, which does not exist"
        known = {opt for param in cmd.params for opt in (*param.opts, *param.secondary_opts)}
        given = [t.split("=", 1)[0] for t in tokens if t.startswith("-")]
        unknown = [t for t in given if t not in known]
        assert not unknown, f"`dptool {' '.join(path)}` in gpu_check.sh: no option {', '.join(unknown)}"
        if any(t in OUTPUT_OPTIONS for t in given):  # results in benchmarks/results are kept in git
            assert "--force" in given, f"`dptool {' '.join(path)}` would refuse its existing output on a rerun"


def _argparse_options(script: Path) -> set[str]:
    options = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            options.update(a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-"))
    return options


def test_benchmark_scripts_take_the_options_given():
    commands = _script_commands()
    assert {name for name, _ in commands} >= {"benchmarks/bench_kernels.py", "benchmarks/bench_train.py"}
    for name, tokens in commands:
        known = _argparse_options(ROOT / name)
        unknown = [t for t in tokens if t.startswith("--") and t.split("=", 1)[0] not in known]
        assert not unknown, f"gpu_check.sh gives {name} unknown options {unknown}"


def test_named_test_files_exist():
    named = set(re.findall(r"tests/test_\w+\.py", TEXT))
    assert named and all((ROOT / n).is_file() for n in named), named


def test_inline_python_calls_fit_the_library():
    blocks = re.findall(r"<<'PYEOF'\n(.*?)\nPYEOF", TEXT, flags=re.S)
    assert blocks
    for block in blocks:
        tree = ast.parse(block)
        names = {}
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module.startswith("dptool"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                    names[alias.asname or alias.name] = getattr(module, alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
                fn = names[node.func.id]
                kwargs = {k.arg: None for k in node.keywords}
                try:
                    inspect.signature(fn).bind(*[None] * len(node.args), **kwargs)
                except TypeError as exc:
                    pytest.fail(f"gpu_check.sh calls {node.func.id}({', '.join(kwargs)}): {exc}")


def test_every_result_goes_to_the_results_folder_which_can_be_moved():
    """A lent machine returns only the files of one folder (its $OUT): every output the script writes must follow
    GPU_CHECK_RESULTS, or it is lost with the machine."""
    assert re.search(r'^RESULTS="\$\{GPU_CHECK_RESULTS:-benchmarks/results\}"$', TEXT, flags=re.M)
    outputs = [tokens[tokens.index(opt) + 1] for line in LINES for tokens in [shlex.split(line, comments=True)]
               for opt in ("--json-out", "--plot", "--output") if opt in tokens]
    assert len(outputs) >= 4, outputs
    assert all(out.startswith("$RESULTS/") for out in outputs), outputs


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_a_step_skipped_for_time_is_not_reported_as_a_failure():
    """A step the budget leaves no time for returns $SKIPPED: the FFCV-patch step must not then say the patches
    failed (and turn them off) for a test that never ran."""
    step = re.search(r"^SKIPPED=\d+.*?^}\n", TEXT, flags=re.S | re.M).group(0)
    block = re.search(r"^    step 240 .*?^    fi\n", TEXT, flags=re.S | re.M).group(0)
    harness = (f"set -u -o pipefail\nBUDGET=25\nSTATUS=0\nPY=false\n{step}SECONDS=10\n{block}"
               'echo "patches=${DPTOOL_FFCV_PATCHES:-on} status=$STATUS"\n')
    run = subprocess.run(["bash", "-c", harness], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert "SKIPPED" in run.stderr and "patches failed" not in run.stderr, run.stderr
    assert run.stdout.strip() == "patches=on status=2", run.stdout
