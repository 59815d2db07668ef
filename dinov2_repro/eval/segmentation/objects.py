"""Object-level metrics of binary maps (SpaceNet's building F1): polygons, one-to-one IoU matching.

Predicted and true masks are polygonised (rasterio.features.shapes, 4-connected, holes kept as
interior rings), or the truth is read as polygons from GeoJSON / GeoPackage. Objects smaller
than ``min_area_px`` pixels are dropped on both sides (slivers). Every (prediction, truth) pair
with IoU >= ``iou_threshold`` is a candidate; candidates are taken highest IoU first, each object
at most once (greedy one-to-one matching). Then precision = TP / predictions, recall = TP /
truths, F1 their harmonic mean, and recall per bin of true-object area.

Pixel masks merge touching objects into one component: a binary truth raster cannot keep two
touching buildings apart, an instance raster (one id per building) or a vector file can.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...config import ConfigError

DEFAULT_SIZE_BINS_PX = (100.0, 400.0, 1600.0)  # true-object area bin edges in pixels
VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg")


@dataclass
class ObjectCounts:
    """Matching counts, summable over tiles or scenes."""

    size_bins_px: tuple[float, ...] = DEFAULT_SIZE_BINS_PX
    tp: int = 0
    n_pred: int = 0
    n_truth: int = 0
    truth_per_bin: list[int] = field(default_factory=list)
    matched_per_bin: list[int] = field(default_factory=list)
    matched_ious: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        bins = len(self.size_bins_px) + 1
        self.truth_per_bin = self.truth_per_bin or [0] * bins
        self.matched_per_bin = self.matched_per_bin or [0] * bins

    def add(self, other: "ObjectCounts") -> None:
        self.tp += other.tp
        self.n_pred += other.n_pred
        self.n_truth += other.n_truth
        self.truth_per_bin = [a + b for a, b in zip(self.truth_per_bin, other.truth_per_bin)]
        self.matched_per_bin = [a + b for a, b in zip(self.matched_per_bin, other.matched_per_bin)]
        self.matched_ious += other.matched_ious

    def metrics(self, *, iou_threshold: float, min_area_px: float) -> dict[str, Any]:
        precision = self.tp / self.n_pred if self.n_pred else 0.0
        recall = self.tp / self.n_truth if self.n_truth else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        edges = [0.0, *self.size_bins_px, math.inf]
        bins = {}
        for lo, hi, n, m in zip(edges[:-1], edges[1:], self.truth_per_bin, self.matched_per_bin):
            label = f"[{lo:g}, {hi:g}) px" if math.isfinite(hi) else f">= {lo:g} px"
            bins[label] = {"n_truth": n, "recall": (m / n) if n else None}
        return {"object_f1": f1, "object_precision": precision, "object_recall": recall, "tp": self.tp,
                "fp": self.n_pred - self.tp, "fn": self.n_truth - self.tp, "n_pred": self.n_pred, "n_truth": self.n_truth,
                "mean_matched_iou": float(np.mean(self.matched_ious)) if self.matched_ious else None,
                "recall_by_size": bins, "iou_threshold": iou_threshold, "min_area_px": min_area_px,
                "f1_level": "object (one-to-one polygon matching)"}


def polygonise(mask: np.ndarray, *, transform=None, instances: bool = False) -> list:
    """Shapely polygons of the True (or, with ``instances``, each nonzero id's) 4-connected regions,
    in the coordinates of ``transform`` (an affine.Affine; default pixel coordinates)."""
    import shapely.geometry
    from affine import Affine
    from rasterio import features

    values = np.asarray(mask)
    source = values.astype(np.int32) if instances else values.astype(bool).astype(np.uint8)
    shapes = features.shapes(source, mask=source != 0, connectivity=4, transform=transform or Affine.identity())
    return [shapely.geometry.shape(geometry) for geometry, _ in shapes]


def match_objects(predicted: Sequence, truth: Sequence, *, iou_threshold: float = 0.5, min_area: float = 0.0,
                  pixel_area: float = 1.0, size_bins_px: Sequence[float] = DEFAULT_SIZE_BINS_PX) -> ObjectCounts:
    """One-to-one greedy matching (highest IoU first) of two polygon lists; objects with area below
    ``min_area`` (same units as the polygons) are dropped first. ``pixel_area`` converts areas to
    pixels for the size bins."""
    import shapely

    if not 0 < iou_threshold <= 1:
        raise ConfigError(f"--iou {iou_threshold}: must be in (0, 1]")
    predicted = [p for p in predicted if p.area >= min_area and p.area > 0]
    truth = [t for t in truth if t.area >= min_area and t.area > 0]
    counts = ObjectCounts(size_bins_px=tuple(size_bins_px), n_pred=len(predicted), n_truth=len(truth))
    truth_bins = np.searchsorted(np.asarray(size_bins_px, dtype=float), [t.area / pixel_area for t in truth], side="right")
    for b in truth_bins:
        counts.truth_per_bin[int(b)] += 1
    if not predicted or not truth:
        return counts
    tree = shapely.STRtree(truth)
    candidates = []
    for i, p in enumerate(predicted):
        for j in tree.query(p, predicate="intersects"):
            t = truth[int(j)]
            inter = p.intersection(t).area
            iou = inter / (p.area + t.area - inter) if inter > 0 else 0.0
            if iou >= iou_threshold - 1e-12:
                candidates.append((iou, i, int(j)))
    used_pred, used_truth = set(), set()
    for iou, i, j in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
        if i in used_pred or j in used_truth:
            continue
        used_pred.add(i)
        used_truth.add(j)
        counts.tp += 1
        counts.matched_ious.append(float(iou))
        counts.matched_per_bin[int(truth_bins[j])] += 1
    return counts


def mask_object_counts(prediction: np.ndarray, truth: np.ndarray, *, valid: np.ndarray | None = None,
                       iou_threshold: float = 0.5, min_area_px: float = 0.0,
                       size_bins_px: Sequence[float] = DEFAULT_SIZE_BINS_PX) -> ObjectCounts:
    """Counts of one pair of binary masks in pixel coordinates; pixels outside ``valid`` are background on both sides."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if valid is not None:
        prediction, truth = prediction & valid, truth & valid
    return match_objects(polygonise(prediction), polygonise(truth), iou_threshold=iou_threshold, min_area=min_area_px,
                         size_bins_px=size_bins_px)


# ---------------------------------------------------------------------------------- files
def read_vector_polygons(path: Path, *, crs=None) -> list:
    """Polygons (multi-polygons split) of every feature of a GeoJSON / GeoPackage file; its CRS must
    equal ``crs`` when both are known."""
    try:
        import pyogrio.raw
    except ImportError:  # pragma: no cover - pyogrio is a dependency; fall back to GeoJSON only
        return _read_geojson_polygons(path)
    import shapely

    meta, _, geometry, _ = pyogrio.raw.read(str(path))
    if crs is not None and meta.get("crs"):
        from rasterio.crs import CRS

        if CRS.from_user_input(meta["crs"]) != CRS.from_user_input(crs):
            raise ConfigError(f"--truth {path} has CRS {meta['crs']}, the map has {crs}; reproject one of them")
    polygons = []
    for geom in shapely.from_wkb(geometry):
        polygons += _polygon_parts(geom)
    return polygons


def _read_geojson_polygons(path: Path) -> list:
    import json

    import shapely.geometry

    data = json.loads(Path(path).read_text())
    features = data.get("features", [data])
    return [part for f in features for part in _polygon_parts(shapely.geometry.shape(f.get("geometry", f)))]


def _polygon_parts(geom) -> list:
    if geom is None or geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom]
    if geom.geom_type in ("MultiPolygon", "GeometryCollection"):
        return [g for part in geom.geoms for g in _polygon_parts(part)]
    return []


