"""A backbone file as a ready-to-use feature extractor: :class:`Backbone`, returned by
``dinov2_repro.load_backbone(path)``.

It wraps the bare model of :func:`dinov2_repro.backbone_file.load_backbone` (which returns
``(nn.Module, header)`` for code that wants the module itself) and does what every caller would
otherwise repeat: pixel normalisation with the file's own mean/std, resizing to a multiple of the
patch size, batching, ``eval()`` and ``no_grad``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class Backbone:
    """A frozen backbone and its header.

    Images may be given as a float tensor ``(N, C, H, W)`` in [0, 1], a uint8 numpy array
    ``(N, H, W, C)`` or ``(H, W, C)``, a float numpy array ``(N, C, H, W)`` in [0, 1], or a PIL
    image or list of PIL images (converted to RGB). They are normalised with the file's mean/std;
    a side that is not a multiple of the patch size is resized to the nearest multiple (or to
    ``size`` when given).
    """

    model: Any  # torch.nn.Module (kept Any so that this module imports without torch)
    meta: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, device: str = "cpu") -> Backbone:
        """Read a backbone file (project export or released DINOv2/DINOv3 file)."""
        from .backbone_file import load_backbone as load_module

        model, meta = load_module(path, device=device)
        return cls(model=model.eval(), meta=dict(meta), device=str(device))

    @property
    def embed_dim(self) -> int:
        """Width of the features (CLS and patch tokens)."""
        return int(self.meta["embed_dim"])

    @property
    def patch_size(self) -> int:
        """Pixels per patch side."""
        return int(self.meta["patch_size"])

    @property
    def in_chans(self) -> int:
        """Bands the model takes."""
        return int(self.meta.get("in_chans", len(self.meta.get("mean", (0, 0, 0)))))

    def embed(self, images: Any, *, size: int | None = None, batch_size: int = 64) -> torch.Tensor:
        """CLS features, one row per image: a float32 CPU tensor ``(N, embed_dim)``."""
        return self._run(images, size=size, batch_size=batch_size, patches=False)

    def patch_features(self, images: Any, *, size: int | None = None, batch_size: int = 64) -> torch.Tensor:
        """Patch-token features on the patch grid: a float32 CPU tensor ``(N, H/p, W/p, embed_dim)``."""
        return self._run(images, size=size, batch_size=batch_size, patches=True)

    def to_tensor(self, images: Any, *, size: int | None = None) -> torch.Tensor:
        """The normalised ``(N, C, H, W)`` float tensor the model is fed."""
        import torch
        import torch.nn.functional as F

        x = _as_float_tensor(images)
        if x.shape[1] != self.in_chans:
            raise ValueError(f"images have {x.shape[1]} band(s) but the backbone takes {self.in_chans}")
        p = self.patch_size
        height, width = (size, size) if size else (_nearest_multiple(x.shape[-2], p), _nearest_multiple(x.shape[-1], p))
        if size and size % p:
            raise ValueError(f"size={size} is not a multiple of the patch size {p}")
        if (height, width) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
        mean = torch.tensor(self.meta["mean"], dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.meta["std"], dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def _run(self, images: Any, *, size: int | None, batch_size: int, patches: bool) -> torch.Tensor:
        import torch

        x = self.to_tensor(images, size=size)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        out = []
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                features = self.model.forward_features(x[start:start + batch_size].to(self.device))
                if patches:
                    tokens = features["x_norm_patchtokens"].float().cpu()
                    out.append(tokens.reshape(len(tokens), *grid, tokens.shape[-1]))
                else:
                    out.append(features["x_norm_clstoken"].float().cpu())
        return torch.cat(out)


def _nearest_multiple(value: int, step: int) -> int:
    return max(step, int(round(value / step)) * step)


def _as_float_tensor(images: Any) -> torch.Tensor:
    """Any supported image input -> float (N, C, H, W) in [0, 1]."""
    import numpy as np
    import torch

    if _is_pil(images):
        images = [images]
    if isinstance(images, (list, tuple)) and images and _is_pil(images[0]):
        images = np.stack([np.asarray(image.convert("RGB")) for image in images])
    if isinstance(images, np.ndarray):
        array = images[None] if images.ndim == 3 else images
        if array.dtype == np.uint8:
            return torch.from_numpy(array.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
        images = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if isinstance(images, torch.Tensor):
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4:
            raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(images.shape)}")
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    raise ValueError(f"images: expected a tensor, a numpy array or PIL images, got {type(images).__name__}")


def _is_pil(obj: Any) -> bool:
    return type(obj).__module__.startswith("PIL.")


__all__ = ["Backbone"]
