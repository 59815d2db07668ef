"""ONNX export of a trained segmentation run (``predict seg --export-onnx``): one tile in, class
logits out, with the run's normalisation, backbone (fine-tuned or frozen, band expansion
applied) and head in the graph.

The input is a batch of tiles of the run's size, each band scaled to [0, 1] as ``predict seg``
scales it (per-scene 2nd-98th percentile of the bands the run reads; nodata 0). What stays out
of the graph, because it is a loop over a scene rather than a function of one tile: reading
windows, the percentile scaling, the overlapping sliding window with its tent blending, test-
time augmentation, the nodata mask and writing GeoTIFFs and polygons.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..eval.segmentation.knn_decoder import EPS, KnnHead, guided_filter
from .graph import DEFAULT_OPSET, compare_with_torch, export_module, worst_difference

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits",)


class ExactSearchKnnHead(nn.Module):
    """KnnHead's forward with its search written in torch (inner products + top-k) instead of
    faiss: the same exact search (faiss's IndexFlatIP is exhaustive), but traceable. The memory
    bank becomes a constant of the graph; k, the temperature and the guided filter's settings
    are read once here (a traced graph cannot turn a buffer into a Python number)."""

    def __init__(self, head: KnnHead) -> None:
        super().__init__()
        if len(head.bank) == 0:
            raise ConfigError("kNN decoder: the memory bank is empty (fit it on labelled tiles first)")
        self.register_buffer("bank", head.bank.detach().clone())
        self.register_buffer("votes", head.votes.detach().clone())
        self.k = min(head.k, len(head.bank))
        self.temperature = head.temperature
        self.radius, self.eps = int(head.settings[2]), float(head.settings[3])

    def forward(self, features: Sequence[Tensor], size: tuple[int, int], guide: Tensor | None = None) -> Tensor:
        maps = features[-1]
        n, d, h, w = maps.shape
        queries = F.normalize(maps.permute(0, 2, 3, 1).reshape(-1, d).float(), dim=1)
        sims, idx = (queries @ self.bank.transpose(0, 1)).topk(self.k, dim=1)
        weights = (sims / self.temperature).softmax(dim=1)
        probs = (weights[..., None] * self.votes[idx]).sum(1)
        probs = probs / probs.sum(1, keepdim=True).clamp_min(EPS)
        probs = F.interpolate(probs.reshape(n, h, w, -1).permute(0, 3, 1, 2), size=size, mode="bilinear",
                              align_corners=False)
        if self.radius > 0 and guide is not None:
            probs = guided_filter(guide.mean(1, keepdim=True), probs, radius=self.radius, eps=self.eps)
            probs = probs.clamp_min(0) / probs.clamp_min(0).sum(1, keepdim=True).clamp_min(EPS)
        return probs.clamp_min(EPS).log()


class SegmentationLogits(nn.Module):
    """Scaled tiles (B, C, tile, tile) in [0, 1] -> class logits (B, K, tile, tile), as predict
    seg computes them before its softmax (the kNN head's logits are log vote shares)."""

    def __init__(self, features: nn.Module, head: nn.Module, *, tile: int, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        self.features = features
        self.head = ExactSearchKnnHead(head) if isinstance(head, KnnHead) else head
        self.tile = int(tile)
        self.guided = bool(getattr(head, "training_free", False))  # the kNN head's guided filter reads the image
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        normalised = (images - self.mean) / self.std
        maps = self.features(normalised)
        extra = {"guide": normalised} if self.guided else {}
        return self.head(maps, (self.tile, self.tile), **extra)


def segmentation_onnx_metadata(record: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata_props of a segmentation export: how to build its input and read its output."""
    tile, channels = int(record["tile"]), int(record["in_channels"])
    return {
        "dinov2_repro.kind": "segmentation",
        "decoder": str(record["model"].get("decoder")),
        "model_kind": str(record["model"].get("kind")),
        "tile": str(tile),
        "bands": json.dumps(record.get("bands")),
        "class_values": json.dumps([int(v) for v in record["class_values"]]),
        "class_names": json.dumps(list(record.get("class_names") or [])),
        "mean": json.dumps([float(v) for v in record["mean"]]),
        "std": json.dumps([float(v) for v in record["std"]]),
        "inputs": f"{INPUT_NAME}: float32 (batch, {channels}, {tile}, {tile}), the run's bands each scaled to [0, 1] "
                  f"(predict seg: the scene's 2nd-98th percentiles, nodata 0); mean/std are applied inside",
        "outputs": "logits: (batch, classes, tile, tile); argmax over classes indexes class_values",
    }


def export_segmentation_onnx(run_dir: str | os.PathLike, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                             check: bool = True) -> dict[str, Any]:
    """Export the segmentation run ``run_dir`` (an ``eval seg --out-dir``) to ``out``: dynamic
    batch, the run's tile size. With ``check``, onnxruntime is compared with torch at two batch
    sizes. Returns the export's description and the max abs differences."""
    from ..eval.segmentation.train import load_run

    if Path(out).suffix.lower() != ".onnx":
        raise ConfigError(f"--export-onnx {out}: an ONNX model is written to a .onnx file")
    features, head, record = load_run(Path(run_dir))
    tile, channels = int(record["tile"]), int(record["in_channels"])
    module = SegmentationLogits(features, head, tile=tile, mean=record["mean"], std=record["std"]).eval()
    example = torch.rand(2, channels, tile, tile)
    dims = {0: torch.export.Dim("batch", min=1, max=65536)}
    export_module(module, example, out, input_name=INPUT_NAME, output_names=OUTPUT_NAMES, dynamic_dims=dims,
                  metadata=segmentation_onnx_metadata(record), opset=opset)
    result: dict[str, Any] = {"onnx": str(out), "opset": opset, "input": INPUT_NAME, "outputs": list(OUTPUT_NAMES),
                              "export_shape": [2, channels, tile, tile], "dynamic_axes": {"batch": True, "height": False,
                                                                                          "width": False}}
    if check:
        # The reference is the run as predict seg loads it (faiss search for the kNN head).
        reference = SegmentationLogits(features, head, tile=tile, mean=record["mean"], std=record["std"])
        reference.head = head
        checks = compare_with_torch(out, reference, [(2, channels, tile, tile), (3, channels, tile, tile)],
                                    output_names=OUTPUT_NAMES, low=0.0, high=1.0)
        result["checks"] = checks
        result["max_abs_diff"] = worst_difference(checks)
    return result
