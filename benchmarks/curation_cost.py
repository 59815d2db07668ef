"""Projected cost of curating 10 M and 100 M tiles, from per-item rates measured on this machine.

    python benchmarks/curation_cost.py            # reads the JSON below, writes curation_cost_cpu.json

Inputs (measured; see docs/curation.md "Cost at scale"):
- curation_verify_cpu.json "verification_speed": CPU ms per aligned pair, exact and coarse-to-fine;
- curation_verify_cpu.json "demo_curation_low_load" (else "demo_curation"): the demo's embed phase (CPU s per tile) and aligned
  pairs per pool image;
- curation_scale_cpu.json: kNN CPU seconds of the N = 1 run on synthetic 384-d embeddings.
Model: core-seconds of each sharded phase = rate x items; the kNN with an IVF index scans
nprobe / nlist of the database per query, so its cost per query grows with the database size
divided by the number of lists (nlist from the curate stage's rule: ~4 sqrt(N) up to 65,536).
Wall time = core-hours / cores (the sharded phases are embarrassingly parallel; the one-task
phases - pair merge and calibration, dedup graph, clustering, sampling - are not in the table).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))


def nlist_for(n: int) -> int:
    """The curate stage's IVF list count for a pool of n (data_curation/knn.py choose_index)."""
    from dinov2_repro.curation.knn import choose_index

    factory = choose_index(n)
    return 1 if factory == "Flat" else int(factory.split(",")[0].split("_")[0][3:])


def project(tiles: int, rates: dict, *, nodes: int, cores_per_node: int, nprobe: int) -> dict:
    cores = nodes * cores_per_node
    knn_core_s = rates["knn_core_s_per_query_per_scanned_row"] * tiles * (tiles * nprobe / nlist_for(tiles))
    embed_core_s = rates["embed_core_s_per_tile"] * tiles
    # Region candidates embed 4 corner squares per tile: at most 4x the embedding cost.
    regions_core_s = 4 * embed_core_s
    pairs = rates["aligned_pairs_per_tile"] * tiles
    out = {"tiles": tiles, "cluster": f"{nodes} nodes x {cores_per_node} cores", "aligned_pairs": int(pairs),
           "knn_index": f"IVF{nlist_for(tiles)}, nprobe {nprobe}"}
    for name, core_s in (("embed", embed_core_s), ("region_descriptors", regions_core_s), ("knn", knn_core_s),
                         ("verify_exact", rates["verify_ms_exact"] / 1000 * pairs),
                         ("verify_coarse_to_fine", rates["verify_ms_coarse_to_fine"] / 1000 * pairs)):
        out[f"{name}_core_hours"] = round(core_s / 3600, 1)
        out[f"{name}_wall_hours"] = round(core_s / 3600 / cores, 2)
    total = sum(out[f"{k}_core_hours"] for k in ("embed", "region_descriptors", "knn", "verify_coarse_to_fine"))
    out["total_core_hours"] = round(total, 1)
    out["total_wall_hours"] = round(total / cores, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--cores-per-node", type=int, default=32)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "curation_cost_cpu.json")
    args = parser.parse_args()
    verify = json.loads((RESULTS / "curation_verify_cpu.json").read_text())
    scale = json.loads((RESULTS / "curation_scale_cpu.json").read_text())
    speed, demo = verify["verification_speed"], verify.get("demo_curation_low_load") or verify["demo_curation"]
    one = next(r for r in scale["runs"] if r["shards"] == 1)
    n = scale["rows"]
    scanned = n * args.nprobe / nlist_for(n)
    rates = {"verify_ms_exact": speed["cpu_ms_per_pair"]["exact"],
             "verify_ms_coarse_to_fine": speed["cpu_ms_per_pair"]["coarse_to_fine"],
             "embed_core_s_per_tile": demo["coarse_to_fine"]["embed_core_s_per_tile"],
             "aligned_pairs_per_tile": max(demo["coarse_to_fine"]["aligned_pairs_per_tile"],
                                           verify.get("aligned_pairs_per_tile_quality_pools", 0.0)),
             # kNN task seconds were measured with `threads` cores per task
             "knn_core_s_per_query_per_scanned_row": sum(one["knn_task_seconds"]) * scale["threads"] / (n * scanned)}
    table = [project(t, rates, nodes=args.nodes, cores_per_node=args.cores_per_node, nprobe=args.nprobe)
             for t in (10_000_000, 100_000_000)]
    result = {"rates": rates, "rates_from": {"verification": "curation_verify_cpu.json verification_speed",
                                             "embed, pairs per tile": "curation_verify_cpu.json demo_curation_low_load",
                                             "knn": f"curation_scale_cpu.json, {n} rows, N=1"},
              "projection": table, "command": "python benchmarks/curation_cost.py " + " ".join(sys.argv[1:]),
              "not_included": "one-task phases (pair merge + calibration, dedup graph, retrieval, hierarchical k-means, "
                              "sampling) and I/O; kNN extrapolated with the IVF scan model, not measured at that size"}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
