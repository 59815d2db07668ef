"""Bicubic pos-embed resampling written as two small matrix products, for export graphs.

The DINOv2 ViT resamples its learned pos-embed with ``F.interpolate(mode="bicubic")`` and a
Python-side shortcut (the native grid returns the table unchanged). Traced for a dynamic image
size, that shortcut is frozen at the export size and the scale factor becomes a constant, so
an export would silently be wrong at every other size. Here the same resampling is computed
from tensors only: for an output grid of ``n`` cells read from ``side`` input cells, a
(n, side) weight matrix holds each output cell's bicubic taps, and the table is resampled as
``W_h @ P @ W_w^T``. The weights reproduce PyTorch's two kernels:

- plain bicubic (``antialias=False``): Keys' cubic with a = -0.75, four taps at
  ``floor(x) - 1 .. floor(x) + 2`` clamped to the edge, source coordinate
  ``x = scale * (i + 0.5) - 0.5``;
- antialiased bicubic (``antialias=True``): a = -0.5, the support widened by ``scale`` when
  shrinking, taps inside the window, weights normalised to sum to one.

``scale`` is input cells per output cell: ``side / (n + offset)`` (the original models'
``interpolate_offset``; 0 means the output size alone sets the scale). Where PyTorch leaves an
axis as it is (the native-grid shortcut; the antialiased kernel also skips any axis whose size
does not change) the scale is forced to 1, which makes both kernels the identity.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _keys_cubic(distance: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel at ``distance`` (any sign); zero from |d| = 2 on."""
    d = distance.abs()
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    return torch.where(d <= 1.0, near, torch.where(d < 2.0, far, torch.zeros_like(d)))


def bicubic_weights(out_cells: Tensor, side: int, scale: Tensor, *, antialias: bool) -> Tensor:
    """(n, side) float64 resampling matrix. ``out_cells``: float64 ``arange(n)``; ``scale``: a
    float64 scalar tensor, input cells per output cell."""
    inputs = torch.arange(side, dtype=torch.float64, device=out_cells.device)
    if not antialias:
        source = scale * (out_cells + 0.5) - 0.5
        first = torch.floor(source)
        frac = source - first
        weights = torch.zeros(out_cells.shape[0], side, dtype=torch.float64, device=out_cells.device)
        for tap in range(4):
            # Taps past the edge read the edge cell (PyTorch clamps the index), so their weight adds to it.
            index = torch.clamp(first + (tap - 1), 0, side - 1)
            tap_weight = _keys_cubic(frac - (tap - 1), -0.75)
            weights = weights + tap_weight[:, None] * (index[:, None] == inputs[None, :]).to(torch.float64)
        return weights
    stretch = torch.clamp(scale, min=1.0)  # the kernel widens only when shrinking
    support = 2.0 * stretch
    centre = scale * (out_cells + 0.5)
    low = torch.clamp(torch.floor(centre - support + 0.5), min=0.0)
    high = torch.clamp(torch.floor(centre + support + 0.5), max=float(side))
    inside = (inputs[None, :] >= low[:, None]) & (inputs[None, :] < high[:, None])
    weights = _keys_cubic((inputs[None, :] - centre[:, None] + 0.5) / stretch, -0.5) * inside.to(torch.float64)
    total = weights.sum(dim=1, keepdim=True)
    return weights / torch.where(total == 0, torch.ones_like(total), total)


def resample_pos_embed_traceable(pos: Tensor, grid_h: int, grid_w: int, *, antialias: bool, offset: float) -> Tensor:
    """The (1, 1 + s*s, D) pos-embed (CLS first) resampled to a ``grid_h`` x ``grid_w`` grid, as
    vision_transformer.resample_pos_embed computes it, with no Python branch on the grid size
    (``grid_h`` / ``grid_w`` may be symbolic sizes of a traced input)."""
    num_patches = pos.shape[1] - 1
    side = int(round(num_patches ** 0.5))
    if side * side != num_patches:
        raise ValueError(f"pos_embed holds {num_patches} patch positions, not a square grid")
    rows = torch.arange(grid_h, dtype=torch.float64, device=pos.device)
    cols = torch.arange(grid_w, dtype=torch.float64, device=pos.device)
    # Grid sizes as tensors (count + 1 of the last index), so nothing below branches in Python.
    n_rows, n_cols = rows[-1:] + 1.0, cols[-1:] + 1.0
    # Where PyTorch leaves an axis alone: both axes on the native grid (the shortcut), or, for the
    # antialiased kernel, any axis whose size does not change (it skips that pass).
    same_rows, same_cols = n_rows == side, n_cols == side
    if not antialias:
        same_rows = same_cols = same_rows & same_cols
    one = torch.ones_like(n_rows)
    scale_h = torch.where(same_rows, one, side / (n_rows + offset))
    scale_w = torch.where(same_cols, one, side / (n_cols + offset))
    weights_h = bicubic_weights(rows, side, scale_h, antialias=antialias).to(pos.dtype)
    weights_w = bicubic_weights(cols, side, scale_w, antialias=antialias).to(pos.dtype)
    table = pos[0, 1:].reshape(side, side, -1).permute(2, 0, 1)  # (D, s, s)
    resampled = weights_h @ table @ weights_w.transpose(0, 1)  # (D, h, w)
    patch_pos = resampled.permute(1, 2, 0).reshape(1, -1, pos.shape[-1])
    return torch.cat([pos[:, :1], patch_pos], dim=1)
