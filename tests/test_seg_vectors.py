"""Polygons of a class map written strip by strip: pieces crossing strip boundaries are merged."""
from __future__ import annotations

import json

import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS

from dinov2_repro.eval.segmentation.vectors import StreamingPolygonWriter
from test_seg import geotiff_folder, tiny_backbone  # noqa: F401  (fixtures)

TRANSFORM = Affine(10.0, 0.0, 1000.0, 0.0, -10.0, 2000.0)


def _whole_map_components(codes: np.ndarray, nodata: int) -> list[tuple[int, int]]:
    """(class, pixels) of every 4-connected component, computed on the whole map at once."""
    from scipy import ndimage

    out = []
    for cls in np.unique(codes[codes != nodata]):
        labels, count = ndimage.label(codes == cls, structure=ndimage.generate_binary_structure(2, 1))
        out += [(int(cls), int(n)) for n in np.bincount(labels.ravel())[1:]]
    return sorted(out)


def _stream(codes, path, *, strip, **kw):
    writer = StreamingPolygonWriter(path, transform=TRANSFORM, crs=CRS.from_epsg(32119), width=codes.shape[1], nodata=-1, **kw)
    confidence = np.full(codes.shape, 0.75)
    for row in range(0, codes.shape[0], strip):
        writer.add_strip(codes[row:row + strip], confidence[row:row + strip], row, last=row + strip >= codes.shape[0])
    return writer.close()


@pytest.mark.parametrize("strip", [1, 3, 5, 40])
def test_polygons_crossing_strips_are_merged(tmp_path, strip):
    import shapely.geometry

    codes = np.zeros((20, 16), np.int32)
    codes[2:18, 2:4] = 1  # a U: two arms joined at the bottom, many strips tall
    codes[2:18, 8:10] = 1
    codes[16:18, 2:10] = 1
    codes[5:9, 12:15] = 2  # a ring of class 2 around a class-0 hole
    codes[6:8, 13] = 0
    codes[0, 15] = -1  # nodata pixel
    codes[10, 12], codes[11, 13] = 1, 1  # diagonal neighbours: two objects
    path = tmp_path / f"p{strip}.geojson"
    written = _stream(codes, path, strip=strip)
    features = json.loads(path.read_text())["features"]
    got = sorted((f["properties"]["class"], f["properties"]["pixels"]) for f in features)
    assert got == _whole_map_components(codes, -1) and written == len(features)
    for f in features:
        geometry = shapely.geometry.shape(f["geometry"])
        assert geometry.is_valid and geometry.area == pytest.approx(f["properties"]["pixels"] * 100.0)
        assert f["properties"]["area"] == pytest.approx(f["properties"]["pixels"] * 100.0)
        assert f["properties"]["mean_confidence"] == pytest.approx(0.75)
    ring = [shapely.geometry.shape(f["geometry"]) for f in features if f["properties"]["class"] == 2]
    assert len(ring) == 1 and len(ring[0].interiors) == 1  # the hole survives the merge


def test_min_area_and_geopackage(tmp_path):
    import pyogrio.raw

    codes = np.zeros((12, 12), np.int32)
    codes[1:11, 1:3] = 1
    codes[5, 8] = 1  # 1 px: dropped with min area 2
    path = tmp_path / "p.gpkg"
    assert _stream(codes, path, strip=4, min_area_px=2) == 2  # background + the bar
    meta, _, geometry, fields = pyogrio.raw.read(str(path))
    assert CRS.from_user_input(meta["crs"]) == CRS.from_epsg(32119) and sorted(fields[0].tolist()) == [0, 1]


@pytest.mark.slow  # ~6 s: a short eval seg run, then predict seg with --vector in small strips
def test_predict_seg_writes_vectors_while_streaming(geotiff_folder, tiny_backbone, tmp_path, one_torch_thread):
    import rasterio

    from dinov2_repro.cli import main

    run = tmp_path / "run"
    assert main(["eval", "seg", "--data", str(geotiff_folder), "--backbone", str(tiny_backbone), "--tile", "28",
                 "--decoder", "linear", "--iterations", "20", "--lrs", "0.01", "--out-dir", str(run)]) == 0
    scene = geotiff_folder / "images" / "scene.tif"
    out, vector = tmp_path / "map.tif", tmp_path / "map.geojson"
    assert main(["predict", "seg", "--checkpoint", str(run), "--scene", str(scene), "--out", str(out),
                 "--vector", str(vector), "--overlap", "0.5"]) == 0  # strips of 14 rows over a 112-row scene
    with rasterio.open(out) as src:
        codes, nodata = src.read(1), src.nodata
    features = json.loads(vector.read_text())["features"]
    got = sorted((f["properties"]["class"], f["properties"]["pixels"]) for f in features)
    assert got == _whole_map_components(codes, int(nodata))
    assert all(0.5 <= f["properties"]["mean_confidence"] <= 1.0 for f in features)
    assert main(["predict", "seg", "--checkpoint", str(run), "--scene", str(scene), "--out", str(out),
                 "--vector", str(scene)]) == 2  # the input scene is refused as a vector output too
    assert main(["predict", "seg", "--checkpoint", str(run), "--scene", str(scene), "--out", str(out),
                 "--vector", str(tmp_path / "x.shp")]) == 2
