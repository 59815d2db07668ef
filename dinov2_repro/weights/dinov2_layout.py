"""DINOv2 weights: the reference hub layout and timm's, to the project's DinoVisionTransformer.

The reference layout (``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``) is the project's own key
layout (the model follows the reference), so it loads as is: ``cls_token``, ``pos_embed``
(CLS position first; 37 x 37 patches for 518 px), ``register_tokens``, ``mask_token``,
``blocks.<i>.*`` with ``mlp.fc1/fc2`` or ViT-g's fused SwiGLU ``mlp.w12/w3``, ``norm``.
timm's layout goes through ``backbone_file.from_timm_state_dict``.

The hub builds the register models with antialiased bicubic pos-embed resampling and no
offset, the others without antialiasing and with offset 0.1; both are recorded here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from ..models.layers.ffn import swiglu_hidden_dim
from .source import WeightsFileError, block_count, default_num_heads, require

_BLOCK_PARTS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "norm2.weight", "norm2.bias")


def is_dinov2_layout(state: Mapping[str, Tensor]) -> bool:
    return "pos_embed" in state and "cls_token" in state


def is_reference_layout(state: Mapping[str, Tensor]) -> bool:
    """Reference keys rather than timm's (only the reference has a mask token, ``register_tokens``
    and ``mlp.w12``; a file with none of them reads the same either way)."""
    return "mask_token" in state or "register_tokens" in state or "blocks.0.mlp.w12.weight" in state


def _swiglu_ratio(dim: int, hidden: int, path: Path) -> float:
    for ratio in (4.0, hidden * 3 / (2 * dim)):
        if swiglu_hidden_dim(dim, ratio) == hidden:
            return ratio
    raise WeightsFileError(f"{path}: SwiGLU hidden size {hidden} for width {dim} is not one the DINOv2 ViT can build")


def dinov2_model_kwargs(state: Mapping[str, Tensor], path: Path, *, num_heads: int | None = None) -> dict[str, Any]:
    """DinoVisionTransformer keywords read off reference-layout tensors (the file has no header)."""
    require(state, ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"), path, "DINOv2 backbone")
    depth = block_count(state, path)
    require(state, [f"blocks.0.{part}" for part in _BLOCK_PARTS], path, "DINOv2 backbone")
    proj = state["patch_embed.proj.weight"]
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    positions = state["pos_embed"].shape[1] - 1
    side = int(round(positions ** 0.5))
    if side * side != positions:
        raise WeightsFileError(f"{path}: pos_embed holds {positions} patch positions, not a square grid")
    if "blocks.0.mlp.w12.weight" in state:
        hidden = state["blocks.0.mlp.w3.weight"].shape[1]
        ffn, ratio = "swiglu", _swiglu_ratio(dim, hidden, path)
    elif "blocks.0.mlp.fc1.weight" in state:
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        ffn, ratio = "mlp", hidden / dim
    else:
        raise WeightsFileError(f"{path}: blocks.0 has neither mlp.fc1 nor mlp.w12 weights")
    return dict(
        img_size=side * patch, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth,
        num_heads=num_heads or default_num_heads(dim), mlp_ratio=ratio, ffn_layer=ffn,
        qkv_bias="blocks.0.attn.qkv.bias" in state, proj_bias="blocks.0.attn.proj.bias" in state,
        ffn_bias=f"blocks.0.mlp.{'w12' if ffn == 'swiglu' else 'fc1'}.bias" in state,
        init_values=1e-5 if "blocks.0.ls1.gamma" in state else None,
        num_register_tokens=registers,
        # The reference hub's settings for its two model kinds.
        interpolate_antialias=bool(registers), interpolate_offset=0.0 if registers else 0.1,
    )


def dinov2_state_dict(state: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Reference or timm DINOv2 tensors -> the project's keys (fp32)."""
    from ..backbone_file import from_timm_state_dict

    if is_reference_layout(state):
        out = {key: value.float() for key, value in state.items()}
        out.setdefault("mask_token", out["cls_token"].new_zeros(1, out["cls_token"].shape[-1]))
        return out
    try:
        return {key: value.float() for key, value in from_timm_state_dict(state).items()}
    except (KeyError, ValueError) as error:
        raise WeightsFileError(f"{path}: {error}") from None
