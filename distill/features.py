"""Head-free feature distillation from a backbone-only teacher (a released DINOv2/DINOv3 file or
this project's backbone export): no DINO/iBOT heads exist to produce targets, so each student
learns to predict the teacher's own features through a learned linear projection.

Per crop (both global crops and every local crop), the student's CLS token and patch tokens,
projected to the teacher's width, are pulled towards the frozen teacher's CLS and patch tokens of
the same crop (cosine distance, or smooth-L1). Teacher and student may have different patch
sizes: the teacher sees the crop at the nearest multiple of its patch size, and its patch-token
map is resampled (bilinear) onto the student's token grid. Nothing here depends on the model
family: only ``patch_size`` and the ``x_norm_clstoken`` / ``x_norm_patchtokens`` outputs are used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_LOSSES = ("cosine", "smooth_l1")
CLS_TARGETS = ("same_crop", "global_crops")


def grid_of(tokens: Tensor, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of a (B, N, D) patch-token tensor from an input of ``height`` x ``width`` px:
    the aspect ratio of the input decides the split of N."""
    n = tokens.shape[1]
    rows = round(math.sqrt(n * height / width))
    if rows < 1 or n % rows:
        raise ValueError(f"{n} patch tokens do not form a grid for a {height}x{width} input")
    return rows, n // rows


def resample_patch_tokens(tokens: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> Tensor:
    """(B, Hs*Ws, D) tokens on ``src_grid`` -> (B, Hd*Wd, D) on ``dst_grid``, by bilinear
    interpolation of the token map (antialiased when shrinking, so no token is skipped)."""
    batch, n, dim = tokens.shape
    if n != src_grid[0] * src_grid[1]:
        raise ValueError(f"{n} tokens do not fill the source grid {src_grid}")
    if tuple(src_grid) == tuple(dst_grid):
        return tokens
    grid = tokens.transpose(1, 2).reshape(batch, dim, *src_grid)
    shrink = dst_grid[0] < src_grid[0] or dst_grid[1] < src_grid[1]
    out = F.interpolate(grid.float(), size=tuple(dst_grid), mode="bilinear", align_corners=False, antialias=shrink)
    return out.to(tokens.dtype).flatten(2).transpose(1, 2)


def teacher_sized(crops: Tensor, patch_size: int) -> Tensor:
    """``crops`` resized to the nearest multiple of the teacher's patch size (unchanged when they
    already are one), so a patch-16 teacher can read 56 px crops made for a patch-14 student."""
    height, width = crops.shape[-2:]
    size = tuple(max(patch_size, round(side / patch_size) * patch_size) for side in (height, width))
    if size == (height, width):
        return crops
    return F.interpolate(crops, size=size, mode="bicubic", align_corners=False, antialias=True)


def feature_loss(prediction: Tensor, target: Tensor, kind: str) -> Tensor:
    """Mean over tokens of the cosine distance (1 - cos) or of the smooth-L1 loss (beta 1, mean
    over channels) between (..., D) predictions and targets."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(prediction.float(), target.float(), dim=-1)).mean()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(prediction.float(), target.float(), beta=1.0)
    raise ValueError(f"distill.feature_loss={kind!r} unknown; choose one of {', '.join(FEATURE_LOSSES)}")


def projection_heads(student_dim: int, teacher_dim: int) -> dict[str, nn.Module]:
    """The learned projections of the student's CLS and patch tokens to the teacher's width."""
    return {"cls_proj": nn.Linear(student_dim, teacher_dim), "patch_proj": nn.Linear(student_dim, teacher_dim)}


@torch.no_grad()
def teacher_features(teacher: nn.Module, crops: Tensor) -> dict[str, Tensor]:
    """The frozen teacher's CLS and patch tokens of ``crops`` (resized to its patch multiple), with
    the token grid they lie on."""
    sized = teacher_sized(crops, int(teacher.patch_size))
    out = teacher(sized, is_training=True)
    patches = out["x_norm_patchtokens"]
    return {"cls": out["x_norm_clstoken"], "patches": patches, "grid": grid_of(patches, *sized.shape[-2:])}


def patch_feature_loss(student_out: dict[str, Tensor], crop_hw: tuple[int, int], target: dict[str, Tensor],
                       student: nn.ModuleDict, kind: str) -> Tensor:
    """The patch loss of one crop set: the student's projected patch tokens vs the teacher's patch
    map of the same crops, resampled onto the student's grid."""
    s_patches = student_out["x_norm_patchtokens"]
    t_patches = resample_patch_tokens(target["patches"], target["grid"], grid_of(s_patches, *crop_hw))
    return feature_loss(student.patch_proj(s_patches), t_patches, kind)


def crop_feature_losses(student_out: dict[str, Tensor], crop_hw: tuple[int, int], target: dict[str, Tensor],
                        student: nn.ModuleDict, kind: str) -> tuple[Tensor, Tensor]:
    """(CLS loss, patch loss) of one crop set against the teacher's tokens of the same crops."""
    cls = feature_loss(student.cls_proj(student_out["x_norm_clstoken"]), target["cls"], kind)
    return cls, patch_feature_loss(student_out, crop_hw, target, student, kind)


def multicrop_cls_loss(student_cls: Tensor, teacher_cls: Tensor, num_images: int, kind: str) -> Tensor:
    """Every student CLS (V views x B images, view-major, projected) against the teacher's CLS of
    each global crop of the same image ((2 x B, D), view-major), averaged over the (student view,
    teacher view) pairs: DINO's multi-crop pairing, without heads."""
    student_views = student_cls.reshape(-1, 1, num_images, student_cls.shape[-1])  # (V, 1, B, D)
    teacher_views = teacher_cls.reshape(1, -1, num_images, teacher_cls.shape[-1])  # (1, T, B, D)
    # Every pair has B tokens, so the mean over the broadcast (V, T, B) grid is the mean of the pair means.
    shape = (student_views.shape[0], teacher_views.shape[1], num_images, student_cls.shape[-1])
    return feature_loss(student_views.expand(shape), teacher_views.expand(shape), kind)
