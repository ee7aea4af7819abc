"""Documented behaviour seen from the CLI and the library: seeds, bad arguments, `info` on odd files."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_beton

from dptool.beton import fingerprint, open_beton, read_image
from dptool.cli.main import cli
from dptool.convert import WriterParams, convert
from dptool.errors import MAX_SEED, InputError, check_seed
from dptool.finetune import FinetuneConfig
from dptool.prune import prune
from dptool.scores import Scores, write_scores
from dptool.scoring import ScoreOptions, score
from dptool.synthetic import separable_images, write_npz
from dptool.train import TrainConfig


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("bad", [-1, MAX_SEED + 1, 1.5, "1", True])
def test_check_seed_refuses(bad):
    with pytest.raises(InputError, match="--seed must be an integer from 0 to"):
        check_seed("--seed", bad)


def test_seed_refused_before_any_work_in_library(tiny_beton, tmp_path):
    npz = write_npz(tmp_path / "d.npz", *separable_images(2, 4, 16, seed=0))
    with pytest.raises(InputError, match="--seed"):
        convert(npz, tmp_path / "d.beton", params=WriterParams(shuffle_seed=-1))
    assert not (tmp_path / "d.beton").exists()
    with pytest.raises(InputError, match="--seed"):
        score("random", source=tiny_beton, options=ScoreOptions(seed=-1))
    with pytest.raises(InputError, match="--seed"):
        FinetuneConfig(seed=-1).resolved()
    with pytest.raises(InputError, match="--seed"):
        TrainConfig(seed=2**40).validate()


@pytest.mark.parametrize("command", [["convert", "{npz}", "{out}"],
                                     ["score", "--method", "random", "--source", "{beton}", "-o", "{out}"],
                                     ["demo", "--workdir", "{out}"]])
def test_negative_seed_is_a_usage_error(command, tiny_beton, tmp_path):
    npz = write_npz(tmp_path / "d.npz", *separable_images(2, 4, 16, seed=0))
    args = [a.format(npz=npz, beton=tiny_beton, out=tmp_path / "out.beton") for a in command]
    result = run(*args, "--seed", "-1")
    assert result.exit_code == 2 and "--seed" in result.output and "internal error" not in result.output


def _class_scores(beton):
    b = open_beton(beton)
    n = b.num_classes
    return Scores(method="random", level="class", ids=np.arange(n), names=[str(i) for i in range(n)],
                  scores=np.arange(n, dtype=float), tiebreak=np.zeros(n), tie_break="test",
                  source={"path": str(beton), "fingerprint": fingerprint(b), "num_samples": b.num_samples,
                          "num_classes": n})


@pytest.mark.parametrize("ratios", ["0.5", 0.5])
def test_prune_ratios_must_be_a_list(ratios, tiny_beton, tmp_path):
    path = write_scores(tmp_path / "s.json", _class_scores(tiny_beton))
    with pytest.raises(InputError, match="--ratios must be a list"):
        prune(tiny_beton, path, tmp_path / "o_{ratio}.beton", ratios=ratios)


def test_read_image_takes_a_path(tiny_beton):
    assert np.array_equal(read_image(tiny_beton, 3), read_image(open_beton(tiny_beton), 3))


def test_info_shows_the_files_fingerprint_and_flags_a_foreign_sidecar(tmp_path):
    # same class counts, other pixels: the counts check of open_beton passes, the fingerprint tells them apart
    a = make_beton(tmp_path, "a", n_classes=3, seed=1)
    b = make_beton(tmp_path, "b", n_classes=3, seed=2)
    shutil.copy(b.with_suffix(".beton.json"), a.with_suffix(".beton.json"))  # b's sidecar beside a
    info = json.loads(run("info", a, "--json").output)
    assert info["fingerprint"] == fingerprint(open_beton(a)) and info["sidecar_matches"] is False
    assert "was not written for this file" in run("info", a).output
    good = json.loads(run("info", b, "--json").output)
    assert good["sidecar_matches"] is True and good["fingerprint"] == fingerprint(open_beton(b))


def test_score_refuses_non_finite_mean_before_any_work(tiny_beton, tmp_path):
    result = run("score", "--method", "random", "--source", tiny_beton, "--mean", "nan", "0", "0",
                 "-o", tmp_path / "s.json")
    assert result.exit_code == 2 and "--mean values must all be finite" in result.output
    assert not (tmp_path / "s.json").exists()


def test_info_describes_a_minimal_training_log(tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_text('{"event": "config", "config": {}}\n{"event": "epoch", "epoch": 0}\n')
    result = run("info", log)  # described since `info` reads logs (tests/test_runlog.py has real ones)
    assert result.exit_code == 0 and "log of train, ?, 1 epoch (running or stopped" in result.output


# --- the README against the CLI: every option it names exists, and its command lines parse --------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
#: options the README names that belong to other programs: torchrun's, and benchmarks/bench_scale.py's --commands
FOREIGN_OPTIONS = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--rdzv_backend", "--rdzv_endpoint",
                   "--commands"}


def _commands() -> dict[str, click.Command]:
    """'convert', ..., 'bench pretrain', 'bench loader' -> the Click command."""
    ctx = click.Context(cli)
    found = {}
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        found[name] = command
        if isinstance(command, click.Group):
            for sub in command.list_commands(ctx):
                found[f"{name} {sub}"] = command.get_command(ctx, sub)
    return found


def _options(command: click.Command) -> dict[str, click.Parameter]:
    """Every spelling of every option of `command` (-h/--help included) -> its parameter."""
    names = {"-h": None, "--help": None}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update({name: param for name in param.opts + param.secondary_opts})
    return names


def readme_command_lines(text: str) -> list[str]:
    """`dptool ...` command lines of the README: those in shell blocks (commented-out ones too) and in `code` spans."""
    lines = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M):
        if lang != "python":
            lines += [line.lstrip("# ") for line in body.splitlines() if re.search(r"(^|[\s#])dptool\s", line)]
    prose = re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M)
    lines += [span for span in re.findall(r"`([^`\n]+)`", prose) if re.search(r"(^|\s)dptool\s+-?[a-z]", span)]
    return lines


def command_line_problems(line: str, commands: dict[str, click.Command]) -> list[str]:
    """What is wrong in one README command line: a command or option that does not exist, or an option value that
    is not one of its choices. Placeholders (`FILE`, `N`, `...`, `[--json]`, `a | b`) are read as such."""
    words = shlex.split(line.split(" # ")[0].replace("[", " ").replace("]", " ").replace("|", " "))
    words = words[words.index("dptool") + 1:]
    while words and words[0] in ("-q", "-v", "-vv", "--debug"):
        words = words[1:]
    if not words or words[0] == "...":
        return []
    name = words[0] if words[0] in commands else None
    if name and isinstance(commands[name], click.Group) and len(words) > 1 and words[1] not in ("...",):
        name = f"{words[0]} {words[1]}" if f"{words[0]} {words[1]}" in commands else None
    if name is None:
        return [f"{line!r}: no command {words[0]!r}"]
    options, problems = _options(commands[name]), []
    words = words[len(name.split()):]
    for i, word in enumerate(words):
        if not word.startswith("-") or word == "-":
            continue
        if word not in options:
            problems.append(f"{line!r}: dptool {name} has no option {word}")
            continue
        param = options[word]
        value = words[i + 1] if i + 1 < len(words) else None
        choices = param.type.choices if isinstance(getattr(param, "type", None), click.Choice) else None
        if choices and value and not value.isupper() and value != "..." and value not in choices:
            problems.append(f"{line!r}: {word} {value} is not one of {', '.join(map(str, param.type.choices))}")
    return problems


def test_every_option_the_readme_names_exists():
    text = README.read_text()
    known = set(_options(cli)).union(*(_options(c) for c in _commands().values())) | FOREIGN_OPTIONS
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text))
    assert named - known == set(), "options in README.md that no command has"


def test_every_readme_command_line_names_its_commands_options():
    commands = _commands()
    lines = readme_command_lines(README.read_text())
    assert len(lines) >= 20, lines  # the workflow block alone has 16
    problems = [p for line in lines for p in command_line_problems(line, commands)]
    assert problems == []


@pytest.mark.parametrize("line, problem", [
    ("dptool prune in.beton --scores s.json --ratio-of 0.6 -o out.beton", "has no option --ratio-of"),
    ("dptool score --method lp --source a.beton -o s.json", "--method lp is not one of"),
    ("dptool bench pretrain a.beton --compare-folder DIR", "has no option --compare-folder"),
    ("dptool pruned in.beton", "no command 'pruned'"),
])
def test_readme_command_line_check_finds_what_is_wrong(line, problem):
    problems = command_line_problems(line, _commands())
    assert len(problems) == 1 and problem in problems[0], problems


def test_every_command_has_a_readme_section():
    headings = [line for line in README.read_text().splitlines() if line.startswith("### ")]
    for name in _commands():
        assert any(f"`dptool {name.split()[0]}" in h for h in headings), name


def readme_missing_files(text: str, root: Path) -> list[str]:
    """Repository files the README names (`dptool/X.py`, `tests/X.py`, benchmark scripts, `results/X.json`, the
    GPU log) that are not in `root`."""
    named = set(re.findall(r"(?<![\w/])((?:dptool|tests|benchmarks)/[a-z_/]+\.\w+)", text))
    named |= {f"benchmarks/{name}" for name in re.findall(r"`((?:bench_\w+|transfer_experiment|gpu_\w+)\.(?:py|sh))`",
                                                         text)}
    named |= {f"benchmarks/results/{name}" for name in re.findall(r"(?<![\w/])results/(\w+\.(?:json|log))", text)}
    named |= {f"benchmarks/results/{name}" for name in re.findall(r"`(\w+\.log)`", text)}
    return sorted(path for path in named if not (root / path).is_file())


def test_every_file_the_readme_names_exists():
    assert readme_missing_files(README.read_text(), README.parent) == []
    assert readme_missing_files("see `results/gone.json` and `bench_gone.py`", README.parent) == [
        "benchmarks/bench_gone.py", "benchmarks/results/gone.json"]


def test_every_benchmark_script_is_in_the_readme():
    scripts = {p.name for p in (README.parent / "benchmarks").iterdir()
               if p.suffix in (".py", ".sh") and not p.name.startswith("_")}
    table = README.read_text().split("\n## Tests and benchmarks\n", 1)[1]
    assert {s for s in scripts if f"| `{s}` |" not in table} == set()


def readme_defaults(text: str) -> list[tuple[str, str]]:
    """(option, value) for each default the README states as "`--opt` (N", "`--opt` ... (default N" or
    "`--opt`, default N" (N a number, or a `code` value after "default")."""
    number = r"([0-9][0-9.e-]*)[;,) ]"
    pattern = (rf"`(--[a-z-]+)` \({number}|`(--[a-z-]+)`[^`(]{{0,45}}\(default:? (?:{number}|`([^`]+)`\))"
               rf"|`(--[a-z-]+)`,?\s+default {number}")
    found = []
    for m in re.finditer(pattern, text):
        groups = [g for g in m.groups() if g is not None]
        found.append((groups[0], groups[1]))
    return found


def _shown_default(param: click.Parameter):
    """The default `-h` shows: the parameter's own, else its `show_default` text or its help's "[default: X]" (the
    options whose default a --preset or --recipe resolves), up to a ';'."""
    if isinstance(param.default, (int, float, str, Path)):  # not None, nor click's sentinel for an unset flag
        return param.default
    shown = param.show_default if isinstance(getattr(param, "show_default", None), str) else None
    found = shown or next(iter(re.findall(r"\[default: ([^\]]+)\]", getattr(param, "help", None) or "")), None)
    return found.split(";")[0].strip() if found else None


def _same(value: str, param: click.Parameter) -> bool:
    default = _shown_default(param)
    try:
        return float(value) == float(default)
    except (TypeError, ValueError):
        return value == str(default)


def test_every_default_the_readme_states_is_the_cli_default():
    commands = _commands()
    stated = readme_defaults(README.read_text())
    assert {"--max-res", "--steps", "--checkpoint-every", "--max-listed", "--workdir"} <= {o for o, _ in stated}
    wrong = [(option, value) for option, value in stated
             if not any(option in _options(c) and _same(value, _options(c)[option])
                        for c in commands.values())]
    assert wrong == [], "README defaults that no command with that option has"
    assert readme_defaults("`--steps` (40) and `--workdir` (default `demo`)") == [("--steps", "40"),
                                                                                 ("--workdir", "demo")]


def _resolves(dotted: str) -> bool:
    """Whether `dptool.a.b.c` names a module, or an attribute reached from the longest importable module."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def test_every_dptool_name_the_readme_gives_exists():
    names = set(re.findall(r"\bdptool(?:\.[A-Za-z_]\w*)+", README.read_text()))
    assert "dptool.train.RECIPES" in names and not _resolves("dptool.train.RECIPE")
    assert sorted(n for n in names if not _resolves(n)) == []
