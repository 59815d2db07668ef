"""How close a student's features are to its teacher's, on the land-cover tiles of the shipped
Landsat scene: linear CKA of the CLS features, and the student's kNN top-1 against the labels
the teacher's own kNN assigns (the teacher's "view" of the scene)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from dinov2_repro.data.sample_data import landcover_tiles
from dinov2_repro.eval.knn_classifier import extract_features, images_to_tensor, knn_predict
from dinov2_repro.backbone_file import load_backbone

# The keys that make up a run's budget and schedule: iterations, batch, lr (peak, warmup, floor,
# scaling), weight decay, the EMA's momentum and the frozen-last-layer prefix.
SCHEDULE_KEYS = ("train.max_iterations", "train.OFFICIAL_EPOCH_LENGTH", "train.batch_size_per_gpu", "optim.epochs",
                 "optim.warmup_epochs", "optim.freeze_last_layer_epochs", "optim.min_lr", "optim.scaling_rule",
                 "optim.weight_decay", "optim.weight_decay_end", "teacher.momentum_teacher",
                 "teacher.final_momentum_teacher")


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear centred kernel alignment of two (n, d) feature matrices (1: same up to rotation/scale)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def neighbour_overlap(x: Tensor, y: Tensor, *, k: int = 10) -> float:
    """Mean fraction of each row's k nearest neighbours (cosine, itself excluded) that two (n, d)
    feature matrices of the same images share: 1 when both spaces rank neighbours alike. Unlike
    linear CKA it ignores the large direction every near-init ViT shares (mean colour), and unlike
    agreement with the teacher's kNN labels it does not penalise a student for fixing the
    teacher's mistakes."""
    def neighbours(f: Tensor) -> Tensor:
        f = torch.nn.functional.normalize(f.double(), dim=1)
        similarity = f @ f.T
        similarity.fill_diagonal_(-float("inf"))
        return similarity.topk(k, dim=1).indices

    nx, ny = neighbours(x), neighbours(y)
    shared = (nx.unsqueeze(2) == ny.unsqueeze(1)).any(dim=2).double().sum(dim=1)
    return float((shared / k).mean())


def matching_schedule_overrides(distill_cfg: DictConfig, *, student: str) -> list[str]:
    """``key=value`` overrides that give an SSL run from scratch the budget and schedule of
    ``student`` in the distillation config: the same iterations, batch, lr schedule (that student's
    ``base_lr``), weight decay, EMA momentum and frozen-last-layer prefix. A baseline trained on
    another schedule (a warmup longer than the run, a slower EMA that exports mostly the init)
    would lose for that reason alone."""
    from .config import student_specs

    specs = {spec.name: spec for spec in student_specs(distill_cfg)}
    if student not in specs:
        raise ValueError(f"no student {student!r} in distill.students (have {sorted(specs)})")
    overrides = [f"optim.base_lr={specs[student].base_lr}"]
    for key in SCHEDULE_KEYS:
        section, name = key.split(".")
        overrides.append(f"{key}={distill_cfg[section][name]}")
    return overrides


def _features(export: str | Path, images: tuple, size: int) -> list[Tensor]:
    model, meta = load_backbone(export)
    return [extract_features(model, images_to_tensor(x, mean=meta["mean"], std=meta["std"], size=size)) for x in images]


def teacher_agreement(teacher_export: str | Path, student_export: str | Path, *, size: int, k: int = 20,
                      seed: int = 0) -> dict[str, Any]:
    """{'cka': linear CKA on all tiles, 'neighbour_overlap': shared k-nearest neighbours on all tiles,
    'knn_agreement': student kNN top-1 vs the teacher's kNN labels}."""
    train_x, train_y, test_x, _ = landcover_tiles(seed=seed)
    labels = torch.as_tensor(train_y).long()
    t_train, t_test = _features(teacher_export, (train_x, test_x), size)
    s_train, s_test = _features(student_export, (train_x, test_x), size)
    teacher_view = knn_predict(t_train, labels, t_test, k=k)
    student_view = knn_predict(s_train, labels, s_test, k=k, num_classes=int(labels.max()) + 1)
    teacher_all, student_all = torch.cat([t_train, t_test]), torch.cat([s_train, s_test])
    return {"cka": linear_cka(teacher_all, student_all), "neighbour_overlap": neighbour_overlap(teacher_all, student_all),
            "knn_agreement": float((student_view == teacher_view).float().mean())}
