from .attention import Attention, packed_attention, resolve_backend
from .block import Block, LayerScale
from .ffn import Mlp, SwiGLU, build_ffn
from .patch_embed import PatchEmbed

__all__ = ["Attention", "Block", "LayerScale", "Mlp", "PatchEmbed", "SwiGLU", "build_ffn", "packed_attention", "resolve_backend"]
