"""Image to patch tokens, for any band count."""
from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, D)."""
        _, chans, height, width = x.shape
        if chans != self.in_chans:
            raise ValueError(f"input has {chans} channels but the model was built with in_chans={self.in_chans}")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input size {height}x{width} is not divisible by the patch size {self.patch_size}; "
                f"use a multiple of {self.patch_size} (e.g. {height // self.patch_size * self.patch_size})"
            )
        return self.proj(x).flatten(2).transpose(1, 2)
