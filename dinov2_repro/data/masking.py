"""BEiT-style block masking of the patch grid for the iBOT loss, as DINOv2 uses it: rectangular
blocks of random area and aspect ratio are added until the sampled number of patches is masked."""
from __future__ import annotations

import math

import numpy as np


class MaskingGenerator:
    """Draws boolean (h, w) masks made of rectangular blocks of patches.

    Blocks hold at least ``min_num_patches`` patches, have an aspect ratio in
    ``[min_aspect, max_aspect]`` (log-uniform) and are placed uniformly; a block that would add no
    new patch, or more than the remaining budget, is redrawn up to ``max_attempts`` times, after
    which masking stops (so a mask may hold fewer patches than asked for, as in the recipe).
    ``max_num_patches`` caps both one block and the whole mask (default: half the patches), which
    is the recipe's "at most 50% of patches".

    Randomness comes only from the ``generator`` passed to ``__call__`` (a numpy Generator), so
    the caller decides what a mask is a function of.
    """

    def __init__(
        self,
        *,
        input_size: tuple[int, int] | int,
        max_num_patches: int | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(v) for v in input_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"MaskingGenerator: input_size must be positive, got {input_size}")
        self.num_patches = self.height * self.width
        self.max_num_patches = self.num_patches // 2 if max_num_patches is None else int(max_num_patches)
        self.min_num_patches = int(min_num_patches)
        if not 0 < self.min_num_patches:
            raise ValueError(f"MaskingGenerator: min_num_patches must be > 0, got {min_num_patches}")
        if min_aspect <= 0:
            raise ValueError(f"MaskingGenerator: min_aspect must be > 0, got {min_aspect}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = int(max_attempts)

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator(input_size=({self.height}, {self.width}), min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, log_aspect_ratio={self.log_aspect_ratio})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try to mask one block adding between 1 and ``budget`` new patches; return how many it added."""
        for _ in range(self.max_attempts):
            target_area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if not (0 < h <= self.height and 0 < w <= self.width):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            region = mask[top : top + h, left : left + w]
            added = h * w - int(region.sum())
            if 0 < added <= budget:
                region[...] = True
                return added
        return 0

    def __call__(self, num_masking_patches: int = 0, *, generator: np.random.Generator | None = None) -> np.ndarray:
        rng = generator if generator is not None else np.random.default_rng()
        mask = np.zeros((self.height, self.width), dtype=bool)
        target = min(int(num_masking_patches), self.max_num_patches)
        count = 0
        while count < target:
            # A block can never be smaller than min_num_patches, so stop once the budget is below it.
            budget = min(target - count, self.max_num_patches)
            if budget < self.min_num_patches:
                break
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask
