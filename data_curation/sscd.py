"""The default dedup embedder: a small CNN trained for copy detection on the pool itself.

No pretrained weights can be downloaded here, so, like SSCD, we train a descriptor to map
strongly augmented views of one image together and every other image apart: InfoNCE over
in-batch negatives plus an entropy (KoLeo) term that spreads descriptors. Minutes on 2 cores
at 64 px. Augmentations follow the copies a curation pool holds: crops, flips, 90-degree
rotations, JPEG, colour jitter, blur, grayscale.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

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
    # No BatchNorm: it costs as much as the convolutions on CPU, and a net this shallow trains without it.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(inplace=True))


class CopyDetectionNet(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, embed_dim) L2-normalised descriptors."""

    def __init__(self, *, width: int = 64, embed_dim: int = 128) -> None:
        super().__init__()
        self.width = width
        self.embed_dim = embed_dim
        self.features = nn.Sequential(
            # Downsample early: at 64 px the copy-relevant structure survives at 16x16, and the
            # full-resolution layers would dominate the CPU cost.
            _conv(3, width // 2, 2), _conv(width // 2, width, 2), _conv(width, width, 1),
            _conv(width, 2 * width, 2), _conv(2 * width, 2 * width, 1),
        )
        self.pool = GeM()
        self.proj = nn.Linear(2 * width, embed_dim)
        # Post-ReLU pooled features all point into one orthant, so raw cosines crowd near 1;
        # centring and scaling each dimension (running statistics at inference) spreads them and
        # makes a fixed cosine threshold meaningful (SSCD whitens its descriptors for the same reason).
        self.center = nn.BatchNorm1d(embed_dim, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - 0.5) / 0.25
        return F.normalize(self.center(self.proj(self.pool(self.features(x)))), dim=-1)


# ---- augmentations (batched: per-sample Python loops cost more than the network on 2 cores) ----
def _jpeg(batch: Tensor, qualities: list[int]) -> Tensor:
    from torchvision.io import decode_jpeg, encode_jpeg

    data = (batch * 255).round().clamp(0, 255).to(torch.uint8)
    encoded = [encode_jpeg(img, quality=q) for img, q in zip(data, qualities)]
    return torch.stack(decode_jpeg(encoded)).float() / 255.0


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    return torch.empty(n).uniform_(low, high, generator=gen)


def colour_jitter(batch: Tensor, gen: torch.Generator, strength: float = 0.4) -> Tensor:
    """Per-sample brightness, contrast, saturation and a small per-channel shift (~hue)."""
    n = batch.shape[0]
    view = lambda t: t.view(n, 1, 1, 1)  # noqa: E731
    batch = batch * view(_uniform(n, 1 - strength, 1 + strength, gen))
    mean = batch.mean(dim=(1, 2, 3), keepdim=True)
    batch = (batch - mean) * view(_uniform(n, 1 - strength, 1 + strength, gen)) + mean
    gray = batch.mean(dim=1, keepdim=True)
    batch = (batch - gray) * view(_uniform(n, 1 - strength, 1 + strength, gen)) + gray
    batch = batch + torch.empty(n, 3, 1, 1).uniform_(-0.05, 0.05, generator=gen)
    return batch.clamp(0, 1)


def _blur(batch: Tensor, sigmas: Tensor) -> Tensor:
    """Separable Gaussian blur with one sigma per sample (grouped convolution)."""
    n, c, h, w = batch.shape
    radius = 2
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-(xs[None] ** 2) / (2 * sigmas[:, None] ** 2))
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(c, 0)
    x = batch.reshape(1, n * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernels.view(n * c, 1, 1, -1), groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernels.view(n * c, 1, -1, 1), groups=n * c)
    return x.view(n, c, h, w)


def augment_batch(images: Tensor, out_size: int, gen: torch.Generator, *, dihedral: bool = True) -> Tensor:
    """Strong copy-like views of ``images`` (B, 3, H, W) in [0, 1] -> (B, 3, out_size, out_size):
    random resized crop (area 0.3-1), flips and 90-degree rotations (when ``dihedral``), colour
    jitter (p 0.8), grayscale (p 0.2), blur (p 0.3), JPEG quality 15-85 (p 0.5)."""
    from torchvision.ops import roi_align

    n, _, height, width = images.shape
    scale = _uniform(n, 0.3, 1.0, gen)
    aspect = torch.exp(_uniform(n, -0.3, 0.3, gen))
    h = (height * torch.sqrt(scale / aspect)).clamp(8, height)
    w = (width * torch.sqrt(scale * aspect)).clamp(8, width)
    top = torch.rand(n, generator=gen) * (height - h)
    left = torch.rand(n, generator=gen) * (width - w)
    boxes = torch.stack([torch.arange(n, dtype=torch.float32), left, top, left + w, top + h], dim=1)
    # roi_align = batched crop + bilinear resize; sampling_ratio averages 2x2 points per bin (mild antialias).
    views = roi_align(images, boxes, output_size=(out_size, out_size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    if dihedral:
        flip = torch.rand(n, generator=gen) < 0.5
        views[flip] = views[flip].flip(-1)
        turns = (torch.rand(n, generator=gen) * 4).long()
        for k in range(1, 4):
            sel = turns == k
            views[sel] = torch.rot90(views[sel], k, dims=(-2, -1))
    jitter = torch.rand(n, generator=gen) < 0.8
    views[jitter] = colour_jitter(views[jitter], gen)
    gray = torch.rand(n, generator=gen) < 0.2
    views[gray] = views[gray].mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    blur = torch.rand(n, generator=gen) < 0.3
    if blur.any():
        views[blur] = _blur(views[blur], _uniform(int(blur.sum()), 0.1, 1.5, gen))
    jpeg = torch.flatten(torch.nonzero(torch.rand(n, generator=gen) < 0.5))
    if len(jpeg):
        qualities = [int(q) for q in _uniform(len(jpeg), 15, 85, gen)]
        views[jpeg] = _jpeg(views[jpeg].clamp(0, 1), qualities)
    return views.clamp(0, 1)


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
    images: Tensor,
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
    dihedral_augment: bool = False,
    device: str = "cpu",
    log_every: int = 50,
) -> tuple[CopyDetectionNet, list[float]]:
    """Train on ``images`` (N, 3, H, W) in [0, 1]; returns the model (eval mode) and losses.

    ``dihedral_augment`` adds flips/rotations to the views. Off by default: the embedder averages
    its descriptor over the 8 flips/rotations (embed.dihedral_pool), which is exactly invariant
    to them whatever the network, so spending capacity on learning that invariance only hurts."""
    if len(images) < 2:
        raise ValueError(f"copy-detection training needs at least 2 images, got {len(images)}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CopyDetectionNet(width=width, embed_dim=embed_dim).to(device).to(memory_format=torch.channels_last)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    batch = min(batch_size, len(images))
    losses: list[float] = []
    start = time.time()
    model.train()
    for step in range(steps):
        picks = torch.randperm(len(images), generator=gen)[:batch]
        views = augment_batch(torch.cat([images[picks], images[picks]]), img_size, gen, dihedral=dihedral_augment)
        views = views.to(device).contiguous(memory_format=torch.channels_last)
        za, zb = model(views).chunk(2)
        loss = info_nce(za, zb, temperature)
        if koleo_weight:
            loss = loss + koleo_weight * 0.5 * (koleo(za) + koleo(zb))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        schedule.step()
        losses.append(float(loss.detach()))
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
