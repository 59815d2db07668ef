"""The project's backbone export for DINOv3 models: timm eva keys plus a rebuild header.

The header extends the DINOv2 one (backbone_file.REQUIRED_METADATA) with ``arch_family``
("dinov3"), the RoPE settings (base, the exact periods, augmentations), ``mask_k_bias``,
``ffn_hidden_dim``, ``norm_eps`` and the training ``dataset``. ``local_cls_norm`` (a
pretraining-only norm of ViT-7B) is not exported, as timm's layout has no place for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..models.registry import _V3_ARCHS, build_vit
from ..models.vision_transformer_v3 import DinoV3VisionTransformer
from .dinov3_layout import from_timm, to_timm
from .source import IMAGENET_MEAN, IMAGENET_STD, WeightsFileError

FAMILY = "dinov3"


def infer_v3_arch(model: DinoV3VisionTransformer) -> str:
    """Registry name with the same width, heads and FFN kind; 'custom' when none matches."""
    for name, spec in _V3_ARCHS.items():
        if (spec["embed_dim"], spec["num_heads"], spec.get("ffn_layer", "mlp")) == (
                model.embed_dim, model.num_heads, "swiglu" if model.ffn_layer in ("swiglu", "swiglufused") else "mlp"):
            return name
    return "custom"


def dinov3_metadata(model: DinoV3VisionTransformer, *, arch: str | None = None, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, dataset: str | None = None) -> dict[str, Any]:
    from ..backbone_file import FORMAT_NAME, FORMAT_VERSION

    mean = list(IMAGENET_MEAN if mean is None and model.in_chans == 3 else mean or ())
    std = list(IMAGENET_STD if std is None and model.in_chans == 3 else std or ())
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != model.in_chans:
            raise ValueError(f"{name} has {len(values)} values but the model has in_chans={model.in_chans}; pass {name}=")
    block = model.blocks[0]
    swiglu = model.ffn_layer in ("swiglu", "swiglufused")
    first = block.mlp.w12 if swiglu else block.mlp.fc1
    hidden = block.mlp.w3.in_features if swiglu else block.mlp.fc1.out_features
    rope = model.rope_embed
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "key_layout": "timm_eva",
        "arch_family": FAMILY, "arch": arch or infer_v3_arch(model),
        "patch_size": model.patch_size, "embed_dim": model.embed_dim, "depth": model.depth,
        "num_heads": model.num_heads, "num_register_tokens": model.num_register_tokens,
        "ffn": "swiglu" if swiglu else "mlp", "ffn_hidden_dim": hidden, "mlp_ratio": hidden / model.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None, "mask_k_bias": bool(block.attn.mask_k_bias),
        "proj_bias": block.attn.proj.bias is not None, "ffn_bias": first.bias is not None,
        "layerscale": hasattr(block.ls1, "gamma"), "norm_eps": model.norm_eps,
        "layerscale_init": getattr(model, "init_values", None) if hasattr(block.ls1, "gamma") else None,
        "rope_base": rope.base, "rope_periods": [float(p) for p in rope.periods.detach().float().cpu()],
        "rope_normalize_coords": "separate", "rope_shift": rope.shift, "rope_jitter": rope.jitter,
        "rope_rescale": rope.rescale,
        "img_size": model.img_size, "in_chans": model.in_chans,
        "interpolate_offset": model.interpolate_offset, "interpolate_antialias": model.interpolate_antialias,
        "mean": mean, "std": std, "dataset": dataset or "unknown",
    }


def model_kwargs(meta: Mapping[str, Any]) -> dict[str, Any]:
    """DinoV3VisionTransformer keywords from a DINOv3 export header."""
    from ..backbone_file import layerscale_init_of  # local: backbone_file dispatches to this module

    return dict(
        img_size=int(meta["img_size"]), patch_size=int(meta["patch_size"]), in_chans=int(meta["in_chans"]),
        embed_dim=int(meta["embed_dim"]), depth=int(meta["depth"]), num_heads=int(meta["num_heads"]),
        ffn_layer=str(meta["ffn"]), ffn_hidden_dim=int(meta["ffn_hidden_dim"]),
        mlp_ratio=float(meta.get("mlp_ratio", 4.0)), qkv_bias=bool(meta["qkv_bias"]),
        mask_k_bias=bool(meta.get("mask_k_bias", True)), proj_bias=bool(meta.get("proj_bias", True)),
        ffn_bias=bool(meta.get("ffn_bias", True)), init_values=layerscale_init_of(meta),
        num_register_tokens=int(meta["num_register_tokens"]), norm_eps=float(meta.get("norm_eps", 1e-5)),
        rope_base=float(meta.get("rope_base", 100.0)), rope_shift=meta.get("rope_shift"),
        rope_jitter=meta.get("rope_jitter"), rope_rescale=meta.get("rope_rescale", 2.0),
    )


def build_from_metadata(meta: Mapping[str, Any]) -> DinoV3VisionTransformer:
    """A (randomly initialised) DINOv3 ViT of the header's architecture."""
    kwargs = model_kwargs(meta)
    arch = meta.get("arch")
    return build_vit(arch, **kwargs) if arch in _V3_ARCHS else DinoV3VisionTransformer(**kwargs)


def export_tensors(model: DinoV3VisionTransformer) -> dict[str, Tensor]:
    return to_timm(model.state_dict())


def load_export(tensors: Mapping[str, Tensor], meta: Mapping[str, Any], path: Path,
                device: str | torch.device = "cpu") -> DinoV3VisionTransformer:
    """Rebuild a DINOv3 export (header + timm eva tensors); periods come from the header."""
    model = build_from_metadata(meta)
    state = from_timm(tensors, path)
    periods = meta.get("rope_periods")
    if periods is not None:
        state["rope_embed.periods"] = torch.tensor(periods, dtype=torch.float32)
    else:
        state["rope_embed.periods"] = model.rope_embed.periods.clone()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsFileError(f"{path}: weights do not match the DINOv3 header: {str(error).splitlines()[0]}") from None
    return model.to(device).eval()
