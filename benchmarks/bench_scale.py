"""Scale: wall time and peak memory of `convert`, `info`, `verify`, `score`, `prune` against the number of samples N.

The design promises ImageNet scale on the CPU path: per-sample state of a few bytes, peak memory of convert, score
and prune under 4 GB whatever N is, time linear in N. This measures it. For each N (default 25k, 100k, 400k) a
source of N small images (``--image-size`` px, ``--classes`` classes, N/classes images per class, shuffled) is
generated as an ``.npz`` (written in chunks, never whole in memory) and, up to ``--imagefolder-max`` samples, also as
an ImageFolder tree of JPEG files (the real ImageNet case). A 10-class target (``--target-images`` images) and a
``resnet_tiny`` surrogate over the same classes (``dptool train --epochs 1`` on a separate small file of
``--surrogate-per-class`` images per class) are made once and reused for every N.

Each of these runs as its own subprocess of the real CLI (``.venv/bin/dptool -q ... --json``):

* ``convert_npz`` (npz -> beton, JPEG), ``convert_imagefolder`` (folder -> beton, JPEG; only N <= --imagefolder-max)
* ``info``; ``verify`` (every sample's CRC-32 against the digests ``convert`` recorded);
  ``score_random``; ``score_lm`` (reads only the target's images); ``score_fm`` (penultimate features of
  *all* N source images: k-means on ``--source-sample`` (16) images per class into ``--clusters`` centroids, the
  same sample at every N >= 16 x classes, then every source image streamed and assigned: the real scale test);
  ``score_fm_s256``: the same with the CLI's default ``--source-sample 256`` (k-means on min(N, 256 x classes)
  features: grows with N up to 256 per class, by design)
* ``prune_lm``, ``prune_fm``: ``--ratio 0.6`` with the LM and the FM scores (byte copy).

Measured per command: wall seconds from start to exit (Python start-up and ``import ffcv`` included, a fixed cost
of a few seconds) and memory of the whole process tree (the command and every worker process it starts, e.g.
convert's writer processes): ``/proc/PID/smaps_rollup`` of every process in the tree is read every
``--interval`` seconds (0.1) and summed (psutil looks the tree up every 5th sample). Reported:

* ``peak_pss_mb``: peak of the summed PSS (proportional set size: a page shared by k processes counts 1/k in each),
  the physical memory the tree holds; the headline number, compared with the 4 GB budget;
* ``peak_anon_mb``: peak of the summed anonymous + shared-memory PSS (what cannot be dropped; file-backed pages,
  such as the FFCV loader's mmap of the ``.beton``, are page cache the kernel can reclaim);
* ``peak_rss_sum_mb``: peak of the summed RSS (counts pages shared by forked workers once per process: an upper
  bound);
* ``max_rss_mb``: the kernel's high-water RSS of the largest single process of the tree (``ru_maxrss`` from
  ``wait4``: exact, not sampled, but the max over processes, not their sum);
* ``procs``: the most processes seen in the tree at once;
* ``cpu_seconds``: user + system CPU time of the command and its waited-for children (``wait4``), less sensitive
  than wall time to other load on the machine (``load_before``: the 1-minute load average at its start).

Sampling costs the benchmark process about a tenth of one core; a peak shorter than the interval can be missed (the
``max_rss_mb`` high-water mark is not). Files are in the page cache (just written) when read. With ``--repeats R``
the sizes are run in R rounds (the same command at the same size minutes apart, so that a burst of other load on a
shared machine hits one round only): per command and size the fastest round's times are kept, and the largest
memory peaks of all rounds.

Verdicts. Time: the marginal cost per 1k samples between consecutive sizes ((t2 - t1) / (N2 - N1)), first interval
against last: linear when the last is at most 1.5x the first (the raw ratio t(N_max) / t(N_min) against N_max /
N_min is reported too, but a fixed start-up cost keeps it below the N ratio). Memory: flat when the peak anonymous
memory grows by less than 64 MB + 10% from N_min to N_max (the PSS of shared libraries moves by ~100 MB with
whatever other processes map torch at the time, so it is not used for the verdict); the growth per sample (bytes)
and the peaks (PSS and anonymous) projected linearly from the last two sizes to ImageNet's 1.28M samples are given.
The commit measured and any uncommitted changes under dptool/ and cli/ are recorded at start and end.

    .venv/bin/python benchmarks/bench_scale.py              # 2 rounds: ~15 min on 2 cores (+3 min of set-up once)
    .venv/bin/python benchmarks/bench_scale.py --repeats 1  # ~8 min
    .venv/bin/python benchmarks/bench_scale.py --sizes 5000,20000 --json-out /tmp/scale.json   # a quick check
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from _args import parser, require_positive  # benchmarks/_args.py, beside this script

REPO = Path(__file__).resolve().parent.parent
IMAGENET_N = 1_281_167
BUDGET_MB = 4096
COMMANDS = ["convert_npz", "convert_imagefolder", "info", "verify", "score_random", "score_lm", "score_fm",
            "score_fm_s256", "prune_lm", "prune_fm"]


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------

def _class_bases(n_classes: int, size: int, seed: int) -> np.ndarray:
    """(C, size, size, 3) float32 class patterns: a base colour plus oriented stripes (as `separable_images`)."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, size=(n_classes, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c = np.arange(n_classes)
    freq = (1 + c % 7).astype(np.float32)[:, None, None]
    angle = (np.pi * (c % 5) / 5).astype(np.float32)[:, None, None]
    stripes = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle))) * 40
    return palette[:, None, None, :] + stripes[..., None]


def _chunks(n: int, n_classes: int, size: int, seed: int, chunk: int = 20000):
    """Yield (images uint8 (B, size, size, 3), labels int64 (B,)) chunks of a shuffled, class-balanced source."""
    bases = _class_bases(n_classes, size, seed=1234)  # same classes in every file (source, surrogate data)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n, dtype=np.int64) % n_classes)
    for lo in range(0, n, chunk):
        lab = labels[lo:lo + chunk]
        noise = rng.integers(-24, 25, size=(len(lab), size, size, 3), dtype=np.int16)
        yield np.clip(bases[lab] + noise, 0, 255).astype(np.uint8), lab


def write_npz_chunked(path: Path, n: int, n_classes: int, size: int, seed: int) -> Path:
    """An `.npz` (images, labels, class_names) written array by array, images chunk by chunk (no N-sized buffer)."""
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp.npz")
    labels_all = []
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("images.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (n, size, size, 3)}
            np.lib.format.write_array_header_2_0(f, header)
            for images, labels in _chunks(n, n_classes, size, seed):
                f.write(images.tobytes())
                labels_all.append(labels)
        for name, arr in (("labels", np.concatenate(labels_all)),
                          ("class_names", np.asarray([f"n{c:08d}" for c in range(n_classes)]))):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    tmp.rename(path)
    return path


def _write_jpegs(job) -> None:
    root, start, images, labels = job
    from PIL import Image

    for j, (img, lab) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / f"n{int(lab):08d}" / f"{start + j:07d}.JPEG", quality=95)


def write_image_folder(root: Path, n: int, n_classes: int, size: int, seed: int, workers: int) -> Path:
    """The same samples as `write_npz_chunked` as an ImageFolder tree of JPEG (q95) files."""
    import multiprocessing

    done = root / ".complete"
    if done.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    for c in range(n_classes):
        (root / f"n{c:08d}").mkdir(parents=True)
    jobs, start = [], 0
    for images, labels in _chunks(n, n_classes, size, seed):
        for lo in range(0, len(labels), 2000):
            jobs.append((root, start + lo, images[lo:lo + 2000], labels[lo:lo + 2000]))
        start += len(labels)
        if len(jobs) >= 4 * workers or start >= n:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                pool.map(_write_jpegs, jobs)
            jobs = []
    done.touch()
    return root


# ---------------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------------

_ROLLUP_KEYS = {"Rss:": "rss", "Pss:": "pss", "Pss_Anon:": "anon", "Pss_Shmem:": "shmem", "Pss_File:": "file"}


