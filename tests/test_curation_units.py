"""Unit tests of the curation building blocks: kNN, union-find, dedup kinds, retrieval, hierarchical k-means."""
from __future__ import annotations

import numpy as np
import pytest

from dinov2_repro.curation.dedup import (UnionFind, box_iou, footprint_pairs, geo_dedup, knn_edges, pick_representatives,
                                 relative_dedup, self_dedup)
from dinov2_repro.curation.hkmeans import balance_stats, balanced_allocation, balanced_sample, hierarchical_kmeans
from dinov2_repro.curation.knn import brute_force_knn, choose_index, kmeans, knn, normalize
from dinov2_repro.curation.retrieve import cluster_based, sample_based


def _clustered(n: int, dim: int, centers: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    return normalize(c[rng.integers(0, centers, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32))


@pytest.mark.parametrize("factory,nprobe", [("Flat", 1), ("IVF16,Flat", 16)])
def test_knn_equals_brute_force_on_small_pool(factory, nprobe):
    x = _clustered(600, 32, 8, seed=1)
    scores, ids = knn(x, x, 10, factory=factory, nprobe=nprobe)
    ref_scores, ref_ids = brute_force_knn(x, x, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # Ids may only differ among exact ties.
    differ = ids != ref_ids
    assert np.all(np.isclose(scores[differ], ref_scores[differ], atol=1e-6))
    assert (ids[:, 0] == np.arange(len(x))).mean() > 0.99  # the query itself comes first


def test_index_choice_follows_pool_size():
    assert choose_index(10_000) == "Flat"
    assert choose_index(1_000_000).startswith("IVF4096,")
    assert choose_index(5_000_000) == "IVF65536_HNSW32,Flat"
    assert choose_index(5_000_000, gpu=True) == "IVF65536,Flat"  # GPU coarse quantizer must be flat


def test_union_find_matches_scipy_components():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(0)
    n = 500
    src, dst = rng.integers(0, n, 300), rng.integers(0, n, 300)
    uf = UnionFind(n)
    uf.union_edges(src, dst)
    labels = uf.labels()
    _, ref = connected_components(coo_matrix((np.ones(300), (src, dst)), shape=(n, n)), directed=False)
    # Same partition: label pairs map one-to-one.
    assert len(set(zip(labels, ref))) == len(set(labels)) == len(set(ref))


def test_knn_edges_threshold_and_self_dedup_policy():
    # 0-1-2 chained above threshold, 3 alone, 4 below threshold to 3.
    ids = np.array([[0, 1, 3], [1, 2, 0], [2, 1, 4], [3, 4, 0], [4, 3, 2]])
    scores = np.array([[1, .9, .1], [1, .8, .9], [1, .8, .2], [1, .5, .1], [1, .5, .2]], np.float32)
    src, dst, sims = knn_edges(scores, ids, 0.6)
    assert sorted(zip(src.tolist(), dst.tolist())) == [(0, 1), (1, 2)]
    priority = np.array([1.0, 5.0, 5.0, 0.0, 0.0])  # rows 1 and 2 tie: lowest index wins
    keep, labels = self_dedup(5, src, dst, priority)
    assert keep.tolist() == [False, True, False, True, True]
    assert labels[0] == labels[1] == labels[2] != labels[3]
    # 'first' policy keeps the lowest row of each component.
    keep_first = pick_representatives(labels, np.zeros(5))
    assert keep_first.tolist() == [True, False, False, True, True]


def test_relative_dedup_drops_whole_touching_components():
    # Pool 0-1 linked, 1 touches reference 0; pool 2-3 linked without reference; 4 alone.
    mask = relative_dedup(5, np.array([0, 2]), np.array([1, 3]), ref_pool_ids=np.array([1]), ref_ids=np.array([0]))
    assert mask.tolist() == [True, True, False, False, False]


def test_geo_dedup_by_footprint_iou():
    def row(x0, y0, crs="EPSG:1"):
        return {"crs": crs, "bounds": [x0, y0, x0 + 64, y0 + 64], "width": 64, "height": 64}

    rows = [row(0, 0), row(8, 8), row(80, 0), row(128, 0), row(0, 0, crs="EPSG:2"), {"path": "photo.png"}]
    assert box_iou(np.array([0, 0, 64, 64.]), np.array([[8, 8, 72, 72.]]))[0] == pytest.approx(56 * 56 / (2 * 4096 - 56 * 56))
    src, dst, ious = footprint_pairs(rows, 0.0)
    assert sorted(zip(src.tolist(), dst.tolist())) == [(0, 1), (2, 3)]  # other CRS and no-bounds rows never pair
    keep, _ = geo_dedup(rows, 0.5, np.zeros(len(rows)))
    assert keep.tolist() == [True, False, True, True, True, True]  # IoU(2,3) = 1/7 <= 0.5 stays
    # A chain A~B~C with A, C disjoint keeps A and C (coverage), not one tile per chain.
    chain = [row(0, 0), row(40, 0), row(80, 0)]
    keep, labels = geo_dedup(chain, 0.1, np.zeros(3))
    assert keep.tolist() == [True, False, True] and len(set(labels.tolist())) == 1
    # Priority decides which overlapping tile survives.
    keep, _ = geo_dedup(chain, 0.1, np.array([0.0, 1.0, 0.0]))
    assert keep.tolist() == [False, True, False]


def test_balanced_allocation_caps_big_and_keeps_small_whole():
    counts = balanced_allocation([100, 5, 40, 2], 30)
    assert counts.sum() == 30
    assert counts[1] == 5 and counts[3] == 2  # rare clusters whole
    assert counts[0] - counts[2] in (0, 1) and counts.max() <= 12  # cap x with sum min(x, size) = 30
    assert balanced_allocation([3, 4], 100).tolist() == [3, 4]
    assert balanced_allocation([3, 4], 0).tolist() == [0, 0]


def test_hierarchical_kmeans_and_balanced_sampling_improve_balance():
    rng = np.random.default_rng(0)
    # Very unbalanced concepts: one big mode and several small ones.
    centers = rng.standard_normal((6, 16)).astype(np.float32) * 4
    sizes = [600, 40, 30, 20, 15, 10]
    x = np.concatenate([c + rng.standard_normal((s, 16)).astype(np.float32) for c, s in zip(centers, sizes)])
    h = hierarchical_kmeans(x, [12, 4], resampling_steps=1, resample_points=8, niter=10, seed=0)
    assert len(h.labels) == 2 and len(h.labels[0]) == len(x) and len(h.labels[1]) == 12
    picked = balanced_sample(h, 150, seed=0)
    assert len(picked) == 150 and len(np.unique(picked)) == 150
    truth = np.repeat(np.arange(6), sizes)
    before, after = balance_stats(np.bincount(truth)), balance_stats(np.bincount(truth[picked], minlength=6))
    assert after["entropy"] > before["entropy"] + 0.5
    assert np.bincount(truth[picked], minlength=6)[5] >= 8  # the rarest concept is (almost) kept whole


def test_kmeans_subsampling_is_explicit_and_seeded():
    x = _clustered(3000, 8, 4, seed=2)
    a = kmeans(x, 4, max_points_per_centroid=50, seed=3)
    b = kmeans(x, 4, max_points_per_centroid=50, seed=3)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="k=10"):
        kmeans(x[:5], 10)


def test_retrieval_sample_based_matches_brute_force_and_cluster_based_caps():
    pool = _clustered(800, 16, 10, seed=4)
    queries = pool[:20] + 0.01
    queries = normalize(queries)
    rows, stats = sample_based(pool, queries, 4, factory="auto")
    _, ref = brute_force_knn(queries, pool, 4)
    assert rows.tolist() == np.unique(ref).tolist()
    assert 0 <= stats["collision_rate"] < 1
    rows, stats = cluster_based(pool, queries, num_clusters=10, min_queries=1, per_cluster=15, cap=40, seed=0)
    assert len(rows) <= 40 and stats["clusters_selected"] >= 1
