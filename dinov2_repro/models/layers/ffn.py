"""Feed-forward layers: the ViT MLP and the fused SwiGLU of ViT-g."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLU hidden size: 2/3 of the MLP's, rounded up to a multiple of 8 (4096 for dim 1536)."""
    return (int(dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


class SwiGLU(nn.Module):
    """silu(x W1) * (x W2), then W3; W1 and W2 fused into one matmul (``w12``)."""

    def __init__(self, *, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def build_ffn(kind: str, *, dim: int, mlp_ratio: float, bias: bool, hidden_dim: int | None = None) -> nn.Module:
    """``hidden_dim`` overrides the width derived from ``mlp_ratio`` (imported weights give it exactly)."""
    if kind == "mlp":
        return Mlp(dim=dim, hidden_dim=hidden_dim or int(dim * mlp_ratio), bias=bias)
    if kind in ("swiglu", "swiglufused"):
        return SwiGLU(dim=dim, hidden_dim=hidden_dim or swiglu_hidden_dim(dim, mlp_ratio), bias=bias)
    raise ValueError(f"ffn_layer {kind!r} unknown; choose 'mlp' or 'swiglu'")
