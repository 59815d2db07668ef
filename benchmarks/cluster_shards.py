"""Memory of the sharded cluster stage: the one-task in-RAM hierarchical k-means vs the cluster
stage's phases with N shards, on synthetic embeddings.

    python benchmarks/cluster_shards.py --rows 300000 --shards 1 2 4

Synthetic 384-d embeddings (benchmarks/curation_scale.py ``synthetic``) in the shard format; every
row is selected (a dedup selection written directly: no kNN is run). The in-RAM reference
(hkmeans.hierarchical_kmeans on the whole matrix, what the stage ran as one task before it was
sharded) and every task of the sharded stage run as their own processes, one after another, so
each peak RSS is that task's alone (a process that only imports the libraries is measured too).
Reported: per task seconds and peak RSS (from the completion markers), whether hierarchy.npz is
byte-identical to N = 1's and whether its labels equal the in-RAM reference's.
Writes benchmarks/results/cluster_shards_cpu.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

IN_RAM = """
import resource, sys, time, numpy as np
from dinov2_repro.curation.config import load_curation_config
from dinov2_repro.curation.hkmeans import hierarchical_kmeans
from dinov2_repro.curation.paths import embeddings_in_ram, setup_threads
cfg = load_curation_config(None, sys.argv[2:])
setup_threads(cfg)
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.time()
c = cfg.cluster
h = hierarchical_kmeans(embeddings_in_ram(cfg, "pool"), list(c.levels), resampling_steps=c.resampling_steps,
                        resample_points=c.resample_points, niter=c.kmeans_iters, seed=cfg.seed,
                        max_points_per_centroid=c.max_points_per_centroid)
np.save(sys.argv[1], h.labels[0])
print(round(time.time() - start, 2), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), round(imported, 1))
"""


def prepare(run: Path, embeddings: Path, keys: list[str]) -> Path:
    """A run folder whose pool embeddings point at the shared synthetic shards; every row selected."""
    from dinov2_repro.curation.config import load_curation_config
    from dinov2_repro.curation.fingerprint import record_stage
    from dinov2_repro.curation.io import atomic_write_json, read_json
    from dinov2_repro.curation.paths import write_selected
    from dinov2_repro.curation.runner import frozen_config

    index = read_json(embeddings / "index.json")
    index["shards"] = [{**s, "file": str(embeddings / s["file"])} for s in index["shards"]]
    atomic_write_json(run / "embeddings" / "pool" / "index.json", index)
    rows = np.arange(index["num_rows"])
    write_selected(run / "dedup" / "selected.json", "dedup", rows, {int(r): "kept" for r in rows}, {})
    cfg = load_curation_config(None, [f"output_dir={run}", *keys])
    record_stage(cfg, "embed", [])
    record_stage(cfg, "dedup", ["embed"])
    return frozen_config(cfg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shard-size", type=int, default=50_000, help="cluster.shard_size")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cluster_shards_cpu.json"))
    args = parser.parse_args()
    from curation_scale import synthetic

    from dinov2_repro.curation.config import load_curation_config
    from dinov2_repro.curation.stages_cluster import CLUSTER

    keys = ["num_threads=1", "embed.progress=false", f"cluster.shard_size={args.shard_size}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = {"rows": args.rows, "dim": args.dim, "cluster.shard_size": args.shard_size, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        embeddings = synthetic(tmp / "embeddings", args.rows, args.dim)
        reference = tmp / "in_ram"
        prepare(reference, embeddings, keys)
        out = subprocess.run([sys.executable, "-c", IN_RAM, str(tmp / "labels.npy"), f"output_dir={reference}", *keys],
                             check=True, env=env, capture_output=True, text=True).stdout.split()
        result["in_ram_one_task"] = {"seconds": float(out[0]), "peak_rss_mb": float(out[1]), "imports_only_rss_mb": float(out[2])}
        print(json.dumps(result["in_ram_one_task"]), flush=True)
        first = None
        for n in args.shards:
            run = tmp / f"n{n}"
            config = prepare(run, embeddings, keys)
            cfg = load_curation_config(None, [f"output_dir={run}", *keys])
            start = time.time()
            for phase in CLUSTER.phase_list(cfg):
                for shard in range(n if phase.sharded else 1):
                    subprocess.run([sys.executable, "-m", "dinov2_repro.curation.runner", str(config), "cluster", phase.name, str(n)],
                                   check=True, env={**env, "RANK": str(shard), "WORLD_SIZE": str(n)},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.time() - start
            (work,) = (run / "cluster" / "work").iterdir()
            tasks = {p.stem: json.loads(p.read_text()) for p in sorted((work / "done").iterdir())}
            hierarchy = (run / "cluster" / "hierarchy.npz").read_bytes()
            first = first or hierarchy
            labels = np.load(run / "cluster" / "hierarchy.npz")["labels_0"]
            result["runs"][str(n)] = {
                "wall_seconds_tasks_one_after_another": round(wall, 1),
                "task_seconds_sum": round(sum(t["seconds"] for t in tasks.values()), 2),
                "max_task_peak_rss_mb": max(t["peak_rss_mb"] for t in tasks.values()),
                "tasks": {name: {"seconds": t["seconds"], "peak_rss_mb": t["peak_rss_mb"]} for name, t in tasks.items()},
                "hierarchy_identical_to_first": hierarchy == first,
                "labels_equal_in_ram": bool(np.array_equal(labels, np.load(tmp / "labels.npy")))}
            print(n, json.dumps({k: v for k, v in result["runs"][str(n)].items() if k != "tasks"}), flush=True)
    import torch
    from backbone import machine_description

    result["machine"] = {**machine_description(torch.device("cpu")), "numpy": np.__version__,
                         "note": "shared machine: 2 cores used by several engineers at once; times are under load"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
