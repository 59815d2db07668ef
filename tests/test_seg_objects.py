"""Object-level (SpaceNet-style) metrics against hand-built cases, and `eval objects` on files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dinov2_repro.eval.segmentation.objects import mask_object_counts, match_objects, polygonise
from test_seg import _write_tif


def _box(x0, y0, x1, y1):
    import shapely.geometry

    return shapely.geometry.box(x0, y0, x1, y1)


def _metrics(pred, truth, **kw):
    counts = match_objects(pred, truth, **kw)
    return counts.metrics(iou_threshold=kw.get("iou_threshold", 0.5), min_area_px=kw.get("min_area", 0.0))


def test_one_prediction_covering_two_touching_buildings_matches_one():
    truth = [_box(0, 0, 10, 10), _box(10, 0, 20, 10)]  # two touching 10x10 buildings
    merged = [_box(0, 0, 20, 10)]  # one predicted blob over both: IoU 100/200 = 0.5 with each
    m = _metrics(merged, truth)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert m["object_precision"] == 1.0 and m["object_recall"] == 0.5 and m["object_f1"] == pytest.approx(2 / 3)
    assert _metrics(merged, truth, iou_threshold=0.51)["tp"] == 0  # configurable threshold
    separate = [_box(0, 0, 10, 10), _box(11, 0, 20, 10)]  # the touching pair predicted apart: both match
    assert _metrics(separate, truth)["tp"] == 2


def test_highest_iou_first_and_one_to_one():
    truth = [_box(0, 0, 10, 10)]
    pred = [_box(0, 0, 10, 8), _box(0, 0, 10, 9)]  # IoU 0.8 and 0.9 with the same building
    counts = match_objects(pred, truth)
    assert counts.tp == 1 and counts.matched_ious == [pytest.approx(0.9)] and counts.n_pred == 2
    # overlapping candidates: the pairs are taken by IoU, not by list order
    truth2 = [_box(0, 0, 10, 10), _box(6, 0, 16, 10)]
    pred2 = [_box(2, 0, 12, 10), _box(5, 0, 15, 10)]
    c2 = match_objects(pred2, truth2)  # P1-A .667, P1-B .43, P2-A .33, P2-B .818 -> P2-B then P1-A
    assert c2.tp == 2 and sorted(round(v, 3) for v in c2.matched_ious) == [0.667, 0.818]


def test_holes_count_in_the_iou():
    donut = _box(0, 0, 10, 10).difference(_box(3, 3, 7, 7))  # area 84
    assert _metrics([_box(0, 0, 10, 10)], [donut])["tp"] == 1  # IoU 84/100
    ring = _box(0, 0, 10, 10).difference(_box(1, 1, 9, 9))  # area 36: a filled prediction is IoU 0.36
    assert _metrics([_box(0, 0, 10, 10)], [ring])["tp"] == 0
    mask = np.zeros((12, 12), bool)
    mask[1:11, 1:11] = True
    mask[4:8, 4:8] = False
    (polygon,) = polygonise(mask)
    assert polygon.area == 84 and len(polygon.interiors) == 1  # holes survive polygonisation


def test_slivers_below_min_area_are_dropped_and_bins_count_recall():
    truth = np.zeros((40, 40), bool)
    truth[0:5, 0:5] = True  # 25 px
    truth[10:30, 10:30] = True  # 400 px
    pred = truth.copy()
    pred[0:5, 0:5] = False  # small building missed
    pred[35, 35:37] = True  # 2 px sliver
    m = mask_object_counts(pred, truth, min_area_px=4, size_bins_px=(100,)).metrics(iou_threshold=0.5, min_area_px=4)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)  # the sliver is no false positive
    assert m["recall_by_size"] == {"[0, 100) px": {"n_truth": 1, "recall": 0.0}, ">= 100 px": {"n_truth": 1, "recall": 1.0}}
    m0 = mask_object_counts(pred, truth, size_bins_px=(100,)).metrics(iou_threshold=0.5, min_area_px=0)
    assert m0["fp"] == 1
    diagonal = np.zeros((4, 4), bool)
    diagonal[0, 0] = diagonal[1, 1] = True
    assert len(polygonise(diagonal)) == 2  # 4-connected: diagonal neighbours are separate objects


def test_eval_objects_cli_with_raster_instance_and_vector_truth(tmp_path, capsys):
    from dinov2_repro.cli import main

    pred = np.zeros((30, 40), np.int32)
    pred[0:10, 0:20] = 1  # covers two touching buildings
    pred[20:25, 30:35] = 1  # a false positive
    pred[29, 39] = -1  # nodata
    _write_tif(tmp_path / "map.tif", pred, nodata=-1)
    instances = np.zeros((30, 40), np.int32)
    instances[0:10, 0:10], instances[0:10, 10:20] = 7, 8
    _write_tif(tmp_path / "inst.tif", instances)
    out = tmp_path / "m.json"
    assert main(["eval", "objects", "--pred", str(tmp_path / "map.tif"), "--truth", str(tmp_path / "inst.tif"),
                 "--truth-instances", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1) and m["object_f1"] == pytest.approx(0.5)
    # the same buildings as a GeoJSON in the map's CRS (pixel size 10 m, origin (1000, 2000))
    features = [{"type": "Feature", "properties": {}, "geometry": _box(1000 + 100 * i, 1900, 1100 + 100 * i, 2000).__geo_interface__}
                for i in range(2)]
    geojson = tmp_path / "truth.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": features,
                                   "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32119"}}}))
    assert main(["eval", "objects", "--pred", str(tmp_path / "map.tif"), "--truth", str(geojson), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1) and m["truth_source"] == "vector"
    assert main(["eval", "objects", "--pred", str(tmp_path / "map.tif"), "--truth", str(geojson), "--out", str(geojson)]) == 2
    capsys.readouterr()
