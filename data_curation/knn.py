"""k-nearest-neighbour search on L2-normalised embeddings (inner product = cosine) with FAISS.

The index is chosen by pool size: exact Flat below ``FLAT_MAX``; IVF with
~4 sqrt(N) lists (Flat codes, so scores are exact) up to ``IVF_SQRT_MAX``; IVF65536 with an HNSW
coarse quantizer beyond. On a GPU (faiss-gpu) the coarse quantizer must be flat. Queries are
batched; candidate scores are always re-computed exactly from the vectors before any threshold
(range search over compressed codes misses most true neighbours).
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np

log = logging.getLogger(__name__)

FLAT_MAX = 50_000
IVF_SQRT_MAX = 2_000_000


def _faiss():
    import faiss

    return faiss


def has_faiss_gpu() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def choose_index(num_vectors: int, *, gpu: bool = False) -> str:
    """A FAISS index factory string for a pool of ``num_vectors``."""
    if num_vectors <= FLAT_MAX:
        return "Flat"
    if num_vectors <= IVF_SQRT_MAX:
        nlist = int(2 ** round(math.log2(4 * math.sqrt(num_vectors))))
        return f"IVF{nlist},Flat"
    return "IVF65536,Flat" if gpu else "IVF65536_HNSW32,Flat"


def build_index(database: np.ndarray, *, factory: str = "auto", nprobe: int = 16, seed: int = 0,
                use_gpu: bool | None = None, train_size: int | None = None):
    """Train (on an explicit, seeded subsample) and fill an inner-product index."""
    faiss = _faiss()
    database = np.ascontiguousarray(database, dtype=np.float32)
    n, dim = database.shape
    gpu = has_faiss_gpu() if use_gpu is None else use_gpu
    if factory == "auto":
        factory = choose_index(n, gpu=gpu)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        nlist = faiss.extract_index_ivf(index).nlist if "IVF" in factory else 0
        # faiss would silently subsample to 256 points per list: subsample ourselves, seeded.
        limit = train_size or max(32 * nlist, 10_000)
        rng = np.random.default_rng(seed)
        sample = database if n <= limit else database[np.sort(rng.choice(n, limit, replace=False))]
        if nlist and sample.shape[0] < nlist:
            raise ValueError(f"index {factory!r} needs >= {nlist} training vectors, the pool has {sample.shape[0]}")
        if nlist:
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = seed
            # 10 k-means iterations (faiss default 25) and 32 points per list: coarse lists only
            # route queries, and this keeps a 1M-vector index under a minute of training on 2 cores.
            ivf.cp.niter = 10
            ivf.cp.min_points_per_centroid = 1
        start = time.time()
        index.train(sample)
        log.info("trained %s on %d vectors in %.1fs", factory, sample.shape[0], time.time() - start)
    if gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        index._resources = resources  # keep alive
    index.add(database)
    set_nprobe(index, nprobe)
    return index


def set_nprobe(index, nprobe: int) -> None:
    """Lists scanned per query of an IVF index (no-op for other indexes)."""
    faiss = _faiss()
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:  # not an IVF index
        pass


def search(index, queries: np.ndarray, k: int, *, batch: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Batched kNN: (scores, ids), each (Q, k); ids -1 where fewer than k were found."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if index.ntotal == 0:
        raise ValueError("kNN search in an empty database (did an earlier stage remove every image?)")
    k = min(k, index.ntotal)
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), batch):
        s, i = index.search(queries[start : start + batch], k)
        scores[start : start + batch], ids[start : start + batch] = s, i
    return scores, ids


def rescore(queries: np.ndarray, database: np.ndarray, ids: np.ndarray, *, batch: int = 2048) -> np.ndarray:
    """Exact inner products of each query with its candidate ids (-inf for missing ids)."""
    out = np.full(ids.shape, -np.inf, np.float32)
    for start in range(0, len(ids), batch):
        block = ids[start : start + batch]
        valid = block >= 0
        cand = database[np.where(valid, block, 0)]
        exact = np.einsum("qd,qkd->qk", queries[start : start + batch], cand)
        out[start : start + batch] = np.where(valid, exact, -np.inf)
    return out


def knn(queries: np.ndarray, database: np.ndarray, k: int, *, factory: str = "auto", nprobe: int = 16,
        batch: int = 16384, seed: int = 0, index=None) -> tuple[np.ndarray, np.ndarray]:
    """kNN of ``queries`` in ``database`` (both L2-normalised) with exact scores, sorted descending."""
    if index is None:
        index = build_index(database, factory=factory, nprobe=nprobe, seed=seed)
    _, ids = search(index, queries, k, batch=batch)
    scores = rescore(queries, database, ids)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def brute_force_knn(queries: np.ndarray, database: np.ndarray, k: int, *, batch: int = 4096,
                    device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN by matmul + top-k in torch (the reference, and the GPU path without faiss-gpu)."""
    import torch

    db = torch.from_numpy(np.ascontiguousarray(database, dtype=np.float32)).to(device)
    k = min(k, db.shape[0])
    all_scores, all_ids = [], []
    for start in range(0, len(queries), batch):
        q = torch.from_numpy(np.ascontiguousarray(queries[start : start + batch], dtype=np.float32)).to(device)
        s, i = torch.topk(q @ db.t(), k, dim=1)
        all_scores.append(s.cpu().numpy())
        all_ids.append(i.cpu().numpy().astype(np.int64))
    return np.concatenate(all_scores), np.concatenate(all_ids)


def kmeans_sample(num_rows: int, k: int, *, seed: int, max_points_per_centroid: int) -> np.ndarray:
    """Positions of the rows k-means trains on: every row, or a seeded ``k x max_points_per_centroid``
    subsample (the sharded stages draw it to read only those rows)."""
    limit = max_points_per_centroid * k
    if num_rows <= limit:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).choice(num_rows, limit, replace=False))


def kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, max_points_per_centroid: int = 256,
           init_centroids: np.ndarray | None = None, spherical: bool = False) -> np.ndarray:
    """faiss.Kmeans with its silent subsampling made explicit: we draw the
    ``max_points_per_centroid * k`` training points ourselves (seeded) and tell faiss not to."""
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if k > len(x):
        raise ValueError(f"k-means with k={k} needs at least {k} points, got {len(x)}")
    if len(x) > max_points_per_centroid * k:
        log.info("k-means: subsampling %d of %d points (max_points_per_centroid=%d)", max_points_per_centroid * k, len(x),
                 max_points_per_centroid)
        x = x[kmeans_sample(len(x), k, seed=seed, max_points_per_centroid=max_points_per_centroid)]
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=spherical,
                      max_points_per_centroid=len(x), min_points_per_centroid=1, gpu=has_faiss_gpu(), verbose=False)
    km.train(x, init_centroids=None if init_centroids is None else np.ascontiguousarray(init_centroids, dtype=np.float32))
    return km.centroids.copy()


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) of each point: (labels, squared distances)."""
    faiss = _faiss()
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return labels[:, 0], dist[:, 0]
