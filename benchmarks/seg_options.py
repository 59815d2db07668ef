"""Segmentation options on the shipped data (issue 22): losses on rare foreground, decoders, TTA,
and the supervised baseline's training curve. CPU, one torch thread, one seed.

    PYTHONPATH=. python benchmarks/seg_options.py synthetic imbalance decoders converge --out benchmarks/results/seg_options_cpu.json

``synthetic``: the rare-building scene of tests/test_seg_losses.py (8% foreground), CE vs the
automatic ce+dice for the random-init ViT (linear, U-Net), the spectral and the supervised model.
``imbalance``: a binary task cut from the shipped Landsat scene (herbaceous, strata class 3, vs
the rest; ~12% of the training pixels), plain CE vs the automatic ce+dice, per model.
``decoders``: the 7-class strata task with every decoder (test mIoU with and without d4 TTA).
``label_efficiency``: the strata task, n = 1, 2, 5, all x seeds 0, 1, 2, the kNN decoder (no
training) vs a trained linear head on the same random-init features vs the per-pixel spectral head.
``converge``: the supervised U-Net's smoothed training loss over the default 200 iterations.
The backbone is the tiny test ViT (embed 32, depth 4, patch 14) at a seeded RANDOM init: no
pretrained tiny export could be trained on this shared machine in the time available, so these
rows compare the options, not backbones.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _herbaceous_task(workdir: Path) -> Path:
    import numpy as np
    import rasterio

    from dinov2_repro.data.sample_data import strata_path, write_landsat_stack

    root = workdir / "herbaceous"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    write_landsat_stack(root / "images" / "scene.tif")
    with rasterio.open(strata_path()) as src:
        strata, profile, nodata = src.read(1), src.profile, src.nodata
    mask = np.where(strata == nodata, 255, (strata == 3).astype(np.uint8)).astype(np.uint8)
    profile.update(dtype="uint8", nodata=255, count=1)
    with rasterio.open(root / "masks" / "scene.tif", "w", **profile) as dst:
        dst.write(mask[None])
    return root


def main() -> int:
    import torch

    from dinov2_repro.backbone_file import save_backbone
    from dinov2_repro.eval.segmentation.train import ModelSpec, prepare_data, run_segmentation
    from test_seg import _tiny_vit

    parser = argparse.ArgumentParser()
    parser.add_argument("experiments", nargs="+", choices=["synthetic", "imbalance", "decoders", "label_efficiency", "converge"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="seg_options_"))
    backbone = str(save_backbone(_tiny_vit(3), workdir / "tiny_random.safetensors", arch="custom",
                                 mean=(0.5,) * 3, std=(0.25,) * 3))
    rows = []
    started = time.time()
    if "synthetic" in args.experiments:
        from test_seg import _write_tif
        from test_seg_losses import _rare_buildings

        root = workdir / "synthetic"
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        image, labels = _rare_buildings()
        _write_tif(root / "images" / "s.tif", image)
        _write_tif(root / "masks" / "s.tif", labels)
        data = prepare_data(data=str(root), workdir=root, tile=28, classes=[0, 1])
        for kind, decoder in [("vit", "linear"), ("vit", "unet"), ("spectral", "unet"), ("supervised", "unet")]:
            for loss in ("ce", None):
                t = time.time()
                spec = ModelSpec(kind, kind, backbone if kind == "vit" else None, decoder)
                r = run_segmentation(spec, data, out_dir=None, progress=False, loss=loss)
                test = r["test"]
                rows.append({"exp": "synthetic", "model": kind, "decoder": decoder if kind == "vit" else None,
                             "loss": r["loss"], "fg_iou": test["per_class_iou"]["1"], "pixel_recall": test["recall"],
                             "pixel_precision": test["precision"], "object_f1": test["objects"]["object_f1"],
                             "seconds": round(time.time() - t)})
                print(rows[-1], flush=True)
    if "imbalance" in args.experiments:
        root = _herbaceous_task(workdir)
        data = prepare_data(data=str(root), workdir=root, tile=56, bands=[3, 2, 1], classes=[0, 1])
        for kind, decoder in [("spectral", "unet"), ("vit", "linear"), ("vit", "unet")]:
            for loss in ("ce", None):
                t = time.time()
                spec = ModelSpec(kind, kind, backbone if kind == "vit" else None, decoder)
                r = run_segmentation(spec, data, out_dir=None, progress=False, loss=loss, tta="d4" if kind == "vit" else "none")
                test = r["test"]
                rows.append({"exp": "imbalance", "model": kind, "decoder": decoder if kind == "vit" else None,
                             "loss": r["loss"], "fg_iou": test["per_class_iou"]["1"], "pixel_recall": test["recall"],
                             "pixel_f1": test["f1"], "object_f1": test["objects"]["object_f1"], "tta": r["tta"],
                             "test_without_tta": r.get("test_without_tta"), "seconds": round(time.time() - t)})
                print(rows[-1], flush=True)
    if "decoders" in args.experiments:
        data = prepare_data(data="landsat", workdir=workdir, tile=56, bands=[3, 2, 1])
        for decoder in ["knn", "linear", "unet", "upernet", "dpt"]:
            t = time.time()
            r = run_segmentation(ModelSpec("random_tiny", "vit", backbone, decoder), data, out_dir=None, progress=False, tta="d4")
            rows.append({"exp": "decoders", "decoder": decoder, "test_miou_d4": r["test"]["miou"],
                         "test_miou_plain": r["test_without_tta"]["miou"], "val_miou": r["val"]["miou"],
                         "trainable": r["trainable_parameters"], "curve": r["train_loss_curve"]["loss"],
                         "test_classes": r["test"]["classes_in_ground_truth"], "seconds": round(time.time() - t)})
            print(rows[-1], flush=True)
    if "label_efficiency" in args.experiments:
        from dinov2_repro.eval.segmentation.label_efficiency import run_label_efficiency

        data = prepare_data(data="landsat", workdir=workdir, tile=56, bands=[3, 2, 1])
        t = time.time()
        specs = [ModelSpec("knn", "vit", backbone, "knn"), ModelSpec("linear", "vit", backbone, "linear"),
                 ModelSpec("spectral", "spectral")]
        le = run_label_efficiency(specs, data, n_values=[1, 2, 5, None], seeds=[0, 1, 2], progress=False)
        for name, model in le["models"].items():
            rows.append({"exp": "label_efficiency", "model": name, "seconds": model["seconds"],
                         "miou": {n: {"mean": r["miou_mean"], "min": r["miou_min"], "max": r["miou_max"]}
                                  for n, r in model["runs"].items()}})
            print(rows[-1], flush=True)
        rows.append({"exp": "label_efficiency_meta", "n_tiles": le["n_tiles"], "test_classes": le["test_classes"],
                     "seconds": round(time.time() - t)})
    if "converge" in args.experiments:
        data = prepare_data(data="landsat", workdir=workdir, tile=56, bands=[3, 2, 1])
        t = time.time()
        r = run_segmentation(ModelSpec("supervised", "supervised"), data, out_dir=None, progress=False)
        rows.append({"exp": "converge", "model": "supervised", "iterations": r["iterations"], "test_miou": r["test"]["miou"],
                     "val_miou": r["val"]["miou"], "curve": r["train_loss_curve"], "seconds": round(time.time() - t)})
        print(rows[-1], flush=True)
    result = {"benchmark": "segmentation options (issue 22)", "rows": rows, "seconds": round(time.time() - started),
              "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_cores": os.cpu_count(),
                          "torch": torch.__version__, "torch_threads": 1, "device": "cpu",
                          "load_average_at_end": list(os.getloadavg())},
              "note": "shared 2-core machine under load from other engineers; backbone at random init (see docstring)"}
    from dinov2_repro.io.files import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
