"""Infinite, seeded, rank-sharded sample stream that can be resumed at any position.

The stream is defined globally, independent of the number of ranks:
global position ``g = 0, 1, 2, ...`` maps to
  - ``epoch = g // size`` and ``index = perm(seed, epoch)[g % size]`` (or ``g % size`` without shuffle),
  - ``sample_seed = mix(seed, g)``, a 63-bit seed for everything random about that sample.
Rank ``r`` of ``world_size`` takes positions ``g = r + world_size * i`` for ``i = start, start+1, ...``.

Resuming: pass ``start`` = number of samples this rank has already consumed (for a training loop:
``iteration * batch_size_per_rank``). Nothing else is stateful, so there is no state_dict: the
sampler is rebuilt from (size, shuffle, seed, rank, world_size, start). Because each position's
index and seed do not depend on the rank layout, what position ``g`` holds is the same for any
world size.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Deterministically hash integers into a non-negative 63-bit seed (splitmix64 chaining).

    Used instead of Python's hash() (salted per process) so every worker and every run agrees.
    """
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


# Domain tags keep the permutation seeds and the per-sample seeds from colliding.
_PERM_TAG = 0x7065726D
_SAMPLE_TAG = 0x73616D70


class InfiniteSampler(Sampler):
    """Endless stream of dataset indices (or ``(index, sample_seed)`` pairs with ``with_seeds=True``).

    Each epoch is a fresh seeded permutation of ``range(size)``; only the permutation of the
    epoch being read is materialised, so starting far into the stream costs nothing extra.
    """

    def __init__(
        self,
        *,
        size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        with_seeds: bool = False,
    ) -> None:
        if size <= 0:
            raise ValueError(f"InfiniteSampler: size must be > 0, got {size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"InfiniteSampler: need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if start < 0:
            raise ValueError(f"InfiniteSampler: start must be >= 0, got {start}")
        self.size = int(size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start = int(start)
        self.with_seeds = bool(with_seeds)

    def global_position(self, local_position: int) -> int:
        """Global stream position of this rank's ``local_position``-th sample."""
        return self.rank + self.world_size * local_position

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The seeded order of one epoch (an int64 array: 8 bytes per sample, not a Python list)."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, _PERM_TAG, epoch))
        return torch.randperm(self.size, generator=generator).numpy()

    def sample_seed(self, global_position: int) -> int:
        return mix_seed(self.seed, _SAMPLE_TAG, global_position)

    def item_at(self, global_position: int) -> int | tuple[int, int]:
        """The stream element at a global position (random access; slow path for tests/tools)."""
        epoch, offset = divmod(global_position, self.size)
        index = int(self.epoch_permutation(epoch)[offset]) if self.shuffle else offset
        return (index, self.sample_seed(global_position)) if self.with_seeds else index

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        local = self.start
        cached_epoch, perm = -1, None
        while True:
            g = self.global_position(local)
            epoch, offset = divmod(g, self.size)
            if not self.shuffle:
                index = offset
            else:
                if epoch != cached_epoch:
                    perm, cached_epoch = self.epoch_permutation(epoch), epoch
                index = int(perm[offset])
            yield (index, self.sample_seed(g)) if self.with_seeds else index
            local += 1
