"""Land-cover kNN on tiles of the shipped Landsat scene, labelled by its strata map: the
project's small, real, offline check that SSL features learned something."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data.sample_data import landcover_tiles
from ..backbone_file import load_backbone, model_kwargs_from_metadata
from ..models import DinoVisionTransformer
from .knn_classifier import images_to_tensor, knn_accuracy


def landcover_knn_report(export_path: str | Path, *, size: int | None = None, k: int = 20, seed: int = 0) -> dict[str, Any]:
    """kNN top-1 of the exported backbone vs the same architecture (rebuilt from the export's
    header) at a seeded random init; tiles are resized to ``size`` (default: the export's img_size)."""
    trained, meta = load_backbone(export_path)
    size = int(size or meta["img_size"])
    train_x, train_y, test_x, test_y = landcover_tiles(seed=seed)
    to_tensor = lambda x: images_to_tensor(x, mean=meta["mean"], std=meta["std"], size=size)  # noqa: E731
    train_t, test_t = to_tensor(train_x), to_tensor(test_x)
    train_l, test_l = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    torch.manual_seed(seed)
    random_init = DinoVisionTransformer(**model_kwargs_from_metadata(meta))
    accuracy_trained = knn_accuracy(trained, train_t, train_l, test_t, test_l, k=k)
    accuracy_random = knn_accuracy(random_init, train_t, train_l, test_t, test_l, k=k)
    majority = float((test_l == torch.bincount(train_l).argmax()).float().mean())
    return {"knn_top1_trained": accuracy_trained, "knn_top1_random_init": accuracy_random,
            "margin": accuracy_trained - accuracy_random, "majority_class_baseline": majority,
            "n_train": len(train_l), "n_test": len(test_l), "k": k, "eval_size_px": size}
