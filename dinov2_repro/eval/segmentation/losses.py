"""Training losses of the segmentation heads: cross-entropy, Dice, focal, CE + Dice, Lovász
(segmentation-models-pytorch's implementations), optional class weights, and the automatic choice.

Why not always cross-entropy: on a binary task with rare foreground (buildings cover ~10% of a
scene) per-pixel CE is minimised early by predicting background everywhere, and a short head
training never leaves that plateau. Dice is a ratio over the foreground, so an all-background
map costs the full Dice loss whatever the imbalance. Hence the rule: ``--loss`` unset means ``ce``
for multi-class tasks and ``ce+dice`` for binary tasks whose foreground is under 20% of the
labelled training pixels (the run says so in its log and its metrics).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...config import ConfigError

log = logging.getLogger(__name__)

LOSSES = ("ce", "dice", "focal", "ce+dice", "lovasz")
RARE_FOREGROUND = 0.2  # binary tasks below this foreground fraction get ce+dice by default
MAX_AUTO_WEIGHT = 10.0  # inverse-frequency weights are capped: a class seen in a handful of pixels must not dominate

LossFn = Callable[[Tensor, Tensor], Tensor]


def class_frequencies(labels: Tensor, *, num_classes: int, ignore_index: int) -> Tensor:
    """Fraction of the labelled pixels in each class (float64, sums to 1)."""
    counts = torch.bincount(labels[labels != ignore_index].flatten(), minlength=num_classes)[:num_classes].double()
    return counts / counts.sum().clamp_min(1)


def parse_class_weights(text: str | None, *, labels: Tensor, num_classes: int, ignore_index: int) -> list[float] | None:
    """``None`` -> no weights; ``auto`` -> inverse class frequency of the training pixels, scaled to
    mean 1 over the classes present and capped at MAX_AUTO_WEIGHT (absent classes get 0 weight);
    ``W1,W2,...`` -> one non-negative weight per class."""
    if text is None or text == "":
        return None
    if text == "auto":
        freq = class_frequencies(labels, num_classes=num_classes, ignore_index=ignore_index)
        present = freq > 0
        weights = torch.zeros(num_classes, dtype=torch.float64)
        weights[present] = 1.0 / freq[present]
        weights[present] /= weights[present].mean()
        return [round(float(w), 6) for w in weights.clamp(max=MAX_AUTO_WEIGHT)]
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--class-weights {text}: expected 'auto' or comma-separated numbers") from None
    if len(values) != num_classes or any(v < 0 for v in values) or not any(v > 0 for v in values):
        raise ConfigError(f"--class-weights {text}: give {num_classes} non-negative weights (one per class, not all 0)")
    return values


def choose_loss(requested: str | None, *, labels: Tensor, num_classes: int, ignore_index: int) -> tuple[str, str]:
    """(loss name, why): ``requested`` if given, else the automatic rule of the module docstring."""
    if requested is not None:
        if requested not in LOSSES:
            raise ConfigError(f"--loss {requested}: choose one of {', '.join(LOSSES)}")
        return requested, "--loss"
    if num_classes == 2:
        foreground = float(class_frequencies(labels, num_classes=2, ignore_index=ignore_index)[1])
        if foreground < RARE_FOREGROUND:
            reason = (f"binary task with foreground {foreground:.1%} of the labelled training pixels "
                      f"(< {RARE_FOREGROUND:.0%}): loss ce+dice instead of ce (set --loss to choose)")
            log.warning("eval seg: %s", reason)
            return "ce+dice", reason
    return "ce", "default for this task"


def build_loss(name: str, *, num_classes: int, ignore_index: int, class_weights: Sequence[float] | None = None) -> LossFn:
    """A ``loss(logits (N, K, H, W), labels (N, H, W))``; class weights weight the CE part, and
    Dice's and focal's per-class terms (smp's ``class_weights``); Lovász takes none."""
    from segmentation_models_pytorch import losses as smp_losses

    if name not in LOSSES:
        raise ConfigError(f"--loss {name}: choose one of {', '.join(LOSSES)}")
    if class_weights is not None and name == "lovasz":
        raise ConfigError("--class-weights: the Lovász loss takes no class weights (use ce, dice, focal or ce+dice)")
    weights = list(class_weights) if class_weights is not None else None
    weight_tensor = torch.tensor(weights, dtype=torch.float32) if weights is not None else None

    def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
        w = weight_tensor.to(logits.device) if weight_tensor is not None else None
        return F.cross_entropy(logits, labels, weight=w, ignore_index=ignore_index)

    if name == "ce":
        return cross_entropy
    if name == "lovasz":
        return smp_losses.LovaszLoss(mode="multiclass", ignore_index=ignore_index)
    if name == "focal":
        return smp_losses.FocalLoss(mode="multiclass", ignore_index=ignore_index, class_weights=weights)
    dice = smp_losses.DiceLoss(mode="multiclass", ignore_index=ignore_index, class_weights=weights)
    if name == "dice":
        return dice
    return lambda logits, labels: cross_entropy(logits, labels) + dice(logits, labels)
