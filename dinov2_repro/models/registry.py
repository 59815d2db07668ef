"""The one model registry: architecture name -> keyword-only factory.

DINOv2 ViTs (``vit_*``, patch 14 by default, learned pos-embed) and DINOv3 ViTs (``vit*16*``,
patch 16, RoPE, 4 storage tokens; shapes as the released DINOv3 models and timm's eva.py).
"""
from __future__ import annotations

from typing import Callable

from .vision_transformer import DinoVisionTransformer
from .vision_transformer_v3 import DinoV3VisionTransformer

_ARCHS: dict[str, dict] = {
    "vit_micro": dict(embed_dim=96, depth=4, num_heads=3),  # fast unit tests of the training loop
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),  # the CPU demo and the learning test
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24),
}
# DINOv3: every released model has 4 storage tokens, patch 16, LayerScale and a (k-masked)
# qkv bias except ViT-7B; S+/H+/7B use SwiGLU (hidden = 2/3 of dim * ratio, multiple of 8).
_V3 = dict(patch_size=16, num_register_tokens=4)
_V3_ARCHS: dict[str, dict] = {
    "vitt16": dict(embed_dim=128, depth=4, num_heads=2, **_V3),  # CPU tests (head dim 64, as released)
    "vits16": dict(embed_dim=384, depth=12, num_heads=6, **_V3),
    "vits16plus": dict(embed_dim=384, depth=12, num_heads=6, ffn_layer="swiglu", mlp_ratio=6.0, **_V3),
    "vitb16": dict(embed_dim=768, depth=12, num_heads=12, **_V3),
    "vitl16": dict(embed_dim=1024, depth=24, num_heads=16, **_V3),
    "vith16plus": dict(embed_dim=1280, depth=32, num_heads=20, ffn_layer="swiglu", mlp_ratio=6.0, **_V3),
    "vit7b16": dict(embed_dim=4096, depth=40, num_heads=32, ffn_layer="swiglu", mlp_ratio=3.0, qkv_bias=False,
                    local_cls_norm=True, **_V3),
}


def available_archs() -> list[str]:
    return [*_ARCHS, *_V3_ARCHS]


def is_dinov3_arch(arch: str) -> bool:
    return arch in _V3_ARCHS


def arch_spec(arch: str) -> dict:
    """The registered keyword arguments of ``arch`` (a copy)."""
    if arch in _ARCHS:
        return dict(_ARCHS[arch])
    if arch in _V3_ARCHS:
        return dict(_V3_ARCHS[arch])
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(available_archs())}")


def build_vit(arch: str, **kwargs) -> DinoVisionTransformer:
    """Build ``arch`` with any keyword of its class overriding the architecture's (DINOv3 archs
    build a DinoV3VisionTransformer, a subclass)."""
    spec = arch_spec(arch)
    if arch in _V3_ARCHS:
        return DinoV3VisionTransformer(**{**spec, **kwargs})
    return DinoVisionTransformer(**{**spec, **kwargs})


def _factory(arch: str) -> Callable[..., DinoVisionTransformer]:
    def factory(**kwargs) -> DinoVisionTransformer:
        return build_vit(arch, **kwargs)

    factory.__name__ = arch
    factory.__doc__ = f"{arch}: {arch_spec(arch)}; keyword arguments as its class."
    return factory


vit_micro = _factory("vit_micro")
vit_tiny = _factory("vit_tiny")
vit_small = _factory("vit_small")
vit_base = _factory("vit_base")
vit_large = _factory("vit_large")
vit_giant2 = _factory("vit_giant2")