def _rollup(pid: int) -> dict[str, int] | None:
    """kB of RSS and PSS (total, anonymous, shared memory, file) of one process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in _ROLLUP_KEYS:
            out[_ROLLUP_KEYS[parts[0]]] = int(parts[1])
    return out


def measure(cmd: list[str], log_prefix: Path, interval: float) -> dict:
    """Run `cmd`, sampling the memory of its process tree; wall seconds, peaks (MB), exit code, parsed JSON."""
    import psutil

    out_path, err_path = log_prefix.with_suffix(".out"), log_prefix.with_suffix(".err")
    peaks = {"rss": 0, "pss": 0, "anon": 0, "file": 0}
    procs = 0
    load = os.getloadavg()[0]
    with open(out_path, "w") as out, open(err_path, "w") as err:
        start = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
        root = psutil.Process(p.pid)
        tick, tree = 0, [p.pid]
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                seconds = time.perf_counter() - start
                break
            if tick % 5 == 0:  # the tree is looked up every 5 samples (scanning /proc costs more than reading)
                try:
                    tree = [p.pid] + [c.pid for c in root.children(recursive=True)]
                except psutil.Error:
                    tree = [p.pid]
            tick += 1
            total = {"rss": 0, "pss": 0, "anon": 0, "file": 0}
            alive = 0
            for q in tree:
                r = _rollup(q)
                if r is None:
                    continue
                alive += 1
                total["rss"] += r.get("rss", 0)
                total["pss"] += r.get("pss", 0)
                total["anon"] += r.get("anon", 0) + r.get("shmem", 0)
                total["file"] += r.get("file", 0)
            procs = max(procs, alive)
            for k in peaks:
                peaks[k] = max(peaks[k], total[k])
            time.sleep(interval)
    p.returncode = os.waitstatus_to_exitcode(status)
    stdout = out_path.read_text()
    stderr = err_path.read_text()
    try:
        doc = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        doc = None
    return {
        "cmd": [Path(cmd[0]).name] + cmd[1:], "rc": p.returncode, "seconds": round(seconds, 3),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3), "load_before": round(load, 2),
        "peak_pss_mb": round(peaks["pss"] / 1024, 1), "peak_anon_mb": round(peaks["anon"] / 1024, 1),
        "peak_file_mb": round(peaks["file"] / 1024, 1), "peak_rss_sum_mb": round(peaks["rss"] / 1024, 1),
        "max_rss_mb": round(usage.ru_maxrss / 1024, 1), "procs": procs,
        "stderr_tail": stderr[-3000:], "result": doc,
    }


def code_state() -> dict:
    """The commit measured and the files that differed from it (the working tree may hold uncommitted work)."""
    def git(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--short", "--", "dptool", "cli").splitlines()}


def merge_repeats(runs: list[dict]) -> list[dict]:
    """One row per size: times of the fastest successful round, memory peaks the largest of all rounds."""
    rows = []
    for n in sorted({r["n"] for r in runs}):
        mine = [r for r in runs if r["n"] == n]
        ok = [r for r in mine if r["rc"] == 0]
        if not ok:
            rows.append(mine[-1])
            continue
        row = dict(min(ok, key=lambda r: r["seconds"]))
        for key in ("peak_pss_mb", "peak_anon_mb", "peak_file_mb", "peak_rss_sum_mb", "max_rss_mb", "procs"):
            row[key] = max(r[key] for r in ok)
        row["rounds"] = [{k: r[k] for k in ("round", "rc", "seconds", "cpu_seconds", "load_before", "peak_pss_mb",
                                            "peak_anon_mb")} for r in mine]
        rows.append(row)
    return rows


def run_checked(cmd: list[str], what: str) -> None:
    """Run an untimed set-up command; stop with its stderr on failure."""
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{what} failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")


def _trim(doc):
    """The command's --json document without its long lists (per-class rows, top groups)."""
    if not isinstance(doc, dict):
        return doc
    keep = {}
    for k, v in doc.items():
        if isinstance(v, list) and len(v) > 12:
            keep[k] = f"<{len(v)} items>"
        elif isinstance(v, dict):
            keep[k] = _trim(v)
        else:
            keep[k] = v
    return keep


# ---------------------------------------------------------------------------------------------------------------
# analysis and output
# ---------------------------------------------------------------------------------------------------------------

