"""Training-free few-shot segmentation (``--decoder knn``): patch-feature label propagation.

The labelled tiles' last-block patch features form a memory bank (L2-normalised). Each memory
patch carries soft class votes: the fraction of its labelled pixels in each class (ignored
pixels do not vote; patches with no labelled pixel are left out). A query patch takes its k
nearest memory patches by cosine similarity (FAISS, exact inner-product search) and averages
their votes with weights exp(similarity / temperature), as DINO's kNN classifier weights its
neighbours. The patch-level class probabilities are upsampled bilinearly to pixels; an optional
guided filter (He et al., box filters on the image's mean band) snaps them to image edges.
Nothing is trained: "fitting" fills the bank.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
EPS = 1e-8


def patch_votes(labels: Tensor, *, num_classes: int, ignore_index: int, patch: int) -> tuple[Tensor, Tensor]:
    """(N, K, h, w) class fraction of each patch's labelled pixels, and (N, h, w) bool: patch has one."""
    valid = labels != ignore_index
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None].float()
    counts = F.avg_pool2d(onehot, kernel_size=patch, stride=patch)  # fraction of ALL pixels per class
    labelled = counts.sum(1)
    return counts / labelled.clamp_min(EPS)[:, None], labelled > 0


class KnnHead(nn.Module):
    """A head with no trainable parameter: ``fit`` fills the bank, ``forward`` votes.

    The bank (M, D), its votes (M, K) and (k, temperature) are buffers, so the head is saved and
    loaded like any other (``head.safetensors``)."""

    training_free = True

    def __init__(self, *, num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                 guided_filter_radius: int = 0, guided_filter_eps: float = 1e-2) -> None:
        super().__init__()
        if k < 1 or temperature <= 0:
            raise ConfigError(f"kNN decoder: k={k} must be >= 1 and temperature={temperature} > 0")
        self.num_classes = num_classes
        self.register_buffer("bank", torch.zeros(0, 1))
        self.register_buffer("votes", torch.zeros(0, num_classes))
        self.register_buffer("settings", torch.tensor([float(k), float(temperature), float(guided_filter_radius),
                                                       float(guided_filter_eps)]))
        self._index = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch's hook signature
        # The bank's size is only known once fitted: take the saved shapes before torch copies the values.
        for name in ("bank", "votes"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        self._index = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def k(self) -> int:
        return int(self.settings[0])

    @property
    def temperature(self) -> float:
        return float(self.settings[1])

    @torch.no_grad()
    def fit(self, feats: Sequence[Tensor], labels: Tensor, *, ignore_index: int) -> "KnnHead":
        """Fill the bank from the patch features of labelled tiles ((N, D, h, w), last block)."""
        maps = feats[-1]
        patch = labels.shape[-1] // maps.shape[-1]
        if patch * maps.shape[-1] != labels.shape[-1]:
            raise ValueError(f"tiles of {labels.shape[-1]} px do not split into {maps.shape[-1]} patches")
        votes, has_label = patch_votes(labels, num_classes=self.num_classes, ignore_index=ignore_index, patch=patch)
        vectors = F.normalize(maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).float(), dim=1)
        keep = has_label.reshape(-1)
        if not keep.any():
            raise ConfigError("kNN decoder: the labelled tiles hold no labelled pixels")
        self.bank = vectors[keep].contiguous()
        self.votes = votes.permute(0, 2, 3, 1).reshape(-1, self.num_classes)[keep].contiguous()
        self._index = None
        return self

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if self._index is None:
            self._index = faiss.IndexFlatIP(self.bank.shape[1])
            self._index.add(np.ascontiguousarray(self.bank.numpy(), dtype=np.float32))
        return self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    @torch.no_grad()
    def patch_probabilities(self, maps: Tensor) -> Tensor:
        """(N, K, h, w) class probabilities of each query patch."""
        if len(self.bank) == 0:
            raise ConfigError("kNN decoder: the memory bank is empty (fit it on labelled tiles first)")
        n, d, h, w = maps.shape
        queries = F.normalize(maps.permute(0, 2, 3, 1).reshape(-1, d).float(), dim=1)
        k = min(self.k, len(self.bank))
        sims, idx = self._search(queries.numpy(), k)
        weights = torch.from_numpy(sims / self.temperature).softmax(dim=1)  # exp(s/T), normalised per query
        probs = (weights[..., None] * self.votes[torch.from_numpy(idx)]).sum(1)
        probs = probs / probs.sum(1, keepdim=True).clamp_min(EPS)
        return probs.reshape(n, h, w, -1).permute(0, 3, 1, 2)

    def forward(self, features: Sequence[Tensor], size: tuple[int, int], guide: Tensor | None = None) -> Tensor:
        """Log class probabilities (N, K, H, W): softmax of the output gives the upsampled votes."""
        probs = F.interpolate(self.patch_probabilities(features[-1]), size=size, mode="bilinear", align_corners=False)
        radius = int(self.settings[2])
        if radius > 0 and guide is not None:
            probs = guided_filter(guide.mean(1, keepdim=True), probs, radius=radius, eps=float(self.settings[3]))
            probs = probs.clamp_min(0) / probs.clamp_min(0).sum(1, keepdim=True).clamp_min(EPS)
        return probs.clamp_min(EPS).log()


def _box(x: Tensor, radius: int) -> Tensor:
    return F.avg_pool2d(x, kernel_size=2 * radius + 1, stride=1, padding=radius, count_include_pad=False)


def guided_filter(guide: Tensor, source: Tensor, *, radius: int, eps: float) -> Tensor:
    """He et al.'s guided filter (grey guide (N, 1, H, W), any (N, K, H, W) source): an edge-aware
    smoothing whose output is locally a linear function of the guide."""
    mean_i, mean_p = _box(guide, radius), _box(source, radius)
    cov_ip = _box(guide * source, radius) - mean_i * mean_p
    var_i = _box(guide * guide, radius) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return _box(a, radius) * guide + _box(b, radius)
