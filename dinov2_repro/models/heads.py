"""DINO/iBOT projection head: MLP -> bottleneck -> L2 normalise -> weight-normalised prototypes."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (one norm per output row).

    The two factors are plain parameters (``weight_v`` (out, in), ``weight_g`` (out, 1)) instead of
    torch's weight_norm hook / parametrization, so FSDP2 can shard them like any other parameter and
    state dicts hold ordinary tensors.
    """

    def __init__(self, *, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # v gets nn.Linear's default init, as the reference's weight-normed nn.Linear did. Only its
        # norm matters for training dynamics (d w / d v scales with g / ||v||), not for the forward.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        # g = 1: every prototype starts as a unit vector, so the logits start as cosine similarities.
        nn.init.ones_(self.weight_g)

    def weight(self) -> Tensor:
        """The effective fp32 weight g * v / ||v||."""
        v = self.weight_v.float()
        return v * (self.weight_g.float() / v.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def forward(self, x: Tensor) -> Tensor:
        # Always fp32, whatever autocast is active: the logits are divided by a teacher temperature
        # of 0.04, which turns bf16's ~0.4% rounding of a logit into 2-9% errors in the targets.
        # The layer is small (bottleneck x K), so the fp32 matmul costs little. Under FSDP the
        # layer is its own unit with an fp32 parameter policy (distributed/fsdp.py).
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


def _l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    # In fp32 and left in fp32 for the prototype layer: 1e-12 underflows to 0 in fp16 (0/0 for an
    # all-zero row) and a bf16 norm over the bottleneck is coarse. The bottleneck is small (N x 256).
    return F.normalize(x.float(), p=2.0, dim=-1, eps=eps)


class DINOHead(nn.Module):
    """Projection head shared by the DINO (CLS) and iBOT (patch) losses.

    ``nlayers`` Linear layers with GELU between them (no BatchNorm) map ``in_dim`` to
    ``bottleneck_dim``; the bottleneck is L2-normalised and projected onto ``out_dim`` prototypes by a
    bias-free weight-normalised linear layer named ``last_layer`` (the optimiser freezes parameters
    whose name contains "last_layer" during the first epoch).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        for key, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                           ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DINOHead: {key} must be a positive integer, got {value!r}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.bottleneck_dim = bottleneck_dim
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(in_features=bottleneck_dim, out_features=out_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter, e.g. after materialising a meta-device model."""
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) -> (..., out_dim) prototype logits, always fp32 (the MLP follows autocast)."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead: expected last dim {self.in_dim}, got input of shape {tuple(x.shape)}")
        x = _l2_normalize(self.mlp(x))
        return self.last_layer(x)
