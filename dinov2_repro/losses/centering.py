"""Teacher centering: softmax with an EMA center, or Sinkhorn-Knopp balanced assignments.

Both run in fp32 regardless of autocast and reduce across ranks when torch.distributed is
initialised, so every rank sees the same center / the same global normalisation.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["SoftmaxCentering", "sinkhorn_knopp_center"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_(tensor: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    if _distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


def _check_logits(name: str, logits: Tensor, ndim: int | None = None) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name}: teacher_logits must be a Tensor, got {type(logits).__name__}")
    if ndim is not None and logits.ndim != ndim:
        raise ValueError(f"{name}: teacher_logits must have {ndim} dims, got shape {tuple(logits.shape)}")


def _check_temperature(name: str, temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature!r}")


class SoftmaxCentering(nn.Module):
    """DINO teacher centering: softmax((t - c) / tau) with c an EMA of the teacher's batch means.

    Call order per step: ``probs = centering(t, tau)`` then ``centering.update(t)``. The center
    applied at step n is therefore the EMA of batches 0..n-1, never the current batch: the center
    only has to track the slowly-moving bias of the teacher, and keeping it independent of the batch
    it centers lets the (cross-rank) reduction of the update run after the teacher is used instead
    of blocking it. This matches the reference, where the center of step n is applied at step n.
    """

    center: Tensor

    def __init__(self, *, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"SoftmaxCentering: out_dim must be a positive integer, got {out_dim!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"SoftmaxCentering: momentum must be in [0, 1], got {momentum!r}")
        self.out_dim = out_dim
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def _check(self, teacher_logits: Tensor) -> None:
        _check_logits("SoftmaxCentering", teacher_logits)
        if teacher_logits.shape[-1] != self.out_dim:
            raise ValueError(
                f"SoftmaxCentering: teacher_logits last dim must be out_dim={self.out_dim}, "
                f"got shape {tuple(teacher_logits.shape)}"
            )

    @torch.no_grad()
    def forward(self, teacher_logits: Tensor, temperature: float) -> Tensor:
        """(..., K) logits -> (..., K) fp32 probabilities, centered with the current center."""
        self._check(teacher_logits)
        _check_temperature("SoftmaxCentering", temperature)
        centered = teacher_logits.float() - self.center.float()
        return torch.softmax(centered / temperature, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """EMA the center towards the mean of ``teacher_logits`` over every leading dim and every rank."""
        self.accumulate(teacher_logits)
        self.apply_accumulated()

    @torch.no_grad()
    def accumulate(self, teacher_logits: Tensor) -> None:
        """Add this batch's rows to the statistics of the current optimizer step (no collective).
        With gradient accumulation every micro-batch of a step adds its rows and the step makes one
        EMA update over all of them, as the same rows spread over more ranks would."""
        self._check(teacher_logits)
        flat = teacher_logits.detach().reshape(-1, self.out_dim).float()
        # One tensor for the sum and the count: one collective, and ranks may hold different numbers of rows.
        stats = torch.empty(self.out_dim + 1, dtype=torch.float32, device=flat.device)
        stats[: self.out_dim] = flat.sum(dim=0)
        stats[self.out_dim] = flat.shape[0]
        pending = getattr(self, "_pending", None)
        self._pending = stats if pending is None else pending + stats

    @torch.no_grad()
    def apply_accumulated(self) -> None:
        """One EMA step towards the mean of the rows accumulated since the last call, over every
        rank (every rank must call it, with or without rows); nothing accumulated: no-op."""
        stats, self._pending = getattr(self, "_pending", None), None
        if stats is None:
            return
        _all_reduce_(stats)
        count = stats[self.out_dim]
        batch_mean = (stats[: self.out_dim] / count.clamp_min(1.0)).unsqueeze(0).to(self.center)
        updated = self.center * self.momentum + batch_mean * (1.0 - self.momentum)
        # No rows on any rank (e.g. no masked tokens this step): keep the center. torch.where
        # instead of `if count == 0` avoids a host-device sync on every step.
        self.center.copy_(torch.where(count.to(self.center.device) > 0, updated, self.center))


@torch.no_grad()
def sinkhorn_knopp_center(
    teacher_logits: Tensor,
    temperature: float,
    *,
    n_iterations: int = 3,
    n_samples: int | Tensor | None = None,
) -> Tensor:
    """Balanced soft assignment of samples to prototypes (SwAV / DINOv2 teacher centering).

    ``teacher_logits`` (N, K) are this rank's samples; the result (N, K) gives each sample a
    distribution over the K prototypes (rows sum to 1) while the prototype masses over the global
    batch are pushed towards 1/K. With torch.distributed initialised every sum over samples is
    global; B is ``n_samples`` when given (for iBOT: the global number of masked tokens) and
    otherwise N summed over ranks.

    Steps as in the recipe: Q = exp(t / tau)^T, Q /= sum(Q), then ``n_iterations`` times: divide
    rows (prototypes) by their sums and by K, divide columns (samples) by their sums and by B;
    finally Q *= B and transpose. Everything in fp32.

    B must be the same GLOBAL count on every rank: a common scalar cancels (the next row step and
    the final Q *= B absorb it), but a per-rank local count would weight the ranks' samples
    unequally. When unsure pass None: N is then summed over ranks (one extra scalar all_reduce).

    Numerical safety (not in the recipe, exact in value): before exp we subtract each prototype's
    max over the global batch. That multiplies row k of Q by a constant exp(-m_k / tau), which the
    first row normalisation removes exactly (and Q /= sum(Q) is a scalar), so the result is
    unchanged for n_iterations >= 1 (with 0 iterations one global max is used instead), while exp
    can no longer overflow (tau = 0.04 overflows fp32 at logits ~3.5) and every row keeps at least
    one entry equal to 1 (no 0/0 row). A per-sample
    shift would NOT be exact (the row sums it changes feed the column step), hence per prototype.
    Sample columns that underflow completely are guarded with a tiny clamp (they come out as zeros
    rather than NaN).
    """
    _check_logits("sinkhorn_knopp_center", teacher_logits, ndim=2)
    _check_temperature("sinkhorn_knopp_center", temperature)
    if not isinstance(n_iterations, int) or n_iterations < 0:
        raise ValueError(f"sinkhorn_knopp_center: n_iterations must be an integer >= 0, got {n_iterations!r}")
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        logits = teacher_logits.detach().float()
        n_local, n_prototypes = logits.shape
        device = logits.device

        if n_local > 0:
            row_max = logits.amax(dim=0)
        else:  # a rank with no masked tokens still has to join every collective
            row_max = torch.full((n_prototypes,), float("-inf"), device=device)
        _all_reduce_(row_max, op=dist.ReduceOp.MAX)
        if n_iterations == 0:  # no row normalisation to absorb a per-prototype shift: shift by one scalar
            row_max = row_max.amax().expand_as(row_max)
        q = torch.exp((logits - row_max) / temperature).t()  # (K, N)

        if n_samples is None:
            total = torch.tensor(float(n_local), device=device)
            _all_reduce_(total)
        else:
            total = torch.as_tensor(n_samples, dtype=torch.float32, device=device)
        tiny = torch.finfo(torch.float32).tiny

        q_sum = q.sum().reshape(1)
        _all_reduce_(q_sum)
        q /= q_sum.clamp_min(tiny)
        for _ in range(n_iterations):
            row_sums = q.sum(dim=1, keepdim=True)  # (K, 1): mass of each prototype, global
            _all_reduce_(row_sums)
            q /= row_sums.clamp_min(tiny)
            q /= n_prototypes
            q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # per sample: local
            q /= total
        q *= total
        return q.t()
