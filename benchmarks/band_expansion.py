"""Band expansion benchmark (issue 19 item 3): land-cover segmentation of the shipped 6-band
Landsat scene from an RGB-trained backbone, on RGB only vs expanded to 6 bands.

    python benchmarks/band_expansion.py --backbone RUN/export/teacher_backbone.safetensors \
        [--seeds 0,1,2] [--split-seeds 0,1,2] [--iterations 200] [--decoder linear] [--tile 56] [--out FILE]

Variants (one frozen backbone, the same head, schedule, tiles and seeds for all):
- ``rgb_only``: bands 3,2,1 (red, green, blue) and the backbone as trained;
- ``mean_file_order``: all 6 bands in file order (blue, green, red, NIR, SWIR1, SWIR2), ``mean``
  rule: bands 1-3 take the R, G, B filters, so blue gets red's filter (what a user who does not
  reorder gets);
- ``mean_rgb_first``: bands 3,2,1,4,5,6, ``mean`` rule (the DINOv3 authors' rule as meant:
  the first three bands are R, G, B);
- ``rgb_named``: all 6 bands in file order, ``rgb`` rule with R, G, B = bands 3, 2, 1.
Per run (a spatial split of the scene, --split-seeds, times a head seed, --seeds: init and batch
order) each variant's test mIoU and its paired difference to ``rgb_only`` on the same split and
seed; mean and sample standard deviation over runs. Each run is ``eval seg``'s (best lr on val, test metrics), with the frozen features of a
variant computed once for all its seeds. Writes the JSON with the machine description and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import torch  # noqa: E402

from backbone import machine_description  # noqa: E402
from dinov2_repro.backbone_file import read_backbone_file  # noqa: E402
from dinov2_repro.eval.segmentation.data import SPLITS  # noqa: E402
from dinov2_repro.eval.segmentation.train import (ModelSpec, build_model, cached_features, check_tile,  # noqa: E402
                                                  evaluate_head, fresh_head, input_normalisation, normalise,
                                                  prepare_data, train_head)
from dinov2_repro.io.files import atomic_write_text  # noqa: E402

# name -> (1-based bands read, --expand-bands value)
VARIANTS = {
    "rgb_only": ([3, 2, 1], None),
    "mean_file_order": (None, "mean"),
    "mean_rgb_first": ([3, 2, 1, 4, 5, 6], "mean"),
    "rgb_named": (None, "3,2,1"),
}


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def seed_runs(spec: ModelSpec, data, *, seeds: list[int], lrs: list[float], iterations: int) -> list[dict]:
    """``eval seg``'s run (run_segmentation: best lr on val, test metrics) for every seed, with the
    frozen features computed once: they do not depend on the seed."""
    features, _, meta = build_model(spec, data_channels=data.in_channels, num_classes=data.num_classes)
    check_tile(features, data, spec)
    mean, std = input_normalisation(meta, data.images["train"])
    feats = {s: cached_features(features, normalise(data.images[s], mean, std)) for s in SPLITS}
    common = dict(num_classes=data.num_classes, ignore_index=data.ignore_index, class_names=data.class_names)
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        best = None
        for lr in lrs:
            head = fresh_head(spec, features, in_channels=data.in_channels, num_classes=data.num_classes, seed=seed)
            train_head(head, feats["train"], data.labels["train"], ignore_index=data.ignore_index,
                       iterations=iterations, lr=lr, batch_size=8, seed=seed)
            val = evaluate_head(head, feats["val"], data.labels["val"], **common)
            if best is None or val["miou"] > best[0]:
                best = (val["miou"], lr, head)
        val_miou, lr, head = best
        test = evaluate_head(head, feats["test"], data.labels["test"], **common)
        runs.append({"seed": seed, "test_miou": test["miou"], "val_miou": val_miou,
                     "test_pixel_accuracy": test["pixel_accuracy"], "lr": lr,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(spec.name, runs[-1], flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, type=Path, help="an RGB backbone export (.safetensors)")
    parser.add_argument("--backbone-note", default="", help="how the backbone was trained (stored in the JSON)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--split-seeds", default="0", help="spatial train/val/test splits of the scene, e.g. 0,1,2")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--lrs", default="0.001", help="head learning-rate sweep (best on val)")
    parser.add_argument("--decoder", default="linear", choices=["linear", "unet", "upernet"])
    parser.add_argument("--tile", type=int, default=56)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "band_expansion_cpu.json")
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    split_seeds = [int(s) for s in args.split_seeds.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    machine = machine_description(torch.device("cpu"))
    _, header = read_backbone_file(args.backbone)
    started = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="band_expansion_") as workdir:
        for name in variants:
            bands, expand = VARIANTS[name]
            spec = ModelSpec(name=name, kind="vit", backbone=str(args.backbone), decoder=args.decoder, expand_bands=expand)
            runs, n_tiles = [], {}
            for split_seed in split_seeds:  # the same tiles for every band selection of a split
                data = prepare_data(data="landsat", workdir=Path(workdir), tile=args.tile, bands=bands, split_seed=split_seed)
                runs += [{"split_seed": split_seed, **run}
                         for run in seed_runs(spec, data, seeds=seeds, lrs=lrs, iterations=args.iterations)]
                n_tiles[f"split_{split_seed}"] = {s: len(data.labels[s]) for s in SPLITS}
            results[name] = {"bands_read": bands or [1, 2, 3, 4, 5, 6], "expand_bands": expand, "n_tiles": n_tiles,
                             "runs": runs, "test_miou": _summary([r["test_miou"] for r in runs]),
                             "test_pixel_accuracy": _summary([r["test_pixel_accuracy"] for r in runs])}
    if "rgb_only" in results:
        base = {(r["split_seed"], r["seed"]): r["test_miou"] for r in results["rgb_only"]["runs"]}
        for name, entry in results.items():
            if name != "rgb_only":
                deltas = [r["test_miou"] - base[(r["split_seed"], r["seed"])] for r in entry["runs"]]
                entry["test_miou_minus_rgb_only"] = {**_summary(deltas), "per_seed": deltas,
                                                     "runs_better": sum(d > 0 for d in deltas), "runs": len(deltas)}
    machine["load_average_at_end"] = os.getloadavg()
    report = {
        "benchmark": "band_expansion",
        "command": "python benchmarks/band_expansion.py " + " ".join(sys.argv[1:]),
        "machine": machine,
        "settings": {"data": "landsat (shipped Landsat-7 scene, ETM+ bands 1,2,3,4,5,7; strata land-cover map, 7 classes)",
                     "tile_px": args.tile, "split_seeds": split_seeds, "seeds": seeds, "iterations": args.iterations,
                     "lrs": lrs, "decoder": args.decoder, "frozen_backbone": True,
                     "backbone": {"path": str(args.backbone), "note": args.backbone_note,
                                  **{k: header[k] for k in ("arch", "embed_dim", "depth", "patch_size", "img_size", "in_chans", "mean", "std")}},
                     "input_normalisation": "the export's R,G,B mean/std on the R,G,B bands, their mean on the others "
                                            "(dinov2_repro.band_expansion.expand_normalisation); tiles are per-scene "
                                            "percentile-scaled to [0, 1] first"},
        "variants": results,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps({name: {"test_miou": entry["test_miou"], "delta": entry.get("test_miou_minus_rgb_only")}
                      for name, entry in results.items()}, indent=2))


if __name__ == "__main__":
    main()
