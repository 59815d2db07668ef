"""Multi-head self-attention over packed sequences, with the one backend switch of the project.

Every block sees a flat token tensor ``x`` of shape (T, C) plus ``groups``: a list of
``(num_seqs, seq_len)`` runs, in order. Crops of one size form one run, so the DINOv2
crop set of a batch B is ``[(2B, 257), (8B, 50)]``. Attention is block-diagonal: a token
only attends to tokens of its own sequence. Backends:

- ``sdpa``: torch scaled_dot_product_attention, one call per run of equal-length
  sequences (exactly block-diagonal, no mask is materialised; CPU and CUDA).
- ``sdpa_mask``: one SDPA call over the whole packed sequence with a boolean
  block-diagonal mask. Quadratic memory in T: for small inputs and for checking.
- ``xformers``: memory-efficient attention with a BlockDiagonalMask (CUDA, when installed).
- ``flex``: torch flex_attention with a document block mask (CUDA; no CPU backward).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import apply_rope_packed

Groups = Sequence[tuple[int, int]]
BACKENDS = ("auto", "sdpa", "sdpa_mask", "xformers", "flex")


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(requested: str, device: torch.device) -> str:
    """Turn a requested backend name into the one that runs on ``device``."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} unknown; choose one of {BACKENDS}")
    on_cuda = device.type == "cuda"
    if requested == "auto":
        return "xformers" if on_cuda and xformers_available() else "sdpa"
    if requested == "xformers" and not (on_cuda and xformers_available()):
        raise RuntimeError("attention backend 'xformers' needs CUDA and an installed xformers")
    if requested == "flex" and not on_cuda:
        raise RuntimeError("attention backend 'flex' needs CUDA (flex_attention has no CPU backward)")
    return requested


def block_diagonal_mask(groups: Groups, device: torch.device) -> Tensor:
    """Boolean (T, T) mask, True where attention is allowed."""
    seq_ids = sequence_ids(groups, device)
    return seq_ids[:, None] == seq_ids[None, :]


def sequence_ids(groups: Groups, device: torch.device) -> Tensor:
    lengths = torch.tensor([length for count, length in groups for _ in range(count)], device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


def _sdpa_grouped(q: Tensor, k: Tensor, v: Tensor, groups: Groups) -> Tensor:
    # q, k, v: (T, H, D). Each run of equal-length sequences is one dense batch; results are
    # written straight into their slice of the output (one copy, no concatenation).
    if len(groups) == 1:
        count, length = groups[0]
        qg, kg, vg = (t.reshape(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2).reshape(q.shape)
    out = q.new_empty(q.shape)
    offset = 0
    for count, length in groups:
        n = count * length
        qg, kg, vg = (t[offset : offset + n].reshape(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        out[offset : offset + n].view(count, length, *q.shape[1:]).copy_(
            F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2))
        offset += n
    return out


def _sdpa_masked(q: Tensor, k: Tensor, v: Tensor, groups: Groups) -> Tensor:
    mask = block_diagonal_mask(groups, q.device)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


def _xformers(q: Tensor, k: Tensor, v: Tensor, groups: Groups) -> Tensor:
    from xformers.ops import fmha, memory_efficient_attention

    seqlens = [length for count, length in groups for _ in range(count)]
    bias = fmha.BlockDiagonalMask.from_seqlens(seqlens)
    return memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


@functools.lru_cache(maxsize=32)
def _flex_block_mask(groups: tuple[tuple[int, int], ...], device_str: str):
    from torch.nn.attention.flex_attention import create_block_mask

    seq_ids = sequence_ids(groups, torch.device(device_str))
    total = seq_ids.numel()

    def same_sequence(b, h, q_idx, kv_idx):
        return seq_ids[q_idx] == seq_ids[kv_idx]

    return create_block_mask(same_sequence, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device_str)


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex_attention materialises the scores; compiled, it is a fused kernel that skips masked blocks.
    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor, k: Tensor, v: Tensor, groups: Groups) -> Tensor:
    block_mask = _flex_block_mask(tuple(tuple(g) for g in groups), str(q.device))
    out = _compiled_flex_attention()(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask)
    return out[0].transpose(0, 1)


_KERNELS = {"sdpa": _sdpa_grouped, "sdpa_mask": _sdpa_masked, "xformers": _xformers, "flex": _flex}


def packed_attention(q: Tensor, k: Tensor, v: Tensor, groups: Groups, backend: str = "auto") -> Tensor:
    """Block-diagonal attention of (T, H, D) tensors; returns (T, H, D)."""
    return _KERNELS[resolve_backend(backend, q.device)](q, k, v, groups)


class Attention(nn.Module):
    """``mask_k_bias`` (DINOv3): the key third of the qkv bias is held at zero. Without RoPE a key
    bias cancels in the softmax; with RoPE it would become a position-dependent term."""

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True, backend: str = "auto",
                 mask_k_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = backend
        self.mask_k_bias = mask_k_bias and qkv_bias
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _qkv(self, x: Tensor) -> Tensor:
        if not self.mask_k_bias:
            return self.qkv(x)
        bias = self.qkv.bias
        dim = bias.shape[0] // 3
        masked = torch.cat([bias[:dim], torch.zeros_like(bias[dim: 2 * dim]), bias[2 * dim:]])
        return F.linear(x, self.qkv.weight, masked)

    def forward(self, x: Tensor, groups: Groups, rope: Sequence | None = None) -> Tensor:
        """``rope``: one (sin, cos) table per run of ``groups`` (see layers/rope.py), or None."""
        tokens, dim = x.shape
        q, k, v = self._qkv(x).reshape(tokens, 3, self.num_heads, dim // self.num_heads).unbind(1)
        if rope is not None:
            q, k = apply_rope_packed(q, groups, rope), apply_rope_packed(k, groups, rope)
        out = packed_attention(q, k, v, groups, self.backend)
        return self.proj(out.reshape(tokens, dim))
