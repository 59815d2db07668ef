"""The one model registry: architecture name -> keyword-only factory."""
from __future__ import annotations

from typing import Callable

from .vision_transformer import DinoVisionTransformer

_ARCHS: dict[str, dict] = {
    "vit_micro": dict(embed_dim=96, depth=4, num_heads=3),  # fast unit tests of the training loop
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),  # the CPU demo and the learning test
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24),
}


def available_archs() -> list[str]:
    return list(_ARCHS)


def build_vit(arch: str, **kwargs) -> DinoVisionTransformer:
    """Build ``arch`` with any DinoVisionTransformer keyword overriding the architecture's."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(_ARCHS)}")
    return DinoVisionTransformer(**{**_ARCHS[arch], **kwargs})


def _factory(arch: str) -> Callable[..., DinoVisionTransformer]:
    def factory(**kwargs) -> DinoVisionTransformer:
        return build_vit(arch, **kwargs)

    factory.__name__ = arch
    factory.__doc__ = f"{arch}: {_ARCHS[arch]}; keyword arguments as DinoVisionTransformer."
    return factory


vit_micro = _factory("vit_micro")
vit_tiny = _factory("vit_tiny")
vit_small = _factory("vit_small")
vit_base = _factory("vit_base")
vit_large = _factory("vit_large")
vit_giant2 = _factory("vit_giant2")
