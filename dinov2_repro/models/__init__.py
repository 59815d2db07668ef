from .registry import available_archs, build_vit, vit_base, vit_giant2, vit_large, vit_small, vit_tiny
from .vision_transformer import DinoVisionTransformer

__all__ = ["DinoVisionTransformer", "available_archs", "build_vit", "vit_base", "vit_giant2", "vit_large", "vit_small", "vit_tiny"]
