"""The shared data edge (dinov2_repro.io): atomic writes, manifests in both formats, and the
one pixel-scaling policy that curation and training must apply identically to the same row."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_repro.data import build_dataset
from dinov2_repro.io.files import atomic_output, atomic_write_json, is_image_file, read_json
from dinov2_repro.io.manifest import read_manifest, write_manifest
from dinov2_repro.io.raster import RasterScaling, RowPixels, read_window, tile_windows


def test_atomic_output_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": np.int64(3), "b": np.float32(0.5)})
    assert read_json(target) == {"a": 3, "b": 0.5}
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert read_json(target) == {"a": 3, "b": 0.5}  # the old file is intact
    assert sorted(os.listdir(target.parent)) == ["out.json"]  # and no temp file is left behind


def test_image_extension_list() -> None:
    assert is_image_file("a/B.PNG") and is_image_file("x.tiff")
    assert not is_image_file("a/.hidden.png") and not is_image_file("notes.txt")
    assert not is_image_file("x.png", ("jpg",))


def test_tile_grid_is_full_tiles_only() -> None:
    windows = list(tile_windows(10, 7, 4, 3))
    assert windows == [(0, 0, 4, 4), (3, 0, 4, 4), (6, 0, 4, 4), (0, 3, 4, 4), (3, 3, 4, 4), (6, 3, 4, 4)]


def test_manifest_jsonl_and_parquet_round_trip(tmp_path: Path) -> None:
    rows = [{"path": "a.png", "label": "x"}, {"path": "/abs/b.tif", "window": [0, 0, 4, 4], "bands": [1, 2]}]
    jsonl = write_manifest(tmp_path / "m.jsonl", rows)
    assert read_manifest(jsonl) == rows
    (tmp_path / "bad.jsonl").write_text('{"path": "a.png"}\n{"label": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*'path'"):
        read_manifest(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_manifest(tmp_path / "nothing.jsonl")
    parquet = write_manifest(tmp_path / "m.parquet", rows)
    back = read_manifest(parquet)
    assert back == rows  # keys a row lacks stay absent


def test_scaling_policy_is_per_scene_with_nodata_zero(landsat_stack_path: Path) -> None:
    pixels = RowPixels()
    bands = [3, 2, 1]
    ranges = pixels.scene_ranges(landsat_stack_path, bands)
    a = read_window(landsat_stack_path, bands, [300, 300, 64, 64], ranges)
    b = pixels.raster({"path": "x", "window": [300, 300, 64, 64], "bands": bands}, landsat_stack_path)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0
    # A window overhanging the scene: the outside part is nodata, hence exactly 0.
    over = read_window(landsat_stack_path, bands, [200, -16, 32, 32], ranges)
    assert np.all(over[:, :16] == 0.0) and over[:, 16:].max() > 0
    # Per-scene, not per-tile: a pixel gets the same value whichever tile it is read through.
    shifted = read_window(landsat_stack_path, bands, [310, 310, 64, 64], ranges)
    np.testing.assert_array_equal(shifted[:, :54, :54], a[:, 10:, 10:])
    fixed = RasterScaling(scale="0,1000").ranges(landsat_stack_path, bands)
    assert fixed.tolist() == [[0.0, 1000.0]] * 3


def test_curation_and_training_see_the_same_pixels(landsat_stack_path: Path, tmp_path: Path) -> None:
    """The embedder that makes dedup decisions and the trainer read a row identically."""
    from dinov2_repro.curation.images import load_row_image

    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(photo)
    rows = [{"path": str(landsat_stack_path), "window": [32, 64, 48, 48], "bands": [3, 2, 1]}, {"path": "photo.png"}]
    manifest = write_manifest(tmp_path / "pool.jsonl", rows)
    dataset = build_dataset(f"Manifest:path={manifest}")
    trained_raster = dataset[0][0].numpy()
    np.testing.assert_allclose(load_row_image(rows[0], tmp_path), trained_raster, atol=1e-6)
    # The trainer keeps pictures as PIL images; its augmentations' ToTensor divides by 255.
    from torchvision.transforms.functional import to_tensor

    trained_photo = to_tensor(dataset[1][0]).numpy()
    np.testing.assert_allclose(load_row_image(rows[1], tmp_path), trained_photo, atol=1e-6)
    assert isinstance(dataset[0][0], torch.Tensor) and json.loads(manifest.read_text().splitlines()[1])["path"] == "photo.png"


def test_in_memory_array_follows_the_same_policy(landsat_stack_path: Path) -> None:
    """to_unit (curation code that cuts crops by hand) = the policy with the array as its scene."""
    import rasterio

    from dinov2_repro.curation.images import to_unit
    from dinov2_repro.io.raster import RasterScaling, apply_ranges

    with rasterio.open(landsat_stack_path) as src:
        crop = src.read([3, 2, 1], window=rasterio.windows.Window(300, 300, 64, 64)).astype(np.float64)
    crop[0, 0, 0] = np.nan
    valid = np.isfinite(crop)
    expected = apply_ranges(crop, valid, RasterScaling().ranges("crop", [1, 2, 3], (crop, valid)))
    out = to_unit(crop)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0, 0] == 0.0 and out.shape == (3, 64, 64)
    assert to_unit(crop, channels=5).shape == (5, 64, 64)
