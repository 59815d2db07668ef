"""Held-out by construction (issue 20 item 2): the land-cover probe's tiles lie in blocks of the Landsat
scene that no pretraining pool built by the project contains, checked pixel by pixel."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from dinov2_repro.data.sample_data import (DEMO_FOLDER_VERSION, HELDOUT_BLOCK_PX, heldout_mask, landcover_tiles,
                                           landsat_rgb, window_overlaps_heldout)

_NAME = re.compile(r"lsat7_2000_r(\d+)_c(\d+)\.png$")


def _pool_windows(folder) -> list[tuple[int, int, np.ndarray]]:
    from PIL import Image

    out = []
    for path in sorted((folder / "landsat").glob("*.png")):
        match = _NAME.search(path.name)
        assert match, f"unexpected Landsat tile name {path.name}"
        out.append((int(match[1]), int(match[2]), np.asarray(Image.open(path).convert("RGB"))))
    return out


def test_no_pretraining_tile_overlaps_a_probe_tile(demo_image_folder):
    rgb, _ = landsat_rgb()
    pool = _pool_windows(demo_image_folder)
    assert len(pool) >= 10, "the pretraining pool lost its Landsat tiles"
    seen = np.zeros(rgb.shape[:2], dtype=bool)
    for row, col, pixels in pool:
        # The file name is where the tile came from: its pixels must be that window of the scene.
        assert np.array_equal(pixels, rgb[row:row + pixels.shape[0], col:col + pixels.shape[1]]), (row, col)
        seen[row:row + pixels.shape[0], col:col + pixels.shape[1]] = True
    assert not (seen & heldout_mask(seen.shape)).any(), "a pretraining tile covers held-out pixels"
    for region, expect_heldout in (("heldout", True), ("tune", False)):
        windows: dict[str, np.ndarray] = {}
        train_x, train_y, test_x, test_y = landcover_tiles(region=region, windows_out=windows)
        assert len(train_y) >= 100 and len(test_y) >= 100, (region, len(train_y), len(test_y))
        tile = train_x.shape[1]
        probe = np.zeros_like(seen)
        for split in ("train", "test"):
            for row, col in windows[split]:
                probe[row:row + tile, col:col + tile] = True
        inside = heldout_mask(seen.shape)
        assert (probe <= inside).all() if expect_heldout else not (probe & inside).any(), region
        if expect_heldout:
            assert not (probe & seen).any(), "a probe tile shares pixels with a pretraining tile"
        # Probe train and test tiles never share a pixel either.
        train_px, test_px = np.zeros_like(seen), np.zeros_like(seen)
        for row, col in windows["train"]:
            train_px[row:row + tile, col:col + tile] = True
        for row, col in windows["test"]:
            test_px[row:row + tile, col:col + tile] = True
        assert not (train_px & test_px).any(), region


def test_heldout_geometry():
    assert not window_overlaps_heldout(0, HELDOUT_BLOCK_PX, HELDOUT_BLOCK_PX, HELDOUT_BLOCK_PX)  # block (0, 1)
    assert window_overlaps_heldout(0, 0, 1, 1)  # block (0, 0)
    assert window_overlaps_heldout(0, HELDOUT_BLOCK_PX - 1, 2, 2)  # straddles blocks (0, 0) and (0, 1)
    mask = heldout_mask((443, 489))
    assert 0.4 < mask.mean() < 0.6


def test_stale_sample_cache_is_rebuilt(tmp_path):
    """A cache written before the held-out split (version 1 marker) is rebuilt, not reused."""
    from dinov2_repro.data.sample_data import write_demo_image_folder

    folder = tmp_path / "sample_images_56"
    (folder / "landsat").mkdir(parents=True)
    stale = folder / "landsat" / "lsat7_2000_r0000_c0000.png"  # block (0, 0) is held out
    stale.write_bytes(b"old build")
    (folder / ".demo_image_folder.json").write_text(json.dumps({"tile": 56, "stride": 56, "version": 1}))
    assert DEMO_FOLDER_VERSION >= 2
    write_demo_image_folder(folder, tile=56)
    assert not stale.exists()
    assert json.loads((folder / ".demo_image_folder.json").read_text())["version"] == DEMO_FOLDER_VERSION


def test_landcover_region_is_checked():
    with pytest.raises(ValueError, match="region"):
        landcover_tiles(region="all")


def test_pretrain_scene_blanks_the_heldout_blocks(tmp_path):
    """The scene the demo's curation tiles: held-out pixels are nodata, the others untouched."""
    import rasterio

    from dinov2_repro.data.sample_data import landsat_scene_paths, write_landsat_pretrain_scene

    path = write_landsat_pretrain_scene(tmp_path / "scene.tif")
    with rasterio.open(path) as src, rasterio.open(landsat_scene_paths().multiband) as original:
        data, nodata, source = src.read(), src.nodata, original.read()
    mask = heldout_mask(data.shape[1:])
    assert (data[:, mask] == nodata).all()
    assert np.array_equal(data[:, ~mask], source[:, ~mask])
