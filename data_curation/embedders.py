"""Embedders: a name from the config -> a module mapping (B, C, S, S) images in [0, 1] to
L2-normalised descriptors. Nothing is downloaded: timm models are built with pretrained=False,
project backbones come from local checkpoints/exports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BASELINES = ("pixel", "phash")


class PixelEmbedder(nn.Module):
    """Baseline: a mean-centred 16x16 colour thumbnail."""

    dim = 3 * 16 * 16

    def forward(self, x: Tensor) -> Tensor:
        thumb = F.interpolate(x, size=(16, 16), mode="area").flatten(1)
        return F.normalize(thumb - thumb.mean(dim=1, keepdim=True), dim=-1)


class PerceptualHash(nn.Module):
    """Baseline: the DCT perceptual hash (64 bits as +-1/8), so cosine = 1 - 2 * hamming / 64."""

    dim = 64

    def __init__(self) -> None:
        super().__init__()
        n = 32
        k = torch.arange(n, dtype=torch.float64)
        basis = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
        self.register_buffer("dct", basis.float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        gray = F.interpolate(x.mean(dim=1, keepdim=True), size=(32, 32), mode="area")[:, 0]
        coeffs = self.dct @ gray @ self.dct.t()
        low = coeffs[:, :8, :8].flatten(1)[:, 1:]  # drop DC: brightness must not matter
        low = torch.cat([low, low[:, :1]], dim=1)  # 64 entries
        bits = (low > low.median(dim=1, keepdim=True).values).float() * 2 - 1
        return bits / 8.0


class BackboneEmbedder(nn.Module):
    """A ViT/CNN feature extractor with its own input normalisation, output L2-normalised."""

    def __init__(self, *, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], dim: int) -> None:
        super().__init__()
        self.model = model
        self.dim = dim
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.model((x - self.mean) / self.std)
        if isinstance(out, dict):
            out = out["x_norm_clstoken"]
        return F.normalize(out.float().flatten(1), dim=-1)


@dataclass
class EmbedderSpec:
    module: nn.Module
    img_size: int
    in_chans: int
    info: dict = field(default_factory=dict)


def _round_to_patch(size: int, patch: int) -> int:
    return max(patch, int(round(size / patch)) * patch)


def build_embedder(name: str, *, img_size: int, checkpoint: str | Path | None = None, seed: int = 0) -> EmbedderSpec:
    """``sscd`` (needs ``checkpoint``), ``timm:<model>``, ``export:<file>``, ``vit:<arch>``, ``pixel``, ``phash``."""
    torch.manual_seed(seed)
    info: dict = {"embedder": name}
    if name == "pixel":
        return EmbedderSpec(PixelEmbedder(), img_size, 3, info)
    if name == "phash":
        return EmbedderSpec(PerceptualHash(), img_size, 3, info)
    if name == "sscd":
        from .sscd import load_copy_detector

        if checkpoint is None:
            raise ValueError("embed.embedder=sscd needs embed.checkpoint (or run the embed stage, which trains it)")
        model, metadata = load_copy_detector(checkpoint)
        info.update(checkpoint=str(checkpoint), **metadata)
        return EmbedderSpec(model, img_size, 3, info)
    kind, _, arg = name.partition(":")
    if not arg:
        raise ValueError(f"embed.embedder: unknown embedder {name!r}; use sscd, timm:<model>, export:<file>, vit:<arch>, pixel or phash")
    if kind == "timm":
        import timm

        try:
            model = timm.create_model(arg, pretrained=False, num_classes=0, img_size=img_size)
        except TypeError:  # CNNs take no img_size
            model = timm.create_model(arg, pretrained=False, num_classes=0)
        cfg = model.pretrained_cfg or {}
        spec_size = img_size
        info.update(seed=seed)
        return EmbedderSpec(BackboneEmbedder(model=model.eval(), mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                                             std=tuple(cfg.get("std", (0.229, 0.224, 0.225))), dim=model.num_features),
                            spec_size, 3, info)
    if kind == "vit":
        from dinov2_repro.models import build_vit

        size = _round_to_patch(img_size, 14)
        model = build_vit(arg, img_size=size, patch_size=14).eval()
        info.update(seed=seed, random_init=True)
        return EmbedderSpec(BackboneEmbedder(model=model, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                             dim=model.embed_dim), size, 3, info)
    if kind == "export":
        try:
            from dinov2_repro.backbone_file import load_backbone
        except ImportError as err:
            raise ImportError(f"embed.embedder={name!r} needs dinov2_repro.backbone_file.load_backbone: {err}") from err
        path = Path(arg)
        if not path.is_file():
            raise FileNotFoundError(f"embed.embedder: export file {path} does not exist")
        model, metadata = load_backbone(str(path))
        patch = int(metadata.get("patch_size", 14))
        in_chans = int(metadata.get("in_chans", 3))
        mean = tuple(float(v) for v in metadata.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(float(v) for v in metadata.get("std", (0.229, 0.224, 0.225)))
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"{path}: metadata mean/std have {len(mean)}/{len(std)} entries for in_chans={in_chans}")
        dim = int(metadata.get("embed_dim", getattr(model, "embed_dim", 0)))
        info.update(export=str(path), arch=metadata.get("arch"))
        return EmbedderSpec(BackboneEmbedder(model=model.eval(), mean=mean, std=std, dim=dim),
                            _round_to_patch(img_size, patch), in_chans, info)
    raise ValueError(f"embed.embedder: unknown embedder kind {kind!r} in {name!r}")


DIHEDRAL = [(k, flip) for flip in (False, True) for k in range(4)]


@torch.no_grad()
def embed_batch(module: nn.Module, images: Tensor, *, dihedral_pool: bool) -> Tensor:
    """Descriptors of a batch; with ``dihedral_pool`` the mean over the 8 flips/rotations, which
    makes any embedder exactly invariant to them."""
    if not dihedral_pool:
        return module(images).float()
    total = None
    for k, flip in DIHEDRAL:
        view = torch.rot90(images.flip(-1) if flip else images, k, dims=(-2, -1))
        out = module(view).float()
        total = out if total is None else total + out
    return F.normalize(total, dim=-1)
