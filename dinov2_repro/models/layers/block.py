"""Transformer block over packed sequences, with efficient stochastic depth.

Efficient stochastic depth (DINOv2's variant): per block and per residual branch, pick a random
subset of ``max(int((1 - d) * n), 1)`` sequences in each run of ``n`` equal-length
sequences, compute the branch for that subset only, and add it back scaled by
``n / subset``. The expectation equals the undropped branch, and the skipped sequences cost
nothing. ``DropPath`` (compute everything, zero the dropped samples) is kept for comparison.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .attention import Attention, Groups
from .ffn import build_ffn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def sequence_subset(groups: Groups, drop_rate: float, device: torch.device) -> tuple[Tensor, list[tuple[int, int]], Tensor]:
    """Token indices of a random subset of sequences in each run, the runs of that subset,
    and the per-token scale ``n / kept`` that keeps the residual unbiased."""
    token_index, kept_groups, scales, offset = [], [], [], 0
    for count, length in groups:
        kept = max(int(count * (1.0 - drop_rate)), 1)
        chosen = torch.randperm(count, device=device)[:kept]
        token_index.append((offset + chosen[:, None] * length + torch.arange(length, device=device)).reshape(-1))
        kept_groups.append((kept, length))
        scales.append(torch.full((kept * length,), count / kept, device=device))
        offset += count * length
    return torch.cat(token_index), kept_groups, torch.cat(scales)


def add_residual_subset(x: Tensor, groups: Groups, branch: Callable[[Tensor, Groups], Tensor], drop_rate: float) -> Tensor:
    index, kept_groups, scale = sequence_subset(groups, drop_rate, x.device)
    update = branch(x[index], kept_groups) * scale[:, None].to(x.dtype)
    return torch.index_add(x, 0, index, update)


def drop_path_mask(groups: Groups, drop_rate: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Per-token keep mask (one Bernoulli draw per sequence), already divided by the keep rate."""
    num_seqs = sum(count for count, _ in groups)
    keep = torch.empty(num_seqs, device=device).bernoulli_(1.0 - drop_rate) / (1.0 - drop_rate)
    lengths = torch.tensor([length for count, length in groups for _ in range(count)], device=device)
    return torch.repeat_interleave(keep, lengths).to(dtype)[:, None]


class Block(nn.Module):
    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str = "mlp",
        init_values: float | None = 1e-5,
        drop_path: float = 0.0,
        stochastic_depth: str = "efficient",
        attn_backend: str = "auto",
        norm_eps: float = 1e-6,
        mask_k_bias: bool = False,
        ffn_hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        if stochastic_depth not in ("efficient", "droppath"):
            raise ValueError(f"stochastic_depth {stochastic_depth!r} unknown; choose 'efficient' or 'droppath'")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, backend=attn_backend,
                              mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = build_ffn(ffn_layer, dim=dim, mlp_ratio=mlp_ratio, bias=ffn_bias, hidden_dim=ffn_hidden_dim)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path
        self.stochastic_depth = stochastic_depth
        self.checkpoint_activations = False  # set by DinoVisionTransformer.set_activation_checkpointing

    def attention_branch(self, x: Tensor, groups: Groups, rope: Sequence | None = None) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), groups, rope))

    def ffn_branch(self, x: Tensor, groups: Groups) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, groups: Groups, rope: Sequence | None = None) -> Tensor:
        """``rope``: per-run RoPE tables (DINOv3) or None; they follow the runs through efficient
        stochastic depth, whose subsets keep each run's sequence length."""
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            # Inside forward, not around __call__: FSDP2's hooks on this block then stay outside
            # the checkpointed region, so recomputation runs on the parameters FSDP unsharded for
            # backward instead of re-entering its forward hooks (which kept every recomputed block
            # alive: no memory saved). preserve_rng_state: efficient stochastic depth draws the
            # same subsets in recomputation.
            return torch.utils.checkpoint.checkpoint(self._residual_branches, x, groups, rope, use_reentrant=False,
                                                     preserve_rng_state=True)
        return self._residual_branches(x, groups, rope)

    def _residual_branches(self, x: Tensor, groups: Groups, rope: Sequence | None = None) -> Tensor:
        # RoPE tables are bound here so that every branch keeps the (tokens, runs) signature
        # add_residual_subset calls it with.
        attention = self.attention_branch if rope is None else functools.partial(self.attention_branch, rope=rope)
        for branch in (attention, self.ffn_branch):
            if not self.training or self.drop_path == 0.0:
                x = x + branch(x, groups)
            elif self.stochastic_depth == "efficient":
                x = add_residual_subset(x, groups, branch, self.drop_path)
            else:
                x = x + branch(x, groups) * drop_path_mask(groups, self.drop_path, x.device, x.dtype)
        return x
