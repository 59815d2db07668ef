"""Released DINOv2 / DINOv3 weights from a local file -> (our model, export header).

Nothing is downloaded: the user brings the file. The family and shape come from the tensors;
the training set (hence the normalisation) from the file name (``..._sat493m-<hash>.pth``)
unless given. Formats: the reference ``.pth`` files of both families and timm ``.safetensors``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..models.layers.rope import RopePositionEmbedding
from ..models.vision_transformer import DinoVisionTransformer
from ..models.vision_transformer_v3 import DinoV3VisionTransformer
from . import dinov2_layout, dinov3_layout
from .dinov3_export import dinov3_metadata, infer_v3_arch
from .source import WeightsFileError, dataset_from_name, normalisation_for, read_tensor_file

logger = logging.getLogger("dinov2_repro")


def detect_family(state: Mapping[str, Tensor], path: Path) -> tuple[str, str]:
    """(family, layout): ("dinov2" | "dinov3", "reference" | "timm")."""
    if dinov3_layout.is_reference_layout(state):
        return "dinov3", "reference"
    if dinov3_layout.is_timm_layout(state):
        return "dinov3", "timm"
    if dinov2_layout.is_dinov2_layout(state):
        return "dinov2", "reference" if dinov2_layout.is_reference_layout(state) else "timm"
    raise WeightsFileError(f"{path}: not a DINOv2 or DINOv3 backbone (no pos_embed, storage_tokens or reg_token; "
                           f"first keys {sorted(state)[:5]})")


def convert_released(state: Mapping[str, Tensor], path: Path, *, family: str, layout: str,
                     num_heads: int | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(model keywords, our state dict) of a released state dict; works on meta tensors too
    (the shape checks of ViT-g and ViT-7B run without their memory)."""
    try:
        if family == "dinov2":
            ours = dinov2_layout.dinov2_state_dict(state, path)
            return dinov2_layout.dinov2_model_kwargs(ours, path, num_heads=num_heads), ours
        if layout == "reference":
            ours, k_bias_zero = dinov3_layout.from_reference(state, path)
        else:
            ours, k_bias_zero = dinov3_layout.from_timm(state, path), True
        kwargs = dinov3_layout.dinov3_model_kwargs(ours, path, num_heads=num_heads, mask_k_bias=k_bias_zero)
        if "rope_embed.periods" not in ours:  # timm files: the fp32 periods timm computes
            head_dim = kwargs["embed_dim"] // kwargs["num_heads"]
            ours["rope_embed.periods"] = RopePositionEmbedding(head_dim=head_dim).periods
        return kwargs, ours
    except (KeyError, IndexError) as error:
        raise WeightsFileError(f"{path}: incomplete {family} state dict: missing {error}") from None


def _load_strict(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    expected = set(model.state_dict())
    unexpected, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if unexpected or missing:
        raise WeightsFileError(f"{path}: tensors do not fit the detected architecture: unexpected {unexpected[:5]}, "
                               f"missing {missing[:5]}")
    try:
        # assign: the model (built on the meta device) takes the converted tensors as they are,
        # so a 7B file needs its own size in memory once, not twice.
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise WeightsFileError(f"{path}: tensor shapes do not fit: {(lines or [str(error)])[0]}") from None


def read_released(
    path: str | os.PathLike,
    *,
    dataset: str | None = None,
    num_heads: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    tensors: Mapping[str, Tensor] | None = None,
) -> tuple[DinoVisionTransformer, dict[str, Any]]:
    """Build and load the model a released file holds; returns (model in eval mode, header).

    ``dataset`` (lvd142m | lvd1689m | sat493m) overrides the one in the file name and picks the
    normalisation; ``mean``/``std`` override that; ``num_heads`` overrides the head count
    inferred from the width. ``tensors``: already-read contents of ``path``.
    """
    path = Path(path)
    state = dict(tensors) if tensors is not None else read_tensor_file(path)[0]
    family, layout = detect_family(state, path)
    dataset = dataset or dataset_from_name(path)
    if dataset is None:
        dataset = "lvd142m" if family == "dinov2" else None
        if family == "dinov3":
            logger.warning("%s: the file name names no training set (lvd1689m or sat493m); using ImageNet "
                           "normalisation. Pass the dataset explicitly for the satellite weights.", path)
    norm_mean, norm_std = normalisation_for(dataset) if dataset else normalisation_for("lvd1689m")
    mean, std = list(mean or norm_mean), list(std or norm_std)
    kwargs, ours = convert_released(state, path, family=family, layout=layout, num_heads=num_heads)
    with torch.device("meta"):
        model = (DinoV3VisionTransformer if family == "dinov3" else DinoVisionTransformer)(**kwargs)
    _load_strict(model, ours, path)
    model = model.to(device).eval()
    meta = _header(model, family=family, dataset=dataset, mean=mean, std=std)
    meta.update(source_file=path.name, source_layout=layout)
    return model, meta


def _header(model: DinoVisionTransformer, *, family: str, dataset: str | None, mean: list, std: list) -> dict[str, Any]:
    from ..backbone_file import backbone_metadata, infer_arch

    if isinstance(model, DinoV3VisionTransformer):
        return dinov3_metadata(model, arch=infer_v3_arch(model), mean=mean, std=std, dataset=dataset)
    meta = backbone_metadata(model, arch=infer_arch(model), mean=mean, std=std)
    meta.update(arch_family=family, dataset=dataset or "unknown")
    return meta
