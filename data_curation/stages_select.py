"""The selection stages as units (units.py): sample, export (retrieve and cluster, sharded, are in
stages_retrieve.py and stages_cluster.py and re-exported here).
"""
from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from .fingerprint import record_stage
from .io import read_json, read_manifest
from .paths import out, pool_manifest, read_selected, require, write_selected
from .stages_cluster import CLUSTER  # noqa: F401  (re-exported: the selection stages in one place)
from .stages_retrieve import RETRIEVE  # noqa: F401
from .units import Phase, ShardContext, StageUnit, remove_other_work

SELECTION_STAGES = ("dedup", "retrieve", "cluster", "sample")


def load_hierarchy(cfg: DictConfig):
    from .hkmeans import Hierarchy

    data = np.load(require(out(cfg, "cluster", "hierarchy.npz"), "sample", "run the cluster stage first"))
    levels = len([k for k in data.files if k.startswith("labels_")])
    h = Hierarchy(labels=[data[f"labels_{l}"] for l in range(levels)], centroids=[data[f"centroids_{l}"] for l in range(levels)])
    return h, data["rows"], str(data["from_stage"])


def stage_sample(cfg: DictConfig) -> Path:
    from .hkmeans import balance_stats, balanced_sample

    h, rows, from_stage = load_hierarchy(cfg)
    base = read_selected(cfg, from_stage)
    if list(base["rows"]) != rows.tolist():
        raise RuntimeError(f"sample: cluster/hierarchy.npz is stale ({from_stage} changed since); re-run cluster")
    target = int(cfg.sample.target_size or 0)
    target = len(rows) if target <= 0 else target
    picked = balanced_sample(h, target, seed=cfg.seed)
    leaf = h.labels[0]
    before = np.bincount(leaf, minlength=len(h.centroids[0]))
    after = np.bincount(leaf[picked], minlength=len(h.centroids[0]))
    reasons = {int(rows[p]): f"balanced sample: leaf cluster {int(leaf[p])} (size {int(before[leaf[p]])}, took {int(after[leaf[p]])})"
               for p in picked}
    summary = {"target_size": target, "selected": int(len(picked)), "levels": list(cfg.cluster.levels),
               "leaf_sizes_before": before.tolist(), "leaf_sizes_after": after.tolist(),
               "balance_before": balance_stats(before), "balance_after": balance_stats(after)}
    return write_selected(out(cfg, "sample", "selected.json"), "sample", rows[picked], reasons, summary)


def stage_export(cfg: DictConfig) -> Path:
    from .io import portable_path, resolve_row_path, write_manifest
    from .report import write_report

    manifest = pool_manifest(cfg)
    rows = read_manifest(manifest)
    history = {}
    final = None
    for stage in ("dedup", "retrieve", "sample"):
        path = out(cfg, stage, "selected.json")
        if path.is_file():
            sel = read_json(path)
            history[stage] = sel
            final = sel
    if final is None:
        raise FileNotFoundError(f"export: no stage selection under {cfg.output_dir}; run dedup first")
    export_dir = out(cfg, "export")
    entries = []
    for r in final["rows"]:
        entry = dict(rows[r])
        entry["path"] = portable_path(resolve_row_path(rows[r], manifest.parent), export_dir)
        steps = [{"stage": "tile", "reason": (rows[r].get("provenance") or {}).get("reason", "in the pool")}]
        steps += [{"stage": s, "reason": sel["reasons"][str(r)]} for s, sel in history.items() if str(r) in sel["reasons"]]
        entry["provenance"] = {"stage": final["stage"], "reason": final["reasons"][str(r)], "pool_row": int(r), "steps": steps}
        entries.append(entry)
    path = write_manifest(export_dir / "manifest.jsonl", entries)
    write_report(cfg, export_dir, history, num_pool=len(rows))
    return path


def export_inputs(cfg: DictConfig) -> list[str]:
    """The chain export combines: embed and every selection stage that ran (cluster with sample)."""
    history = [s for s in ("dedup", "retrieve", "sample") if out(cfg, s, "selected.json").is_file()]
    return ["embed"] + [s for s in SELECTION_STAGES if s in history or (s == "cluster" and "sample" in history)]


def _single(stage: str, fn, inputs):
    def run(ctx: ShardContext) -> None:
        fn(ctx.cfg)
        if stage != "export":
            record_stage(ctx.cfg, stage, inputs(ctx.cfg))
        remove_other_work(ctx)
    return StageUnit(stage, (Phase("run", run),), inputs=inputs)


SAMPLE = _single("sample", stage_sample, lambda cfg: ["cluster"])
EXPORT = _single("export", stage_export, export_inputs)
