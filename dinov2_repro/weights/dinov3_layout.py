"""DINOv3 weights: the reference layout and timm's (eva.py), to and from DinoV3VisionTransformer.

Reference layout (``dinov3_vit*16_pretrain_<dataset>-<hash>.pth``) -> ours:
- ``storage_tokens`` -> ``register_tokens``; ``rope_embed.periods`` is kept (the files carry
  periods rounded to bf16, and the reference model computes with those);
- ``attn.qkv.bias`` times ``attn.qkv.bias_mask`` (the key third masked to zero) -> ``qkv.bias``;
- separate SwiGLU ``mlp.w1``/``mlp.w2``/``mlp.w3`` -> our fused ``mlp.w12`` (gate first) / ``w3``;
- ``local_cls_norm`` (ViT-7B) is kept.

timm layout (``vit_*_patch16_dinov3[_qkvb]``) <-> ours: ``reg_token``, ``gamma_1/2`` for the
LayerScales, ``q_bias``/``v_bias`` (no key bias), SwiGLU ``fc1_g``/``fc1_x``/``fc2``; timm has
no mask token, no local_cls_norm and no periods (recomputed in fp32 from base 100).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .source import WeightsFileError, block_count, default_num_heads, require



def is_reference_layout(state: Mapping[str, Tensor]) -> bool:
    return "storage_tokens" in state or "rope_embed.periods" in state


def is_timm_layout(state: Mapping[str, Tensor]) -> bool:
    return "pos_embed" not in state and ("reg_token" in state or "blocks.0.gamma_1" in state
                                         or "blocks.0.attn.q_bias" in state)


def _rename_common(key: str) -> str:
    return key.replace("storage_tokens", "register_tokens")


def from_reference(state: Mapping[str, Tensor], path: Path) -> tuple[dict[str, Tensor], bool]:
    """(our state dict, mask_k_bias) from reference-layout tensors."""
    if any(key.startswith("cls_norm.") for key in state):
        raise WeightsFileError(f"{path}: separate CLS/patch norms (cls_norm.*) are not supported by this importer")
    out: dict[str, Tensor] = {}
    k_bias_zero = True
    for key, value in state.items():
        if key.endswith(".bias_mask"):
            continue
        value = value.float()
        if key.endswith("attn.qkv.bias"):
            mask = state.get(key + "_mask")
            if mask is not None:
                value = value * mask.float().nan_to_num(0.0)
            third = value.shape[0] // 3
            if not value.is_meta:
                k_bias_zero = k_bias_zero and bool((value[third: 2 * third] == 0).all())
        match = re.match(r"(blocks\.\d+\.mlp\.)w([12])\.(weight|bias)$", key)
        if match:
            prefix, which, kind = match.groups()
            if which == "1":
                out[f"{prefix}w12.{kind}"] = torch.cat([value, state[f"{prefix}w2.{kind}"].float()], dim=0)
            continue
        out[_rename_common(key)] = value
    out.setdefault("mask_token", out["cls_token"].new_zeros(1, out["cls_token"].shape[-1]))
    return out, k_bias_zero


def from_timm(state: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Our state dict from timm eva (DINOv3) tensors; no periods (the model computes them)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        value = value.float()
        if key.startswith(("head.", "fc_norm.", "norm_pre.")):
            raise WeightsFileError(f"{path}: timm key {key!r} has no place in the backbone (a classifier head?)")
        if key.endswith("attn.q_bias"):
            v_bias = state[key.replace("q_bias", "v_bias")].float()
            out[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias])
            continue
        if key.endswith("attn.v_bias"):
            continue
        match = re.match(r"(blocks\.\d+\.mlp\.)fc1_g\.(weight|bias)$", key)
        if match:
            prefix, kind = match.groups()
            out[f"{prefix}w12.{kind}"] = torch.cat([value, state[f"{prefix}fc1_x.{kind}"].float()], dim=0)
            continue
        if re.match(r"blocks\.\d+\.mlp\.fc1_x\.", key):
            continue
        if ".mlp.fc2." in key and "blocks.0.mlp.fc1_g.weight" in state:
            key = key.replace(".mlp.fc2.", ".mlp.w3.")
        key = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[key.replace("reg_token", "register_tokens")] = value
    out.setdefault("mask_token", out["cls_token"].new_zeros(1, out["cls_token"].shape[-1]))
    return out


def to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our DINOv3 state dict -> timm eva keys (timm loads it strictly into vit_*_patch16_dinov3[_qkvb])."""
    out: dict[str, Tensor] = {}
    swiglu = "blocks.0.mlp.w12.weight" in state
    for key, value in state.items():
        if key in ("mask_token", "rope_embed.periods") or key.startswith("local_cls_norm."):
            continue  # pretraining-only or recomputed by timm
        if key.endswith("attn.qkv.bias"):
            third = value.shape[0] // 3
            out[key.replace("qkv.bias", "q_bias")] = value[:third]
            out[key.replace("qkv.bias", "v_bias")] = value[2 * third:]
            continue
        match = re.match(r"(blocks\.\d+\.mlp\.)w12\.(weight|bias)$", key)
        if match:
            prefix, kind = match.groups()
            gate, val = value.chunk(2, dim=0)
            out[f"{prefix}fc1_g.{kind}"], out[f"{prefix}fc1_x.{kind}"] = gate, val
            continue
        if swiglu:
            key = key.replace(".mlp.w3.", ".mlp.fc2.")
        key = key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        out[key.replace("register_tokens", "reg_token")] = value
    return out


