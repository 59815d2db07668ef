"""Curation benchmarks -> benchmarks/results/curation_cpu.json (parts are merged into the file).

--part dedup: N synthetic 384-d L2-normalised embeddings (clusters plus planted duplicate groups),
  self-dedup as the curate stage does it (FAISS kNN k=64 with the index chosen by pool size,
  exact re-scoring, threshold, union-find components). Reports wall times and the recall of the
  planted pairs, plus kNN recall@64 against exact brute-force search on sampled queries.
  On a GPU (torch.cuda) the same runs as torch matmul top-k (exact) unless faiss-gpu is present.
--part quality: the real-image near-duplicate experiment (benchmarks/curation_quality.py).
--quick: a small, fast smoke run (used by the tests), written to --output.

    python benchmarks/curation.py --part dedup            # 1M vectors, ~10 min on 2 cores
    python benchmarks/curation.py --part quality
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dinov2_repro.curation.dedup import components, knn_edges, pick_representatives  # noqa: E402
from dinov2_repro.curation.io import atomic_write_json  # noqa: E402
from dinov2_repro.curation.knn import brute_force_knn, build_index, choose_index, has_faiss_gpu, normalize, rescore, search  # noqa: E402

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "curation_cpu.json"


def synthetic_pool(n: int, dim: int, *, clusters: int, dup_sources: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered embeddings (unrelated members of a cluster: cosine ~0.3) where ``dup_sources``
    images get 1-3 near-copies (cosine ~0.75-0.97 to their source). Returns (x, planted pairs)."""
    rng = np.random.default_rng(seed)
    centers = normalize(rng.standard_normal((clusters, dim), dtype=np.float32))
    x = np.empty((n, dim), np.float32)
    copies_per = rng.integers(1, 4, size=dup_sources)
    num_copies = int(copies_per.sum())
    num_base = n - num_copies
    assign = rng.integers(0, clusters, size=num_base)
    block = 100_000
    for s in range(0, num_base, block):
        e = min(s + block, num_base)
        noise = rng.standard_normal((e - s, dim), dtype=np.float32) / np.sqrt(dim)
        x[s:e] = normalize(0.55 * centers[assign[s:e]] + 0.83 * noise)
    sources = rng.choice(num_base, dup_sources, replace=False)
    src_of_copy = np.repeat(sources, copies_per)
    # Noise scale per copy: cosine to the source spreads over ~0.75-0.97.
    scale = rng.uniform(0.25, 0.85, size=(num_copies, 1)).astype(np.float32)
    for s in range(0, num_copies, block):
        e = min(s + block, num_copies)
        noise = rng.standard_normal((e - s, dim), dtype=np.float32) / np.sqrt(dim)
        x[num_base + s : num_base + e] = normalize(x[src_of_copy[s:e]] + scale[s:e] * noise)
    copy_ids = np.arange(num_base, n)
    pairs = [np.stack([src_of_copy, copy_ids], 1)]
    # Copies of one source are duplicates of each other too.
    order = np.argsort(src_of_copy, kind="stable")
    s_sorted, c_sorted = src_of_copy[order], copy_ids[order]
    for offset in (1, 2):
        same = s_sorted[offset:] == s_sorted[:-offset]
        pairs.append(np.stack([c_sorted[:-offset][same], c_sorted[offset:][same]], 1))
    pairs = np.concatenate(pairs)
    return x, np.sort(pairs, axis=1)


def planted_recall(pairs: np.ndarray, x: np.ndarray, src: np.ndarray, dst: np.ndarray, threshold: float) -> dict:
    """Recall of the planted pairs whose exact cosine is above the threshold (the ones exact
    kNN + threshold would find), and of all planted pairs."""
    exact = np.einsum("ij,ij->i", x[pairs[:, 0]], x[pairs[:, 1]])
    found_keys = set((src.astype(np.int64) * len(x) + dst).tolist())
    found = np.array([int(a) * len(x) + int(b) in found_keys for a, b in pairs])
    above = exact > threshold
    return {"planted_pairs": int(len(pairs)), "planted_above_threshold": int(above.sum()),
            "recall_vs_exact": float(found[above].mean()) if above.any() else 1.0,
            "recall_all_planted": float(found.mean())}


