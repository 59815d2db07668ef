"""Fine-tuning modes of ``eval seg`` (``--train-backbone none|last:K|all``) with layer-wise lr decay.

``none`` (the default) keeps the backbone frozen and its features cached. ``last:K`` trains the
last K transformer blocks and the final norm, ``all`` every backbone parameter (patch embedding,
tokens, blocks, norm). Layer-wise decay gives block i (0-based, of depth D) the learning rate
lr x decay^(D - i) (the norm: lr; the patch embedding and tokens: lr x decay^(D + 1)), so the
blocks nearest the input move least. When the backbone trains, features are recomputed from
the images at every step: cached features would be those of the backbone before training, which
is why :func:`..train.cached_features` refuses a backbone with trainable parameters.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from ...config import ConfigError


def parse_train_backbone(text: str, *, depth: int) -> list[int] | None:
    """Trainable block indices: None for ``none``, all for ``all``, the last K for ``last:K``."""
    if text == "none":
        return None
    if text == "all":
        return list(range(depth))
    if text.startswith("last:") and text[5:].isdigit() and 1 <= int(text[5:]) <= depth:
        return list(range(depth - int(text[5:]), depth))
    raise ConfigError(f"--train-backbone {text}: use none, all or last:K with 1 <= K <= {depth} (the backbone's depth)")


def unfreeze(features: nn.Module, mode: str) -> nn.Module:
    """A copy of ``features`` (a FrozenViTFeatures) whose chosen backbone parts train."""
    trainable = copy.deepcopy(features)
    backbone = trainable.backbone
    blocks = parse_train_backbone(mode, depth=int(backbone.depth))
    backbone.requires_grad_(False)
    if blocks is None:
        return trainable
    if mode == "all":
        backbone.requires_grad_(True)
    else:
        for i in blocks:
            backbone.blocks[i].requires_grad_(True)
        backbone.norm.requires_grad_(True)
    trainable.trainable = True
    return trainable


def parameter_groups(features: nn.Module, head: nn.Module, *, lr: float, layer_decay: float) -> list[dict]:
    """AdamW groups: the head at ``lr``; each trainable backbone part at its decayed rate."""
    if not 0 < layer_decay <= 1:
        raise ConfigError(f"--layer-decay {layer_decay}: must be in (0, 1]")
    backbone = features.backbone
    depth = int(backbone.depth)
    groups = [{"params": [p for p in head.parameters() if p.requires_grad], "lr": lr}]
    for name, param in backbone.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("blocks."):
            scale = layer_decay ** (depth - int(name.split(".")[1]))
        elif name.startswith("norm."):
            scale = 1.0
        else:  # patch embedding, cls / register / mask tokens, position embedding
            scale = layer_decay ** (depth + 1)
        groups.append({"params": [param], "lr": lr * scale})
    return groups


def train_end_to_end(features: nn.Module, head: nn.Module, images: Tensor, labels: Tensor, *, loss_fn,
                     ignore_index: int, iterations: int, lr: float, layer_decay: float = 1.0, batch_size: int = 8,
                     seed: int = 0, curve: list[float] | None = None) -> tuple[nn.Module, nn.Module]:
    """AdamW (wd 1e-4, cosine) on the head and the trainable backbone parts; features are computed
    from ``images`` (normalised) at every step."""
    if not (labels != ignore_index).any():
        raise ConfigError("the training tiles hold no labelled pixels")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(parameter_groups(features, head, lr=lr, layer_decay=layer_decay), weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(iterations, 1))
    size = tuple(labels.shape[-2:])
    head.train()
    for _ in range(iterations):
        index = torch.randint(len(labels), (batch_size,), generator=generator)
        loss = loss_fn(head(features.trainable_forward(images[index]), size), labels[index])
        if curve is not None:
            curve.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return features.eval(), head.eval()


@torch.no_grad()
def fresh_features(features: nn.Module, images: Tensor, *, batch_size: int = 32) -> list[Tensor]:
    """Features of ``images`` from the backbone as it is now (after training): for evaluation only."""
    chunks = [features.trainable_forward(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return [torch.cat([chunk[level] for chunk in chunks]) for level in range(len(chunks[0]))]


def trainable_parameter_count(modules: Sequence[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
