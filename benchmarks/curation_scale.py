"""Scale of sharded curation: the dedup stage's kNN on synthetic embeddings, N local shards.

    python benchmarks/curation_scale.py --rows 1000000 --shards 1 2 4

Synthetic 384-d embeddings (clusters plus 1% planted near-copies) are written in the shard format
of docs/curation.md and imported with ``curate embed --from-embeddings``; then ``curate dedup
--launcher local --shards N`` (pixel verification off: there are no pixels) runs for each N into
its own folder. Reported per N: wall time of the dedup stage, the peak RSS of every task (from
the tasks' completion markers), and whether ``dedup/knn.npz`` is byte-identical to N = 1's.
Writes benchmarks/results/curation_scale_cpu.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def synthetic(folder: Path, rows: int, dim: int, *, seed: int = 0, shard_rows: int = 100_000) -> Path:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(rows // 1000, 8), dim)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for j, start in enumerate(range(0, rows, shard_rows)):
        stop = min(start + shard_rows, rows)
        x = centers[rng.integers(0, len(centers), stop - start)] + 0.7 * rng.standard_normal((stop - start, dim)).astype(np.float32)
        copies = rng.random(stop - start) < 0.01  # planted near-copies of the previous row
        x[1:][copies[1:]] = x[:-1][copies[1:]] + 0.01 * rng.standard_normal((int(copies[1:].sum()), dim)).astype(np.float32)
        np.save(folder / f"part_{j:05d}.npy", x.astype(np.float16))
        shards.append({"file": f"part_{j:05d}.npy", "start": start, "stop": stop})
    (folder / "index.json").write_text(json.dumps({"num_rows": rows, "dim": dim, "dtype": "float16", "shards": shards}))
    with open(folder / "manifest.jsonl", "w") as f:
        for i in range(rows):
            f.write(f'{{"path": "synthetic/{i}.png"}}\n')
    return folder


def curate(*args: str) -> float:
    start = time.time()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "dinov2_repro.cli", "curate", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--items", type=int, default=4, help="kNN database items (dedup.shard_size = rows / items)")
    parser.add_argument("--threads", type=int, default=2, help="num_threads of the run (split over the local processes)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "curation_scale_cpu.json"))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="curation_scale_"))
    data = synthetic(work / "embeddings", args.rows, args.dim)
    common = [f"pool.manifest={data / 'manifest.jsonl'}", "embed.embedder=pixel", "embed.progress=false",
              "dedup.verify.enabled=false", "dedup.geo_iou=2.0", "dedup.max_removed_fraction=1.0", "device=cpu",
              f"num_threads={args.threads}", f"dedup.shard_size={-(-args.rows // args.items)}"]
    runs, reference = [], None
    for n in args.shards:
        out = work / f"run_n{n}"
        curate("embed", "--from-embeddings", str(data), f"output_dir={out}", *common)
        seconds = curate("dedup", "--launcher", "local", "--shards", str(n), f"output_dir={out}", *common)
        (fp,) = (out / "dedup" / "work").iterdir()
        tasks = {m.stem: json.loads(m.read_text()) for m in sorted((fp / "done").glob("*.json"))}
        knn = (out / "dedup" / "knn.npz").read_bytes()
        reference = reference or knn
        runs.append({"shards": n, "dedup_wall_s": round(seconds, 1),
                     "knn_task_peak_rss_mb": [t["peak_rss_mb"] for k, t in tasks.items() if k.startswith("knn.")],
                     "knn_task_seconds": [t["seconds"] for k, t in tasks.items() if k.startswith("knn.")],
                     "one_task_phases_peak_rss_mb": {k.split(".")[0]: t["peak_rss_mb"] for k, t in tasks.items()
                                                     if not k.startswith(("knn.", "regions.", "verify."))},
                     "knn_identical_to_first": knn == reference})
        print(json.dumps(runs[-1]), flush=True)
    result = {"rows": args.rows, "dim": args.dim, "items": args.items, "threads": args.threads, "runs": runs,
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_average_at_end": os.getloadavg(),
                          "note": "shared machine: 2 cores used by several engineers at once; wall times are under load"}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