def knn_recall(x: np.ndarray, ids: np.ndarray, k: int, *, queries: int, seed: int, device: str = "cpu") -> float:
    """Mean overlap of the top-k (self excluded) with exact brute-force top-k on sampled queries."""
    rng = np.random.default_rng(seed)
    q = rng.choice(len(x), min(queries, len(x)), replace=False)
    _, exact = brute_force_knn(x[q], x, k + 1, device=device)
    hits = [len(set(exact[i].tolist()) & set(ids[qi].tolist())) / (k + 1) for i, qi in enumerate(q)]
    return float(np.mean(hits))


def run_dedup(n: int, *, dim: int = 384, k: int = 64, threshold: float = 0.6, nprobe: int = 8, seed: int = 0,
              device: str = "cpu", index_factory: str = "auto") -> dict:
    import faiss
    import torch

    threads = int(os.environ.get("BENCH_THREADS", "2"))
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    t0 = time.time()
    x, pairs = synthetic_pool(n, dim, clusters=max(n // 1000, 10), dup_sources=max(n // 50, 10), seed=seed)
    gen_s = time.time() - t0
    times = {}
    t = time.time()
    if device == "cuda" and not has_faiss_gpu():
        factory = "torch-matmul-topk (exact)"
        scores, ids = brute_force_knn(x, x, k + 1, device="cuda", batch=8192)
        times["knn_s"] = time.time() - t
    else:
        factory = choose_index(n, gpu=device == "cuda") if index_factory == "auto" else index_factory
        index = build_index(x, factory=factory, nprobe=nprobe, seed=seed, use_gpu=device == "cuda")
        times["index_build_s"] = time.time() - t
        t = time.time()
        _, ids = search(index, x, k + 1)
        times["search_s"] = time.time() - t
        t = time.time()
        scores = rescore(x, x, ids)
        times["rescore_s"] = time.time() - t
    t = time.time()
    src, dst, sims = knn_edges(scores, ids, threshold)
    labels = components(n, src, dst)
    keep = pick_representatives(labels, np.zeros(n))
    times["components_s"] = time.time() - t
    total = sum(times.values())
    recall = planted_recall(pairs, x, src, dst, threshold)
    t = time.time()
    recall["knn_recall_at_64_vs_exact"] = knn_recall(x, ids, k, queries=1000 if n >= 100_000 else 200, seed=seed,
                                                     device=device)
    return {"n": n, "dim": dim, "k": k, "threshold": threshold, "index": factory, "nprobe": nprobe, "device": device,
            "threads": threads, "data_gen_s": round(gen_s, 1), **{kk: round(v, 2) for kk, v in times.items()},
            "dedup_wall_s": round(total, 1), "edges": int(len(src)), "removed": int(n - keep.sum()),
            **recall, "exact_check_s": round(time.time() - t, 1),
            "goal": {"wall_s_max": 600, "recall_min": 0.95},
            "meets_goal": bool(total < 600 and recall["recall_vs_exact"] >= 0.95)}


def run_quality_part(quick: bool, workdir: Path, splits: list[str], per_kind: int | None = None,
                     max_tiles_per_scene: int | None = None, methods: tuple[str, ...] = ()) -> dict:
    """The near-duplicate quality experiment (benchmarks/curation_quality.py) per split."""
    from curation_quality import run_split

    steps = int(os.environ.get("QUALITY_STEPS", "40" if quick else "300"))
    sizes = dict(per_kind=3, max_tiles_per_scene=8) if quick else dict(per_kind=15, max_tiles_per_scene=60)
    sizes.update({k: v for k, v in (("per_kind", per_kind), ("max_tiles_per_scene", max_tiles_per_scene)) if v})
    # One thread on a shared machine: a second OpenMP thread spin-waits when the cores are busy.
    threads = os.environ.get("BENCH_THREADS", "2")
    return {split: run_split(workdir, split, steps=steps, overrides=(f"num_threads={threads}",), methods=methods, **sizes)
            for split in splits}


def verification_cost(tiles_used: int = 24, partners: int = 8, seed: int = 0) -> dict:
    """Milliseconds per aligned pair of the pixel verification (64 px tiles, one thread) with each
    image in ``partners`` pairs, as in the pipeline (an image's prepared stacks are reused)."""
    from curation_quality import TILE, load_scene
    from dinov2_repro.curation.images import to_unit
    from dinov2_repro.curation.verify import VerifyParams, verify_pairs

    scene = load_scene("grass")
    rng = np.random.default_rng(seed)
    spots = rng.integers(0, scene.shape[1] - TILE, size=(tiles_used, 2))
    tiles = [to_unit(scene[:, y : y + TILE, x : x + TILE]) for y, x in spots]
    src = np.repeat(np.arange(tiles_used), partners // 2)
    dst = (src + np.tile(np.arange(1, partners // 2 + 1), tiles_used)) % tiles_used  # each tile in `partners` pairs
    start, cpu_start = time.time(), time.process_time()
    verify_pairs(src, dst, lambda i: tiles[i], VerifyParams())
    ms, cpu_ms = 1000 * (time.time() - start) / len(src), 1000 * (time.process_time() - cpu_start) / len(src)
    # CPU ms is what the pairs cost; wall ms also counts waiting for a shared machine's cores.
    return {"ms_per_pair": round(cpu_ms, 1), "wall_ms_per_pair": round(ms, 1), "pairs_timed": int(len(src)),
            "pairs_per_image": partners, "threads": 1, "work_size": VerifyParams().work_size,
            "load_average": os.getloadavg()[0]}


def verification_throughput(*, tiles_per_scene: int = 12, partners: int = 16, rounds: int = 3, seed: int = 0,
                            coarse_candidates: int | None = None) -> dict:
    """Pixel verification, exact search vs coarse-to-fine, on the SAME pairs in the same run: CPU ms
    per aligned pair (one thread), pairs/s per core, and how far the results agree.

    Tiles of four shipped scenes, a planted copy (one of eight kinds, curation_quality.py) of every
    third tile; pairs: every tile with ``partners`` random tiles of its own scene (look-alike
    non-copies), every copy with its source and with ``partners // 2`` tiles of the scene. Each
    method runs ``rounds`` times alternately, each time with empty caches; the median counts (a
    shared machine's load changes during the run). Decisions: normalised scores (background.py,
    background from the same pairs) above a threshold, compared at several thresholds."""
    from curation_quality import TILE, load_scene, make_copy, _shifted
    from dinov2_repro.curation.background import score_pairs
    from dinov2_repro.curation.images import to_unit
    from dinov2_repro.curation.verify import VerifyParams, verify_pairs

    rng = np.random.default_rng(seed)
    images, scene_of, copies = [], [], []  # copies: (source, copy index, kind)
    kinds = ("colour", "rot90", "hflip", "noise", "crop75", "half_res", "crop60", "shift25")
    for s_i, name in enumerate(("grass", "brick", "rmnp", "coins")):
        scene = load_scene(name)
        _, h, w = scene.shape
        spots = []
        while len(spots) < tiles_per_scene:
            y, x = int(rng.integers(0, h - TILE + 1)), int(rng.integers(0, w - TILE + 1))
            if np.isfinite(scene[:, y : y + TILE, x : x + TILE]).all():
                spots.append((y, x))
        for t, (y, x) in enumerate(spots):
            images.append(to_unit(scene[:, y : y + TILE, x : x + TILE]))
            scene_of.append(s_i)
            if t % 3 == 0:
                kind = kinds[len(copies) % len(kinds)]
                if kind == "shift25":
                    where = _shifted(scene, y, x, 0.25, rng)
                    if where is None:
                        continue
                    copy = to_unit(scene[:, where[0] : where[0] + TILE, where[1] : where[1] + TILE])
                else:
                    copy = make_copy(kind, images[-1], rng)[0]
                copies.append((len(images) - 1, len(images), kind))
                images.append(copy.astype(np.float32))
                scene_of.append(s_i)
    scene_of = np.array(scene_of)
    pairs = set()
    for i in range(len(images)):
        same = np.flatnonzero(scene_of == scene_of[i])
        is_copy = any(c == i for _, c, _ in copies)
        for j in rng.choice(same[same != i], min(partners // 2 if is_copy else partners, len(same) - 1), replace=False):
            pairs.add((min(i, int(j)), max(i, int(j))))
    planted = {(min(a, c), max(a, c)): kind for a, c, kind in copies}
    pairs |= set(planted)
    pairs = np.array(sorted(pairs), dtype=np.int64)
    src, dst = pairs[:, 0], pairs[:, 1]
    is_planted = np.array([(int(a), int(b)) in planted for a, b in pairs])
    # A tile and the copy of another tile of the same scene may overlap: only planted pairs count as copies,
    # pairs of two different planted groups as non-copies; others (a copy vs. its source's neighbours) are
    # left out of the precision count.
    params = {"exact": VerifyParams(method="exact"),
              "coarse_to_fine": VerifyParams(**({"coarse_candidates": coarse_candidates} if coarse_candidates else {}))}
    cpu_ms = {m: [] for m in params}
    results = {}
    for _ in range(rounds):
        for method, p in params.items():
            start = time.process_time()
            _, alignments = verify_pairs(src, dst, lambda i: images[i], p)
            cpu_ms[method].append(1000 * (time.process_time() - start) / len(src))
            results[method] = alignments
    exact, fast = results["exact"], results["coarse_to_fine"]
    same = np.array([(a.dihedral, a.scale, a.crop_is, a.shift) == (b.dihedral, b.scale, b.crop_is, b.shift)
                     and abs(a.peak - b.peak) < 1e-4 for a, b in zip(exact, fast)])
    deficit = np.array([a.peak - b.peak for a, b in zip(exact, fast)])
    scores = {m: score_pairs(src, dst, results[m], rank=2, weight=0.5) for m in params}
    decisions = {}
    for threshold in (0.45, 0.5, 0.55, 0.6):
        d = {m: scores[m] > threshold for m in params}
        decisions[f"{threshold:.2f}"] = {
            "flips": int((d["exact"] != d["coarse_to_fine"]).sum()),
            **{f"{m}_planted_recall": round(float(d[m][is_planted].mean()), 4) for m in params},
            **{f"{m}_false_positives": int(d[m][~is_planted].sum()) for m in params}}
    ms = {m: float(np.median(v)) for m, v in cpu_ms.items()}
    return {"pairs": int(len(src)), "images": len(images), "planted_pairs": int(is_planted.sum()),
            "pairs_per_image": round(2 * len(src) / len(images), 1), "threads": 1, "rounds": rounds,
            "work_size": VerifyParams().work_size, "coarse_candidates": params["coarse_to_fine"].coarse_candidates,
            "cpu_ms_per_pair": {m: round(v, 2) for m, v in ms.items()},
            "cpu_ms_per_pair_each_round": {m: [round(x, 2) for x in v] for m, v in cpu_ms.items()},
            "pairs_per_s_per_core": {m: round(1000 / v, 1) for m, v in ms.items()},
            "speedup": round(ms["exact"] / ms["coarse_to_fine"], 2),
            "same_alignment_fraction": round(float(same.mean()), 4),
            "same_alignment_fraction_planted": round(float(same[is_planted].mean()), 4),
            "peak_deficit_quantiles_50_90_99_max": [round(float(q), 4) for q in np.quantile(deficit, [0.5, 0.9, 0.99, 1.0])],
            "decisions_by_threshold": decisions, "load_average": os.getloadavg()}


def project_1m(ms_per_pair: float, result: dict) -> dict:
    """Projected verification time for a 1M pool, two ways: (1) the 1M kNN benchmark's pairs above
    its cosine threshold (synthetic embeddings: a lower bound), (2) the pairs the pipeline aligned per
    pool image (candidates + background neighbours) on the quality pools, scaled to 1M images."""
    out = {}
    candidates = result.get("dedup_cpu", {}).get("edges")
    if candidates:
        out.update(candidates_1m=candidates, projected_1m_s_one_core=round(ms_per_pair * candidates / 1000, 1))
    per_image = [m["timing"]["aligned_pairs"] / m["pool"] for m in result.get("quality", {}).values()
                 if isinstance(m, dict) and "aligned_pairs" in m.get("timing", {})]
    if per_image:
        pairs = int(round(max(per_image) * 1_000_000))
        out.update(aligned_pairs_per_image=round(max(per_image), 2), aligned_pairs_1m_at_that_rate=pairs,
                   projected_1m_core_hours_at_that_rate=round(ms_per_pair * pairs / 3.6e6, 1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["dedup", "quality", "verify-cost", "verify-speed", "all"], default="dedup")
    parser.add_argument("--quick", action="store_true", help="small smoke run (tests)")
    parser.add_argument("--nprobe", type=int, default=8, help="IVF lists scanned per query (the curate stage's dedup.nprobe)")
    parser.add_argument("--n", type=int, default=None, help="pool size (default 1M, 20k with --quick)")
    parser.add_argument("--index", default="auto", help="FAISS index factory of the dedup part (auto: the curate "
                        "stage's choice for the pool size; e.g. IVF64,Flat forces an approximate index on a small pool)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--workdir", type=Path, default=Path("output/bench_curation"))
    parser.add_argument("--splits", nargs="+", choices=["tune", "heldout", "fresh"], default=["tune", "heldout"],
                        help="quality pools: tune = scenes used while choosing defaults, heldout = measured (three times; "
                             "one drove a design change), fresh = new scenes plus copy types calibration never makes")
    parser.add_argument("--per-kind", type=int, default=None, help="planted copies per kind (default 15, 3 with --quick)")
    parser.add_argument("--max-tiles-per-scene", type=int, default=None, help="tiles per scene (default 60, 8 with --quick)")
    parser.add_argument("--coarse-candidates", type=int, default=None, help="verify-speed: dedup.verify.coarse_candidates "
                        "of the coarse-to-fine run (default: the config default)")
    parser.add_argument("--partners", type=int, default=None, help="verify-speed: random partners per tile of its scene "
                        "(default 16, ~15 pairs per image), with --tiles-per-scene (default 12); a run with either is stored "
                        "as verification_speed_partners<N> (e.g. 24 and 24: ~22 pairs per image, as in the demo's dedup run, "
                        "where each image's preparation is shared by more pairs)")
    parser.add_argument("--tiles-per-scene", type=int, default=None, help="verify-speed: tiles per scene (see --partners)")
    parser.add_argument("--methods", nargs="+", choices=["exact", "coarse_to_fine"], default=None,
                        help="quality: run the dedup stage once per dedup.verify.method on the same embeddings")
    args = parser.parse_args(argv)
    result = json.loads(args.output.read_text()) if args.output.is_file() else {}
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if args.part in ("dedup", "all"):
        n = args.n or (20_000 if args.quick else 1_000_000)
        result["dedup_cpu"] = run_dedup(n, nprobe=args.nprobe, index_factory=args.index)
        print(json.dumps(result["dedup_cpu"], indent=1))
        import torch

        if torch.cuda.is_available():
            result["dedup_gpu"] = run_dedup(n, device="cuda")
            print(json.dumps(result["dedup_gpu"], indent=1))
    if args.part in ("verify-cost", "all"):
        cost = verification_cost()
        cost.update(project_1m(cost["ms_per_pair"], result))
        result["verification_cost"] = cost
        print(json.dumps(cost))
    if args.part in ("verify-speed", "all"):
        sizes = {k: v for k, v in (("partners", args.partners), ("tiles_per_scene", args.tiles_per_scene)) if v}
        key = "verification_speed" if not sizes else f"verification_speed_partners{args.partners or 16}"
        result[key] = verification_throughput(coarse_candidates=args.coarse_candidates, **sizes)
        result[key]["command"] = "BENCH_THREADS=1 python benchmarks/curation.py " + " ".join(argv if argv is not None else sys.argv[1:])
        print(json.dumps(result[key], indent=1))
    if args.part == "quality" and args.methods:  # verification methods side by side on the same embedded pools
        q = run_quality_part(args.quick, args.workdir, args.splits, args.per_kind, args.max_tiles_per_scene, tuple(args.methods))
        keys = ("pool", "candidates", "verified_edges", "pair_precision", "pair_recall_required_kinds", "false_removal_rate", "timing")
        result["quality_by_verify_method"] = {
            "command": "python benchmarks/curation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "splits": q, "summary": {split: {m: {k: r[k] for k in keys} for m, r in by.items()} for split, by in q.items()}}
        print(json.dumps(result["quality_by_verify_method"]["summary"], indent=1))
    elif args.part in ("quality", "all"):
        q = run_quality_part(args.quick, args.workdir, args.splits, args.per_kind, args.max_tiles_per_scene)
        if "results" in result.get("quality", {}):
            result["quality"] = {}  # the pre-verification experiment's numbers are superseded
        result.setdefault("quality", {}).update(q)
        for split, m in q.items():
            print(split, json.dumps({k: m[k] for k in ("pool", "candidates", "verified_edges", "pair_precision",
                                                        "pair_precision_required_kinds", "pair_recall_required_kinds",
                                                        "false_removal_rate", "timing")}))
            print(json.dumps(m["per_kind"]))
    result["quick"] = args.quick
    atomic_write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