def analyse(name: str, rows: list[dict]) -> dict:
    """Time per 1k samples, marginal costs, ratios, memory growth and projections for one command."""
    rows = [r for r in rows if r["rc"] == 0]
    if len(rows) < 2:
        return {"command": name, "sizes": [r["n"] for r in rows], "note": "fewer than two successful sizes"}
    n = np.array([r["n"] for r in rows], dtype=float)
    t = np.array([r["seconds"] for r in rows])
    cpu = np.array([r["cpu_seconds"] for r in rows])
    m = np.array([r["peak_pss_mb"] for r in rows])
    a = np.array([r["peak_anon_mb"] for r in rows])
    marginal = np.diff(t) / np.diff(n) * 1000  # s per 1k samples
    marginal_cpu = np.diff(cpu) / np.diff(n) * 1000
    per_sample = lambda v: np.diff(v) / np.diff(n) * 1024 * 1024  # noqa: E731 - MB per sample -> bytes
    # linear: the last interval's marginal cost at most 1.5x the first's (0.05 s per 1k of slack for tiny costs)
    linear = bool(marginal[-1] <= 1.5 * max(marginal[0], 0) + 0.05)
    # flat: judged on anonymous memory (PSS of shared libraries moves with whatever else maps them)
    flat = bool(a[-1] - a[0] < 64 + 0.10 * a[0])
    # the last interval's growth, never below the last measurement (at small N the noise can make it negative)
    def project(v) -> float:
        return max(float(v[-1]), float(v[-1] + (v[-1] - v[-2]) / (n[-1] - n[-2]) * (IMAGENET_N - n[-1])))

    return {
        "command": name, "sizes": n.astype(int).tolist(), "seconds": t.tolist(), "cpu_seconds": cpu.tolist(),
        "peak_pss_mb": m.tolist(), "peak_anon_mb": a.tolist(),
        "seconds_per_1k": (t / n * 1000).round(4).tolist(),
        "marginal_seconds_per_1k": marginal.round(4).tolist(),
        "marginal_cpu_seconds_per_1k": marginal_cpu.round(4).tolist(),
        "time_ratio": round(float(t[-1] / t[0]), 3), "n_ratio": round(float(n[-1] / n[0]), 3),
        "loglog_slope_time": np.round(np.diff(np.log(t)) / np.diff(np.log(n)), 3).tolist(),
        "linear_time": linear,
        "pss_growth_bytes_per_sample": np.round(per_sample(m), 1).tolist(),
        "anon_growth_bytes_per_sample": np.round(per_sample(a), 1).tolist(),
        "flat_memory": flat,
        "projected_peak_pss_mb_at_imagenet": round(project(m)),
        "projected_peak_anon_mb_at_imagenet": round(project(a)),
        "projected_seconds_at_imagenet": round(float(t[-1] + marginal[-1] / 1000 * (IMAGENET_N - n[-1]))),
        "under_budget_at_imagenet": bool(project(m) < BUDGET_MB),
    }


