"""Batch multi-crop samples and draw the iBOT masks for the global crops."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .masking import MaskingGenerator
from .samplers import mix_seed

_MASK_TAG = 0x6D61736B


def _unpack(sample: Any, position: int) -> tuple[Mapping[str, Sequence[Tensor]], int | None, int]:
    """Return (crops, sample_seed or None, n_skipped) for a loader sample or a plain (crops, label) pair."""
    if isinstance(sample, Mapping) and "crops" in sample:
        return sample["crops"], sample.get("seed"), int(sample.get("n_skipped", 0))
    if isinstance(sample, (tuple, list)) and sample and isinstance(sample[0], Mapping):
        return sample[0], None, 0
    raise TypeError(
        f"collate: sample {position} must be a dict with 'crops' (from loader.SeededTransformDataset) "
        f"or a (crops_dict, label) pair, got {type(sample).__name__}"
    )


def stratified_masks(
    *,
    n_images: int,
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    n_tokens: int,
    mask_generator: MaskingGenerator,
    rng: np.random.Generator,
) -> tuple[Tensor, int]:
    """Masks for ``n_images`` crops: int(n_images * mask_probability) of them masked, with ratios
    stratified over ``mask_ratio_tuple``; returns (bool (n_images, n_tokens), upperbound)."""
    n_masked = int(n_images * mask_probability)
    bounds = np.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_masked + 1)
    masks: list[np.ndarray] = []
    upperbound = 0
    for i in range(n_masked):
        ratio = rng.uniform(bounds[i], bounds[i + 1])
        masks.append(mask_generator(int(n_tokens * ratio), generator=rng))
        upperbound += int(n_tokens * bounds[i + 1])
    empty = np.zeros(mask_generator.get_shape(), dtype=bool)
    masks.extend(empty for _ in range(n_images - n_masked))
    order = rng.permutation(n_images)
    stacked = np.stack([masks[j] for j in order]).reshape(n_images, -1)
    return torch.from_numpy(stacked), upperbound


def collate_data_and_cast(
    samples: Sequence[Any],
    *,
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype = torch.float32,
    n_tokens: int,
    mask_generator: MaskingGenerator,
    generator: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Stack crops crop-major ([crop 1 of every image, then crop 2, ...]) and build the iBOT masks.

    Mask randomness: ``generator`` when given; otherwise seeded from the first sample's seed (so a
    batch's masks are a function of its samples, whatever the worker layout); otherwise drawn from
    the torch global RNG (seeded per worker by the DataLoader).
    """
    if not samples:
        raise ValueError("collate: empty batch")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"ibot.mask_sample_probability must be in [0, 1], got {mask_probability}")
    low, high = mask_ratio_tuple
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"ibot.mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {mask_ratio_tuple}")
    grid = mask_generator.get_shape()
    if grid[0] * grid[1] != n_tokens:
        raise ValueError(f"collate: n_tokens={n_tokens} does not match the mask generator grid {grid}")

    unpacked = [_unpack(s, i) for i, s in enumerate(samples)]
    crops = [u[0] for u in unpacked]
    batch = len(samples)
    n_global = len(crops[0]["global_crops"])
    n_local = len(crops[0]["local_crops"])
    global_crops = torch.stack([c["global_crops"][k] for k in range(n_global) for c in crops]).to(dtype)
    if n_local:
        local_crops = torch.stack([c["local_crops"][k] for k in range(n_local) for c in crops]).to(dtype)
    else:
        local_crops = torch.empty((0, *global_crops.shape[1:2], 0, 0), dtype=dtype)

    first_seed = unpacked[0][1]
    if generator is not None:
        rng = generator
    elif first_seed is not None:
        rng = np.random.default_rng(mix_seed(first_seed, _MASK_TAG))
    else:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))

    n_images = n_global * batch
    masks, upperbound = stratified_masks(
        n_images=n_images,
        mask_ratio_tuple=(low, high),
        mask_probability=mask_probability,
        n_tokens=n_tokens,
        mask_generator=mask_generator,
        rng=rng,
    )
    mask_indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()
    masks_weight = (1.0 / per_image).expand_as(masks)[masks]
    return {
        "collated_global_crops": global_crops,
        "collated_local_crops": local_crops,
        "collated_masks": masks,
        "mask_indices_list": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices.shape[0], dtype=torch.long),
        "upperbound": upperbound,
        "n_skipped": sum(u[2] for u in unpacked),
    }
