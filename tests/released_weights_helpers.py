"""Test helpers: random timm DINOv2 / DINOv3 models written in the OFFICIAL (reference) layouts.

The writers below invert timm's checkpoint filters (timm.models.vision_transformer for DINOv2,
timm.models.eva for DINOv3), so a file they write is what the released ``.pth`` looks like:
``register_tokens`` / ``storage_tokens``, ``ls*.gamma``, fused ``mlp.w12`` (DINOv2 ViT-g) or
split ``mlp.w1/w2/w3`` (DINOv3 SwiGLU), ``qkv.bias`` + ``qkv.bias_mask``, ``rope_embed.periods``,
``mask_token`` and ``local_cls_norm`` (7B). Used by tests/test_released_weights.py and
benchmarks/released_weights_oracle.py.
"""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

# (timm model name, official file name, our family); names as the publishers ship them.
DINOV2_CASES = {
    "vits14": ("vit_small_patch14_dinov2", "dinov2_vits14_pretrain.pth"),
    "vits14_reg4": ("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg4_pretrain.pth"),
    "vitb14": ("vit_base_patch14_dinov2", "dinov2_vitb14_pretrain.pth"),
    "vitb14_reg4": ("vit_base_patch14_reg4_dinov2", "dinov2_vitb14_reg4_pretrain.pth"),
    "vitl14": ("vit_large_patch14_dinov2", "dinov2_vitl14_pretrain.pth"),
    "vitl14_reg4": ("vit_large_patch14_reg4_dinov2", "dinov2_vitl14_reg4_pretrain.pth"),
    "vitg14": ("vit_giant_patch14_dinov2", "dinov2_vitg14_pretrain.pth"),
    "vitg14_reg4": ("vit_giant_patch14_reg4_dinov2", "dinov2_vitg14_reg4_pretrain.pth"),
}
DINOV3_CASES = {
    "vits16": ("vit_small_patch16_dinov3", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
    "vits16_qkvb": ("vit_small_patch16_dinov3_qkvb", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
    "vits16plus": ("vit_small_plus_patch16_dinov3", "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"),
    "vits16plus_qkvb": ("vit_small_plus_patch16_dinov3_qkvb", "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"),
    "vitb16": ("vit_base_patch16_dinov3", "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
    "vitb16_qkvb": ("vit_base_patch16_dinov3_qkvb", "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
    "vitl16": ("vit_large_patch16_dinov3", "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"),
    "vitl16_sat": ("vit_large_patch16_dinov3_qkvb", "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"),
    "vith16plus": ("vit_huge_plus_patch16_dinov3", "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"),
    "vith16plus_qkvb": ("vit_huge_plus_patch16_dinov3_qkvb", "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"),
    "vit7b16": ("vit_7b_patch16_dinov3", "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"),
    "vit7b16_sat": ("vit_7b_patch16_dinov3", "dinov3_vit7b16_pretrain_sat493m-a6675841.pth"),
}


def create_timm(name: str, **kwargs) -> nn.Module:
    import timm

    if "dinov2" in name:
        kwargs.setdefault("dynamic_img_size", True)  # DINOv2 models are built for 518 px only otherwise
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


def random_timm(name: str, *, seed: int = 0, **kwargs) -> nn.Module:
    """A timm model with random weights (randomize_), built on the meta device first: timm's own
    initialisation of a 300M-parameter model costs tens of seconds on two cores, and is
    overwritten anyway. Non-persistent buffers (RoPE periods) are recomputed."""
    with torch.device("meta"):
        model = create_timm(name, **kwargs)
    model = model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    return randomize_(model, seed).eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights that make every part of the forward matter (timm's init leaves LayerScale at 1e-5,
    so blocks would barely change the tokens and a broken block would go unnoticed)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=generator) * std

    for name, param in model.named_parameters():
        if re.search(r"(gamma(_\d)?|ls\d\.gamma)$", name):
            param.copy_(0.5 + torch.rand(param.shape, generator=generator))
        elif "norm" in name and name.endswith("weight"):
            param.copy_(1.0 + normal(param.shape, 0.1))
        elif name.endswith("bias"):
            param.copy_(normal(param.shape, 0.1))
        elif param.ndim >= 2 and "token" not in name and "pos_embed" not in name:
            param.copy_(normal(param.shape, 1.0 / math.sqrt(param[0].numel())))
        else:
            param.copy_(normal(param.shape, 1.0))
    return model


def dinov2_official_from_timm(state: dict[str, Tensor], *, seed: int = 1) -> dict[str, Tensor]:
    """Inverse of timm's DINOv2 filter: the reference hub layout of ``state``."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    state = dict(state)
    cls, pos = state.pop("cls_token"), state.pop("pos_embed")
    registers = state.pop("reg_token", None)
    dim = cls.shape[-1]
    if registers is not None:
        # timm folds the CLS position into cls_token (no_embed_class); split it again at random.
        cls_pos = torch.randn(1, 1, dim, generator=generator)
        out["cls_token"], out["pos_embed"] = cls - cls_pos, torch.cat([cls_pos, pos], dim=1)
        out["register_tokens"] = registers
    else:
        out["cls_token"], out["pos_embed"] = cls, pos
    out["mask_token"] = torch.randn(1, dim, generator=generator)
    swiglu = state["blocks.0.mlp.fc1.weight"].shape[0] == 2 * state["blocks.0.mlp.fc2.weight"].shape[1]
    for key, value in state.items():
        if swiglu:
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[key] = value
    return out


def dinov3_official_from_timm(state: dict[str, Tensor], *, periods: Tensor, released_zero_bias: bool = True,
                              local_cls_norm: bool = False, seed: int = 1) -> dict[str, Tensor]:
    """Inverse of timm's eva filter for DINOv3. With timm's q/v biases the key third of
    ``qkv.bias`` is random and masked by ``bias_mask`` (as LinearKMaskedBias stores it); without
    them (the non-qkvb names) the file holds an all-zero bias and its mask, as the released
    distilled models do, unless ``released_zero_bias`` is False (ViT-7B: no bias at all)."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    dim = state["cls_token"].shape[-1]
    for key, value in state.items():
        if key.endswith("attn.q_bias"):
            k_bias = torch.randn(value.shape, generator=generator)
            base = key.replace("q_bias", "qkv.")
            out[base + "bias"] = torch.cat([value, k_bias, state[key.replace("q_bias", "v_bias")]])
            out[base + "bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
            continue
        if key.endswith("attn.v_bias"):
            continue
        key = (key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
               .replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2."))
        if "blocks.0.mlp.fc1_g.weight" in state:
            key = key.replace("mlp.fc2.", "mlp.w3.")
        out[key] = value
        if key.endswith("attn.qkv.weight") and key.replace("weight", "bias") not in out and released_zero_bias \
                and key.replace("qkv.weight", "q_bias") not in state:
            out[key.replace("weight", "bias")] = torch.zeros(3 * dim)
            out[key.replace("weight", "bias_mask")] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    out["mask_token"] = torch.randn(1, dim, generator=generator)
    out["rope_embed.periods"] = periods.clone()
    if local_cls_norm:
        out["local_cls_norm.weight"] = 1.0 + 0.1 * torch.randn(dim, generator=generator)
        out["local_cls_norm.bias"] = 0.1 * torch.randn(dim, generator=generator)
    return out


def timm_periods(model: nn.Module) -> Tensor:
    return model.rope.periods.detach().clone().float()


@torch.no_grad()
def compare_with_timm(ours: nn.Module, theirs: nn.Module, image: Tensor, *, indices: list[int]) -> dict[str, float]:
    """Max abs differences of CLS, patch tokens and normed intermediate layers (CLS + patches)."""
    prefix = theirs.num_prefix_tokens
    reference = theirs.forward_features(image)
    features = ours.forward_features(image)
    diffs = {
        "cls": (features["x_norm_clstoken"] - reference[:, 0]).abs().max().item(),
        "patch": (features["x_norm_patchtokens"] - reference[:, prefix:]).abs().max().item(),
    }
    theirs_layers = theirs.forward_intermediates(image, indices=indices, norm=True, output_fmt="NLC",
                                                 return_prefix_tokens=True, intermediates_only=True)
    ours_layers = ours.get_intermediate_layers(image, n=indices, norm=True, return_class_token=True)
    diffs["intermediate"] = max(
        max((p - tp).abs().max().item(), (c - tprefix[:, 0]).abs().max().item())
        for (p, c), (tp, tprefix) in zip(ours_layers, theirs_layers))
    diffs["max"] = max(diffs.values())
    return diffs
