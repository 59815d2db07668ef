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
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

IN_RAM_IMPORTS = """
from dinov2_repro.curation.hkmeans import hierarchical_kmeans
from dinov2_repro.curation.paths import embeddings_in_ram
"""
IN_RAM = """
c = cfg.cluster
h = hierarchical_kmeans(embeddings_in_ram(cfg, "pool"), list(c.levels), resampling_steps=c.resampling_steps,
                        resample_points=c.resample_points, niter=c.kmeans_iters, seed=cfg.seed,
                        max_points_per_centroid=c.max_points_per_centroid)
result = h.labels[0]
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shard-size", type=int, default=50_000, help="cluster.shard_size")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cluster_shards_cpu.json"))
    args = parser.parse_args()
    from curation_scale import synthetic
    from sharded_stage import prepare_run, run_in_ram, run_stage_tasks, write_result

    from dinov2_repro.curation.stages_cluster import CLUSTER

    keys = ["num_threads=1", "embed.progress=false", f"cluster.shard_size={args.shard_size}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = {"rows": args.rows, "dim": args.dim, "cluster.shard_size": args.shard_size, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        embeddings = synthetic(tmp / "embeddings", args.rows, args.dim)
        reference = tmp / "in_ram"
        prepare_run(reference, {"pool": embeddings}, keys)
        result["in_ram_one_task"] = run_in_ram(IN_RAM_IMPORTS, IN_RAM, tmp / "labels.npy", reference, keys, env)
        print(json.dumps(result["in_ram_one_task"]), flush=True)
        first = None
        for n in args.shards:
            run = tmp / f"n{n}"
            config = prepare_run(run, {"pool": embeddings}, keys)
            entry = run_stage_tasks(CLUSTER, config, run, keys, n, env)
            hierarchy = (run / "cluster" / "hierarchy.npz").read_bytes()
            first = first or hierarchy
            labels = np.load(run / "cluster" / "hierarchy.npz")["labels_0"]
            entry["hierarchy_identical_to_first"] = hierarchy == first
            entry["labels_equal_in_ram"] = bool(np.array_equal(labels, np.load(tmp / "labels.npy")))
            result["runs"][str(n)] = entry
            print(n, json.dumps({k: v for k, v in entry.items() if k != "tasks"}), flush=True)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
