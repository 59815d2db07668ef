"""Weighted kNN classification on frozen CLS features (the DINO protocol: cosine similarity,
top-k neighbours, votes weighted by exp(sim / T))."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def images_to_tensor(images: np.ndarray | Tensor, *, mean: Sequence[float], std: Sequence[float], size: int | None = None) -> Tensor:
    """uint8 (N, H, W, C) or float (N, C, H, W) in [0, 1] -> normalised float (N, C, H, W)."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 255.0
    x = x.float()
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


@torch.no_grad()
def extract_features(model: nn.Module, images: Tensor, *, batch_size: int = 128) -> Tensor:
    """L2-normalised CLS features of a normalised image tensor."""
    model.eval()
    device = _device_of(model)
    features = [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(features), dim=1)


def _device_of(model: nn.Module) -> torch.device:
    # Feature baselines (imagestats, RCF) hold buffers only; a module with neither runs on CPU.
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None) -> Tensor:
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    k = min(k, len(train_features))
    similarity = test_features @ train_features.T
    top_sim, top_idx = similarity.topk(k, dim=1)
    votes = torch.zeros(len(test_features), num_classes)
    votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
    return votes.argmax(dim=1)


def knn_accuracy(model: nn.Module, train_images: Tensor, train_labels: Tensor, test_images: Tensor, test_labels: Tensor,
                 *, k: int = 20, temperature: float = 0.07) -> float:
    train_features = extract_features(model, train_images)
    test_features = extract_features(model, test_images)
    predictions = knn_predict(train_features, train_labels, test_features, k=k, temperature=temperature,
                              num_classes=int(max(train_labels.max(), test_labels.max())) + 1)
    return float((predictions == test_labels).float().mean())
