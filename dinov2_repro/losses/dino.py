"""DINO (CLS token) cross-entropy between student crops and centered teacher crops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """Sum over crop pairs (s, t) of the batch-mean cross-entropy -sum_k t_k log softmax(s / T_s)_k.

    ``student_logits`` (S, B, K) and ``teacher_probs`` (T, B, K) are indexed by crop then image.
    With ``ignore_diagonal=True`` the pairs s == t are skipped: pass the student's global crops and
    the teacher's global crops in the same order and only the swapped pairs (A vs B, B vs A) count.
    The loss is a plain sum of the pair terms; the caller divides by the number of terms (18 for
    2 global + 8 local crops: 8 x 2 local terms + 2 swapped global terms). Computed in fp32.
    """

    def __init__(self, *, student_temp: float = 0.1) -> None:
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"DINOLoss: student_temp must be > 0, got {student_temp!r}")
        self.student_temp = student_temp

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, *, ignore_diagonal: bool = False) -> Tensor:
        if student_logits.ndim != 3 or teacher_probs.ndim != 3:
            raise ValueError(
                "DINOLoss: expected student_logits (S, B, K) and teacher_probs (T, B, K), got shapes "
                f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
            )
        if student_logits.shape[1:] != teacher_probs.shape[1:]:
            raise ValueError(
                "DINOLoss: student_logits and teacher_probs must agree on (B, K), got shapes "
                f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
            )
        n_student, batch, _ = student_logits.shape
        n_teacher = teacher_probs.shape[0]
        if batch == 0:
            raise ValueError("DINOLoss: batch dimension B is 0")
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
            t = teacher_probs.detach().float()
            # pair_ce[s, t] = -sum_{b,k} t[t,b,k] * log_p[s,b,k]: one (S, B*K) x (B*K, T) matmul,
            # no (S, T, B, K) intermediate.
            pair_ce = -(log_p.reshape(n_student, -1) @ t.reshape(n_teacher, -1).t())
            if ignore_diagonal:
                # Zero the diagonal rather than select off it: same sum, and a static shape that
                # fake-tensor tracing (dinov2_repro/plan) can follow.
                same = torch.eye(n_student, n_teacher, dtype=torch.bool, device=pair_ce.device)
                pair_ce = pair_ce.masked_fill(same, 0.0)
            return pair_ce.sum() / batch