def evaluate_object_files(pred: str | os.PathLike, truth: str | os.PathLike, *, class_value: int = 1,
                          iou_threshold: float = 0.5, min_area_px: float = 0.0,
                          size_bins_px: Sequence[float] = DEFAULT_SIZE_BINS_PX, truth_instances: bool = False) -> dict[str, Any]:
    """Object metrics of a class-code map (``pred``, pixels == ``class_value`` are objects; nodata
    is background) against a mask on the same grid (pixels == ``class_value``, or each nonzero id
    with ``truth_instances``) or a GeoJSON / GeoPackage of true polygons in the map's CRS."""
    import rasterio

    from ...io.raster import raster_read_guard

    pred, truth = Path(pred), Path(truth)
    for option, path in (("--pred", pred), ("--truth", truth)):
        if not path.is_file():
            raise ConfigError(f"{option} {path} does not exist")
    with raster_read_guard(pred), rasterio.open(pred) as src:
        codes, transform, crs, shape, nodata = src.read(1), src.transform, src.crs, src.shape, src.nodata
    predicted_mask = codes == class_value
    if nodata is not None:
        predicted_mask &= codes != nodata
    pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
    if truth.suffix.lower() in VECTOR_SUFFIXES:
        truth_polygons = read_vector_polygons(truth, crs=crs)
        source = "vector"
    else:
        with raster_read_guard(truth), rasterio.open(truth) as tsrc:
            if tsrc.shape != shape or tsrc.transform != transform:
                raise ConfigError(f"--truth {truth} is {tsrc.width}x{tsrc.height} px with transform {tuple(tsrc.transform)[:6]}; "
                                  f"the map {pred} is {shape[1]}x{shape[0]} with {tuple(transform)[:6]}: give a mask on the map's grid")
            values, tnodata = tsrc.read(1), tsrc.nodata
        keep = np.ones(values.shape, bool) if tnodata is None else values != tnodata
        mask = np.where(keep, values, 0) if truth_instances else (values == class_value) & keep
        truth_polygons = polygonise(mask, transform=transform, instances=truth_instances)
        source = "instance raster" if truth_instances else "mask raster"
    counts = match_objects(polygonise(predicted_mask, transform=transform), truth_polygons, iou_threshold=iou_threshold,
                           min_area=min_area_px * pixel_area, pixel_area=pixel_area, size_bins_px=size_bins_px)
    return {"task": "objects", "pred": str(pred), "truth": str(truth), "truth_source": source, "class_value": class_value,
            "pixel_area": pixel_area, **counts.metrics(iou_threshold=iou_threshold, min_area_px=min_area_px)}
