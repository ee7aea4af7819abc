"""Scoring speed: LM end to end vs the bare surrogate forward passes, and FM k-means + assignment vs faiss alone.

LM. A generated target (.beton, JPEG) is scored with ``dptool.scoring.score_files`` (load the checkpoint, open
and fingerprint both files, check the output width, FFCV decoding, forward passes, histograms, write the scores
file). The baseline is the same surrogate's forward passes alone over the same images, already decoded and
normalised in memory, same batch size and device. Target: end to end <= 1.2x the bare forward passes.
FFCV's compiled stages come from Numba's disk cache (`dptool._ffcv_cache`) once any loader has run; the baseline's
own decoding fills it, so the end-to-end runs load them. ``DPTOOL_FFCV_PATCHES=0`` measures without it.

FM. Gaussian-blob features: ``dptool.scoring.kmeans`` (k-means++ seeds + faiss Lloyd iterations, one per call)
followed by assigning every sample with ``dptool.kernels.nearest_centroid``, vs ``faiss.Kmeans.train`` +
``IndexFlatL2.search(k=1)`` with the same iterations. Also reported: dptool with faiss' random seeding (the
per-iteration loop's own overhead), the k-means objective of each, and how many assignments differ from faiss
search on the same centroids.

FM reuse. ``dptool.scoring.score_files`` with ``--method fm`` on a generated JPEG source (``--reuse-per-class``
images per class) and the LM target, from scratch (source features, k-means, every source image assigned, target
votes) against ``centroids_from`` the first run's scores file (only the target is read); both must give the same
scores.

Runs are interleaved (each repeat runs every contender once, back to back). On a shared machine the load
changes between repeats, so the ratio reported is the median of the per-repeat ratios (each computed from two
runs made seconds apart); the best time of each contender is reported too.

    .venv/bin/python benchmarks/bench_score.py                      # CPU, a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_score.py --device cuda --target-images 20000 --res 224 --batch-size 512
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from _args import parser, require_archs, require_device, require_positive  # benchmarks/_args.py, beside this script


def make_data(folder: Path, classes: int, target_images: int, stored: int) -> tuple[Path, Path]:
    """A source with `classes` classes (4 images each: LM reads only its labels) and a 10-class JPEG target."""
    from dptool.convert import WriterParams, convert
    from dptool.synthetic import separable_images, write_npz

    paths = []
    for name, n_cls, per in (("source", classes, 4), ("target", 10, -(-target_images // 10))):
        images, labels = separable_images(n_cls, per, stored, seed=1)
        npz = write_npz(folder / f"{name}.npz", images, labels, [f"{name}_{c}" for c in range(n_cls)])
        out = folder / f"{name}.beton"
        convert(npz, out, params=WriterParams(max_resolution=stored, write_mode="jpg", jpeg_quality=90))
        paths.append(out)
    return paths[0], paths[1]


def make_checkpoint(folder: Path, arch: str, classes: int) -> Path:
    """A randomly initialised surrogate checkpoint (speed does not depend on the weights)."""
    import torch

    from dptool.checkpoint import save_checkpoint
    from dptool.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, classes)
    return save_checkpoint(folder / "surrogate.pt", arch=arch, num_classes=classes, state_dict=model.state_dict(),
                           recipe={}, data_fingerprint=None, epoch=0)


def bench_lm(args, folder: Path) -> dict:
    """Time `score_files` (LM) and the bare forward passes over the same images, interleaved."""
    import torch

    from dptool._ffcv_cache import compile_cache_enabled
    from dptool.features import InferenceOptions
    from dptool.loaders import inference_loader
    from dptool.scoring import ScoreOptions, score_files
    from dptool.scoring.lm import FIRST_BATCH_STAGE
    from dptool.surrogate import load_surrogate

    source, target = make_data(folder, args.classes, args.target_images, args.stored)
    ckpt = make_checkpoint(folder, args.arch, args.classes)
    opts = ScoreOptions(inference=InferenceOptions(batch_size=args.batch_size, workers=args.workers))
    model = load_surrogate(model=ckpt, device=args.device).model
    t0 = time.perf_counter()
    batches = [x.clone() for x, _ in inference_loader(target, batch_size=args.batch_size, res=args.res,
                                                      workers=args.workers, device=args.device)]
    decode_seconds = time.perf_counter() - t0
    n = sum(len(b) for b in batches)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    amp = args.device.startswith("cuda")

    def bare() -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            for x in batches:
                model(x).argmax(dim=1)
        sync()
        return time.perf_counter() - start

    def end_to_end() -> tuple[float, dict]:
        start = time.perf_counter()
        summary = score_files(folder / "lm.json", method="lm", source=source, target=target,
                              surrogate={"model": ckpt}, options=opts, res=args.res, device=args.device, force=True)
        return time.perf_counter() - start, summary["timings"]

    with torch.inference_mode():  # warm-up: allocator, oneDNN/cuDNN kernel choice
        for x in batches[:2]:
            model(x)
    bares, e2es, stages = [], [], []
    for i in range(args.repeats):  # alternate which runs first, so that neither always follows the other
        if i % 2:
            seconds, timings = end_to_end()
            bares.append(bare())
        else:
            bares.append(bare())
            seconds, timings = end_to_end()
        e2es.append(seconds)
        stages.append(timings)
    best = int(np.argmin(e2es))
    ratios = [e / b for e, b in zip(e2es, bares)]
    # the inference loop after its first batch against the bare passes after theirs: loading the surrogate,
    # checks, loader set-up and writing are left out of both sides
    steady = [(st["target inference"] - st[FIRST_BATCH_STAGE]) / (b * (1 - len(batches[0]) / n))
              for b, st in zip(bares, stages)]
    return {
        "arch": args.arch, "source_classes": args.classes, "target_images": n, "stored_px": args.stored,
        "res": args.res, "batch_size": args.batch_size, "device": args.device, "workers": args.workers,
        "ffcv_compile_cache": compile_cache_enabled(),
        "bare_forward_seconds": min(bares), "end_to_end_seconds": min(e2es),
        "end_to_end_over_bare": float(np.median(ratios)), "target_ratio": 1.2,
        "end_to_end_over_bare_per_repeat": ratios,
        "inference_loop_without_first_batch_over_bare": float(np.median(steady)),
        "end_to_end_stages": stages[best], "decode_to_memory_seconds_first_loader": decode_seconds,
        "bare_images_per_s": n / min(bares), "end_to_end_images_per_s": n / min(e2es),
        "all_bare_seconds": bares, "all_end_to_end_seconds": e2es,
    }


def bench_fm_reuse(args, folder: Path) -> dict:
    """Time FM from scratch against FM reusing the groups of an earlier run (`centroids_from`), interleaved."""
    from dptool.convert import WriterParams, convert
    from dptool.features import InferenceOptions
    from dptool.scores import read_scores
    from dptool.scoring import ScoreOptions, score_files
    from dptool.synthetic import separable_images, write_npz

    _, target = make_data(folder, args.classes, args.target_images, args.stored)
    images, labels = separable_images(args.classes, args.reuse_per_class, args.stored, seed=2)
    source = folder / "fm_source.beton"
    convert(write_npz(folder / "fm_source.npz", images, labels), source,
            params=WriterParams(max_resolution=args.stored, write_mode="jpg", jpeg_quality=90))
    ckpt = make_checkpoint(folder, args.arch, args.classes)
    inference = InferenceOptions(batch_size=args.batch_size, workers=args.workers)
    common = {"method": "fm", "source": source, "target": target, "surrogate": {"model": ckpt}, "res": args.res,
              "device": args.device, "force": True}
    first = folder / "first.json"
    score_files(first, options=ScoreOptions(inference=inference), **common)  # the groups that are reused

    def run(name: str, options) -> tuple[float, dict]:
        start = time.perf_counter()
        summary = score_files(folder / f"{name}.json", options=options, **common)
        return time.perf_counter() - start, summary["timings"]

    runs: dict[str, list] = {"fresh": [], "reused": []}
    contenders = {"fresh": ScoreOptions(inference=inference),
                  "reused": ScoreOptions(inference=inference, centroids_from=str(first))}
    for i in range(args.reuse_repeats):
        for name in (("fresh", "reused") if i % 2 == 0 else ("reused", "fresh")):
            runs[name].append(run(name, contenders[name]))
    fresh, reused = read_scores(folder / "fresh.json"), read_scores(folder / "reused.json")
    same = bool(np.array_equal(fresh.scores, reused.scores) and np.array_equal(fresh.ranks, reused.ranks))
    best = {name: min(r, key=lambda t: t[0]) for name, r in runs.items()}
    return {
        "arch": args.arch, "source_images": len(labels), "source_classes": args.classes,
        "target_images": int(read_scores(first).target["num_samples"]), "res": args.res, "device": args.device,
        "fresh_seconds": best["fresh"][0], "reused_seconds": best["reused"][0],
        "fresh_over_reused": best["fresh"][0] / best["reused"][0],
        "fresh_stages": best["fresh"][1], "reused_stages": best["reused"][1],
        "same_scores_and_ranks": same,
        "all_seconds": {name: [t for t, _ in r] for name, r in runs.items()},
    }


def blobs(n: int, d: int, k: int, seed: int) -> np.ndarray:
    """(n, d) float32 features around k random centres (unit spread, centres ~ N(0, 3^2))."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(k, d)).astype(np.float32)
    return (centres[rng.integers(k, size=n)] + rng.normal(size=(n, d)).astype(np.float32)).astype(np.float32)


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared distance of the rows of `x` to their nearest centroid."""
    from dptool.kernels import nearest_centroid

    return float(np.mean(nearest_centroid(x, centroids)[1]))


def bench_fm(args) -> dict:
    """dptool k-means + nearest-centroid assignment vs faiss.Kmeans + IndexFlatL2.search, interleaved."""
    import faiss

    from dptool.kernels import nearest_centroid
    from dptool.scoring import kmeans

    everything = blobs(args.fm_all, args.fm_dim, args.fm_k, seed=0)  # k-means trains on the first fm_train rows
    train = everything[: args.fm_train]
    out: dict = {}

    def run_dptool(init: str) -> None:
        t0 = time.perf_counter()
        cent = kmeans(train, args.fm_k, niter=args.fm_iters, seed=0, init=init)
        t1 = time.perf_counter()
        assign = nearest_centroid(everything, cent)[0]
        t2 = time.perf_counter()
        out[init] = (t1 - t0, t2 - t1, cent, np.asarray(assign))

    def run_faiss() -> None:
        t0 = time.perf_counter()
        km = faiss.Kmeans(args.fm_dim, args.fm_k, niter=args.fm_iters, seed=0,
                          max_points_per_centroid=-(-args.fm_train // args.fm_k) + 1)
        km.train(train)
        t1 = time.perf_counter()
        _, assign = km.index.search(everything, 1)
        t2 = time.perf_counter()
        out["faiss"] = (t1 - t0, t2 - t1, km.centroids, assign[:, 0])

    contenders = {"k-means++": lambda: run_dptool("k-means++"), "random": lambda: run_dptool("random"),
                  "faiss": run_faiss}
    runs: dict = {name: [] for name in contenders}
    for _ in range(args.fm_repeats):
        for name, fn in contenders.items():
            fn()
            runs[name].append(out[name])
    best = {name: min(r, key=lambda run: run[0] + run[1]) for name, r in runs.items()}
    index = faiss.IndexFlatL2(args.fm_dim)
    index.add(best["k-means++"][2])
    same = int((index.search(everything, 1)[1][:, 0] == best["k-means++"][3]).sum())
    result = {"train_points": args.fm_train, "assigned_points": args.fm_all, "dim": args.fm_dim, "k": args.fm_k,
              "iterations": args.fm_iters, "faiss_threads": faiss.omp_get_max_threads()}
    for name in contenders:
        km_s, assign_s, cent, _ = best[name]
        ratios = [(a[0] + a[1]) / (f[0] + f[1]) for a, f in zip(runs[name], runs["faiss"])]
        result[name] = {"kmeans_seconds": km_s, "assign_seconds": assign_s, "total_seconds": km_s + assign_s,
                        "over_faiss": float(np.median(ratios)), "over_faiss_per_repeat": ratios,
                        "objective": objective(everything, cent)}
    result["assignments_equal_to_faiss_search_on_same_centroids"] = f"{same}/{args.fm_all}"
    return result


def main() -> None:
    """Run the benchmarks, print a table, write JSON."""
    ap = parser(__doc__)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--classes", type=int, default=100, help="source classes = surrogate head width")
    ap.add_argument("--target-images", type=int, default=2000)
    ap.add_argument("--stored", type=int, default=128, help="stored target resolution (JPEG), px")
    ap.add_argument("--res", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fm-train", type=int, default=50_000)
    ap.add_argument("--fm-all", type=int, default=100_000)
    ap.add_argument("--fm-dim", type=int, default=256)
    ap.add_argument("--fm-k", type=int, default=500)
    ap.add_argument("--fm-iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the LM runs")
    ap.add_argument("--fm-repeats", type=int, default=5)
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--skip-fm", action="store_true")
    ap.add_argument("--reuse-per-class", type=int, default=50, help="FM reuse: source images per class")
    ap.add_argument("--reuse-repeats", type=int, default=2, help="interleaved repeats of the FM reuse runs")
    ap.add_argument("--skip-fm-reuse", action="store_true")
    ap.add_argument("--json-out", type=Path, default=Path(__file__).parent / "results" / "score.json")
    args = ap.parse_args()
    require_positive(ap, args, ("classes", "target_images", "stored", "res", "batch_size", "workers", "fm_train",
                                "fm_all", "fm_dim", "fm_k", "fm_iters", "repeats", "fm_repeats",
                                "reuse_per_class", "reuse_repeats"))
    if not args.fm_k <= args.fm_train <= args.fm_all:
        ap.error(f"need --fm-k <= --fm-train <= --fm-all (k-means needs a point per centroid and trains on the first "
                 f"--fm-train points), got {args.fm_k}, {args.fm_train} and {args.fm_all}")
    require_device(ap, args.device)
    require_archs(ap, [args.arch])
    logging.basicConfig(level=logging.WARNING)

    result: dict = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "repeats": args.repeats}
    if not args.skip_lm:
        with tempfile.TemporaryDirectory() as tmp:
            lm = result["lm"] = bench_lm(args, Path(tmp))
        print(f"LM, {lm['target_images']} target images, {lm['arch']} at {lm['res']} px on {lm['device']}:")
        print(f"  bare forward passes   {lm['bare_forward_seconds']:8.2f} s  ({lm['bare_images_per_s']:.0f} img/s)")
        print(f"  dptool score (LM)     {lm['end_to_end_seconds']:8.2f} s  ({lm['end_to_end_images_per_s']:.0f} img/s)")
        print(f"  end to end / bare     {lm['end_to_end_over_bare']:8.2f} x  (median of per-repeat ratios "
              f"{', '.join(f'{r:.2f}' for r in lm['end_to_end_over_bare_per_repeat'])}; target <= 1.2)")
        print(f"  inference loop after its first batch / bare passes after theirs "
              f"{lm['inference_loop_without_first_batch_over_bare']:.2f} x")
        print("  stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in lm["end_to_end_stages"].items()))
    if not args.skip_fm:
        fm = result["fm"] = bench_fm(args)
        print(f"FM, k-means of {fm['train_points']} x {fm['dim']} into {fm['k']} ({fm['iterations']} iterations), "
              f"then {fm['assigned_points']} assigned:")
        print(f"  {'':<22}{'k-means s':>10}{'assign s':>10}{'total s':>10}{'/ faiss':>9}{'objective':>11}"
              "   (best times; '/ faiss' = median of per-repeat ratios)")
        for name in ("k-means++", "random", "faiss"):
            r = fm[name]
            label = {"k-means++": "dptool (k-means++)", "random": "dptool (random init)", "faiss": "faiss alone"}[name]
            print(f"  {label:<22}{r['kmeans_seconds']:>10.2f}{r['assign_seconds']:>10.2f}{r['total_seconds']:>10.2f}"
                  f"{r['over_faiss']:>9.2f}{r['objective']:>11.2f}")
        print(f"  assignments equal to faiss search on the same centroids: "
              f"{fm['assignments_equal_to_faiss_search_on_same_centroids']}")
    if not args.skip_fm_reuse:
        with tempfile.TemporaryDirectory() as tmp:
            fr = result["fm_reuse"] = bench_fm_reuse(args, Path(tmp))
        print(f"FM end to end, {fr['source_images']} source and {fr['target_images']} target images, {fr['arch']} at "
              f"{fr['res']} px on {fr['device']} (best of {args.reuse_repeats}):")
        print(f"  from scratch            {fr['fresh_seconds']:8.2f} s  ("
              + ", ".join(f"{k} {v:.2f} s" for k, v in fr["fresh_stages"].items()) + ")")
        print(f"  --centroids-from        {fr['reused_seconds']:8.2f} s  ("
              + ", ".join(f"{k} {v:.2f} s" for k, v in fr["reused_stages"].items()) + ")")
        print(f"  from scratch / reused   {fr['fresh_over_reused']:8.2f} x; same scores and ranks: "
              f"{fr['same_scores_and_ranks']}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
