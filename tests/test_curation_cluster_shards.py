"""The sharded cluster stage (data_curation/stages_cluster.py) on a synthetic pool of embeddings:
the same hierarchy.npz bytes for N = 1, 3, 4; the same clusters as the in-RAM hierarchical
k-means; a killed assign shard reruns alone; progress per shard."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from dinov2_repro.curation.config import load_curation_config
from dinov2_repro.curation.fingerprint import record_stage
from dinov2_repro.curation.hkmeans import hierarchical_kmeans
from dinov2_repro.curation.io import atomic_write_json
from dinov2_repro.curation.paths import embeddings_in_ram, write_selected
from dinov2_repro.curation.pipeline import run_stage
from dinov2_repro.curation.stages_cluster import CLUSTER
from dinov2_repro.curation.units import FAIL_SHARD_ENV, SimulatedFailure

NUM_ROWS, DIM = 460, 16
# 414 selected rows in 9 assignment items of 46 rows; levels of 6 then 2 clusters.
CLUSTER_KEYS = ["cluster.levels=[6,2]", "cluster.shard_size=46", "cluster.resample_points=5", "cluster.kmeans_iters=8",
                "num_threads=1", "embed.progress=true"]


def _pool(out: Path) -> np.ndarray:
    """Embeddings of 8 blobs of very different sizes in 3 float16 shards, and a dedup selection
    (every row but each 10th); returns the selected rows."""
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(8, DIM))
    sizes = np.array([200, 120, 60, 30, 20, 15, 10, 5])
    x = np.concatenate([c + 0.3 * rng.normal(size=(n, DIM)) for c, n in zip(centers, sizes)])[rng.permutation(NUM_ROWS)]
    folder = out / "embeddings" / "pool"
    folder.mkdir(parents=True)
    shards = []
    for j, start in enumerate(range(0, NUM_ROWS, 200)):
        np.save(folder / f"shard_{j:05d}.npy", x[start : start + 200].astype(np.float16))
        shards.append({"file": f"shard_{j:05d}.npy", "start": start, "stop": min(start + 200, NUM_ROWS)})
    atomic_write_json(folder / "index.json", {"num_rows": NUM_ROWS, "dim": DIM, "dtype": "float16", "shards": shards})
    rows = np.array([r for r in range(NUM_ROWS) if r % 10], dtype=np.int64)
    write_selected(out / "dedup" / "selected.json", "dedup", rows, {int(r): "kept" for r in rows}, {})
    return rows


def _cfg(out: Path, *extra: str):
    return load_curation_config(None, [f"output_dir={out}", *CLUSTER_KEYS, *extra])


def _run(out: Path, num_shards: int, *extra: str) -> bytes:
    rows = _pool(out)
    cfg = _cfg(out, *extra)
    record_stage(cfg, "dedup", [])
    run_stage(cfg, "cluster", num_shards=num_shards)
    assert np.array_equal(np.load(out / "cluster" / "hierarchy.npz")["rows"], rows)
    return (out / "cluster" / "hierarchy.npz").read_bytes()


@pytest.fixture(scope="module")
def one_task(tmp_path_factory) -> bytes:
    return _run(tmp_path_factory.mktemp("n1") / "run", 1)


@pytest.mark.parametrize("num_shards", [3, 4])
def test_shards_write_the_same_hierarchy_bytes(one_task, tmp_path, num_shards, caplog):
    with caplog.at_level(logging.INFO):
        assert _run(tmp_path / "run", num_shards) == one_task
    (work,) = (tmp_path / "run" / "cluster" / "work").iterdir()
    markers = {p.name for p in (work / "done").iterdir()}
    for phase in ("assign_1", "assign_2", "assign"):
        assert {f"{phase}.{i:05d}-of-{num_shards:05d}.json" for i in range(num_shards)} <= markers
    assert {"fit.00000-of-00001.json", "refit_2.00000-of-00001.json", "merge.00000-of-00001.json"} <= markers
    # Progress per shard (log lines: stderr is not a terminal here).
    assert f"cluster assign[{num_shards - 1}/{num_shards}]:" in caplog.text and "row/s" in caplog.text


@pytest.mark.parametrize("max_points", [256, 12])  # 256: fit on every row; 12: on a seeded sample of 6 x 12 rows
def test_sharded_stage_finds_the_clusters_of_the_in_ram_kmeans(tmp_path, max_points):
    """Merging per-item top-r lists is exact: the clusters equal hkmeans.hierarchical_kmeans on
    the whole matrix with the same settings (which samples the same rows when it subsamples)."""
    out = tmp_path / "run"
    _run(out, 3, f"cluster.max_points_per_centroid={max_points}")
    cfg = _cfg(out, f"cluster.max_points_per_centroid={max_points}")
    rows = np.load(out / "cluster" / "hierarchy.npz")["rows"]
    ref = hierarchical_kmeans(embeddings_in_ram(cfg, "pool", rows), [6, 2], resampling_steps=2, resample_points=5, niter=8,
                              seed=0, max_points_per_centroid=max_points)
    got = np.load(out / "cluster" / "hierarchy.npz")
    for level in range(2):
        np.testing.assert_array_equal(got[f"labels_{level}"], ref.labels[level])
        np.testing.assert_allclose(got[f"centroids_{level}"], ref.centroids[level], atol=1e-5)
    # The resampling moved the centroids: the stage did not stop at the first fit.
    (first_fit,) = (out / "cluster" / "work").glob("*/fit/centroids.npy")
    assert not np.allclose(np.load(first_fit), got["centroids_0"], atol=1e-3)


@pytest.mark.faults
def test_killed_assign_shard_reruns_alone(one_task, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    monkeypatch.setenv(FAIL_SHARD_ENV, "cluster:assign:1")
    with pytest.raises(SimulatedFailure):
        _run(out, 3)
    (work,) = (out / "cluster" / "work").iterdir()
    before = {p.name: p.stat().st_mtime_ns for p in (work / "assign").glob("item_*.npz")}
    # Shard 0 took items 0, 3, 6; shard 1 wrote item 1 and failed; shard 2 never ran.
    assert sorted(before) == [f"item_{j:05d}.npz" for j in (0, 1, 3, 6)]
    monkeypatch.delenv(FAIL_SHARD_ENV)
    with caplog.at_level(logging.INFO):
        run_stage(_cfg(out), "cluster", num_shards=3)
    text = caplog.text
    assert "cluster/assign[0/3]: complete, skipped" in text and "cluster/assign_2[1/3]: complete, skipped" in text
    assert "cluster/assign[1/3]: running" in text and "cluster/fit[0/1]: complete, skipped" in text
    after = {p.name: p.stat().st_mtime_ns for p in (work / "assign").glob("item_*.npz")}
    assert all(after[name] == mtime for name, mtime in before.items())  # nothing finished was recomputed
    assert len(after) == 9
    assert (out / "cluster" / "hierarchy.npz").read_bytes() == one_task


def test_phases_follow_the_resampling_steps(tmp_path):
    names = [p.name for p in CLUSTER.phase_list(_cfg(tmp_path, "cluster.resampling_steps=1"))]
    assert names == ["fit", "assign_1", "refit_1", "assign", "merge"]
    assert [p.name for p in CLUSTER.phase_list(_cfg(tmp_path, "cluster.resampling_steps=0"))] == ["fit", "assign", "merge"]
