"""Segmentation metrics from one confusion matrix accumulated over a whole split (evaluation.md):
per-class IoU, macro mIoU over the classes present in ground truth or prediction, pixel accuracy,
and for binary tasks pixel-level F1 / precision / recall of the positive class (index 1)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor


def confusion_matrix(prediction: Tensor, target: Tensor, *, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels skipped."""
    keep = target != ignore_index
    truth, predicted = target[keep].long(), prediction[keep].long()
    if truth.numel() and (int(truth.min()) < 0 or int(truth.max()) >= num_classes):
        raise ValueError(f"ground-truth class {int(truth.max())} outside 0..{num_classes - 1} (set the ignore index?)")
    flat = truth * num_classes + predicted
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(matrix: Tensor | np.ndarray, *, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of a (K, K) confusion matrix (rows = truth). A class neither in the ground truth nor
    predicted has IoU ``None`` and is left out of mIoU."""
    cm = np.asarray(matrix, dtype=np.float64)
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix")
    tp = np.diag(cm)
    support = cm.sum(axis=1)  # ground-truth pixels per class
    predicted = cm.sum(axis=0)
    union = support + predicted - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    total = cm.sum()
    result: dict[str, Any] = {
        "miou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, iou)},
        "support_pixels": {name: int(s) for name, s in zip(names, support)},
        "classes_in_ground_truth": [name for name, s in zip(names, support) if s > 0],
        "n_pixels": int(total),
    }
    if k == 2:
        precision = tp[1] / predicted[1] if predicted[1] else 0.0
        recall = tp[1] / support[1] if support[1] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result.update(f1=float(f1), precision=float(precision), recall=float(recall), f1_level="pixel")
    return result
