"""Memory of the sharded retrieve stage: the one-task in-RAM retrieval vs the retrieve stage's
phases with N shards, on synthetic embeddings, in sample and cluster mode.

    python benchmarks/retrieve_shards.py --rows 300000 --queries 2000 --shards 1 2 4

Synthetic 384-d pool embeddings (benchmarks/curation_scale.py ``synthetic``) in the shard format,
every row selected (a dedup selection written directly); one query set of pool rows plus noise.
The in-RAM reference (retrieve.py on the whole selection, what the stage ran as one task before
it was sharded) and every task of the sharded stage run as their own processes, one after
another, so each peak RSS is that task's alone. Reported per mode: per task seconds and peak RSS
(from the completion markers), whether retrieve/selected.json is byte-identical to N = 1's and
whether its rows equal the in-RAM reference's. Writes benchmarks/results/retrieve_shards_cpu.json
(or --out).
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
from dinov2_repro.curation.paths import embeddings_in_ram, read_selected
from dinov2_repro.curation.retrieve import cluster_based, sample_based
"""
IN_RAM = """
rows = np.array(read_selected(cfg, "dedup")["rows"], dtype=np.int64)
x, q, r = embeddings_in_ram(cfg, "pool", rows), embeddings_in_ram(cfg, "query_0"), cfg.retrieve
if r.mode == "sample":
    local, _ = sample_based(x, q, r.k, factory=cfg.dedup.index, nprobe=cfg.dedup.nprobe, seed=cfg.seed)
else:
    local, _ = cluster_based(x, q, num_clusters=r.num_clusters, min_queries=r.min_queries, per_cluster=r.per_cluster,
                             cap=r.cap_per_query_set, seed=cfg.seed, max_points_per_centroid=cfg.cluster.max_points_per_centroid)
result = np.sort(rows[local])
"""


def query_set(pool: Path, folder: Path, num_queries: int, seed: int = 1) -> Path:
    """Queries near the pool: the first rows of its first shard plus noise, in the shard format."""
    from dinov2_repro.curation.io import read_json

    index = read_json(pool / "index.json")
    base = np.load(pool / index["shards"][0]["file"])[:num_queries].astype(np.float32)
    noisy = base + 0.3 * np.random.default_rng(seed).standard_normal(base.shape).astype(np.float32)
    folder.mkdir(parents=True)
    np.save(folder / "part_00000.npy", noisy.astype(np.float16))
    (folder / "index.json").write_text(json.dumps({"num_rows": len(noisy), "dim": int(noisy.shape[1]), "dtype": "float16",
                                                   "shards": [{"file": "part_00000.npy", "start": 0, "stop": len(noisy)}]}))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shard-size", type=int, default=50_000, help="retrieve.shard_size")
    parser.add_argument("--modes", nargs="+", default=["sample", "cluster"])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "retrieve_shards_cpu.json"))
    args = parser.parse_args()
    from curation_scale import synthetic
    from sharded_stage import prepare_run, run_in_ram, run_stage_tasks, write_result

    from dinov2_repro.curation.stages_retrieve import RETRIEVE

    mode_keys = {"sample": ["retrieve.mode=sample", "retrieve.k=4"],
                 "cluster": ["retrieve.mode=cluster", "retrieve.num_clusters=100", "retrieve.min_queries=3",
                             "retrieve.per_cluster=1000", "retrieve.cap_per_query_set=50000"]}
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = {"rows": args.rows, "dim": args.dim, "queries": args.queries, "retrieve.shard_size": args.shard_size, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pool = synthetic(tmp / "embeddings", args.rows, args.dim)
        embeddings = {"pool": pool, "query_0": query_set(pool, tmp / "queries", args.queries)}
        (tmp / "queries.jsonl").write_text("")  # a query manifest path for the config (its embeddings are given)
        for mode in args.modes:
            keys = ["num_threads=1", "embed.progress=false", f"retrieve.shard_size={args.shard_size}",
                    f"retrieve.query_manifests=[{tmp / 'queries.jsonl'}]", *mode_keys[mode]]
            entry = result["modes"][mode] = {"keys": mode_keys[mode], "runs": {}}
            reference = tmp / f"{mode}_in_ram"
            prepare_run(reference, embeddings, keys)
            entry["in_ram_one_task"] = run_in_ram(IN_RAM_IMPORTS, IN_RAM, tmp / f"{mode}_rows.npy", reference, keys, env)
            print(mode, json.dumps(entry["in_ram_one_task"]), flush=True)
            first = None
            for n in args.shards:
                run = tmp / f"{mode}_n{n}"
                config = prepare_run(run, embeddings, keys)
                measured = run_stage_tasks(RETRIEVE, config, run, keys, n, env)
                selected = (run / "retrieve" / "selected.json").read_bytes()
                first = first or selected
                rows = json.loads(selected)["rows"]
                measured.update({"retrieved": len(rows), "selected_identical_to_first": selected == first,
                                 "rows_equal_in_ram": rows == np.load(tmp / f"{mode}_rows.npy").tolist()})
                entry["runs"][str(n)] = measured
                print(mode, n, json.dumps({k: v for k, v in measured.items() if k != "tasks"}), flush=True)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
