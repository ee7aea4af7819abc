"""`dptool demo`: the whole method on built-in data, through the same library calls the CLI makes.

generate (mini-ImageNet + shifted target) -> convert -> train a surrogate -> score (LM, FM, random) ->
prune at one ratio -> pretrain on the full and on each pruned file -> linear probe on the target -> one table.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .atomic import check_output_path
from .errors import InputError, check_seed

__all__ = ["DemoConfig", "DemoRow", "DemoResult", "run_demo", "prepare_data", "pretrain_and_probe", "plot_demo",
           "with_overrides"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and recipes of the demo; `quick()` is the shorter version (about a minute on two cores)."""

    per_class: int = 60  # source images per class (100 classes)
    target_train_per_class: int = 40
    target_test_per_class: int = 40
    size: int = 32
    surrogate_arch: str = "resnet_tiny"
    pretrain_arch: str = "resnet_tiny"
    surrogate_epochs: int = 4
    pretrain_epochs: int = 6
    probe_epochs: int = 30
    batch_size: int = 128
    lr: float = 0.5
    ratio: float = 0.6
    methods: tuple[str, ...] = ("lm", "fm", "random")
    seed: int = 0
    workers: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        """A smaller, shorter run (about a minute on two cores)."""
        return cls(per_class=24, target_train_per_class=20, target_test_per_class=20, surrogate_epochs=2,
                   pretrain_epochs=3, probe_epochs=10)


@dataclass
class DemoRow:
    """One line of the demo's table."""

    method: str
    ratio: float
    pretrain_images: int
    pretrain_seconds: float
    target_top1_final: float
    target_top1_best: float

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)


@dataclass
class DemoResult:
    """The table, the files each stage wrote, and time per stage."""

    workdir: str
    rows: list[DemoRow] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    plot: str | None = None

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {"workdir": self.workdir, "rows": [r.to_dict() for r in self.rows], "files": self.files,
                "stage_seconds": self.stage_seconds, "plot": self.plot}


@contextlib.contextmanager
def _stage(result: DemoResult, name: str):
    """Log the start of a stage and record its seconds in `result.stage_seconds`."""
    log.info("demo: %s", name)
    start = time.perf_counter()
    yield
    result.stage_seconds[name] = round(time.perf_counter() - start, 2)


def prepare_data(workdir: Path, config: DemoConfig, *, force: bool = False) -> dict[str, Path]:
    """Generate the built-in data as `.npz` files and convert each with `dptool convert`'s library call."""
    from .convert import WriterParams, convert
    from .synthetic import mini_imagenet, write_npz

    data = mini_imagenet(per_class=config.per_class, target_train_per_class=config.target_train_per_class,
                         target_test_per_class=config.target_test_per_class, size=config.size, seed=config.seed)
    params = WriterParams(max_resolution=config.size, write_mode="raw", num_workers=config.workers,
                          shuffle_seed=config.seed)
    paths = {}
    for name, (images, labels, names) in data.items():
        npz = write_npz(workdir / f"{name}.npz", images, labels, names)
        paths[name] = workdir / f"{name}.beton"
        convert(npz, paths[name], params=params, force=force)
    return paths


def _train_config(config: DemoConfig, arch: str, epochs: int, *, batch_size: int | None = None):
    from .recipe import TrainConfig

    return TrainConfig(arch=arch, small_input=True, epochs=epochs, batch_size=batch_size or config.batch_size,
                       lr=config.lr, lr_peak_epoch=min(2.0, epochs / 2), min_res=config.size, max_res=config.size,
                       val_res=config.size, res_step=8, workers=config.workers, seed=config.seed)


def pretrain_and_probe(data: Path, target_train: Path, target_test: Path, out_stem: Path, config: DemoConfig, *,
                       force: bool = False, progress: bool = False) -> tuple[int, float, dict]:
    """Pretrain `config.pretrain_arch` on `data`, then linear-probe it on the target (`progress`: their bars).

    Returns (pretraining images trained on, pretraining seconds, the finetune result as a dict)."""
    from .beton import open_beton
    from .finetune import FinetuneConfig, finetune
    from .train import train

    # not with_suffix: a stem such as "pretrain_lm_0.2" would lose its ".2"
    checkpoint = out_stem.parent / f"{out_stem.name}.pt"
    # a file pruned at a high --ratio can hold fewer images than a batch, which train refuses: one batch of all
    samples = open_beton(data).num_samples
    recipe = _train_config(config, config.pretrain_arch, config.pretrain_epochs,
                           batch_size=min(config.batch_size, samples))
    trained = train(data, checkpoint, config=recipe, force=force, progress=progress)
    probe = finetune(trained.checkpoint, target_train, target_test,
                     config=FinetuneConfig(mode="lp", epochs=config.probe_epochs, batch_size=config.batch_size,
                                           res=config.size, workers=config.workers, seed=config.seed),
                     force=force, progress=progress)
    return trained.images_trained, trained.seconds, probe.to_dict()


