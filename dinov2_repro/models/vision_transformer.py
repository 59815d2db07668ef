"""The DINOv2 Vision Transformer: one packed forward for a tensor or a list of crops."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, PatchEmbed
from .layers.attention import Groups

FeatureDict = dict[str, Tensor]
CHECKPOINTING_MODES = ("none", "blocks", "every_k")


def resample_pos_embed(pos: Tensor, grid: tuple[int, int], *, antialias: bool = False, offset: float = 0.1) -> Tensor:
    """Bicubically resample a (1, 1 + s*s, D) pos-embed (CLS first) to a ``grid`` of patches."""
    grid_h, grid_w = grid
    num_patches = pos.shape[1] - 1
    side = int(math.sqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"pos_embed holds {num_patches} patch positions, not a square grid")
    if (grid_h, grid_w) == (side, side):
        return pos
    patch_pos = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if offset:
        # The original models scale by (grid + offset) / side to avoid floating-point rounding of the output size.
        scale = ((grid_h + offset) / side, (grid_w + offset) / side)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", antialias=antialias)
    if patch_pos.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"pos-embed interpolation gave {tuple(patch_pos.shape[-2:])}, expected {(grid_h, grid_w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    return torch.cat([pos[:, :1], patch_pos], dim=1)


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str = "mlp",
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = 1e-5,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        stochastic_depth: str = "efficient",
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
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
        self.init_values = init_values  # LayerScale init: exports record it so a random init can be rebuilt as trained
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        rates = [drop_path_rate] * depth if drop_path_uniform else [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                ffn_bias=ffn_bias, ffn_layer=ffn_layer, init_values=init_values, drop_path=rate,
                stochastic_depth=stochastic_depth, attn_backend=attn_backend,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_attention_backend(self, backend: str) -> None:
        for block in self.blocks:
            block.attn.backend = backend

    def set_stochastic_depth(self, mode: str) -> None:
        for block in self.blocks:
            block.stochastic_depth = mode

    def set_activation_checkpointing(self, mode: str, *, every: int = 1) -> None:
        """Recompute block activations in backward instead of keeping them: ``none``; ``blocks``
        (every block); ``every_k`` (blocks 0, k, 2k, ...: about 1/k of the saving for 1/k of the
        recompute cost)."""
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"activation checkpointing mode {mode!r} unknown; choose one of {CHECKPOINTING_MODES}")
        if mode == "every_k" and every < 1:
            raise ValueError(f"activation checkpointing every_k needs k >= 1, got {every}")
        step = {"none": 0, "blocks": 1, "every_k": every}[mode]
        for index, block in enumerate(self.blocks):
            block.checkpoint_activations = bool(step) and index % step == 0

    @property
    def checkpointed_blocks(self) -> frozenset[int]:
        return frozenset(i for i, block in enumerate(self.blocks) if block.checkpoint_activations)

    # ---- tokens ----------------------------------------------------------------------
    def interpolate_pos_encoding(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        """Pos-embed (1, 1 + h*w, D) for an input of ``height`` x ``width`` pixels (bicubic)."""
        grid = (height // self.patch_size, width // self.patch_size)
        return resample_pos_embed(self.pos_embed.float(), grid, antialias=self.interpolate_antialias,
                                  offset=self.interpolate_offset).to(dtype)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """(B, C, H, W) [+ (B, N) bool mask] -> (B, 1 + R + N, D) tokens."""
        batch, _, height, width = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            masks = masks.reshape(batch, -1)
            if masks.shape[1] != tokens.shape[1]:
                raise ValueError(f"mask has {masks.shape[1]} tokens per image, the input has {tokens.shape[1]} patches")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(height, width, tokens.dtype)
        if self.register_tokens is not None:
            # Registers come after the pos-embed is added: they carry no position.
            registers = self.register_tokens.expand(batch, -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens

    def position_tables(self, images: Sequence[Tensor]) -> list | None:
        """Per-crop rotary tables for the blocks; None here (a learned pos-embed is added to the
        tokens instead). The DINOv3 ViT returns one RoPE table per crop tensor."""
        return None

    def _run_blocks(self, crops: Sequence[Tensor], blocks: Sequence[nn.Module] | None = None, collect: Sequence[int] = (),
                    rope: list | None = None) -> tuple[Tensor, Groups, list[Tensor]]:
        groups: Groups = [(t.shape[0], t.shape[1]) for t in crops]
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in crops]) if len(crops) > 1 else crops[0].reshape(-1, crops[0].shape[-1])
        collected = []
        for index, block in enumerate(self.blocks if blocks is None else blocks):
            x = block(x, groups) if rope is None else block(x, groups, rope)
            if index in collect:
                collected.append(x)
        return x, groups, collected

    @staticmethod
    def _unpack(x: Tensor, groups: Groups) -> list[Tensor]:
        sizes = [count * length for count, length in groups]
        return [part.reshape(count, length, -1) for part, (count, length) in zip(torch.split(x, sizes), groups)]

    def _features(self, prenorm: Tensor, masks: Tensor | None) -> FeatureDict:
        # Every tensor leaving the backbone is its own storage, not a view: under FSDP2 an
        # in-place op on a returned view would drop the pre-backward hook (no all-gather, wrong
        # gradients). The norm is per token, so normalising each slice gives fresh outputs at no
        # extra memory; the packed pre-norm tokens are a view of the blocks' output and are copied.
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": self.norm(prenorm[:, 0]),
            "x_norm_regtokens": self.norm(prenorm[:, 1 : r + 1]),
            "x_norm_patchtokens": self.norm(prenorm[:, r + 1 :]),
            "x_prenorm": prenorm if prenorm._base is None else prenorm.clone(),
            "masks": masks,
        }

    # ---- forward ---------------------------------------------------------------------
    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None) -> FeatureDict | list[FeatureDict]:
        """One crop tensor -> a feature dict; a list of crop tensors -> a list of dicts, all
        crops packed into one sequence through every block."""
        if isinstance(x, Tensor):
            return self.forward_features([x], [masks])[0]
        x = list(x)
        masks_list = list(masks) if masks is not None else [None] * len(x)
        if len(masks_list) != len(x):
            raise ValueError(f"got {len(x)} crop tensors but {len(masks_list)} masks")
        crops = [self.prepare_tokens(t, m) for t, m in zip(x, masks_list)]
        packed, groups, _ = self._run_blocks(crops, rope=self.position_tables(x))
        return [self._features(p, m) for p, m in zip(self._unpack(packed, groups), masks_list)]

    def forward(self, x: Tensor | Sequence[Tensor], masks=None, is_training: bool = False):
        out = self.forward_features(x, masks)
        if is_training:
            return out
        if isinstance(out, list):
            return [o["x_norm_clstoken"] for o in out]
        return out["x_norm_clstoken"]

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (or of the block indices in ``n``), patch tokens
        only; optionally reshaped to (B, D, h, w) and paired with the class token."""
        indices = list(range(self.depth - n, self.depth)) if isinstance(n, int) else list(n)
        if any(i < 0 or i >= self.depth for i in indices):
            raise ValueError(f"block indices {indices} out of range for depth {self.depth}")
        tokens = self.prepare_tokens(x)
        _, groups, collected = self._run_blocks([tokens], self.blocks[: max(indices) + 1], collect=indices,
                                                rope=self.position_tables([x]))
        outputs = [c.reshape(groups[0][0], groups[0][1], -1) for c in collected]
        if norm:
            outputs = [self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        patches = [o[:, 1 + self.num_register_tokens :] for o in outputs]
        if reshape:
            batch, _, height, width = x.shape
            patches = [
                p.reshape(batch, height // self.patch_size, width // self.patch_size, -1).permute(0, 3, 1, 2).contiguous()
                for p in patches
            ]
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)
