"""Near-duplicate quality on real shipped images (bounded), its ground-truth rules and metrics,
and the benchmark's --quick smoke mode. The full experiment and the 1M-vector benchmark run
from benchmarks/curation.py; their numbers are in benchmarks/results/curation_cpu.json."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dinov2_repro.curation.quality import build_quality_pool, labelled_pairs, pair_metrics, run_quality

ROOT = Path(__file__).resolve().parents[1]


def test_ground_truth_rules_for_overlapping_tiles():
    def tile(x0):
        return {"crs": "EPSG:1", "bounds": [x0, 0, x0 + 64, 64]}

    rows = [tile(0), tile(8), tile(40), tile(200), {"path": "a.png"}, {"path": "a_copy.png"}]
    group = [0, 1, 2, 3, 4, 4]
    positives, ignored = labelled_pairs(rows, group, geo_iou=0.5)
    assert (4, 5) in positives  # injected copy
    assert (0, 1) in positives  # IoU 56/72 > 0.5: geographic duplicate
    assert (0, 2) in ignored and (1, 2) in ignored  # partial overlap: neither
    assert all(3 not in p for p in positives | ignored)  # disjoint tile: negative with everyone


def test_pair_metrics_perfect_and_random_embeddings():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((30, 16)).astype(np.float32)
    x = np.concatenate([base, base[:10] + 0.01 * rng.standard_normal((10, 16)).astype(np.float32)])
    positives = {(i, 30 + i) for i in range(10)}
    perfect = pair_metrics(x, positives, set(), threshold=0.95)
    assert perfect["uAP"] == 1.0 and perfect["precision"] == 1.0 and perfect["recall"] == 1.0
    noise = pair_metrics(rng.standard_normal((40, 16)).astype(np.float32), positives, set(), threshold=0.95)
    assert noise["uAP"] < 0.3 and noise["recall"] < 0.5


def test_quality_pool_injects_recorded_copies(tmp_path):
    manifest, truth = build_quality_pool(tmp_path, photo_limit=4, scene_tile_limit=6, seed=1)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == truth["num_base"] + len(truth["injected"]) and truth["injected"]
    for record in truth["injected"]:
        assert truth["group"][record["row"]] == record["source"]
        row = rows[record["row"]]
        if record["transforms"] == ["shift"]:
            assert row["window"] != rows[record["source"]]["window"] and row["path"] == rows[record["source"]]["path"]
        else:
            assert (tmp_path / row["path"]).is_file()


@pytest.mark.slow
def test_trained_copy_detector_beats_baselines_on_real_images(tmp_path):
    """Bounded version of the quality experiment: a short training on a smaller pool. The
    trained, dihedral-pooled descriptor must rank injected copies better than both baselines."""
    report = run_quality(tmp_path, steps=40, batch_size=32, photo_limit=10, scene_tile_limit=16, seed=0)
    results = report["results"]
    assert report["injected"] >= 10
    assert results["sscd"]["uAP"] > results["pixel"]["uAP"] + 0.1
    assert results["sscd"]["uAP"] > results["phash"]["uAP"] + 0.1
    assert report["sscd_training"]["last_loss"] < report["sscd_training"]["first_loss"]
    curve = results["sscd"]["pr_curve"]
    assert all(a["recall"] >= b["recall"] for a, b in zip(curve, curve[1:]))  # recall falls as the threshold rises


@pytest.mark.slow
def test_benchmark_quick_mode(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "curation.py"), "--part", "dedup", "--quick", "--n", "4000",
                    "--output", str(out)], check=True, cwd=ROOT, capture_output=True, timeout=300)
    result = json.loads(out.read_text())["dedup_cpu"]
    assert result["n"] == 4000 and result["planted_pairs"] > 0
    assert result["recall_vs_exact"] >= 0.95 and result["knn_recall_at_64_vs_exact"] >= 0.95
    assert result["dedup_wall_s"] > 0
