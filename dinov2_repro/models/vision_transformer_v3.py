"""The DINOv3 Vision Transformer on the project's packed blocks.

Differences from the DINOv2 ViT (vision_transformer.py), all from the DINOv3 reference:
- no learned pos-embed: 2-D RoPE on the patch tokens' queries and keys (layers/rope.py), with
  the coordinate shift / jitter / rescale augmentations in training (rescale 2 by default);
- ``num_register_tokens`` storage tokens (4 in every released model) after the CLS token;
- patch 16, LayerNorm eps 1e-5, the key third of the qkv bias masked to zero;
- an optional ``local_cls_norm`` (ViT-7B pretraining): in training, the CLS and storage tokens
  of the second crop tensor of a list (the local crops) are normalised by it instead of ``norm``.

Masking (``mask_token``), sequence packing, efficient stochastic depth, activation
checkpointing, ``forward_features`` and ``get_intermediate_layers`` are the DINOv2 ViT's: this
class inherits them and only changes how tokens are prepared and what the blocks are given.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .layers import Block, PatchEmbed
from .layers.rope import RopePositionEmbedding, RopeTable
from .vision_transformer import DinoVisionTransformer, FeatureDict


class DinoV3VisionTransformer(DinoVisionTransformer):
    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        ffn_hidden_dim: int | None = None,
        qkv_bias: bool = True,
        mask_k_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str = "mlp",
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = 1e-5,
        num_register_tokens: int = 4,
        local_cls_norm: bool = False,
        norm_eps: float = 1e-5,
        rope_base: float = 100.0,
        rope_shift: float | None = None,
        rope_jitter: float | None = None,
        rope_rescale: float | None = 2.0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.0,
        stochastic_depth: str = "efficient",
        attn_backend: str = "auto",
    ) -> None:
        """Keywords as DinoVisionTransformer's plus the DINOv3 ones above. ``img_size`` is only the
        default input size (RoPE works at any grid); ``interpolate_*`` are accepted so that one
        ``student:`` config section builds either family, and have no effect (no pos-embed)."""
        # nn.Module.__init__ on purpose: the parent's __init__ would create a learned pos-embed.
        nn.Module.__init__(self)
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.img_size = img_size
        self.in_chans = in_chans
        self.depth = depth
        self.num_heads = num_heads
        self.ffn_layer = ffn_layer
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.norm_eps = norm_eps
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.rope_embed = RopePositionEmbedding(head_dim=embed_dim // num_heads, base=rope_base, shift=rope_shift,
                                                jitter=rope_jitter, rescale=rope_rescale)
        rates = [drop_path_rate] * depth if drop_path_uniform else [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                ffn_bias=ffn_bias, ffn_layer=ffn_layer, init_values=init_values, drop_path=rate,
                stochastic_depth=stochastic_depth, attn_backend=attn_backend, norm_eps=norm_eps,
                mask_k_bias=mask_k_bias, ffn_hidden_dim=ffn_hidden_dim,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.local_cls_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if local_cls_norm else None
        self.init_weights()

    @property
    def rope_settings(self) -> dict:
        rope = self.rope_embed
        return {"base": rope.base, "shift": rope.shift, "jitter": rope.jitter, "rescale": rope.rescale,
                "normalize_coords": "separate"}

    def init_weights(self) -> None:
        # The reference's init: N(0, 0.02) class and storage tokens, zero mask token, truncated
        # normal linear weights; the RoPE periods are recomputed (a meta-device model has none).
        nn.init.normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        self.rope_embed.reset_periods()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def interpolate_pos_encoding(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        raise AttributeError("the DINOv3 ViT has no learned pos-embed (it uses RoPE); nothing to interpolate")

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """(B, C, H, W) [+ (B, N) bool mask] -> (B, 1 + R + N, D): CLS, storage tokens, patches."""
        batch = x.shape[0]
        tokens = self.patch_embed(x)
        if masks is not None:
            masks = masks.reshape(batch, -1)
            if masks.shape[1] != tokens.shape[1]:
                raise ValueError(f"mask has {masks.shape[1]} tokens per image, the input has {tokens.shape[1]} patches")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(batch, -1, -1))
        return torch.cat([p.to(tokens.dtype) for p in prefix] + [tokens], dim=1)

    def position_tables(self, images: Sequence[Tensor]) -> list[RopeTable]:
        """One RoPE table per crop tensor: in training each crop size draws its own augmentation."""
        return [self.rope_embed(t.shape[-2] // self.patch_size, t.shape[-1] // self.patch_size) for t in images]

    def forward_features(self, x: Tensor | Sequence[Tensor], masks=None) -> FeatureDict | list[FeatureDict]:
        out = super().forward_features(x, masks)
        if self.local_cls_norm is not None and self.training and isinstance(out, list) and len(out) > 1:
            # Reference: in training the second crop tensor (the local crops) gets its own
            # CLS/storage norm; its patch tokens keep the shared norm.
            prenorm, r = out[1]["x_prenorm"], self.num_register_tokens
            out[1]["x_norm_clstoken"] = self.local_cls_norm(prenorm[:, 0])
            out[1]["x_norm_regtokens"] = self.local_cls_norm(prenorm[:, 1: r + 1])
        return out
