"""The default dedup embedder: a small CNN trained for copy detection on the pool itself.

No pretrained weights can be downloaded here, so, like SSCD, we train a descriptor to map
strongly augmented views of one image together and every other image apart: InfoNCE over
in-batch negatives plus an entropy (KoLeo) term that spreads descriptors. Minutes on 2 cores
at 64 px. Augmentations follow the copies a curation pool holds: crops, flips, 90-degree
rotations, JPEG, colour jitter, blur, grayscale.
"""
from __future__ import annotations

import io
import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


class GeM(nn.Module):
    """Generalised-mean pooling (p=3): the usual copy-detection pooling, between mean and max."""

    def __init__(self, p: float = 3.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=1e-6).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CopyDetectionNet(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, embed_dim) L2-normalised descriptors."""

    def __init__(self, *, width: int = 64, embed_dim: int = 128) -> None:
        super().__init__()
        self.width = width
        self.embed_dim = embed_dim
        self.features = nn.Sequential(
            _conv(3, width // 2, 2), _conv(width // 2, width, 1), _conv(width, width, 2),
            _conv(width, 2 * width, 1), _conv(2 * width, 2 * width, 2), _conv(2 * width, 2 * width, 1),
        )
        self.pool = GeM()
        self.proj = nn.Linear(2 * width, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - 0.5) / 0.25
        return F.normalize(self.proj(self.pool(self.features(x))), dim=-1)


# ---- augmentations (per sample, on (3, H, W) float tensors in [0, 1]) -------------------
def _jpeg(image: Tensor, quality: int) -> Tensor:
    from torchvision.io import decode_jpeg, encode_jpeg

    data = encode_jpeg((image * 255).round().clamp(0, 255).to(torch.uint8), quality=quality)
    return decode_jpeg(data).float() / 255.0


def _colour_jitter(image: Tensor, gen: torch.Generator, strength: float = 0.4) -> Tensor:
    def u(low: float, high: float) -> float:
        return float(torch.empty(()).uniform_(low, high, generator=gen))

    image = image * u(1 - strength, 1 + strength)  # brightness
    mean = image.mean()
    image = (image - mean) * u(1 - strength, 1 + strength) + mean  # contrast
    gray = image.mean(dim=0, keepdim=True)
    image = (image - gray) * u(1 - strength, 1 + strength) + gray  # saturation
    image = image + torch.empty(3, 1, 1).uniform_(-0.05, 0.05, generator=gen)  # per-channel shift ~ hue
    return image.clamp(0, 1)


def augment(image: Tensor, out_size: int, gen: torch.Generator) -> Tensor:
    """One strong copy-like view of ``image`` (3, H, W) -> (3, out_size, out_size)."""
    _, height, width = image.shape
    rand = lambda: float(torch.rand((), generator=gen))  # noqa: E731
    scale = 0.3 + 0.7 * rand()
    aspect = math.exp((rand() - 0.5) * 0.6)
    h = max(8, min(height, int(round(height * math.sqrt(scale / aspect)))))
    w = max(8, min(width, int(round(width * math.sqrt(scale * aspect)))))
    top = int(rand() * (height - h + 1))
    left = int(rand() * (width - w + 1))
    view = image[:, top : top + h, left : left + w]
    view = F.interpolate(view[None], size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)[0]
    if rand() < 0.5:
        view = view.flip(-1)
    view = torch.rot90(view, int(rand() * 4), dims=(-2, -1))
    if rand() < 0.8:
        view = _colour_jitter(view, gen)
    if rand() < 0.2:
        view = view.mean(dim=0, keepdim=True).expand(3, -1, -1).contiguous()
    if rand() < 0.3:
        sigma = 0.1 + 1.4 * rand()
        radius = 2
        xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(xs**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        view = F.conv2d(F.pad(view[:, None], (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        view = F.conv2d(F.pad(view, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))[:, 0]
    if rand() < 0.5:
        view = _jpeg(view.clamp(0, 1), quality=int(15 + 70 * rand()))
    return view.clamp(0, 1)


# ---- objective ----------------------------------------------------------------------------
def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE: view a_i must pick b_i (and vice versa) among all 2B-1 other views."""
    z = torch.cat([a, b])
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    n = a.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def koleo(z: Tensor) -> Tensor:
    """Kozachenko-Leonenko entropy estimate: -mean log distance to the nearest other descriptor."""
    with torch.no_grad():
        sim = z @ z.t()
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    distance = (z - z[nearest] + 1e-8).norm(dim=1)
    return -torch.log(distance + 1e-8).mean()


def train_copy_detector(
    images: Sequence[Tensor],
    *,
    steps: int,
    batch_size: int,
    img_size: int,
    embed_dim: int,
    width: int,
    lr: float,
    weight_decay: float,
    temperature: float,
    koleo_weight: float,
    seed: int,
    device: str = "cpu",
    log_every: int = 50,
) -> tuple[CopyDetectionNet, list[float]]:
    """Train on ``images`` (each (3, H, W) in [0, 1]); returns the model (eval mode) and losses."""
    if len(images) < 2:
        raise ValueError(f"copy-detection training needs at least 2 images, got {len(images)}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CopyDetectionNet(width=width, embed_dim=embed_dim).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    batch = min(batch_size, len(images))
    losses: list[float] = []
    start = time.time()
    model.train()
    for step in range(steps):
        picks = torch.randperm(len(images), generator=gen)[:batch].tolist()
        view_a = torch.stack([augment(images[i], img_size, gen) for i in picks]).to(device)
        view_b = torch.stack([augment(images[i], img_size, gen) for i in picks]).to(device)
        za, zb = model(view_a), model(view_b)
        loss = info_nce(za, zb, temperature)
        if koleo_weight:
            loss = loss + koleo_weight * 0.5 * (koleo(za) + koleo(zb))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        schedule.step()
        losses.append(float(loss))
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.info("sscd step %d/%d loss %.4f (%.1fs)", step + 1, steps, losses[-1], time.time() - start)
    model.eval()
    return model, losses


def save_copy_detector(model: CopyDetectionNet, path: str | Path, extra: dict | None = None) -> Path:
    """Safetensors with a metadata header enough to rebuild the model; written atomically."""
    from safetensors.torch import save

    metadata = {"kind": "sscd_cnn", "width": str(model.width), "embed_dim": str(model.embed_dim)}
    metadata.update({k: str(v) for k, v in (extra or {}).items()})
    from .io import atomic_write_bytes

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write_bytes(path, save(state, metadata=metadata))


def load_copy_detector(path: str | Path) -> tuple[CopyDetectionNet, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embed.checkpoint: {path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("kind") != "sscd_cnn":
        raise ValueError(f"embed.checkpoint: {path} is not a copy-detection checkpoint (metadata kind={metadata.get('kind')!r})")
    model = CopyDetectionNet(width=int(metadata["width"]), embed_dim=int(metadata["embed_dim"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), metadata
