"""kNN search sharded over the database: FAISS shards with an exact merge.

The database (the pool for dedup, the dedup selection for retrieval) is cut into items of
``rows_per_item`` rows, fixed by the config. An IVF index is trained once, on a seeded sample
read from the memory-mapped embeddings, and saved; each item copies that trained (empty) index,
adds only its rows, and searches every query (streamed in batches). Scores are re-computed
exactly; the merge keeps, per query, the k best over all items, ordered by (score descending, id
ascending). Items are the same for any shard count, and every query probes the same IVF lists in
every item (one shared quantizer), so the merged result does not depend on N. Only one item's
rows (and its index) are in RAM at a time.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .knn import choose_index, has_faiss_gpu, rescore, search, set_nprobe
from .store import EmbeddingStore

log = logging.getLogger(__name__)


def item_ranges(num_rows: int, rows_per_item: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows_per_item, num_rows)) for s in range(0, num_rows, rows_per_item)]


def train_shared_index(store: EmbeddingStore, *, factory: str, seed: int, path: Path,
                       rows: np.ndarray | None = None) -> str:
    """Train the (empty) index once and save it to ``path``; returns the factory string used.
    ``rows``: the database is that subset of the store's rows (all rows when None)."""
    import faiss

    from dinov2_repro.io.files import atomic_output

    n = len(store) if rows is None else len(rows)
    if factory == "auto":
        factory = choose_index(n, gpu=has_faiss_gpu())
    index = faiss.index_factory(store.dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index)
        limit = max(32 * ivf.nlist, 10_000)
        rng = np.random.default_rng(seed)
        picks = np.arange(n) if n <= limit else np.sort(rng.choice(n, limit, replace=False))
        if len(picks) < ivf.nlist:
            raise ValueError(f"dedup.index {factory!r} needs >= {ivf.nlist} training vectors, the pool has {len(picks)}")
        ivf.cp.seed, ivf.cp.niter, ivf.cp.min_points_per_centroid = seed, 10, 1
        start = time.time()
        index.train(store.take(picks if rows is None else rows[picks]))
        log.info("knn: trained %s on %d of %d vectors in %.1fs", factory, len(picks), n, time.time() - start)
    with atomic_output(path) as tmp:
        faiss.write_index(index, str(tmp))
    return factory


def item_index(template_path: Path, database: np.ndarray, *, nprobe: int):
    """A copy of the trained (empty) index holding only ``database`` (one item's rows)."""
    import faiss

    index = faiss.read_index(str(template_path))
    index.add(database)
    set_nprobe(index, nprobe)
    return index


def search_queries(index, database: np.ndarray, ids: np.ndarray, query_blocks, num_queries: int, *, k: int,
                   query_batch: int, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of ``num_queries`` queries, given as (start, rows) blocks, against one item's
    index: (Q, min(k, rows)), exact scores, ``ids`` of the item's rows, -1/-inf where fewer were found."""
    k = min(k, len(database))
    scores = np.empty((num_queries, k), np.float32)
    found = np.empty((num_queries, k), np.int64)
    for q0, queries in query_blocks:
        _, local = search(index, queries, k, batch=query_batch)
        scores[q0 : q0 + len(queries)] = rescore(queries, database, local)
        found[q0 : q0 + len(queries)] = np.where(local >= 0, ids[np.maximum(local, 0)], -1)
        if progress is not None:
            progress.update(len(queries))
    return scores, found


def search_item(template_path: Path, store: EmbeddingStore, start: int, stop: int, *, k: int, nprobe: int,
                query_batch: int, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of every query row against database rows [start, stop): (Q, min(k, rows)), exact
    scores, global ids, -1/-inf where fewer were found."""
    database = store.rows(start, stop)
    index = item_index(template_path, database, nprobe=nprobe)
    return search_queries(index, database, np.arange(start, stop, dtype=np.int64), store.chunks(query_batch), len(store),
                          k=k, query_batch=query_batch, progress=progress)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int, *, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Per query the k best (score desc, id asc) over the items' (scores, ids); -1/-inf pad."""
    num_queries = len(parts[0][0])
    width = min(k, sum(p[0].shape[1] for p in parts))
    out_scores = np.empty((num_queries, width), np.float32)
    out_ids = np.empty((num_queries, width), np.int64)
    for q0 in range(0, num_queries, batch):
        s = np.concatenate([np.asarray(p[0][q0 : q0 + batch]) for p in parts], axis=1)
        i = np.concatenate([np.asarray(p[1][q0 : q0 + batch]) for p in parts], axis=1)
        s = np.where(i >= 0, s, -np.inf)
        # Missing ids sort last (id key 2**62), then by score desc, then id asc.
        order = np.lexsort((np.where(i >= 0, i, 2**62), -s), axis=1)[:, :width]
        out_scores[q0 : q0 + batch] = np.take_along_axis(s, order, 1)
        out_ids[q0 : q0 + batch] = np.take_along_axis(i, order, 1)
    return out_scores, out_ids
