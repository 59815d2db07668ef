"""DINOv2 multi-crop augmentation for RGB images and multispectral tiles (the recipe is spelled out below).

Input: a PIL image (converted to RGB), an (H, W, C) uint8 numpy array, a uint8 tensor (C, H, W),
or a float tensor (C, H, W) already scaled to [0, 1] per band (GeoTIFF tiles, any band count).

Every crop goes: RandomResizedCrop (bicubic, antialiased) + horizontal flip -> colour -> Gaussian
blur (kernel 9, sigma in [0.1, 2]) -> solarize (second global crop only) -> per-band normalisation.
Colour for 3-channel input is the recipe's ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8 then grayscale
with p=0.2. Any other band count gets a band-agnostic jitter instead: one brightness and one contrast
factor shared by all bands (p=0.8), because independent per-band factors would rewrite the spectral
signature that distinguishes land covers. Solarize uses the threshold 128/255 on [0, 1] data.

All randomness is drawn from the torch global RNG, so seeding it before the call (the data loader
does this per sample) makes the output a pure function of the seed and the image.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Blur probabilities (global crop 1, global crop 2, local crops). "released": the reference
# code's blur wrapper applied 1-p, so the published checkpoints effectively trained with these.
BLUR_RATES: dict[str, tuple[float, float, float]] = {"stated": (1.0, 0.1, 0.5), "released": (0.0, 0.9, 0.5)}

SOLARIZE_THRESHOLD = 128 / 255
_RANGE_TOLERANCE = 1e-3


def _coin(p: float) -> bool:
    # torch.rand is in [0, 1): p=1 always fires, p=0 never does.
    return bool(torch.rand(()) < p)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


class RandomGaussianBlur:
    """Gaussian blur applied with probability ``p``; ``tag`` names the crop it belongs to."""

    def __init__(self, *, p: float, kernel_size: int = 9, sigma: tuple[float, float] = (0.1, 2.0), tag: str = "") -> None:
        self.p, self.kernel_size, self.sigma, self.tag = float(p), int(kernel_size), sigma, tag

    def blur(self, img: Tensor) -> Tensor:
        sigma = _uniform(*self.sigma)
        return TF.gaussian_blur(img, [self.kernel_size, self.kernel_size], [sigma, sigma])

    def __call__(self, img: Tensor) -> Tensor:
        return self.blur(img) if _coin(self.p) else img

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(p={self.p}, kernel_size={self.kernel_size}, sigma={self.sigma}, tag={self.tag!r})"


class RandomSolarize:
    def __init__(self, *, p: float, threshold: float = SOLARIZE_THRESHOLD) -> None:
        self.p, self.threshold = float(p), float(threshold)

    def __call__(self, img: Tensor) -> Tensor:
        if not _coin(self.p):
            return img
        return torch.where(img >= self.threshold, 1.0 - img, img)


class BandAgnosticJitter:
    """Brightness and contrast jitter for any band count, factors shared across bands."""

    def __init__(self, *, p: float = 0.8, brightness: float = 0.4, contrast: float = 0.4) -> None:
        self.p, self.brightness, self.contrast = float(p), float(brightness), float(contrast)

    def __call__(self, img: Tensor) -> Tensor:
        if not _coin(self.p):
            return img
        b = _uniform(1 - self.brightness, 1 + self.brightness)
        c = _uniform(1 - self.contrast, 1 + self.contrast)
        # Contrast pivots on each band's own mean so bands with different levels stay comparable.
        band_mean = img.mean(dim=(-2, -1), keepdim=True)
        return ((img * b - band_mean * b) * c + band_mean * b).clamp_(0.0, 1.0)


def to_image_tensor(image: Any) -> Tensor:
    """Convert supported inputs to a (C, H, W) tensor (uint8 kept as uint8, floats checked to be in [0, 1])."""
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"augmentation input: numpy image must be (H, W, C), got shape {image.shape}")
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # copy: arrays from PIL are read-only
    if not isinstance(image, Tensor):
        raise TypeError(f"augmentation input: expected PIL image, numpy array or tensor, got {type(image).__name__}")
    if image.ndim != 3:
        raise ValueError(f"augmentation input: tensor must be (C, H, W), got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise TypeError(f"augmentation input: tensor dtype must be uint8 or floating, got {image.dtype}")
    lo, hi = float(image.min()), float(image.max())
    if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        raise ValueError(
            f"augmentation input: float tensors must be scaled to [0, 1] per band (got range [{lo:.4g}, {hi:.4g}]); "
            "scale GeoTIFF data in the dataset (see datasets.GeoTiff scale=...)"
        )
    return image.float()


class DataAugmentationDINO:
    """Multi-crop views for one image: 2 global crops (student and teacher) and N local crops."""

    def __init__(
        self,
        *,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 98,
        blur_rates: str = "stated",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if blur_rates not in BLUR_RATES:
            raise ValueError(f"crops.blur_rates must be one of {sorted(BLUR_RATES)}, got {blur_rates!r}")
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"crops.mean and crops.std must have the same non-zero length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"crops.std must be positive, got {list(std)}")
        if local_crops_number < 0:
            raise ValueError(f"crops.local_crops_number must be >= 0, got {local_crops_number}")
        self.global_crops_scale = tuple(float(v) for v in global_crops_scale)
        self.local_crops_scale = tuple(float(v) for v in local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.blur_rates = blur_rates
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]

        def geometric(size: int, scale: tuple[float, float]) -> v2.Compose:
            return v2.Compose([
                v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
            ])

        self.geometric_global = geometric(self.global_crops_size, self.global_crops_scale)
        self.geometric_local = geometric(self.local_crops_size, self.local_crops_scale)
        self.color_rgb = v2.Compose([
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ])
        self.color_bands = BandAgnosticJitter(p=0.8)
        p1, p2, p_local = BLUR_RATES[blur_rates]
        self.blur_global1 = RandomGaussianBlur(p=p1, tag="global1")
        self.blur_global2 = RandomGaussianBlur(p=p2, tag="global2")
        self.blur_local = RandomGaussianBlur(p=p_local, tag="local")
        self.solarize_global2 = RandomSolarize(p=0.2)

    def _crop(self, image: Tensor, geometric: v2.Compose, blur: RandomGaussianBlur, solarize: RandomSolarize | None) -> Tensor:
        crop = geometric(image)
        if crop.dtype == torch.uint8:
            crop = TF.to_dtype(crop, torch.float32, scale=True)
        else:
            crop = crop.clamp(0.0, 1.0)  # bicubic overshoots the [0, 1] range the colour ops assume
        crop = self.color_rgb(crop) if crop.shape[0] == 3 else self.color_bands(crop)
        crop = blur(crop)
        if solarize is not None:
            crop = solarize(crop)
        return TF.normalize(crop, self.mean, self.std)

    def __call__(self, image: Any) -> dict[str, list[Tensor]]:
        image = to_image_tensor(image)
        bands = image.shape[0]
        if bands != len(self.mean):
            raise ValueError(
                f"DataAugmentationDINO: image has {bands} bands but mean/std have {len(self.mean)} entries "
                "(crops.mean / crops.std must match the data's band count and student.in_chans)"
            )
        global1 = self._crop(image, self.geometric_global, self.blur_global1, None)
        global2 = self._crop(image, self.geometric_global, self.blur_global2, self.solarize_global2)
        local = [self._crop(image, self.geometric_local, self.blur_local, None) for _ in range(self.local_crops_number)]
        return {"global_crops": [global1, global2], "global_crops_teacher": [global1, global2], "local_crops": local}

    def __repr__(self) -> str:
        return (
            f"DataAugmentationDINO(global {self.global_crops_size}px scale={self.global_crops_scale}, "
            f"{self.local_crops_number} local {self.local_crops_size}px scale={self.local_crops_scale}, "
            f"blur_rates={self.blur_rates!r} {BLUR_RATES[self.blur_rates]}, bands={len(self.mean)})"
        )
