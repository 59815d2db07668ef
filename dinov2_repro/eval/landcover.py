"""Land-cover kNN on tiles of the shipped Landsat scene, labelled by its strata map: the
project's small, real, offline check that SSL features learned something.

The tiles come from the scene's held-out blocks (``sample_data.HELDOUT_BLOCK_PX``), which no
pretraining pool built by this project contains, and the trained backbone is compared with the cheap
baselines of ``eval.baselines`` on the same tiles: its architecture at a random init built with the
training config's init values, imagestats and RCF."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..backbone_file import load_backbone
from ..data.sample_data import landcover_tiles
from .baselines import FEATURE_BASELINES, build_feature_baseline
from .knn_classifier import images_to_tensor, knn_accuracy


def landcover_knn_report(export_path: str | Path, *, size: int | None = None, k: int = 20, seed: int = 0,
                         split_seeds: Sequence[int] | None = None, baselines: Sequence[str] = ("random_init",),
                         region: str = "heldout") -> dict[str, Any]:
    """kNN top-1 of the exported backbone and of each baseline (``knn_top1_<name>``); tiles are resized
    to ``size`` (default: the export's img_size). ``margin`` is trained minus random init (when that
    baseline runs) and ``margin_vs_best_baseline`` trained minus the strongest baseline.

    ``split_seeds``: average over these spatial train/test splits of the region instead of the one
    ``seed`` gives; ``per_split`` then lists each split's figures. ``region``: ``heldout`` (reported
    figures) or ``tune`` (the pretraining blocks; for choosing settings only). ``baselines``: any of
    FEATURE_BASELINES; the default keeps to random init (the cheapest), ``eval landcover`` runs all."""
    trained, meta = load_backbone(export_path)
    size = int(size or meta["img_size"])
    per_split = [_one_split(trained, meta, size=size, k=k, seed=seed, split_seed=s, baselines=baselines, region=region)
                 for s in (split_seeds if split_seeds is not None else [seed])]
    keys = ["knn_top1_trained", *[f"knn_top1_{name}" for name in baselines], "majority_class_baseline"]
    report: dict[str, Any] = {key: sum(r[key] for r in per_split) / len(per_split) for key in keys}
    report.update(n_train=per_split[0]["n_train"], n_test=per_split[0]["n_test"], k=k, eval_size_px=size, region=region,
                  layerscale_init=meta.get("layerscale_init"))
    if "random_init" in baselines:
        report["margin"] = report["knn_top1_trained"] - report["knn_top1_random_init"]
    if baselines:
        best = max(baselines, key=lambda name: report[f"knn_top1_{name}"])
        report["best_baseline"] = best
        report["margin_vs_best_baseline"] = report["knn_top1_trained"] - report[f"knn_top1_{best}"]
    if split_seeds is not None:
        report["split_seeds"] = list(split_seeds)
        report["per_split"] = per_split
    return report


def _one_split(trained: torch.nn.Module, meta: dict[str, Any], *, size: int, k: int, seed: int, split_seed: int,
               baselines: Sequence[str], region: str) -> dict[str, Any]:
    train_x, train_y, test_x, test_y = landcover_tiles(seed=split_seed, region=region)
    to_tensor = lambda x: images_to_tensor(x, mean=meta["mean"], std=meta["std"], size=size)  # noqa: E731
    train_t, test_t = to_tensor(train_x), to_tensor(test_x)
    train_l, test_l = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    majority = float((test_l == torch.bincount(train_l).argmax()).float().mean())
    out = {"knn_top1_trained": knn_accuracy(trained, train_t, train_l, test_t, test_l, k=k)}
    for name in baselines:
        model = build_feature_baseline(name, meta=meta, train_images=train_t, seed=seed)
        out[f"knn_top1_{name}"] = knn_accuracy(model, train_t, train_l, test_t, test_l, k=k)
    return {**out, "majority_class_baseline": majority, "n_train": len(train_l), "n_test": len(test_l)}
