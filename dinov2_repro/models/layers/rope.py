"""2-D rotary position embedding (RoPE) of the DINOv3 ViT, applied per packed sequence.

Each patch at grid cell (i, j) of an h x w grid gets normalised coordinates in [-1, 1]
(cell centres, each axis divided by its own length). Head dimension D is split in four
quarters of frequencies: the first D/4 angles come from the row coordinate, the next D/4
from the column coordinate; the D/2 angles are tiled twice and rotate q and k in the
"rotate half" layout. Class and storage tokens (the prefix of each sequence) are not rotated.

Training-time augmentations of the coordinates, drawn once per call (one crop size of a
batch), as in the reference: ``shift`` adds U(-s, s) per axis, ``jitter`` multiplies each axis
by a log-uniform factor in [1/j, j], ``rescale`` multiplies both axes by one log-uniform
factor in [1/r, r]. They are off in eval mode.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

Groups = Sequence[tuple[int, int]]  # as in attention.py: (num_seqs, seq_len) runs
RopeTable = tuple[Tensor, Tensor]  # (sin, cos), each (num_patches, head_dim), fp32


class RopePositionEmbedding(nn.Module):
    """Sin/cos tables for an h x w patch grid. ``periods`` is a persistent buffer (the released
    DINOv3 files carry it, rounded to bf16 precision; loading it reproduces their model)."""

    def __init__(
        self,
        *,
        head_dim: int,
        base: float = 100.0,
        shift: float | None = None,
        jitter: float | None = None,
        rescale: float | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head dimension divisible by 4, got {head_dim}")
        for name, value in (("jitter", jitter), ("rescale", rescale)):
            if value is not None and value < 1.0:
                raise ValueError(f"RoPE {name} factor must be >= 1 (a log-uniform range [1/f, f]), got {value}")
        if shift is not None and shift < 0:
            raise ValueError(f"RoPE shift must be >= 0, got {shift}")
        self.head_dim = head_dim
        self.base = float(base)
        self.shift, self.jitter, self.rescale = shift, jitter, rescale
        self.register_buffer("periods", torch.empty(head_dim // 4), persistent=True)
        self.reset_periods()

    def reset_periods(self) -> None:
        """periods_k = base ** (4k / D), k = 0 .. D/4 - 1 (fp32)."""
        quarter = self.head_dim // 4
        exponents = 2.0 * torch.arange(quarter, dtype=torch.float32) / (self.head_dim // 2)
        with torch.no_grad():
            self.periods.copy_((self.base ** exponents).to(self.periods.device))

    def coordinates(self, height: int, width: int) -> Tensor:
        """(h*w, 2) cell-centre coordinates in [-1, 1], row-major, augmented in training."""
        device = self.periods.device
        rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
        coords = 2.0 * coords - 1.0
        if self.training:
            if self.shift is not None:
                coords = coords + torch.empty(2, device=device).uniform_(-self.shift, self.shift)[None]
            if self.jitter is not None:
                limit = math.log(self.jitter)
                coords = coords * torch.empty(2, device=device).uniform_(-limit, limit).exp()[None]
            if self.rescale is not None:
                limit = math.log(self.rescale)
                coords = coords * torch.empty(1, device=device).uniform_(-limit, limit).exp()
        return coords

    def forward(self, height: int, width: int) -> RopeTable:
        coords = self.coordinates(height, width)
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]
        angles = angles.flatten(1).repeat(1, 2)  # (h*w, D): [row freqs, col freqs] twice
        return angles.sin(), angles.cos()

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, base={self.base}, shift={self.shift}, jitter={self.jitter}, "
                f"rescale={self.rescale}")


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope_packed(x: Tensor, groups: Groups, tables: Sequence[RopeTable]) -> Tensor:
    """Rotate the patch tokens of packed (T, H, D) queries or keys; ``tables[g]`` belongs to the
    run ``groups[g]``, and each sequence's first ``length - num_patches`` tokens stay as they are.

    Tables are per run, not per token, so a run thinned by efficient stochastic depth (fewer
    sequences, same length) still lines up with its table. Computed in fp32, as the reference.
    """
    if len(tables) != len(groups):
        raise ValueError(f"got {len(tables)} RoPE tables for {len(groups)} sequence runs")
    parts, offset = [], 0
    for (count, length), (sin, cos) in zip(groups, tables):
        seq = x[offset: offset + count * length].reshape(count, length, *x.shape[1:])
        offset += count * length
        prefix = length - sin.shape[0]
        if prefix < 0:
            raise ValueError(f"RoPE table has {sin.shape[0]} positions but the sequences have {length} tokens")
        patches = seq[:, prefix:].float()
        rotated = patches * cos[None, :, None, :] + rotate_half(patches) * sin[None, :, None, :]
        parts.append(torch.cat([seq[:, :prefix], rotated.to(x.dtype)], dim=1).reshape(count * length, *x.shape[1:]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
