"""CPU learning benchmark (issue 20 item 7): does the tiny recipe beat the cheap baselines on regions
of the Landsat scene that pretraining never saw?

    python benchmarks/learning.py [--seeds 0,1,2] [--variant NAME] [--override KEY=VALUE ...] [--quick]

Per seed: the shipped tiny recipe (configs/train/vit_tiny_cpu.yaml, ``train.seed`` = seed, plus any
``--override``) pretrains on the ``Sample:`` pool, which leaves out the held-out blocks of the Landsat
scene (dinov2_repro.data.sample_data.HELDOUT_BLOCK_PX). Its teacher export is then compared with
the honest random init (same architecture, the header's init values, seeded with the same seed),
imagestats and RCF (eval.baselines) on three held-out probes:

- land-cover kNN (k = 20, tiles of the held-out blocks, averaged over 3 spatial train/test splits);
- land-cover linear probe: the learning rate of each arm is chosen on the *tune* region (the
  pretraining blocks' labelled tiles) and reported once on the held-out region;
- segmentation: a linear decoder (eval seg code) on frozen features, trained on held-out blocks and
  tested on other held-out blocks; compared with random init and the per-pixel spectral baseline
  (imagestats and RCF are image-level features, the spectral model is their pixel-level analogue).

Results (mean, std and min-max over seeds per arm; margins of the recipe over each baseline with
their spread) are merged into ``benchmarks/results/learning_cpu.json`` under ``--variant`` (default
``shipped``), with the machine description. Timings are wall clock on whatever the machine carries.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from backbone import machine_description  # noqa: E402
from dinov2_repro.backbone_file import load_backbone  # noqa: E402
from dinov2_repro.config import CONFIG_DIR, load_config  # noqa: E402
from dinov2_repro.data.sample_data import (HELDOUT_BLOCK_PX, LANDCOVER_CLASSES, landcover_tiles,  # noqa: E402
                                           landsat_block_is_heldout, write_demo_image_folder)
from dinov2_repro.eval.baselines import build_feature_baseline  # noqa: E402
from dinov2_repro.eval.knn_classifier import images_to_tensor  # noqa: E402
from dinov2_repro.eval.landcover import landcover_knn_report  # noqa: E402
from dinov2_repro.eval.linear import linear_probe  # noqa: E402
from dinov2_repro.io.files import atomic_write_json  # noqa: E402
from dinov2_repro.train.pretrain import TEACHER_EXPORT  # noqa: E402

ARMS = ("trained", "random_init", "imagestats", "rcf")
KNN_SPLIT_SEEDS = (0, 1, 2)
LINEAR_LRS = (0.01, 0.1, 1.0)
SEG_TILE = 56


def _train_all(seeds: Sequence[int], pool: Path, work_dir: Path, overrides: Sequence[str]) -> dict[int, float]:
    """Pretrain every seed at once, one process and one torch thread each (on a shared 2-core machine a
    second intra-op thread per process mostly spins); a run directory that already holds a checkpoint
    resumes from it. Returns {seed: wall seconds}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started, jobs = time.perf_counter(), {}
    for seed in seeds:
        run_dir = work_dir / f"run_{seed}"
        if (run_dir / TEACHER_EXPORT).is_file() and (run_dir / "metrics.jsonl").is_file():
            continue  # finished earlier (a rerun of the evaluation only)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / "train_stdout.log", "ab")
        jobs[seed] = subprocess.Popen(
            [sys.executable, "-m", "dinov2_repro.cli", "train", "--config-file",
             str(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml"), f"train.dataset_path=ImageFolder:root={pool}",
             f"train.output_dir={run_dir}", "train.tensorboard=false", f"train.seed={seed}", *overrides],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seconds = {seed: 0.0 for seed in seeds}
    for seed, job in jobs.items():
        if job.wait() != 0:
            raise SystemExit(f"pretraining seed {seed} failed: see {work_dir / f'run_{seed}' / 'train_stdout.log'}")
        seconds[seed] = time.perf_counter() - started
    return seconds


def _arm_model(arm: str, model: torch.nn.Module, meta: dict, train_images: torch.Tensor, seed: int) -> torch.nn.Module:
    return model if arm == "trained" else build_feature_baseline(arm, meta=meta, train_images=train_images, seed=seed)


def _linear(export: Path, seed: int, size: int) -> dict[str, Any]:
    """Per arm: lr chosen on the tune region, then top-1 on the held-out region at that lr."""
    model, meta = load_backbone(export)
    out: dict[str, Any] = {}
    regions = {}
    for region in ("tune", "heldout"):
        tx, ty, vx, vy = landcover_tiles(region=region)
        to_tensor = lambda x: images_to_tensor(x, mean=meta["mean"], std=meta["std"], size=size)  # noqa: E731
        regions[region] = (to_tensor(tx), torch.as_tensor(ty), to_tensor(vx), torch.as_tensor(vy))
    for arm in ARMS:
        n_blocks = 4 if arm in ("trained", "random_init") else 1
        tt, tl, vt, vl = regions["tune"]
        tuned = linear_probe(_arm_model(arm, model, meta, tt, seed), tt, tl, vt, vl, lrs=LINEAR_LRS, n_blocks=n_blocks)
        tt, tl, vt, vl = regions["heldout"]
        held = linear_probe(_arm_model(arm, model, meta, tt, seed), tt, tl, vt, vl, lrs=(tuned["lr"],), n_blocks=n_blocks,
                            class_names=list(LANDCOVER_CLASSES))
        out[arm] = {"top1": held["top1"], "lr_from_tune": tuned["lr"], "tune_top1": tuned["top1"]}
    return out


def heldout_seg_data(workdir: Path, *, tile: int = SEG_TILE):
    """SegData from the held-out blocks only: blocks in a fixed seeded order, ~60% train, 20% val,
    20% test (whole 112 px blocks, so tiles of different splits never touch the same block)."""
    from dinov2_repro.eval.segmentation.data import Tile, discover_pairs, load_scene, tile_arrays
    from dinov2_repro.eval.segmentation.train import SegData

    values, names = list(range(1, len(LANDCOVER_CLASSES) + 1)), list(LANDCOVER_CLASSES)
    pairs = discover_pairs("landsat", workdir=workdir)
    scene = load_scene(pairs[0], bands=[3, 2, 1], class_values=values, ignore_index=255)
    height, width = scene.labels.shape
    positions = [(r, c) for r in range(0, height - tile + 1, tile) for c in range(0, width - tile + 1, tile)
                 if (scene.labels[r:r + tile, c:c + tile] != 255).mean() >= 0.5
                 and landsat_block_is_heldout(r // HELDOUT_BLOCK_PX, c // HELDOUT_BLOCK_PX)
                 and (r + tile - 1) // HELDOUT_BLOCK_PX == r // HELDOUT_BLOCK_PX
                 and (c + tile - 1) // HELDOUT_BLOCK_PX == c // HELDOUT_BLOCK_PX]
    blocks = sorted({(r // HELDOUT_BLOCK_PX, c // HELDOUT_BLOCK_PX) for r, c in positions})
    order = np.random.default_rng(0).permutation(len(blocks))
    cut1, cut2 = round(0.6 * len(blocks)), round(0.8 * len(blocks))
    split_of = {blocks[k]: ("train" if rank < cut1 else "val" if rank < cut2 else "test") for rank, k in enumerate(order)}
    images, labels = {}, {}
    for split in ("train", "val", "test"):
        tiles = [Tile(0, r, c, split) for r, c in positions if split_of[(r // HELDOUT_BLOCK_PX, c // HELDOUT_BLOCK_PX)] == split]
        x, y = tile_arrays([scene], tiles, tile=tile)
        images[split], labels[split] = torch.from_numpy(x), torch.from_numpy(y)
    return SegData("landsat (held-out blocks)", tile, [3, 2, 1], values, names, 255, images, labels)


def _seg(export: Path, seed: int, data, iterations: int) -> dict[str, Any]:
    from dinov2_repro.eval.segmentation.label_efficiency import run_label_efficiency
    from dinov2_repro.eval.segmentation.train import ModelSpec

    specs = [ModelSpec(name="trained", kind="vit", backbone=str(export), decoder="linear"),
             ModelSpec(name="random_init", kind="random_init", backbone=str(export), decoder="linear"),
             ModelSpec(name="spectral", kind="spectral")]
    result = run_label_efficiency(specs, data, n_values=[None], seeds=[seed], iterations=iterations, progress=False)
    n = str(result["n_labelled"][0])
    return {"miou": {name: m["runs"][n]["miou_mean"] for name, m in result["models"].items()},
            "n_tiles": result["n_tiles"], "test_classes": result["test_classes"]}


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values),
            "values": list(values)}


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/std/min-max per arm and metric; margins (recipe minus baseline) per seed and their spread.
    ``beats`` is true when the smallest per-seed margin is positive and the mean margin exceeds the
    seed spread (max - min) of the recipe's own figure."""
    out: dict[str, Any] = {}
    for metric, arms in (("knn", ARMS), ("linear", ARMS), ("seg_miou", ("trained", "random_init", "spectral"))):
        table = {arm: _summary([s[metric][arm] for s in per_seed]) for arm in arms}
        spread = table["trained"]["max"] - table["trained"]["min"]
        margins = {}
        for arm in arms[1:]:
            diffs = [s[metric]["trained"] - s[metric][arm] for s in per_seed]
            margins[arm] = {**_summary(diffs), "beats": min(diffs) > 0 and statistics.fmean(diffs) > spread}
        out[metric] = {"arms": table, "trained_seed_spread": spread, "margins": margins}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variant", default="shipped", help="name of this run's entry in the results JSON")
    parser.add_argument("--override", action="append", default=[], help="config override for pretraining (repeatable)")
    parser.add_argument("--seg-iterations", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 iterations, 1 seed, not written to results/")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "learning_cpu.json"))
    parser.add_argument("--append", action="store_true", help="merge these seeds into the variant's existing rows")
    parser.add_argument("--work-dir", default=None, help="keep the pool and run directories here (default: a temporary folder)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = list(args.override)
    if args.quick:
        seeds, overrides = seeds[:1], overrides + ["train.max_iterations=2"]
        args.seg_iterations = 5
    started = time.perf_counter()
    per_seed = []
    with tempfile.TemporaryDirectory(prefix="learning_bench_") as tmp:
        work_dir = Path(args.work_dir) if args.work_dir else Path(tmp)
        pool = write_demo_image_folder(work_dir / "images", tile=56)
        seg_data = heldout_seg_data(work_dir / "seg")
        size = int(load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", overrides).crops.global_crops_size)
        train_seconds = _train_all(seeds, pool, work_dir, overrides)
        for seed in seeds:
            run_dir = work_dir / f"run_{seed}"
            train_s = train_seconds[seed]
            export = run_dir / TEACHER_EXPORT
            eval_started = time.perf_counter()
            knn = landcover_knn_report(export, size=size, seed=seed, split_seeds=KNN_SPLIT_SEEDS, baselines=ARMS[1:])
            row = {"seed": seed, "train_s": round(train_s, 1),
                   "knn": {arm: knn[f"knn_top1_{arm}"] for arm in ARMS},
                   "knn_majority_class": knn["majority_class_baseline"],
                   "linear_detail": _linear(export, seed, size)}
            row["linear"] = {arm: row["linear_detail"][arm]["top1"] for arm in ARMS}
            seg = _seg(export, seed, seg_data, args.seg_iterations)
            row["seg_miou"], row["seg"] = seg["miou"], {k: v for k, v in seg.items() if k != "miou"}
            row["eval_s"] = round(time.perf_counter() - eval_started, 1)
            per_seed.append(row)
            print(json.dumps(row), flush=True)
    entry = {"overrides": overrides, "seeds": seeds, "per_seed": per_seed, "summary": summarise(per_seed),
             "eval_size_px": size, "knn": {"k": 20, "split_seeds": list(KNN_SPLIT_SEEDS), "region": "heldout"},
             "linear": {"lrs": list(LINEAR_LRS), "lr_selected_on": "tune region", "reported_on": "heldout region"},
             "seg": {"decoder": "linear", "iterations": args.seg_iterations, "n_labelled": "all held-out train tiles"},
             "wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(entry["summary"], indent=2))
    if args.quick:
        return
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.is_file() else {}
    previous = results.get("variants", {}).get(args.variant)
    if args.append and previous and previous.get("overrides") == overrides:
        # Seeds evaluated in separate invocations (e.g. as their runs finish): keep the others' rows.
        rows = {row["seed"]: row for row in previous["per_seed"]}
        rows.update({row["seed"]: row for row in per_seed})
        entry["per_seed"] = [rows[seed] for seed in sorted(rows)]
        entry["seeds"] = sorted(rows)
        entry["summary"] = summarise(entry["per_seed"])
        entry["wall_s"] = round(previous.get("wall_s", 0.0) + entry["wall_s"], 1)
    results.setdefault("variants", {})[args.variant] = entry
    results["machine"] = machine_description(torch.device("cpu"))
    results["note"] = ("2-core machine shared with other engineers' jobs while this ran (load average ~6): "
                       "wall times are inflated and vary; accuracies do not depend on load.")
    atomic_write_json(output, results, indent=2)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
