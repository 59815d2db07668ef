"""Cheap feature baselines that remote-sensing benchmarks use as a floor (released-weights.md):

- ``imagestats``: per-band mean, std and quantiles of the image;
- ``rcf``: random convolutional features - a fixed bank of random k x k filters, ReLU of both signs,
  global mean pool. Filters are drawn from a Gaussian or from patches of the training images
  ("empirical", the MOSAIKS variant).
- ``random_init``: the evaluated backbone's architecture at a seeded random init, rebuilt from the
  export header with the init values the run trained from (LayerScale included).

Each baseline is a frozen ``nn.Module`` mapping normalised images (N, C, H, W) to features (N, D), so
the kNN and linear probes treat it like a backbone. Baselines with no learned scale are *fitted* on the
training images (feature standardisation, and the empirical RCF filters): the probe then sees
z-scored features, which is what makes cosine kNN meaningful on them (full strength, not a strawman).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_BASELINES = ("random_init", "imagestats", "rcf")
DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


class _Standardised(nn.Module):
    """Features z-scored with statistics of the training images (set by ``fit``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(0))
        self.register_buffer("feature_std", torch.ones(0))

    def raw_features(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, train_images: Tensor) -> "_Standardised":
        raw = self._batched(train_images)
        self.feature_mean, self.feature_std = raw.mean(0), raw.std(0).clamp_min(1e-6)
        return self

    @torch.no_grad()
    def _batched(self, images: Tensor, batch_size: int = 256) -> Tensor:
        return torch.cat([self.raw_features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        raw = self.raw_features(images)
        if self.feature_mean.numel() == 0:
            return raw
        return (raw - self.feature_mean) / self.feature_std


class ImageStats(_Standardised):
    """Per band: mean, std and the given quantiles of the pixel values -> (N, C * (2 + len(quantiles)))."""

    def __init__(self, *, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> None:
        super().__init__()
        if any(not 0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"imagestats quantiles must lie in [0, 1], got {list(quantiles)}")
        self.quantiles = tuple(float(q) for q in quantiles)

    def raw_features(self, images: Tensor) -> Tensor:
        flat = images.float().flatten(2)  # (N, C, H*W)
        parts = [flat.mean(-1), flat.std(-1)]
        if self.quantiles:
            q = torch.quantile(flat, torch.tensor(self.quantiles), dim=-1)  # (Q, N, C)
            parts += list(q)
        return torch.cat(parts, dim=1)


class RandomConvFeatures(_Standardised):
    """``num_features`` / 2 random ``kernel`` x ``kernel`` filters; ReLU(conv + b) and ReLU(-conv + b)
    (bias ``bias``), each mean-pooled over the image -> (N, num_features).

    ``mode='gaussian'``: filters ~ N(0, 1); ``mode='empirical'``: filters are random patches of the
    training images (``fit``), mean-removed and scaled to unit norm, so they respond to the data's
    own textures and colours."""

    def __init__(self, *, in_chans: int, num_features: int = 512, kernel: int = 3, bias: float = -1.0,
                 mode: str = "empirical", seed: int = 0) -> None:
        super().__init__()
        if num_features < 2 or num_features % 2:
            raise ValueError(f"rcf num_features must be an even number >= 2, got {num_features}")
        if mode not in ("gaussian", "empirical"):
            raise ValueError(f"rcf mode must be 'gaussian' or 'empirical', got {mode!r}")
        self.mode, self.kernel, self.seed = mode, kernel, seed
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(num_features // 2, in_chans, kernel, kernel, generator=generator)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", torch.full((num_features // 2,), float(bias)))

    def fit(self, train_images: Tensor) -> "RandomConvFeatures":
        if self.mode == "empirical":
            generator = torch.Generator().manual_seed(self.seed)
            n, _, height, width = train_images.shape
            count = self.weight.shape[0]
            index = torch.randint(0, n, (count,), generator=generator)
            rows = torch.randint(0, height - self.kernel + 1, (count,), generator=generator)
            cols = torch.randint(0, width - self.kernel + 1, (count,), generator=generator)
            patches = torch.stack([train_images[i, :, r:r + self.kernel, c:c + self.kernel]
                                   for i, r, c in zip(index.tolist(), rows.tolist(), cols.tolist())]).float()
            patches = patches - patches.mean(dim=(1, 2, 3), keepdim=True)
            # A flat patch has no texture: fall back to its Gaussian filter rather than divide by ~0.
            norms = patches.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            gaussian = self.weight / self.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            self.weight = torch.where(norms > 1e-3, patches / norms.clamp_min(1e-3), gaussian)
        return super().fit(train_images)  # type: ignore[return-value]

    def raw_features(self, images: Tensor) -> Tensor:
        response = F.conv2d(images.float(), self.weight)
        positive = F.relu(response + self.bias.view(1, -1, 1, 1)).mean(dim=(2, 3))
        negative = F.relu(-response + self.bias.view(1, -1, 1, 1)).mean(dim=(2, 3))
        return torch.cat([positive, negative], dim=1)


def random_init_backbone(meta: Mapping[str, Any], *, seed: int = 0) -> nn.Module:
    """The export's architecture at a seeded random init, with the header's init values (LayerScale
    of the training config; see backbone_file.model_kwargs_from_metadata)."""
    from ..backbone_file import build_model_from_metadata

    torch.manual_seed(seed)
    return build_model_from_metadata(meta).eval()


def build_feature_baseline(name: str, *, meta: Mapping[str, Any], train_images: Tensor, seed: int = 0,
                           rcf_mode: str = "empirical", rcf_features: int = 512) -> nn.Module:
    """One baseline by name (FEATURE_BASELINES), fitted on ``train_images`` where it needs fitting."""
    if name == "random_init":
        return random_init_backbone(meta, seed=seed)
    if name == "imagestats":
        return ImageStats().fit(train_images).eval()
    if name == "rcf":
        return RandomConvFeatures(in_chans=int(train_images.shape[1]), num_features=rcf_features, mode=rcf_mode,
                                  seed=seed).fit(train_images).eval()
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(FEATURE_BASELINES)}")


def parse_baselines(text: str, *, option: str = "--baselines") -> list[str]:
    """'random_init,imagestats,rcf' -> names ('' or 'none' -> []); unknown names raise ConfigError."""
    from ..config import ConfigError

    names = [item.strip() for item in text.split(",") if item.strip() and item.strip() != "none"]
    unknown = [name for name in names if name not in FEATURE_BASELINES]
    if unknown:
        raise ConfigError(f"{option} {text}: unknown baseline(s) {unknown}; choose from {', '.join(FEATURE_BASELINES)} or none")
    return names
