"""AdamW parameter groups (layer-wise lr decay, patch-embed multiplier, no decay on
bias/norm/gamma, frozen head last layer) and their per-iteration update."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch import nn

_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def layer_id_for(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for block i, num_layers + 1 for the final norm and heads."""
    if any(part in name for part in _EMBEDDING_NAMES):
        return 0
    if ".blocks." in f".{name}":
        after = f".{name}".split(".blocks.", 1)[1]
        return int(after.split(".")[0]) + 1
    return num_layers + 1


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    # The reference exempts exactly biases, norms and LayerScale gammas. The prototype layer's
    # weight_g is decayed like any weight: that bounds the prototype norms, hence the logit scale.
    return param.ndim <= 1 or name.endswith(".bias") or "norm" in name or "gamma" in name


def build_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    num_layers: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
) -> list[dict]:
    """Parameters grouped by identical (lr multiplier, wd multiplier, is_last_layer, is_backbone).

    Names are those of the student ``ModuleDict``: ``backbone.*`` gets the layer-wise decay,
    heads sit above the last layer (multiplier 1). ``is_backbone`` lets the warm start of a
    continued pretraining freeze and then ramp the backbone alone (``apply_schedule``)."""
    buckets: dict[tuple[float, float, bool, bool], list[nn.Parameter]] = defaultdict(list)
    for name, param in named_params:
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            lr_mult = layerwise_decay ** (num_layers + 1 - layer_id_for(name[len("backbone."):], num_layers))
            if "patch_embed" in name:
                lr_mult *= patch_embed_lr_mult
        else:
            lr_mult = 1.0
        wd_mult = 0.0 if _no_weight_decay(name, param) else 1.0
        buckets[(lr_mult, wd_mult, "last_layer" in name, name.startswith("backbone."))].append(param)
    return [
        {"params": params, "lr_multiplier": lr_mult, "wd_multiplier": wd_mult, "is_last_layer": last,
         "is_backbone": backbone}
        for (lr_mult, wd_mult, last, backbone), params in buckets.items()
    ]


def build_optimizer(param_groups: list[dict], *, betas: tuple[float, float], fused: str | bool, device: torch.device) -> torch.optim.AdamW:
    use_fused = device.type == "cuda" if fused == "auto" else bool(fused)
    return torch.optim.AdamW(param_groups, lr=0.0, betas=betas, fused=use_fused or None)


def apply_schedule(optimizer: torch.optim.Optimizer, *, lr: float, wd: float, last_layer_lr: float,
                   backbone_lr_scale: float = 1.0) -> None:
    """Set every group's lr and weight decay for this iteration. ``backbone_lr_scale`` (0 while a
    warm-started backbone is frozen, then a ramp to 1) multiplies the groups marked ``is_backbone``.
    AdamW decays by ``lr * wd``, so a frozen group is neither moved nor decayed; its gradients
    still fill the Adam moments, which keeps every parameter in the optimiser state (a checkpoint
    taken during the freeze then loads like any other)."""
    for group in optimizer.param_groups:
        scale = backbone_lr_scale if group.get("is_backbone", False) else 1.0
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"] * scale
        group["weight_decay"] = wd * group["wd_multiplier"]
