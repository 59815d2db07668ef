"""Feature2Pyramid: four same-stride ViT maps -> a four-level pyramid (evaluation.md).

A plain ViT has one stride p. Maps taken from 4 intermediate blocks are rescaled to strides
p/4, p/2, p, 2p: two 2x transposed convs, one, identity, a 2x2 max-pool. The channels stay at
the embedding width, as in mmseg's neck for ViTs.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


def pyramid_block_indices(depth: int) -> list[int]:
    """Four evenly spaced block indices ending at the last block (12 -> 2, 5, 8, 11; 24 -> 5, 11, 17, 23)."""
    return [max(0, round(depth * (i + 1) / 4) - 1) for i in range(4)]


class Feature2Pyramid(nn.Module):
    def __init__(self, *, embed_dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(embed_dim),
            nn.GELU(),
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2)
        self.same = nn.Identity()
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.out_channels = [embed_dim] * 4

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        if len(maps) != 4:
            raise ValueError(f"Feature2Pyramid takes 4 feature maps, got {len(maps)}")
        return [self.up4(maps[0]), self.up2(maps[1]), self.same(maps[2]), self.down2(maps[3])]
