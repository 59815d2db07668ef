"""Collapse monitors from tensors the SSL step already has (no extra forward passes).

DINO fails in two opposite ways: the teacher's per-sample distributions stay (near) uniform, so the
targets never sharpen, or every sample lands on the same few prototypes (collapse). The first shows
as a per-sample teacher entropy near log K, the second as an entropy of the batch-mean teacher
distribution near 0 and a feature rank near 1. Values are per rank (local batch) under FSDP.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

__all__ = ["COLLAPSE_BATCH_ENTROPY_FRACTION", "COLLAPSE_RANK", "collapse_messages", "effective_rank", "final_monitors",
           "teacher_monitors"]

# Below these the run has collapsed: the batch-mean teacher distribution sits on a handful of
# prototypes (10% of log K: about 2 equally used prototypes out of 1024), or the features span ~1 direction.
COLLAPSE_BATCH_ENTROPY_FRACTION = 0.1
COLLAPSE_RANK = 1.5


def _entropy(probs: Tensor) -> Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)


@torch.no_grad()
def teacher_monitors(teacher_probs: Tensor, student_teacher_ce: Tensor) -> dict[str, Tensor]:
    """``teacher_probs`` (..., K) rows summing to 1 (centered or Sinkhorn-Knopp targets);
    ``student_teacher_ce`` the mean student-teacher cross-entropy over the same rows. Returns
    0-dim tensors under ``monitor/`` names (entropies in nats, ``*_rel`` as fractions of log K)."""
    probs = teacher_probs.detach().float().reshape(-1, teacher_probs.shape[-1])
    log_k = math.log(probs.shape[-1])
    entropy = _entropy(probs).mean()
    batch_entropy = _entropy(probs.mean(dim=0))
    ce = student_teacher_ce.detach().float()
    return {
        "monitor/teacher_entropy": entropy,
        "monitor/teacher_entropy_rel": entropy / log_k,
        "monitor/teacher_batch_entropy": batch_entropy,
        "monitor/teacher_batch_entropy_rel": batch_entropy / log_k,
        "monitor/student_teacher_ce": ce,
        "monitor/student_teacher_kl": ce - entropy,
        # A static-shape count (no unique()), so the planner can trace the step on fake tensors.
        "monitor/prototypes_used": torch.zeros(probs.shape[-1], device=probs.device)
        .index_fill_(0, probs.argmax(dim=-1), 1.0).sum(),
    }


@torch.no_grad()
def effective_rank(features: Tensor) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of the
    (N, D) feature matrix; between 1 (all features on one line) and min(N, D)."""
    singular = torch.linalg.svdvals(features.detach().float())
    p = singular / singular.sum().clamp_min(1e-12) + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


def collapse_messages(record: dict[str, float], iteration: int, *, check_rank: bool = True) -> list[str]:
    """One line per collapse sign found in a logged ``record`` (empty when healthy).

    ``check_rank=False`` skips the rank sign: a freshly initialised ViT (LayerScale 1e-5) gives
    nearly the same CLS feature for every image, rank ~1, until training has moved the blocks, so
    the loop checks it only after the lr warmup."""
    messages = []
    batch_entropy = record.get("monitor/teacher_batch_entropy_rel")
    if batch_entropy is not None and batch_entropy < COLLAPSE_BATCH_ENTROPY_FRACTION:
        messages.append(
            f"collapse at iteration {iteration}: the batch-mean teacher distribution has entropy "
            f"{batch_entropy:.3f} log K (< {COLLAPSE_BATCH_ENTROPY_FRACTION}): a few prototypes take every sample")
    rank = record.get("monitor/rankme")
    if check_rank and rank is not None and rank < COLLAPSE_RANK:
        messages.append(f"collapse at iteration {iteration}: teacher CLS features have effective rank {rank:.2f} "
                        f"(< {COLLAPSE_RANK}): they span about one direction")
    return messages


def final_monitors(metrics_path: str | os.PathLike, *, last: int = 3) -> dict[str, float]:
    """Each ``monitor/*`` value of a run's metrics.jsonl averaged over its last ``last`` logged
    records (each is one batch: noisy alone), keyed without the ``monitor/`` prefix."""
    from .metrics import read_metrics

    records = read_metrics(metrics_path)
    keys = sorted({k for r in records for k in r if k.startswith("monitor/")})
    out = {}
    for key in keys:
        values = [float(r[key]) for r in records if r.get(key) is not None][-last:]
        if values:
            out[key.split("/", 1)[1]] = sum(values) / len(values)
    return out
