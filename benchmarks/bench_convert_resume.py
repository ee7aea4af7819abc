"""What the resumable conversion costs a normal one: `dptool convert` of one tree against another, interleaved.

Each run is a fresh process that imports dptool from the tree it is given (PYTHONPATH; `--old` is a checkout of the
code before the resume work, e.g. `git worktree add --detach /tmp/old 1868805`) and converts the same generated
folder of ImageNet-sized JPEGs (page cache warm, `sync` before each run). The arms run in turn, one round after
another, the order rotated each round, after one untimed warm-up run each. Arms: `old`; `new` (this checkout, the
default 30 s between progress records); `new_records_1s` (this checkout with a record every second, to price a
record). In the new code's runs, the progress records (`_save_checkpoint`: fsync + state file, in the recording
thread or at the end), the source identity (`_run_identity`: the stat pass over the files) and the metadata
`pwrite`s are timed by wrapping those functions. Prints medians (and the median of each run's time over the old
code's run of the same round, which the machine's other load shifts less), and the CPU seconds of each run's
process tree (interpreter start and imports included; less sensitive to other load than wall time), and writes
JSON.

    .venv/bin/python benchmarks/bench_convert_resume.py --old /tmp/old --images 5000 \\
        --json-out benchmarks/results/convert_resume_cost.json
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _args import parser, require_positive  # benchmarks/_args.py, beside this script
from bench_convert import make_folder

HERE = Path(__file__).resolve().parent
NEW_TREE = HERE.parent


def child(tree: str, src: str, out: str, max_res: int, workers: int, mode: str) -> None:
    """One timed conversion in this process, with dptool imported from `tree`; prints a JSON line."""
    import dptool

    if not Path(dptool.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"dptool imported from {dptool.__file__}, not from {tree}")
    import dptool.convert as conv
    import dptool.writer as writer

    timings: dict[str, list] = {"records": [], "identity": [], "source_identity": [], "pwrite": [], "write_beton": []}
    t0 = time.perf_counter()

    def timed(module, name: str, key: str, detail=None):
        original = getattr(module, name, None)
        if original is None:
            return

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                timings[key].append([start - t0, end - start] + ([detail(*args)] if detail else []))

        setattr(module, name, wrapper)

    try:
        import dptool.writer_progress as progress_module
    except ImportError:  # the code before the resume work
        progress_module = None
    samples = lambda ck, fd, snap, table, n: snap["done"]  # noqa: E731 - the samples a record covers
    if progress_module is not None:
        timed(progress_module, "_save_checkpoint", "records", samples)  # the recording thread's
    timed(writer, "_save_checkpoint", "records", samples)  # the parent's (the last record, a stop's)
    # _run_identity looks _source_identity up in its own module (dptool.convert_resume since convert.py was split)
    run_identity = getattr(conv, "_run_identity", None)
    identity_module = sys.modules[run_identity.__module__] if run_identity else conv
    timed(identity_module, "_source_identity", "source_identity")  # inside _run_identity: the stat pass
    timed(conv, "_run_identity", "identity")
    timed(writer, "pwrite_all", "pwrite")
    timed(conv, "write_beton", "write_beton")
    params = conv.WriterParams(max_resolution=max_res, write_mode=mode, jpeg_quality=90, num_workers=workers)
    t0 = time.perf_counter()
    result = conv.convert(src, out, params=params)
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "images": result.num_samples, "fingerprint": result.fingerprint,
                      "bytes": result.bytes, "timings": timings}))


def summary(values: list[float]) -> dict:
    """Median, min, max and the spread (max - min) over the median."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread_over_median": (max(values) - min(values)) / med}


