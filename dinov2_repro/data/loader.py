"""The pretraining data loader: reproducible per stream position, resumable, robust to bad files.

Guarantee: what rank ``rank`` sees at its stream position (the image, its augmentation draws and
the batch's masks) is a pure function of (seed, global position), hence of (seed, p, rank,
world_size); it does not depend on num_workers or on whether the run started at 0 or resumed.
How: the sampler yields ``(index, sample_seed)``; SeededTransformDataset seeds torch / numpy /
random from sample_seed around the transform (inside a forked RNG state, so the caller's own RNG
is untouched with num_workers=0); the collate seeds its mask RNG from the batch's first sample seed.

Resume: ``start_sample`` = samples this rank already consumed = iteration * batch_size.
"""
from __future__ import annotations

import functools
import gc
import logging
import os
import random
import signal
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..distributed.signals import set_parent_death_signal
from .samplers import InfiniteSampler, mix_seed

logger = logging.getLogger("dinov2_repro.data")

_SUBSTITUTE_TAG = 0x73756273


class SeededTransformDataset(Dataset):
    """Wraps a ``(image, label)`` dataset: indexed by ``(index, sample_seed)`` pairs (or plain ints).

    Returns ``{"crops": transform(image), "label", "index", "seed", "n_skipped"}``. A sample that
    fails to load is logged with its path and replaced by another index drawn deterministically from
    (sample_seed, attempt); ``n_skipped`` counts the failures behind this sample so the collate can
    report them. ``max_consecutive_failures`` failures in a row mean the data is broken: raise.
    """

    def __init__(self, *, dataset: Dataset, transform: Callable[[Any], Any] | None, max_consecutive_failures: int = 50) -> None:
        self.dataset = dataset
        self.transform = transform
        self.max_consecutive_failures = int(max_consecutive_failures)

    def __len__(self) -> int:
        return len(self.dataset)

    def _describe(self, index: int) -> str:
        describe = getattr(self.dataset, "describe", None)
        return describe(index) if describe is not None else f"index {index}"

    def _load(self, index: int, seed: int) -> tuple[Any, Any, int, int]:
        n_skipped = 0
        candidate = index
        while True:
            try:
                image, label = self.dataset[candidate]
                return image, label, candidate, n_skipped
            except Exception as error:  # any decode/IO failure: a corrupt file must not kill the run
                n_skipped += 1
                logger.warning("skipping unreadable sample %s: %s: %s", self._describe(candidate), type(error).__name__, error)
                if n_skipped >= self.max_consecutive_failures:
                    raise RuntimeError(
                        f"{n_skipped} consecutive unreadable samples (last: {self._describe(candidate)}); check the dataset"
                    ) from error
                candidate = mix_seed(seed, _SUBSTITUTE_TAG, n_skipped) % len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = (item if isinstance(item, tuple) else (item, mix_seed(item)))
        image, label, used_index, n_skipped = self._load(int(index), int(seed))
        if self.transform is None:
            crops = image
        else:
            # Fork the RNG state so that, with num_workers=0, seeding here leaves the training
            # loop's own random streams (dropout, stochastic depth) untouched.
            py_state, np_state = random.getstate(), np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                try:
                    crops = self.transform(image)
                finally:
                    random.setstate(py_state)
                    np.random.set_state(np_state)
        return {"crops": crops, "label": label, "index": used_index, "seed": seed, "n_skipped": n_skipped}


def _worker_init(_: int, *, trainer_pid: int | None = None) -> None:
    # A forked worker inherits the trainer's unreachable objects; if its collector finalises one
    # whose threads live only in the trainer (a destroyed gloo process group of an earlier run in
    # the same process), the destructor waits forever (seen: the suite hung in
    # ~ProcessGroupGloo inside a worker). Frozen objects are never collected here.
    gc.freeze()
    # Each worker is one process per core's worth of work; intra-op threads would oversubscribe.
    torch.set_num_threads(1)
    # Slurm signals every process of a step on preemption; only the trainer (submitit's handler)
    # should react, so workers ignore the requeue signals instead of dying mid-batch.
    for name in ("SIGUSR2", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    # Ignoring SIGTERM must not make a worker immortal: it dies with the trainer, however the
    # trainer died (SIGKILL included).
    set_parent_death_signal(signal.SIGKILL, expected_parent=trainer_pid)


def close_loader_iterator(iterator: Iterator[Any] | None) -> None:
    """Stop a DataLoader iterator's worker processes now (a no-op for num_workers=0 or other iterators).

    Called when a run ends, normally or not: left to garbage collection, persistent workers of
    a failed run kept the interpreter waiting at exit forever.
    """
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def make_data_loader(
    *,
    dataset: Dataset,
    transform: Callable[[Any], Any] | None,
    collate_fn: Callable[[list], Any],
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_sample: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    persistent_workers: bool | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """An endless DataLoader of collated batches for this rank, starting at ``start_sample``.

    ``drop_last`` is accepted for API symmetry: the stream is infinite, so every batch is full.
    ``persistent_workers`` defaults to True when num_workers > 0; ``pin_memory`` to CUDA availability.
    """
    if batch_size <= 0:
        raise ValueError(f"train.batch_size_per_gpu must be > 0, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"train.num_workers must be >= 0, got {num_workers}")
    sampler = InfiniteSampler(
        size=len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, start=start_sample, with_seeds=True
    )
    extra: dict[str, Any] = {}
    if num_workers > 0:
        gc.collect()  # finalise the trainer's garbage here, before workers fork a copy of it
        extra["persistent_workers"] = True if persistent_workers is None else persistent_workers
        extra["worker_init_fn"] = functools.partial(_worker_init, trainer_pid=os.getpid())
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return DataLoader(
        SeededTransformDataset(dataset=dataset, transform=transform),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        # The DataLoader draws its workers' base seed from this generator; without one it would
        # consume the caller's global torch RNG at every iter().
        generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
        **extra,
    )
