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
from dinov2_repro.curation.paths import embeddings_in_ram, read_selected, setup_threads
from dinov2_repro.curation.retrieve import cluster_based, sample_based
cfg = load_curation_config(None, sys.argv[2:])
setup_threads(cfg)
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.time()
rows = np.array(read_selected(cfg, "dedup")["rows"], dtype=np.int64)
x, q, r = embeddings_in_ram(cfg, "pool", rows), embeddings_in_ram(cfg, "query_0"), cfg.retrieve
if r.mode == "sample":
    local, _ = sample_based(x, q, r.k, factory=cfg.dedup.index, nprobe=cfg.dedup.nprobe, seed=cfg.seed)
else:
    local, _ = cluster_based(x, q, num_clusters=r.num_clusters, min_queries=r.min_queries, per_cluster=r.per_cluster,
                             cap=r.cap_per_query_set, seed=cfg.seed, max_points_per_centroid=cfg.cluster.max_points_per_centroid)
np.save(sys.argv[1], np.sort(rows[local]))
print(round(time.time() - start, 2), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), round(imported, 1))
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


def prepare(run: Path, embeddings: dict[str, Path], keys: list[str]) -> Path:
    """A run folder whose pool and query embeddings point at the shared synthetic shards; every
    pool row selected. Returns the frozen config the tasks read."""
    from dinov2_repro.curation.config import load_curation_config
    from dinov2_repro.curation.fingerprint import record_stage
    from dinov2_repro.curation.io import atomic_write_json, read_json
    from dinov2_repro.curation.paths import write_selected
    from dinov2_repro.curation.runner import frozen_config

    for name, folder in embeddings.items():
        index = read_json(folder / "index.json")
        index["shards"] = [{**s, "file": str(folder / s["file"])} for s in index["shards"]]
        atomic_write_json(run / "embeddings" / name / "index.json", index)
    rows = np.arange(read_json(embeddings["pool"] / "index.json")["num_rows"])
    write_selected(run / "dedup" / "selected.json", "dedup", rows, {int(r): "kept" for r in rows}, {})
    cfg = load_curation_config(None, [f"output_dir={run}", *keys])
    record_stage(cfg, "embed", [])
    record_stage(cfg, "dedup", ["embed"])
    return frozen_config(cfg)


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

    from dinov2_repro.curation.config import load_curation_config
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
            prepare(reference, embeddings, keys)
            out = subprocess.run([sys.executable, "-c", IN_RAM, str(tmp / f"{mode}_rows.npy"), f"output_dir={reference}", *keys],
                                 check=True, env=env, capture_output=True, text=True).stdout.split()
            entry["in_ram_one_task"] = {"seconds": float(out[0]), "peak_rss_mb": float(out[1]), "imports_only_rss_mb": float(out[2])}
            print(mode, json.dumps(entry["in_ram_one_task"]), flush=True)
            first = None
            for n in args.shards:
                run = tmp / f"{mode}_n{n}"
                config = prepare(run, embeddings, keys)
                cfg = load_curation_config(None, [f"output_dir={run}", *keys])
                start = time.time()
                for phase in RETRIEVE.phase_list(cfg):
                    for shard in range(n if phase.sharded else 1):
                        subprocess.run([sys.executable, "-m", "dinov2_repro.curation.runner", str(config), "retrieve",
                                        phase.name, str(n)], check=True, env={**env, "RANK": str(shard), "WORLD_SIZE": str(n)},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wall = time.time() - start
                (work,) = (run / "retrieve" / "work").iterdir()
                tasks = {p.stem: json.loads(p.read_text()) for p in sorted((work / "done").iterdir())}
                selected = (run / "retrieve" / "selected.json").read_bytes()
                first = first or selected
                rows = json.loads(selected)["rows"]
                entry["runs"][str(n)] = {
                    "wall_seconds_tasks_one_after_another": round(wall, 1),
                    "task_seconds_sum": round(sum(t["seconds"] for t in tasks.values()), 2),
                    "max_task_peak_rss_mb": max(t["peak_rss_mb"] for t in tasks.values()),
                    "tasks": {name: {"seconds": t["seconds"], "peak_rss_mb": t["peak_rss_mb"]} for name, t in tasks.items()},
                    "retrieved": len(rows),
                    "selected_identical_to_first": selected == first,
                    "rows_equal_in_ram": rows == np.load(tmp / f"{mode}_rows.npy").tolist()}
                print(mode, n, json.dumps({k: v for k, v in entry["runs"][str(n)].items() if k != "tasks"}), flush=True)
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
