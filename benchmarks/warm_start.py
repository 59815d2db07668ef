"""Continued pretraining from a backbone-only file (issue 19 item 4), at tiny scale on CPU.

    python benchmarks/warm_start.py [--iterations 200] [--output-dir DIR]

1. The "released" model: a tiny teacher (vit_micro, the tiny CPU recipe, 200 iterations) is
   pretrained on the shipped demo images (Landsat + RMNP + natural photos) and exported; the
   export is a backbone without DINO/iBOT heads, like the released DINOv2/DINOv3 files.
2. Continued pretraining from that file (``MODEL.WEIGHTS=<export>``) on a DIFFERENT remote-sensing
   pool: the RMNP aerial scene read as a GeoTIFF (percentile-scaled, 56 px tiles at stride 28: 192
   windows, none of them a tile of step 1, and no Landsat tile, so the probe's scene is not in it),
   for ``--iterations`` iterations with the same recipe, in these variants:
   - ``naive``: fresh heads, everything trains from the first iteration;
   - ``warm_start``: backbone frozen for the first 25% while the heads adapt, then a linear lr
     ramp over the next 25% (train.freeze_backbone_iterations / train.unfreeze_lr_ramp_iterations);
   (A third variant, the warm start plus Gram anchoring to the initial backbone, was measured at commit
   eb29826 and then removed with the anchor, since it did not measurably help; its figures stay in the
   results file under ``warm_start_gram``.)
3. Land-cover kNN probe (dinov2_repro.eval.landcover, 5 spatial splits) of every export, and the
   run's collapse monitors (teacher RankMe, target entropies) from its metrics.jsonl.
Pass (issue): probe after >= probe before - 0.01. Writes ``<output-dir>/warm_start_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import torch  # noqa: E402

from backbone import machine_description  # noqa: E402
from dinov2_repro.config import CONFIG_DIR, load_config  # noqa: E402
from dinov2_repro.data.sample_data import rmnp_rgb_path, write_demo_image_folder  # noqa: E402
from dinov2_repro.eval.landcover import landcover_knn_report  # noqa: E402
from dinov2_repro.io.files import atomic_write_text  # noqa: E402
from dinov2_repro.train.monitors import final_monitors  # noqa: E402
from dinov2_repro.train.pretrain import TEACHER_EXPORT, run_ssl_training  # noqa: E402

SPLITS = list(range(5))
SIZE = 56


def tiny_run(out_dir: Path, dataset: str, iterations: int, *, seed: int = 0, extra: list[str] = ()) -> Path:
    """A run of the tiny CPU recipe (vit_micro) on ``dataset``; returns its teacher export."""
    cfg = load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        "student.arch=vit_micro", f"train.dataset_path={dataset}", f"train.output_dir={out_dir}",
        "train.tensorboard=false", f"train.max_iterations={iterations}", f"optim.epochs={max(1, iterations // 20)}",
        f"train.seed={seed}", *extra])
    run_ssl_training(cfg)
    return out_dir / TEACHER_EXPORT


def probe(export: Path) -> dict:
    report = landcover_knn_report(export, size=SIZE, split_seeds=SPLITS)
    return {"landcover_knn_top1": report["knn_top1_trained"], "random_init_top1": report["knn_top1_random_init"],
            "per_split_top1": [round(r["knn_top1_trained"], 4) for r in report["per_split"]]}


def variants(iterations: int) -> dict[str, list[str]]:
    quarter = iterations // 4
    warm = [f"train.freeze_backbone_iterations={quarter}", f"train.unfreeze_lr_ramp_iterations={quarter}"]
    return {"naive": [], "warm_start": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200, help="continued-pretraining iterations")
    parser.add_argument("--released-iterations", type=int, default=200)
    parser.add_argument("--work-dir", default="/tmp/warm_start_bench")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # runs are deterministic for a thread count; 1 is the tests' setting
    machine = machine_description(torch.device("cpu"))
    work = Path(args.work_dir)
    images = write_demo_image_folder(work / "images", tile=SIZE)
    started = time.perf_counter()
    released = tiny_run(work / "released", f"ImageFolder:root={images}", args.released_iterations)
    report = {
        "benchmark": "continued pretraining from a backbone-only export (issue 19 item 4)",
        "command": "python benchmarks/warm_start.py " + " ".join(sys.argv[1:]),
        "settings": {"arch": "vit_micro", "recipe": "configs/train/vit_tiny_cpu.yaml", "released_iterations":
                     args.released_iterations, "released_pool": "demo images (Landsat + RMNP + natural), 56 px PNG",
                     "continued_pool": "GeoTiff:root=rmnp-rgb.tif:tile=56:stride=28 (192 windows)",
                     "continued_iterations": args.iterations, "probe": "land-cover kNN top-1, k=20, 5 spatial splits",
                     "torch_threads": 1},
        "machine": machine,
        "released": {**probe(released), "seconds": round(time.perf_counter() - started, 1)},
    }
    pool = f"GeoTiff:root={rmnp_rgb_path()}:tile={SIZE}:stride={SIZE // 2}"
    for name, extra in variants(args.iterations).items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        run_dir = work / name
        export = tiny_run(run_dir, pool, args.iterations, extra=[f"MODEL.WEIGHTS={released}", *extra])
        result = {"overrides": extra, **probe(export), "monitors": final_monitors(run_dir / "metrics.jsonl"),
                  "seconds": round(time.perf_counter() - t0, 1)}
        result["delta_vs_released"] = result["landcover_knn_top1"] - report["released"]["landcover_knn_top1"]
        result["pass_after_ge_before_minus_0.01"] = result["delta_vs_released"] >= -0.01
        report[name] = result
        print(name, json.dumps(result), flush=True)
    out = Path(args.output_dir) / "warm_start_cpu.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
