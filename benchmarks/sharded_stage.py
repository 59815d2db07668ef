"""Shared pieces of the sharded-stage memory benchmarks (cluster_shards.py, retrieve_shards.py):
a run folder pointed at synthetic embedding shards, the in-RAM reference in its own process, and
a stage's tasks run one after another as separate processes (so each peak RSS is that task's)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def prepare_run(run: Path, embeddings: dict[str, Path], keys: list[str]) -> Path:
    """A run folder whose embedding sets point at the given shard folders, with every pool row
    selected by a dedup selection written directly (no kNN is run). Returns the frozen config the
    tasks read."""
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


# What every in-RAM reference script shares: the config from argv, the thread setting, the RSS
# after the imports alone; then the body's ``result`` array saved and the timings printed.
_IN_RAM_IMPORTS = """
import resource, sys, time, numpy as np
from dinov2_repro.curation.config import load_curation_config
from dinov2_repro.curation.paths import setup_threads
"""
_IN_RAM_START = """
cfg = load_curation_config(None, sys.argv[2:])
setup_threads(cfg)
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.time()
"""
_IN_RAM_TAIL = """
np.save(sys.argv[1], result)
print(round(time.time() - start, 2), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), round(imported, 1))
"""


def run_in_ram(imports: str, body: str, output: Path, run: Path, keys: list[str], env: dict) -> dict:
    """The one-task reference in its own process: ``imports`` (the stage's modules; part of the
    imports-only RSS) then ``body`` (Python with ``cfg`` and ``np`` defined), which sets ``result``,
    an array saved at ``output``. Returns its seconds, peak RSS MB and imports-only RSS MB."""
    script = _IN_RAM_IMPORTS + imports + _IN_RAM_START + body + _IN_RAM_TAIL
    out = subprocess.run([sys.executable, "-c", script, str(output), f"output_dir={run}", *keys],
                         check=True, env=env, capture_output=True, text=True).stdout.split()
    return {"seconds": float(out[0]), "peak_rss_mb": float(out[1]), "imports_only_rss_mb": float(out[2])}


def run_stage_tasks(unit, config: Path, run: Path, keys: list[str], num_shards: int, env: dict) -> dict:
    """Every task of ``unit`` with ``num_shards`` shards (``config``: prepare_run's frozen config),
    one process each, one after another: the wall time and each task's seconds and peak RSS (from
    its completion marker)."""
    from dinov2_repro.curation.config import load_curation_config

    cfg = load_curation_config(None, [f"output_dir={run}", *keys])
    start = time.time()
    for phase in unit.phase_list(cfg):
        for shard in range(num_shards if phase.sharded else 1):
            subprocess.run([sys.executable, "-m", "dinov2_repro.curation.runner", str(config), unit.name, phase.name,
                            str(num_shards)], check=True, env={**env, "RANK": str(shard), "WORLD_SIZE": str(num_shards)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - start
    (work,) = (run / unit.name / "work").iterdir()
    tasks = {p.stem: json.loads(p.read_text()) for p in sorted((work / "done").iterdir())}
    return {"wall_seconds_tasks_one_after_another": round(wall, 1),
            "task_seconds_sum": round(sum(t["seconds"] for t in tasks.values()), 2),
            "max_task_peak_rss_mb": max(t["peak_rss_mb"] for t in tasks.values()),
            "tasks": {name: {"seconds": t["seconds"], "peak_rss_mb": t["peak_rss_mb"]} for name, t in tasks.items()}}


def write_result(result: dict, out: str) -> None:
    """``result`` with the machine description, as JSON at ``out``."""
    import torch
    from backbone import machine_description

    result["machine"] = {**machine_description(torch.device("cpu")), "numpy": np.__version__,
                         "note": "shared machine: 2 cores used by several engineers at once; times are under load"}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
