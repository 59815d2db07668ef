"""iBOT patch loss: cross-entropy on the masked patch tokens of the global crops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["iBOTPatchLoss"]


class iBOTPatchLoss(nn.Module):  # noqa: N801 (the method's name)
    """sum_i w_i * CE_i / n_images over the M masked tokens of all global crops.

    CE_i = -sum_k t_ik log softmax(s_ik / T_s)_k. ``masks_weight`` w_i is 1 / (number of masked
    tokens in token i's image), so every masked image contributes its mean token loss; dividing by
    ``n_images`` (all global-crop images, masked or not) makes the result the mean over images with
    unmasked images counting as 0. Computed in fp32.
    """

    def __init__(self, *, student_temp: float = 0.1) -> None:
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"iBOTPatchLoss: student_temp must be > 0, got {student_temp!r}")
        self.student_temp = student_temp

    def forward(
        self,
        student_logits_masked: Tensor,
        teacher_probs_masked: Tensor,
        masks_weight: Tensor,
        n_images: int,
    ) -> Tensor:
        if student_logits_masked.ndim != 2 or student_logits_masked.shape != teacher_probs_masked.shape:
            raise ValueError(
                "iBOTPatchLoss: expected student_logits_masked and teacher_probs_masked of the same shape "
                f"(M, K), got {tuple(student_logits_masked.shape)} and {tuple(teacher_probs_masked.shape)}"
            )
        if masks_weight.shape != student_logits_masked.shape[:1]:
            raise ValueError(
                f"iBOTPatchLoss: masks_weight must have shape (M,) = ({student_logits_masked.shape[0]},), "
                f"got {tuple(masks_weight.shape)}"
            )
        if int(n_images) <= 0:
            raise ValueError(f"iBOTPatchLoss: n_images must be > 0, got {n_images!r}")
        with torch.autocast(device_type=student_logits_masked.device.type, enabled=False):
            log_p = F.log_softmax(student_logits_masked.float() / self.student_temp, dim=-1)
            ce = -(teacher_probs_masked.detach().float() * log_p).sum(dim=-1)
            return (ce * masks_weight.detach().float()).sum() / n_images
