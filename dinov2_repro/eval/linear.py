"""Linear probe on frozen features (the DINOv2 protocol in miniature): the CLS tokens of the last
1 or 4 blocks concatenated with the average-pooled patch tokens of the last block; one linear layer
per learning rate of a small sweep, trained full-batch on the cached features; top-1 and
per-class accuracy of the best learning rate."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def linear_features(model: nn.Module, images: Tensor, *, n_blocks: int = 1, batch_size: int = 64) -> Tensor:
    """(N, (n_blocks + 1) * D): CLS of the last ``n_blocks`` blocks + mean patch token of the last block.
    A module without ``get_intermediate_layers`` (a feature baseline, eval.baselines) gives its own
    features."""
    if n_blocks not in (1, 4):
        raise ValueError(f"n_blocks must be 1 or 4, got {n_blocks}")
    model.eval()
    if not hasattr(model, "get_intermediate_layers"):
        return torch.cat([model(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])
    chunks = []
    for i in range(0, len(images), batch_size):
        outputs = model.get_intermediate_layers(images[i:i + batch_size], n=n_blocks, return_class_token=True)
        parts = [cls for _, cls in outputs] + [outputs[-1][0].mean(dim=1)]
        chunks.append(torch.cat(parts, dim=1).float())
    return torch.cat(chunks)


def train_linear(features: Tensor, labels: Tensor, *, num_classes: int, lr: float, epochs: int = 100, seed: int = 0) -> nn.Linear:
    """Full-batch SGD (momentum 0.9, cosine) on standardised features; weight decay 0."""
    torch.manual_seed(seed)
    layer = nn.Linear(features.shape[1], num_classes)
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    for _ in range(epochs):
        loss = F.cross_entropy(layer(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return layer.eval()


def per_class_accuracy(predictions: Tensor, labels: Tensor, class_names: Sequence[str]) -> dict[str, float | None]:
    return {name: (float((predictions[labels == c] == c).float().mean()) if (labels == c).any() else None)
            for c, name in enumerate(class_names)}


def linear_probe(model: nn.Module, train_images: Tensor, train_labels: Tensor, val_images: Tensor, val_labels: Tensor, *,
                 class_names: Sequence[str] | None = None, lrs: Sequence[float] = (0.01, 0.1, 1.0), n_blocks: int = 1,
                 epochs: int = 100) -> dict[str, Any]:
    """Sweep ``lrs`` and report the best on the evaluation split, as the DINOv2 linear evaluation does
    (the reported accuracy is therefore the best of the sweep, an upper estimate)."""
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    train_f = linear_features(model, train_images, n_blocks=n_blocks)
    val_f = linear_features(model, val_images, n_blocks=n_blocks)
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)  # standardise: one lr grid fits every backbone
    train_f, val_f = (train_f - mean) / std, (val_f - mean) / std
    sweep, best = {}, None
    for lr in lrs:
        layer = train_linear(train_f, train_labels, num_classes=num_classes, lr=lr, epochs=epochs)
        with torch.no_grad():
            predictions = layer(val_f).argmax(1)
        top1 = float((predictions == val_labels).float().mean())
        sweep[str(lr)] = top1
        if best is None or top1 > best[0]:
            best = (top1, lr, predictions)
    assert best is not None
    top1, lr, predictions = best
    return {"top1": top1, "lr": lr, "lr_sweep_top1": sweep, "n_blocks": n_blocks, "feature_dim": int(train_f.shape[1]),
            "per_class_accuracy": per_class_accuracy(predictions, val_labels, names),
            "n_train": len(train_labels), "n_val": len(val_labels)}
