"""ONNX export of a backbone: images in, CLS token and patch tokens out.

Inputs are what the backbone itself takes: float32 images (B, C, H, W), already normalised with
the file's mean/std (recorded in the ONNX metadata), H and W multiples of the patch size. The
batch axis is always dynamic; so are H and W unless a fixed size is asked for: both ViT
families handle any grid (DINOv2 resamples its pos-embed, DINOv3 computes RoPE for the grid).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..models import DinoV3VisionTransformer, DinoVisionTransformer
from .graph import DEFAULT_OPSET, compare_with_torch, export_module, worst_difference

INPUT_NAME = "images"
OUTPUT_NAMES = ("cls_token", "patch_tokens")
# Largest patch grid side the dynamic axes accept (a 14 px patch: 14,336 px); torch.export needs a bound.
MAX_GRID = 1024


class BackboneTokens(nn.Module):
    """images (B, C, H, W) -> (normalised CLS token (B, D), normalised patch tokens (B, H/p * W/p, D))."""

    def __init__(self, backbone: DinoVisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone.forward_features(images)
        return features["x_norm_clstoken"], features["x_norm_patchtokens"]


def parse_image_size(text: str | int | Sequence[int]) -> tuple[int, int]:
    """``224`` or ``224,336`` (height, width) -> (height, width)."""
    if isinstance(text, int):
        return text, text
    if not isinstance(text, str):
        values = [int(v) for v in text]
    else:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--image-size {text}: expected SIZE or HEIGHT,WIDTH in pixels") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"--image-size {text}: expected SIZE or HEIGHT,WIDTH in pixels")
    return values[0], values[1]


def backbone_onnx_metadata(backbone: DinoVisionTransformer, header: Mapping[str, Any], *, dynamic_size: bool) -> dict[str, str]:
    """ONNX metadata_props: what a runtime needs to feed the model and read its outputs."""
    family = "dinov3" if isinstance(backbone, DinoV3VisionTransformer) else "dinov2"
    return {
        "dinov2_repro.kind": "backbone",
        "arch": str(header.get("arch", "custom")),
        "arch_family": family,
        "patch_size": str(backbone.patch_size),
        "embed_dim": str(backbone.embed_dim),
        "in_chans": str(backbone.in_chans),
        "num_register_tokens": str(backbone.num_register_tokens),
        "img_size": str(backbone.img_size),
        "dynamic_image_size": json.dumps(dynamic_size),
        "mean": json.dumps([float(v) for v in header.get("mean", [])]),
        "std": json.dumps([float(v) for v in header.get("std", [])]),
        "inputs": f"{INPUT_NAME}: float32 (batch, {backbone.in_chans}, height, width), normalised with mean/std; "
                  f"height and width multiples of {backbone.patch_size}",
        "outputs": "cls_token: (batch, embed_dim); patch_tokens: (batch, height/patch * width/patch, embed_dim), "
                   "row-major patch order; both after the final LayerNorm",
    }


def export_backbone_onnx(backbone: DinoVisionTransformer, out: str | os.PathLike, *, header: Mapping[str, Any],
                         image_size: tuple[int, int] | None = None, dynamic_size: bool = True,
                         opset: int = DEFAULT_OPSET, check: bool = True) -> dict[str, Any]:
    """Export ``backbone`` (either ViT family) to ``out`` and, with ``check``, compare onnxruntime
    with torch: at the export size, and at another batch size and (``dynamic_size``) another
    image size. Returns the export's description with the max abs differences."""
    if Path(out).suffix.lower() != ".onnx":
        raise ConfigError(f"--out {out}: an ONNX model is written to a .onnx file")
    patch = int(backbone.patch_size)
    height, width = image_size or (int(backbone.img_size), int(backbone.img_size))
    if height % patch or width % patch:
        raise ConfigError(f"--image-size {height},{width}: both sides must be multiples of the patch size {patch}")
    module = BackboneTokens(backbone)
    batch = torch.export.Dim("batch", min=1, max=65536)
    dims: dict[int, Any] = {0: batch}
    if dynamic_size:
        dims[2] = patch * torch.export.Dim("grid_height", min=1, max=MAX_GRID)
        dims[3] = patch * torch.export.Dim("grid_width", min=1, max=MAX_GRID)
    # Batch 2 at export: a batch of 1 would let the tracer treat the axis as a constant.
    example = torch.randn(2, backbone.in_chans, height, width)
    export_module(module, example, out, input_name=INPUT_NAME, output_names=OUTPUT_NAMES, dynamic_dims=dims,
                  metadata=backbone_onnx_metadata(backbone, header, dynamic_size=dynamic_size), opset=opset)
    result: dict[str, Any] = {
        "onnx": str(out), "opset": opset, "input": INPUT_NAME, "outputs": list(OUTPUT_NAMES),
        "export_shape": [2, backbone.in_chans, height, width],
        "dynamic_axes": {"batch": True, "height": dynamic_size, "width": dynamic_size},
    }
    if check:
        shapes = [(2, backbone.in_chans, height, width), (3, backbone.in_chans, height, width)]
        if dynamic_size:  # another size, not square, so that rows and columns cannot be swapped unnoticed
            shapes.append((1, backbone.in_chans, height + patch, width + 2 * patch))
        checks = compare_with_torch(out, module, shapes, output_names=OUTPUT_NAMES)
        result["checks"] = checks
        result["max_abs_diff"] = worst_difference(checks)
    return result
