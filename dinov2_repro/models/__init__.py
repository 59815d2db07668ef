from .registry import available_archs, build_vit, vit_base, vit_giant2, vit_large, vit_micro, vit_small, vit_tiny
from .heads import DINOHead
from .vision_transformer import DinoVisionTransformer

__all__ = ["DINOHead", "DinoVisionTransformer", "available_archs", "build_vit", "vit_base", "vit_giant2", "vit_large", "vit_micro", "vit_small", "vit_tiny"]