def dinov3_model_kwargs(state: Mapping[str, Tensor], path: Path, *, num_heads: int | None = None,
                        mask_k_bias: bool = True) -> dict[str, Any]:
    """DinoV3VisionTransformer keywords read off our-layout tensors."""
    require(state, ("cls_token", "patch_embed.proj.weight", "norm.weight", "blocks.0.attn.qkv.weight"), path,
            "DINOv3 backbone")
    depth = block_count(state, path)
    proj = state["patch_embed.proj.weight"]
    dim = proj.shape[0]
    if "blocks.0.mlp.w12.weight" in state:
        ffn, hidden = "swiglu", state["blocks.0.mlp.w3.weight"].shape[1]
    elif "blocks.0.mlp.fc1.weight" in state:
        ffn, hidden = "mlp", state["blocks.0.mlp.fc1.weight"].shape[0]
    else:
        raise WeightsFileError(f"{path}: blocks.0 has no feed-forward weights (mlp.fc1, mlp.w1/w2/w3 or fc1_g)")
    heads = num_heads or default_num_heads(dim)
    if "rope_embed.periods" in state and state["rope_embed.periods"].numel() * 4 != dim // heads:
        raise WeightsFileError(f"{path}: rope_embed.periods has {state['rope_embed.periods'].numel()} entries, "
                               f"which does not fit {heads} heads of width {dim // heads}; pass num_heads")
    qkv_bias = "blocks.0.attn.qkv.bias" in state
    return dict(
        patch_size=proj.shape[-1], in_chans=proj.shape[1], embed_dim=dim, depth=depth, num_heads=heads,
        ffn_layer=ffn, ffn_hidden_dim=hidden, mlp_ratio=hidden / dim, qkv_bias=qkv_bias,
        mask_k_bias=mask_k_bias and qkv_bias, proj_bias="blocks.0.attn.proj.bias" in state,
        ffn_bias=f"blocks.0.mlp.{'w12' if ffn == 'swiglu' else 'fc1'}.bias" in state,
        init_values=1e-5 if "blocks.0.ls1.gamma" in state else None,
        num_register_tokens=state["register_tokens"].shape[1] if "register_tokens" in state else 0,
        local_cls_norm="local_cls_norm.weight" in state,
    )


def check_keys(state: Mapping[str, Tensor], expected: set[str], path: Path) -> None:
    """One line naming what does not fit (before load_state_dict's long message)."""
    unexpected = sorted(set(state) - expected)
    missing = sorted(expected - set(state) - {"rope_embed.periods", "mask_token"})
    if unexpected or missing:
        raise WeightsFileError(f"{path}: tensors do not fit the detected DINOv3 architecture: "
                               f"unexpected {unexpected[:5]}, missing {missing[:5]}")
