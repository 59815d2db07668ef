"""Land-cover kNN on tiles of the shipped Landsat scene, labelled by its strata map: the
project's small, real, offline check that SSL features learned something."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.sample_data import landcover_tiles
from ..backbone_file import build_model_from_metadata, load_backbone
from .knn_classifier import images_to_tensor, knn_accuracy


def landcover_knn_report(export_path: str | Path, *, size: int | None = None, k: int = 20, seed: int = 0,
                         split_seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """kNN top-1 of the exported backbone vs the same architecture (rebuilt from the export's
    header) at a seeded random init; tiles are resized to ``size`` (default: the export's img_size).

    ``split_seeds``: average over these spatial train/test splits of the scene instead of the one
    ``seed`` gives. One split has ~100 test tiles (one tile = 0.01), so comparisons of two close
    models need several; ``per_split`` then lists each split's figures."""
    trained, meta = load_backbone(export_path)
    size = int(size or meta["img_size"])
    torch.manual_seed(seed)
    random_init = build_model_from_metadata(meta)
    per_split = [_one_split(trained, random_init, meta, size=size, k=k, split_seed=s)
                 for s in (split_seeds if split_seeds is not None else [seed])]
    mean = lambda key: sum(r[key] for r in per_split) / len(per_split)  # noqa: E731
    report = {"knn_top1_trained": mean("knn_top1_trained"), "knn_top1_random_init": mean("knn_top1_random_init"),
              "majority_class_baseline": mean("majority_class_baseline"),
              "n_train": per_split[0]["n_train"], "n_test": per_split[0]["n_test"], "k": k, "eval_size_px": size}
    report["margin"] = report["knn_top1_trained"] - report["knn_top1_random_init"]
    if split_seeds is not None:
        report["split_seeds"] = list(split_seeds)
        report["per_split"] = per_split
    return report


def _one_split(trained: torch.nn.Module, random_init: torch.nn.Module, meta: dict[str, Any], *, size: int, k: int,
               split_seed: int) -> dict[str, Any]:
    train_x, train_y, test_x, test_y = landcover_tiles(seed=split_seed)
    to_tensor = lambda x: images_to_tensor(x, mean=meta["mean"], std=meta["std"], size=size)  # noqa: E731
    train_t, test_t = to_tensor(train_x), to_tensor(test_x)
    train_l, test_l = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    majority = float((test_l == torch.bincount(train_l).argmax()).float().mean())
    return {"knn_top1_trained": knn_accuracy(trained, train_t, train_l, test_t, test_l, k=k),
            "knn_top1_random_init": knn_accuracy(random_init, train_t, train_l, test_t, test_l, k=k),
            "majority_class_baseline": majority, "n_train": len(train_l), "n_test": len(test_l)}
