"""Test-time augmentation for overhead imagery, which has no "up": the class probabilities of
the dihedral views of a tile, each mapped back to the tile's frame, are averaged.

``d4``: the 8 symmetries of the square (4 rotations x optional transpose); ``flip``: the tile,
its left-right mirror, its up-down mirror and both (a group too: the two mirrors compose to the
half turn); ``none``: the tile alone. Averaging over a group makes the
prediction equivariant: a rotated tile gets the rotated map, and a tile symmetric under the
group gets a symmetric map. Rotations need square inputs (segmentation tiles are square).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

TTA_MODES = ("none", "flip", "d4")

View = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]


def _rot(k: int) -> View:
    return (lambda x: torch.rot90(x, k, dims=(-2, -1))), (lambda y: torch.rot90(y, -k, dims=(-2, -1)))


def _transposed_rot(k: int) -> View:
    forward, inverse = _rot(k)
    return (lambda x: forward(x.transpose(-2, -1))), (lambda y: inverse(y).transpose(-2, -1))


def tta_views(mode: str) -> list[View]:
    """(transform, inverse) pairs of the views of ``mode``, the identity first."""
    if mode == "none":
        return [_rot(0)]
    if mode == "flip":
        return [_rot(0), (lambda x: x.flip(-1), lambda y: y.flip(-1)), (lambda x: x.flip(-2), lambda y: y.flip(-2)),
                (lambda x: x.flip(-2, -1), lambda y: y.flip(-2, -1))]
    if mode == "d4":
        return [_rot(k) for k in range(4)] + [_transposed_rot(k) for k in range(4)]
    raise ValueError(f"--tta {mode}: choose one of {', '.join(TTA_MODES)}")


def tta_probabilities(probabilities: Callable[[Tensor], Tensor], images: Tensor, *, mode: str = "none") -> Tensor:
    """Mean over the views of ``probabilities(view(images))`` mapped back; ``probabilities`` takes
    (N, C, H, W) images and returns (N, K, H, W) class probabilities."""
    views = tta_views(mode)
    if mode == "d4" and images.shape[-1] != images.shape[-2]:
        raise ValueError(f"--tta d4 needs square tiles, got {tuple(images.shape[-2:])}")
    total = None
    for forward, inverse in views:
        out = inverse(probabilities(forward(images)))
        total = out if total is None else total + out
    return total / len(views)