def print_table(results: dict[str, list[dict]], sizes: list[int], analysis: dict[str, dict]) -> None:
    """Seconds, peak PSS and peak anonymous memory per command and size, then the verdicts."""
    w = 9
    label = lambda n: f"{n // 1000}k" if n % 1000 == 0 else str(n)  # noqa: E731
    head = "".join(f"{label(n) + ' ' + unit:>{w}}" for unit in ("s", "MB", "anon") for n in sizes)
    print(f"\n{'command':<20}{head}{'s/1k@max':>9}{'procs':>6}")
    for name, rows in results.items():
        by_n = {r["n"]: r for r in rows}
        cells = []
        for key, fmt in (("seconds", "{:.1f}"), ("peak_pss_mb", "{:.0f}"), ("peak_anon_mb", "{:.0f}")):
            for n in sizes:
                r = by_n.get(n)
                cells.append(f"{'-' if r is None else ('FAIL' if r['rc'] else fmt.format(r[key])):>{w}}")
        ok = [r for r in rows if not r["rc"]]
        last = max(ok, key=lambda r: r["n"]) if ok else None
        per = f"{last['seconds'] / last['n'] * 1000:.3f}" if last else "-"
        procs = max((r["procs"] for r in rows), default=0)
        print(f"{name:<20}{''.join(cells)}{per:>9}{procs:>6}")
    print("(s = wall seconds, start-up included; MB = peak PSS of the process tree; anon = its anonymous + shared "
          "memory part)")
    print(f"\n{'command':<20}{'t ratio':>8}{'N ratio':>8}{'marginal s/1k':>22}{'cpu s/1k':>20}{'linear':>7}"
          f"{'anon B/sample':>16}{'flat':>5}{'PSS MB@1.28M':>13}{'anon MB@1.28M':>14}")
    for name, a in analysis.items():
        if "note" in a:
            print(f"{name:<20}{a['note']}")
            continue
        fmt = lambda xs, f: ", ".join(f.format(x) for x in xs)  # noqa: E731
        print(f"{name:<20}{a['time_ratio']:>8.1f}{a['n_ratio']:>8.1f}"
              f"{fmt(a['marginal_seconds_per_1k'], '{:.3f}'):>22}{fmt(a['marginal_cpu_seconds_per_1k'], '{:.3f}'):>20}"
              f"{'yes' if a['linear_time'] else 'NO':>7}{fmt(a['anon_growth_bytes_per_sample'], '{:.0f}'):>16}"
              f"{'yes' if a['flat_memory'] else 'NO':>5}{a['projected_peak_pss_mb_at_imagenet']:>13.0f}"
              f"{a['projected_peak_anon_mb_at_imagenet']:>14.0f}")


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """Seconds vs N and peak PSS vs N per command (log-log), with the 4 GB budget line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    cmap = plt.get_cmap("tab10")
    all_n = sorted({r["n"] for rows in results.values() for r in rows})
    for i, (name, rows) in enumerate(results.items()):
        rows = [r for r in rows if r["rc"] == 0]
        if not rows:
            continue
        n = [r["n"] for r in rows]
        axes[0].plot(n, [r["seconds"] for r in rows], marker="o", color=cmap(i % 10), label=name)
        axes[1].plot(n, [r["peak_pss_mb"] for r in rows], marker="o", color=cmap(i % 10), label=name)
        axes[1].plot(n, [r["peak_anon_mb"] for r in rows], marker=".", ls="--", lw=0.8, color=cmap(i % 10))
    if len(all_n) >= 2:
        x = np.array([all_n[0], all_n[-1]], dtype=float)
        ref = [max(r["seconds"] for rows in results.values() for r in rows if r["n"] == all_n[0] and r["rc"] == 0)]
        axes[0].plot(x, ref[0] * x / x[0], ls=":", color="gray", label="slope 1 (linear)")
    axes[1].axhline(BUDGET_MB, ls="--", color="red", label="4 GB budget")
    for ax, title, ylab in ((axes[0], "wall time (start-up included)", "seconds"),
                            (axes[1], "peak memory of the process tree: PSS (solid), anonymous part (dashed)", "MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("source samples N")
        ax.set_ylabel(ylab)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(handles=[axes[0].lines[-1]], fontsize=7, loc="upper left")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------

def main() -> None:
    """Make the data, run every command at every size, print the table, write JSON and the plot."""
    ap = parser(__doc__)
    ap.add_argument("--sizes", default="25000,100000,400000", help="source sizes N, comma-separated")
    ap.add_argument("--classes", type=int, default=1000, help="source classes")
    ap.add_argument("--image-size", type=int, default=20, help="side of the generated source images, px")
    ap.add_argument("--res", type=int, default=16, help="surrogate training and scoring resolution, px")
    ap.add_argument("--target-images", type=int, default=500, help="images of the 10-class target")
    ap.add_argument("--surrogate-per-class", type=int, default=10,
                    help="images per class of the surrogate's training file (1 epoch of resnet_tiny)")
    ap.add_argument("--clusters", type=int, default=None, help="FM k-means K (default: --classes)")
    ap.add_argument("--source-sample", type=int, default=16,
                    help="FM: source images per class for k-means (the same sample at every N >= classes x this)")
    ap.add_argument("--ratio", type=float, default=0.6, help="prune ratio")
    ap.add_argument("--imagefolder-max", type=int, default=400000,
                    help="also convert from an ImageFolder of JPEG files at sizes up to this (0 = never)")
    ap.add_argument("--commands", default=",".join(COMMANDS), help="commands to measure, comma-separated")
    ap.add_argument("--interval", type=float, default=0.1, help="memory sampling interval, s")
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds over all sizes; per command and size the fastest round's times are kept and the "
                         "largest peaks of all rounds")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scale-bench"),
                    help="generated data (kept and reused), outputs, logs")
    ap.add_argument("--json-out", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    ap.add_argument("--plot", type=Path, default=None, help="PNG (default: --json-out with .png)")
    args = ap.parse_args()

    try:
        sizes = sorted(int(float(s)) for s in args.sizes.split(","))
    except ValueError:
        ap.error(f"--sizes must be numbers separated by commas, got {args.sizes!r}")
    require_positive(ap, args, ("classes", "image_size", "res", "target_images", "surrogate_per_class",
                                "source_sample", "repeats"))
    if sizes[0] < 1:
        ap.error(f"every --sizes value must be at least 1, got {sizes[0]}")
    if args.clusters is not None and args.clusters < 1:
        ap.error(f"--clusters must be at least 1, got {args.clusters}")
    if not 0 <= args.ratio < 1 or not args.interval > 0 or args.imagefolder_max < 0:
        ap.error(f"--ratio must be in [0, 1), --interval > 0 and --imagefolder-max >= 0, got {args.ratio}, "
                 f"{args.interval} and {args.imagefolder_max}")
    wanted = [c.strip() for c in args.commands.split(",") if c.strip()]
    unknown = set(wanted) - set(COMMANDS)
    if unknown:
        ap.error(f"unknown commands {sorted(unknown)}; known: {', '.join(COMMANDS)}")
    for prune_cmd, score_cmd in (("prune_lm", "score_lm"), ("prune_fm", "score_fm")):
        if prune_cmd in wanted and score_cmd not in wanted:
            ap.error(f"--commands {prune_cmd} prunes with the scores {score_cmd} writes; add {score_cmd}")
    clusters = args.clusters or args.classes
    dptool = str(REPO / ".venv" / "bin" / "dptool")
    work = args.workdir
    data, outs, logs = work / "data", work / "out", work / "logs"
    for d in (data, outs, logs):
        d.mkdir(parents=True, exist_ok=True)
    workers = os.cpu_count() or 1
    began = time.perf_counter()
    code_start = code_state()

    # --- once: target, surrogate (untimed) ---------------------------------------------------------------
    from dptool.synthetic import separable_images, write_npz

    tag = f"{args.classes}c_{args.image_size}px"
    target = data / f"target_{args.target_images}_{args.image_size}px.beton"
    if not target.exists():
        images, labels = separable_images(10, -(-args.target_images // 10), args.image_size, seed=7)
        npz = write_npz(data / "target.npz", images, labels, [f"target_{c}" for c in range(10)])
        run_checked([dptool, "-q", "convert", str(npz), str(target), "--max-res", str(args.image_size), "--force"],
                    "target convert")
    sur_n = args.surrogate_per_class * args.classes
    sur_beton = data / f"surrogate_data_{sur_n}_{tag}.beton"
    ckpt = data / f"surrogate_{sur_n}_{tag}_res{args.res}.pt"
    if not ckpt.exists():
        print(f"training the surrogate (resnet_tiny, 1 epoch on {sur_n} images) ...", flush=True)
        npz = write_npz_chunked(data / f"surrogate_data_{sur_n}_{tag}.npz", sur_n, args.classes, args.image_size,
                                seed=99)
        run_checked([dptool, "-q", "convert", str(npz), str(sur_beton), "--max-res", str(args.image_size),
                     "--force"], "surrogate data convert")
        r, batch = args.res, min(256, sur_n)
        run_checked([dptool, "-q", "train", str(sur_beton), "--arch", "resnet_tiny", "--epochs", "1",
                     "--min-res", str(r), "--max-res", str(r), "--val-res", str(r), "--batch-size", str(batch),
                     "-o", str(ckpt), "--force"], "surrogate training")
    # warm-up (untimed): FFCV's compiled inference stages go to Numba's disk cache before any timing
    run_checked([dptool, "-q", "score", "--method", "fm", "--source", str(sur_beton), "--target", str(target),
                 "--model", str(ckpt), "--source-sample", "2", "--clusters", "10", "--kmeans-iters", "1",
                 "-o", str(outs / "warmup.json"), "--force"], "warm-up")

    # --- per size ------------------------------------------------------------------------------------------
    runs: dict[str, list[dict]] = {c: [] for c in wanted}
    errors: list[dict] = []

    def record(name: str, n: int, cmd: list[str]) -> dict:
        r = measure(cmd, logs / f"{name}_{n}_r{rep}", args.interval)
        r["n"], r["round"] = n, rep
        r["result"] = _trim(r["result"])
        runs[name].append(r)
        status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']}"
        print(f"  {name:<20} {r['seconds']:8.1f} s  peak PSS {r['peak_pss_mb']:7.0f} MB  (anon {r['peak_anon_mb']:.0f},"
              f" RSS sum {r['peak_rss_sum_mb']:.0f}, max proc {r['max_rss_mb']:.0f}, {r['procs']} procs)  {status}",
              flush=True)
        if r["rc"] != 0:
            errors.append({"command": name, "n": n, "rc": r["rc"], "stderr_tail": r["stderr_tail"]})
        return r

    for rep, n in [(rep, n) for rep in range(args.repeats) for n in sizes]:  # rounds: repeats minutes apart
        print(f"\nround {rep + 1}/{args.repeats}, N = {n}: generating data ...", flush=True)
        t0 = time.perf_counter()
        npz = write_npz_chunked(data / f"source_{n}_{tag}.npz", n, args.classes, args.image_size, seed=n)
        folder = None
        if "convert_imagefolder" in wanted and n <= args.imagefolder_max:
            folder = write_image_folder(data / f"folder_{n}_{tag}", n, args.classes, args.image_size, seed=n,
                                        workers=workers)
        print(f"  data ready in {time.perf_counter() - t0:.0f} s", flush=True)
        src = outs / f"source_{n}.beton"
        common = ["--max-res", str(args.image_size), "--force", "--json"]
        if "convert_npz" in wanted:
            record("convert_npz", n, [dptool, "-q", "convert", str(npz), str(src), *common])
        elif not src.exists():  # the later commands need the source file
            run_checked([dptool, "-q", "convert", str(npz), str(src), *common], "convert")
        if folder is not None:
            record("convert_imagefolder", n,
                   [dptool, "-q", "convert", str(folder), str(outs / f"source_{n}_folder.beton"), *common])
            (outs / f"source_{n}_folder.beton").unlink(missing_ok=True)
        if "info" in wanted:
            record("info", n, [dptool, "-q", "info", str(src), "--json"])
        if "verify" in wanted:
            record("verify", n, [dptool, "-q", "verify", str(src), "--json"])
        score = [dptool, "-q", "score", "--source", str(src), "--target", str(target), "--force", "--json"]
        if "score_random" in wanted:
            record("score_random", n, score + ["--method", "random", "-o", str(outs / f"random_{n}.json")])
        lm, fm = outs / f"lm_{n}.json", outs / f"fm_{n}.json"
        if "score_lm" in wanted:
            record("score_lm", n, score + ["--method", "lm", "--model", str(ckpt), "-o", str(lm)])
        if "score_fm" in wanted:
            record("score_fm", n, score + ["--method", "fm", "--model", str(ckpt), "--clusters", str(clusters),
                                           "--source-sample", str(args.source_sample), "-o", str(fm)])
        if "score_fm_s256" in wanted:  # the CLI's default sample: k-means on min(N, 256 x classes) features
            record("score_fm_s256", n, score + ["--method", "fm", "--model", str(ckpt), "--clusters", str(clusters),
                                                "-o", str(outs / f"fm_s256_{n}.json")])
        for name, scores in (("prune_lm", lm), ("prune_fm", fm)):
            if name in wanted and scores.exists():
                out = outs / f"{name}_{n}.beton"
                record(name, n, [dptool, "-q", "prune", str(src), "--scores", str(scores), "--ratio",
                                 str(args.ratio), "-o", str(out), "--force", "--json"])
                out.unlink(missing_ok=True)

    results = {k: merge_repeats(v) for k, v in runs.items() if v}
    analysis = {name: analyse(name, rows) for name, rows in results.items()}
    print_table(results, sizes, analysis)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "params": {"sizes": sizes, "classes": args.classes, "image_size": args.image_size, "res": args.res,
                   "target_images": args.target_images, "surrogate": "resnet_tiny, 1 epoch, "
                   f"{sur_n} images", "clusters": clusters, "source_sample": args.source_sample,
                   "ratio": args.ratio, "imagefolder_max": args.imagefolder_max, "interval_s": args.interval,
                   "repeats": args.repeats,
                   "write_mode": "jpg (q90, the convert default)"},
        "memory_measure": "peak over samples every interval of the summed /proc/PID/smaps_rollup PSS of the "
                          "command's process tree; max_rss_mb = wait4 ru_maxrss (largest single process)",
        "budget_mb": BUDGET_MB, "imagenet_n": IMAGENET_N, "code_at_start": code_start, "code_at_end": code_state(),
        "results": results, "analysis": analysis, "errors": errors,
        "total_seconds": round(time.perf_counter() - began, 1),
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=1) + "\n")
    png = args.plot or args.json_out.with_suffix(".png")
    plot(results, png)
    print(f"\ntotal {report['total_seconds']:.0f} s; wrote {args.json_out} and {png}")


if __name__ == "__main__":
    main()