def main() -> None:
    """Interleave the arms on one generated folder; report wall time and images/s, and the new code's records."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        tree, src, out, max_res, workers, mode = sys.argv[2:8]
        child(tree, src, out, int(max_res), int(workers), mode)
        return
    ap = parser(__doc__)
    ap.add_argument("--old", type=Path, required=True, help="a checkout of the code to compare with (its dptool/)")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--max-res", type=int, default=256)
    ap.add_argument("--write-mode", default="jpg", choices=["raw", "jpg", "smart", "proportion"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="folder for the run's temporary folder (created if missing; default: the system's)")
    ap.add_argument("--json-out", type=Path, default=HERE / "results" / "convert_resume_cost.json")
    args = ap.parse_args()
    require_positive(ap, args, ("images", "classes", "max_res", "workers", "rounds"))
    args.old = args.old.resolve()
    if not (args.old / "dptool" / "__init__.py").is_file():
        ap.error(f"--old {args.old} holds no dptool/ package")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    arms = {"old": (args.old, {}), "new": (NEW_TREE, {}),
            "new_records_1s": (NEW_TREE, {"DPTOOL_CONVERT_CHECKPOINT_SECONDS": "1"})}
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_folder(tmp / "src", args.images, args.classes)
        print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.1f}s", flush=True)
        for p in (tmp / "src").rglob("*.JPEG"):  # warm the page cache
            p.read_bytes()

        def run(arm: str) -> dict:
            tree, extra = arms[arm]
            out = tmp / f"{arm}.beton"
            for p in tmp.iterdir():
                if p.is_file():
                    p.unlink()
            os.sync()
            load = os.getloadavg()[0]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            env = {**os.environ, **extra, "PYTHONPATH": str(tree)}
            proc = subprocess.run([sys.executable, __file__, "--child", str(tree), str(tmp / "src"), str(out),
                                   str(args.max_res), str(args.workers), args.write_mode],
                                  env=env, cwd=tmp, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(f"{arm}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
            after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run's process and its workers, all reaped
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_1min_before": load, "cpu_s": cpu}

        names = list(arms)
        for arm in names:  # warm-up, untimed
            run(arm)
        for r in range(args.rounds):
            for arm in names[r % len(names):] + names[:r % len(names)]:
                res = run(arm)
                runs[arm].append(res)
                print(f"round {r} {arm:<16}{res['wall_s']:8.2f} s {res['images'] / res['wall_s']:8.0f} img/s "
                      f"records {len(res['timings']['records'])}", flush=True)
    fingerprints = {arm: sorted({r["fingerprint"] for r in rs}) for arm, rs in runs.items()}
    result = {
        "images": args.images, "max_res": args.max_res, "write_mode": args.write_mode, "workers": args.workers,
        "rounds": args.rounds, "old_tree": str(args.old), "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "load_average_at_end": os.getloadavg(),
        "same_bytes": len({f for fs in fingerprints.values() for f in fs}) == 1, "fingerprints": fingerprints,
        "arms": {},
    }
    for arm, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        t = [r["timings"] for r in rs]
        result["arms"][arm] = {
            "wall_s": summary(walls),
            "images_per_s": summary([r["images"] / r["wall_s"] for r in rs]),
            "records_per_run": [len(x["records"]) for x in t],
            "record_s_total_per_run": [sum(rec[1] for rec in x["records"]) for x in t],
            "record_s_each": [rec[1] for x in t for rec in x["records"]],
            "identity_s_per_run": [sum(i[1] for i in x["identity"]) for x in t],
            "source_identity_s_per_run": [sum(i[1] for i in x["source_identity"]) for x in t],
            "pwrite_calls_per_run": [len(x["pwrite"]) for x in t],
            "pwrite_s_per_run": [sum(i[1] for i in x["pwrite"]) for x in t],
            "write_beton_s_per_run": [sum(i[1] for i in x["write_beton"]) for x in t],
            "all_wall_s": walls,
            "cpu_s": summary([r["cpu_s"] for r in rs]),  # the process tree's, interpreter start and imports included
            "all_cpu_s": [r["cpu_s"] for r in rs],
            "load_1min_before_each": [r["load_1min_before"] for r in rs],
        }
    base = result["arms"]["old"]["wall_s"]["median"]
    for arm, a in result["arms"].items():  # each run against the old code's run of the same round
        a["wall_over_old_same_round"] = summary([r["wall_s"] / o["wall_s"] for r, o in zip(runs[arm], runs["old"])])
        a["cpu_over_old_same_round"] = summary([r["cpu_s"] / o["cpu_s"] for r, o in zip(runs[arm], runs["old"])])
    print(f"{'arm':<16}{'median s':>10}{'min':>8}{'max':>8}{'img/s':>8}{'vs old':>8}{'paired':>8}{'cpu s':>8}"
          f"{'paired':>8}{'records':>9}{'rec s':>8}")
    for arm, a in result["arms"].items():
        a["median_wall_over_old"] = a["wall_s"]["median"] / base
        print(f"{arm:<16}{a['wall_s']['median']:>10.2f}{a['wall_s']['min']:>8.2f}{a['wall_s']['max']:>8.2f}"
              f"{a['images_per_s']['median']:>8.0f}{a['median_wall_over_old']:>8.3f}"
              f"{a['wall_over_old_same_round']['median']:>8.3f}{a['cpu_s']['median']:>8.2f}"
              f"{a['cpu_over_old_same_round']['median']:>8.3f}"
              f"{statistics.median(a['records_per_run']):>9.0f}{statistics.median(a['record_s_total_per_run']):>8.3f}")
    print(f"same bytes in every run: {result['same_bytes']}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
