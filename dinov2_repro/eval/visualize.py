"""PNG figures of the evaluation stage: label-efficiency curves, PCA feature maps (the DINOv2
paper's figure-1 style), class-map colouring and prediction-vs-ground-truth panels."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..io.files import atomic_output

# Colours per class index (tab10 without grey); index -1 (nodata / ignore) is drawn black.
_PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
                     [227, 119, 194], [188, 189, 34], [23, 190, 207], [174, 199, 232]], dtype=np.uint8)


def save_figure(figure: Any, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_output(path, suffix=path.suffix) as tmp:
            figure.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colour_classes(indices: np.ndarray) -> np.ndarray:
    """(H, W) class indices (-1 = nodata) -> (H, W, 3) uint8 colours."""
    colours = _PALETTE[np.clip(indices, 0, None) % len(_PALETTE)]
    colours[indices < 0] = 0
    return colours


def plot_label_efficiency(result: Mapping[str, Any], path: str | os.PathLike,
                          panels: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Test mIoU vs number of labelled tiles: mean line and min-max band over seeds, per model.
    ``panels`` (title -> model names) draws one axis per group, sharing the y scale, so that many
    models stay readable; by default every model shares one axis."""
    plt = pyplot()
    groups = dict(panels) if panels else {"": list(result["models"])}
    figure, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.2), sharey=True, squeeze=False)
    seeds = len(result["seeds"])
    everyone = list(dict.fromkeys(name for names in groups.values() for name in names))
    colours = {name: f"C{i % 10}" for i, name in enumerate(everyone)}  # one colour per model across panels
    for axis, (title, names) in zip(axes[0], groups.items()):
        for name in names:
            model = result["models"][name]
            ns = sorted(int(n) for n in model["runs"])
            mean = np.array([model["runs"][str(n)]["miou_mean"] for n in ns])
            low = np.array([model["runs"][str(n)]["miou_min"] for n in ns])
            high = np.array([model["runs"][str(n)]["miou_max"] for n in ns])
            axis.plot(ns, mean, marker="o", label=name, color=colours[name])
            if seeds > 1:
                axis.fill_between(ns, low, high, color=colours[name], alpha=0.2)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("labelled training tiles (n)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        if title:
            axis.set_title(title, fontsize=9)
    axes[0, 0].set_ylabel("test mIoU (line: mean, band: min-max over seeds)" if seeds > 1 else "test mIoU")
    figure.suptitle(f"label efficiency ({result['data']}, {result['tile_px']} px tiles, {seeds} seed{'s' * (seeds > 1)})",
                    fontsize=10)
    return save_figure(figure, path)


@torch.no_grad()
def pca_rgb(model: nn.Module, images: Tensor) -> np.ndarray:
    """First 3 PCA components of the last block's patch features (fitted jointly over all images)
    mapped to RGB: (N, h, w, 3) floats in [0, 1]."""
    patches = model.get_intermediate_layers(images, n=1, reshape=True)[0]  # (N, D, h, w)
    n, d, h, w = patches.shape
    flat = patches.permute(0, 2, 3, 1).reshape(-1, d).double()
    flat = flat - flat.mean(0)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    projected = flat @ v[:3].T
    low, high = projected.quantile(0.01, dim=0), projected.quantile(0.99, dim=0)
    rgb = ((projected - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)
    return rgb.reshape(n, h, w, 3).float().numpy()


def plot_pca(models: Mapping[str, nn.Module], images: Tensor, display: np.ndarray, path: str | os.PathLike) -> Path:
    """One row per model: each image's PCA map next to the image itself (``display``: (N, H, W, 3) in [0, 1])."""
    plt = pyplot()
    count = len(images)
    figure, axes = plt.subplots(len(models) + 1, count, figsize=(1.6 * count, 1.7 * (len(models) + 1)), squeeze=False)
    for column in range(count):
        axes[0, column].imshow(display[column])
    axes[0, 0].set_ylabel("image", fontsize=8)
    for row, (name, model) in enumerate(models.items(), start=1):
        maps = pca_rgb(model.eval(), images)
        for column in range(count):
            axes[row, column].imshow(maps[column], interpolation="nearest")
        axes[row, 0].set_ylabel(name, fontsize=8)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("first 3 PCA components of patch features -> RGB", fontsize=9)
    return save_figure(figure, path)


def plot_prediction_vs_truth(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, class_names: Sequence[str],
                             path: str | os.PathLike, *, title: str = "") -> Path:
    """Image | ground truth | prediction; class maps hold indices with -1 for nodata / ignore."""
    plt = pyplot()
    from matplotlib.patches import Patch

    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for axis, picture, label in zip(axes, (image, colour_classes(truth), colour_classes(prediction)),
                                    ("image", "ground truth", "prediction")):
        axis.imshow(picture, interpolation="nearest")
        axis.set_title(label)
        axis.axis("off")
    handles = [Patch(color=_PALETTE[i % len(_PALETTE)] / 255, label=name) for i, name in enumerate(class_names)]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(class_names), 7), fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)
