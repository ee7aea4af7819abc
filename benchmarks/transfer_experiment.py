"""The paper's curve on the built-in data: target top-1 against the pruning ratio for LM, FM and random.

For each seed: generate the data (fixed design, see dptool.synthetic.mini_imagenet), train a surrogate, score
with LM, FM and random, prune at each ratio (one pass per method), pretrain on every file, linear-probe on the
target. Writes JSON and a PNG with mean +- std over seeds (final-epoch and best-epoch top-1) and pretraining
time. The data generator's design was fixed before any result was seen; nothing is tuned here.

    .venv/bin/python benchmarks/transfer_experiment.py --seeds 0 1 2 --out benchmarks/results/transfer
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from _args import parser  # benchmarks/_args.py, beside this script


def run_seed(workdir: Path, config, ratios: list[float], methods: list[str]) -> list[dict]:
    """One seed of the whole experiment; returns one record per (method, ratio)."""
    from dptool.demo import _train_config, prepare_data, pretrain_and_probe
    from dptool.prune import prune
    from dptool.scoring.pipeline import score_files
    from dptool.scoring.run import ScoreOptions
    from dptool.train import train

    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare_data(workdir, config, force=True)
    surrogate = train(paths["source"], workdir / "surrogate.pt", force=True,
                      config=_train_config(config, config.surrogate_arch, config.surrogate_epochs))
    records = []
    images, seconds, probe = pretrain_and_probe(paths["source"], paths["target_train"], paths["target_test"],
                                                workdir / "pretrain_full", config, force=True)
    for method in methods:
        records.append({"seed": config.seed, "method": method, "ratio": 0.0, "pretrain_images": images,
                        "pretrain_seconds": seconds, "final": probe["final_test_top1"],
                        "best": probe["best_test_top1"]})
    pruned_ratios = [r for r in ratios if r > 0]
    for method in methods if pruned_ratios else ():  # ratio 0 alone: the full run above is the whole curve
        scores = workdir / f"scores_{method}.json"
        score_files(scores, method=method, source=paths["source"], target=paths["target_train"],
                    surrogate={"model": surrogate.checkpoint}, options=ScoreOptions(seed=config.seed),
                    res=config.size, force=True, given=())  # the same options for every method: no warnings
        result = prune(paths["source"], scores, workdir / f"{method}_{{ratio}}.beton", ratios=pruned_ratios,
                       force=True)
        for ratio, pruned in zip(pruned_ratios, result.files):
            data = Path(pruned.output)
            images, seconds, probe = pretrain_and_probe(data, paths["target_train"], paths["target_test"],
                                                        workdir / f"pretrain_{method}_{ratio:g}", config, force=True)
            records.append({"seed": config.seed, "method": method, "ratio": ratio, "pretrain_images": images,
                            "pretrain_seconds": seconds, "final": probe["final_test_top1"],
                            "best": probe["best_test_top1"]})
            print(json.dumps(records[-1]), flush=True)
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Mean and std over seeds per (method, ratio)."""
    out = []
    for method in sorted({r["method"] for r in records}):
        for ratio in sorted({r["ratio"] for r in records}):
            rs = [r for r in records if r["method"] == method and r["ratio"] == ratio]
            if not rs:
                continue
            row = {"method": method, "ratio": ratio, "n": len(rs)}
            for key in ("final", "best", "pretrain_seconds", "pretrain_images"):
                vals = np.array([r[key] for r in rs], dtype=float)
                row[key] = float(vals.mean())
                row[key + "_std"] = float(vals.std())
            out.append(row)
    return out


def plot(summary: list[dict], path: Path) -> None:
    """Target top-1 (final and best epoch) and pretraining time against the pruning ratio, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method, colour in zip(("lm", "fm", "random", "el2n"), ("tab:blue", "tab:orange", "tab:gray", "tab:green")):
        rows = [r for r in summary if r["method"] == method]
        if not rows:
            continue
        x = [r["ratio"] for r in rows]
        for ax, key in zip(axes[:2], ("final", "best")):
            ax.errorbar(x, [r[key] for r in rows], yerr=[r[key + "_std"] for r in rows], marker="o",
                        capsize=3, color=colour, label=method)
        axes[2].errorbar(x, [r["pretrain_seconds"] for r in rows], yerr=[r["pretrain_seconds_std"] for r in rows],
                         marker="o", capsize=3, color=colour, label=method)
    for ax, title in zip(axes, ("target top-1, final epoch", "target top-1, best epoch", "pretraining seconds")):
        ax.set_xlabel("pruning ratio (fraction of source classes removed)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Run every seed, then summarise and plot."""
    from dptool.demo import DemoConfig

    ap = parser(__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8])
    ap.add_argument("--methods", nargs="+", default=["lm", "fm", "random"], choices=["lm", "fm", "random", "el2n"])
    ap.add_argument("--quick", action="store_true", help="The demo's quick sizes (a smoke run, not a result).")
    ap.add_argument("--workdir", type=Path, default=Path("transfer-work"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transfer")
    args = ap.parse_args()
    if not all(0 <= r < 1 for r in args.ratios):
        ap.error(f"--ratios must each be in [0, 1), got {' '.join(f'{r:g}' for r in args.ratios)}")

    base = DemoConfig.quick() if args.quick else DemoConfig()
    records, start = [], time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for done, seed in enumerate(args.seeds, 1):
        config = replace(base, seed=seed)
        records += run_seed(args.workdir / f"seed{seed}", config, args.ratios, args.methods)
        summary = summarize(records)  # written after every seed, so a cut-short run still reports
        result = {"config": asdict(base), "seeds": args.seeds[:done], "ratios": args.ratios, "records": records,
                  "summary": summary, "seconds": time.perf_counter() - start}
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        plot(summary, args.out.with_suffix(".png"))
    print(f"{'method':<8}{'ratio':>6}{'final':>14}{'best':>14}{'pretrain s':>12}")
    for r in summary:
        print(f"{r['method']:<8}{r['ratio']:>6.1f}{r['final']:>8.3f}±{r['final_std']:.3f}"
              f"{r['best']:>8.3f}±{r['best_std']:.3f}{r['pretrain_seconds']:>12.1f}")


if __name__ == "__main__":
    main()
