from .registry import arch_spec, available_archs, build_vit, is_dinov3_arch, vit_base, vit_giant2, vit_large, vit_micro, vit_small, vit_tiny
from .heads import DINOHead
from .vision_transformer import DinoVisionTransformer
from .vision_transformer_v3 import DinoV3VisionTransformer

__all__ = ["DINOHead", "DinoV3VisionTransformer", "DinoVisionTransformer", "arch_spec", "available_archs", "build_vit",
           "is_dinov3_arch", "vit_base", "vit_giant2", "vit_large", "vit_micro", "vit_small", "vit_tiny"]