def run_demo(workdir: str | os.PathLike, config: DemoConfig = DemoConfig(), *, force: bool = False,
             progress: bool = False) -> DemoResult:
    """Run every stage of the method on built-in data in `workdir`; return the table and where things are."""
    from .distributed import launched_by_torchrun
    from .prune import prune
    from .scoring.pipeline import score_files
    from .scoring.run import ScoreOptions
    from .train import train

    if launched_by_torchrun():  # every rank would convert, score and prune into one folder, then fail at finetune
        raise InputError("demo runs in one process (its linear probe cannot run under torchrun); run it without "
                         "torchrun.")
    if not 0 <= config.ratio < 1:
        raise InputError(f"--ratio must be in [0, 1), got {config.ratio}.")
    check_seed("--seed", config.seed)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"--workdir {workdir} is a file; give a folder.")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create --workdir {workdir} ({exc.strerror}); choose a folder you can write to.") \
            from None
    check_output_path(workdir / "demo.json", force=True)  # a folder that cannot be written to fails here, at once
    if any(workdir.glob("*.beton")) and not force:
        raise InputError(f"{workdir} already holds demo files; pass --force to run again over them.")
    result = DemoResult(workdir=str(workdir))
    stage = functools.partial(_stage, result)

    with stage("generate + convert"):
        paths = prepare_data(workdir, config, force=True)
    result.files.update({k: str(v) for k, v in paths.items()})

    with stage("train surrogate"):
        surrogate = train(paths["source"], workdir / "surrogate.pt",
                          config=_train_config(config, config.surrogate_arch, config.surrogate_epochs),
                          force=True, progress=progress)
    result.files["surrogate"] = surrogate.checkpoint

    for method in config.methods:
        with stage(f"score {method}"):
            score_files(workdir / f"scores_{method}.json", method=method, source=paths["source"],
                        target=paths["target_train"], surrogate={"model": surrogate.checkpoint},
                        options=ScoreOptions(seed=config.seed, progress=progress), res=config.size, force=True,
                        given=())  # one set of options for every method, on purpose: no warnings
        with stage(f"prune {method}"):
            pruned = workdir / f"source_{method}_p{round(config.ratio * 100)}.beton"
            prune(paths["source"], workdir / f"scores_{method}.json", pruned, ratio=config.ratio, force=True)
        result.files[f"scores_{method}"] = str(workdir / f"scores_{method}.json")
        result.files[f"pruned_{method}"] = str(pruned)

    runs = [("none", 0.0, paths["source"])]
    runs += [(m, config.ratio, Path(result.files[f"pruned_{m}"])) for m in config.methods]
    for method, ratio, data in runs:
        with stage(f"pretrain + probe ({method})"):
            images, seconds, probe = pretrain_and_probe(data, paths["target_train"], paths["target_test"],
                                                        workdir / f"pretrain_{method}", config, force=True,
                                                        progress=progress)
        result.rows.append(DemoRow(method=method, ratio=ratio, pretrain_images=images, pretrain_seconds=seconds,
                                   target_top1_final=probe["final_test_top1"],
                                   target_top1_best=probe["best_test_top1"]))
    result.plot = str(plot_demo(result, workdir / "demo.png"))
    (workdir / "demo.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return result


def plot_demo(result: DemoResult, path: str | os.PathLike) -> Path:
    """Two panels: pretraining time and target top-1 (final and best epoch) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    labels = [f"{r.method}\n{'full' if r.ratio == 0 else f'pruned {r.ratio:.0%}'}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    xs = list(range(len(rows)))
    ax1.bar(xs, [r.pretrain_seconds for r in rows], color="tab:gray")
    ax1.set_xticks(xs, labels)
    ax1.set_ylabel("pretraining seconds")
    width = 0.38
    ax2.bar([x - width / 2 for x in xs], [r.target_top1_final for r in rows], width, label="final epoch")
    ax2.bar([x + width / 2 for x in xs], [r.target_top1_best for r in rows], width, label="best epoch")
    ax2.set_xticks(xs, labels)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("target top-1 (linear probe)")
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle("dptool demo: prune the source, keep the transfer")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def with_overrides(config: DemoConfig, **overrides) -> DemoConfig:
    """`config` with the non-None `overrides` applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
