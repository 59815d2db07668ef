"""The retrieve stage as a unit (units.py): retrieval against the query sets with the pool sharded.

The database is the dedup selection (its rows of the memory-mapped pool embeddings), cut into
items of ``retrieve.shard_size`` selected rows, fixed by the config (never by N). The query sets
(``retrieve.query_manifests``) are small and read whole. Phases by ``retrieve.mode``:

sample   knn_train (1 task)  train the IVF index (``dedup.index``) once on a seeded sample of the
                             selected rows (Flat: nothing to train); saved.
         knn       (N)       each item adds its rows to a copy of that index and searches every
                             query of every set (sharded_knn.py); exact scores.
         merge     (1 task)  per query the k best over the items (score desc, id asc); the union of
                             the neighbours of every set -> retrieve/selected.json.
cluster  fit       (1 task)  k-means (``retrieve.num_clusters``) on the seeded sample knn.kmeans
                             would draw from the selected rows (every row when few enough).
         assign    (N)       nearest centroid of each selected row, per item.
         merge     (1 task)  the queries' nearest centroids; clusters holding > min_queries queries
                             give up to per_cluster seeded-random members, capped per query set.
none     merge     (1 task)  every dedup survivor passes.

The result (retrieve/selected.json) is the same bytes for every N, and equals the one-task
in-RAM retrieval (retrieve.py) of the same selection: the same training sample and seeds.
"""
from __future__ import annotations

import logging

import numpy as np
from omegaconf import DictConfig

from .fingerprint import record_stage
from .io import atomic_save_npy, atomic_save_npz, atomic_write_json
from .paths import embedding_store, embeddings_in_ram, out, read_selected, write_selected
from .progress import Progress
from .sharded_knn import item_ranges
from .units import Phase, ShardContext, StageUnit, remove_other_work

log = logging.getLogger(__name__)


def retrieve_inputs(cfg: DictConfig) -> list[str]:
    """The dedup selection the retrieval runs on, and the embeddings."""
    return ["dedup", "embed"]


def _active(cfg: DictConfig) -> bool:
    return cfg.retrieve.mode != "none" and bool(cfg.retrieve.query_manifests)


def _selection(cfg: DictConfig) -> np.ndarray:
    rows = np.array(read_selected(cfg, "dedup")["rows"], dtype=np.int64)
    if _active(cfg) and len(rows) == 0:
        raise ValueError("retrieve: the dedup selection is empty; nothing to retrieve from")
    return rows


def _items(cfg: DictConfig, num_rows: int) -> list[tuple[int, int]]:
    """Positions [start, stop) in the selection of each database item (fixed by the config)."""
    return item_ranges(num_rows, int(cfg.retrieve.shard_size))


def _query_sets(cfg: DictConfig) -> list[str]:
    return [f"query_{i}" for i in range(len(cfg.retrieve.query_manifests))]


# ---- sample mode ------------------------------------------------------------------------------
def _k(cfg: DictConfig, num_rows: int) -> int:
    return min(int(cfg.retrieve.k), num_rows)


def knn_train(ctx: ShardContext) -> None:
    """The shared index, trained on a seeded sample of the selected rows."""
    from .sharded_knn import train_shared_index

    cfg = ctx.cfg
    rows = _selection(cfg)
    factory = train_shared_index(embedding_store(cfg, "pool"), factory=cfg.dedup.index, seed=int(cfg.seed),
                                 path=ctx.phase_dir / "index.faiss", rows=rows)
    atomic_write_json(ctx.phase_dir / "index.json", {"factory": factory, "rows": len(rows)})


def knn_search(ctx: ShardContext) -> None:
    """Each of this shard's database items against every query of every set."""
    from .sharded_knn import item_index, search_queries

    cfg = ctx.cfg
    rows = _selection(cfg)
    pool = embedding_store(cfg, "pool")
    queries = {name: embedding_store(cfg, name) for name in _query_sets(cfg)}
    batch = int(cfg.dedup.query_batch)
    todo = ctx.pending(_items(ctx.cfg, len(rows)))
    with Progress(len(todo) * sum(len(q) for q in queries.values()), f"retrieve knn[{ctx.shard}/{ctx.num_shards}]",
                  unit="query", enabled=cfg.embed.progress) as progress:
        for j, (start, stop) in todo:
            database = pool.take(rows[start:stop])
            index = item_index(ctx.work / "knn_train" / "index.faiss", database, nprobe=int(cfg.dedup.nprobe))
            found = {}
            for name, store in queries.items():
                # ids: positions in the selection (the merge maps them to pool rows).
                found[f"scores_{name}"], found[f"ids_{name}"] = search_queries(
                    index, database, np.arange(start, stop, dtype=np.int64), store.chunks(batch), len(store),
                    k=_k(cfg, len(rows)), query_batch=batch, progress=progress)
            atomic_save_npz(ctx.item_path(j), **found)
            ctx.item_done()


def _sample_merge(ctx: ShardContext, rows: np.ndarray) -> dict[str, tuple[np.ndarray, dict]]:
    from .retrieve import union_of_neighbours
    from .sharded_knn import merge_topk

    parts = [np.load(p) for p in ctx.finished_items("knn", len(_items(ctx.cfg, len(rows))))]
    result = {}
    for name in _query_sets(ctx.cfg):
        _, ids = merge_topk([(p[f"scores_{name}"], p[f"ids_{name}"]) for p in parts], _k(ctx.cfg, len(rows)))
        result[name] = union_of_neighbours(ids)
    return result


# ---- cluster mode -----------------------------------------------------------------------------
def _num_clusters(cfg: DictConfig, num_rows: int) -> int:
    return min(int(cfg.retrieve.num_clusters), num_rows)


def cluster_fit(ctx: ShardContext) -> None:
    """k-means on the seeded sample of selected rows (read from the memory-mapped embeddings)."""
    from .knn import kmeans, kmeans_sample
    from .retrieve import KMEANS_ITERS

    cfg = ctx.cfg
    rows = _selection(cfg)
    k = _num_clusters(cfg, len(rows))
    mppc = int(cfg.cluster.max_points_per_centroid)
    picks = kmeans_sample(len(rows), k, seed=int(cfg.seed), max_points_per_centroid=mppc)
    log.info("retrieve fit: k-means (k=%d) on %d of %d selected rows", k, len(picks), len(rows))
    centroids = kmeans(embedding_store(cfg, "pool").take(rows[picks]), k, niter=KMEANS_ITERS, seed=int(cfg.seed),
                       max_points_per_centroid=mppc)
    atomic_save_npy(ctx.phase_dir / "centroids.npy", centroids)


def cluster_assign(ctx: ShardContext) -> None:
    """Nearest centroid of every selected row of this shard's items."""
    from .knn import assign

    cfg = ctx.cfg
    rows = _selection(cfg)
    centroids = np.load(ctx.work / "fit" / "centroids.npy")
    pool = embedding_store(cfg, "pool")
    todo = ctx.pending(_items(ctx.cfg, len(rows)))
    with Progress(sum(b - a for _, (a, b) in todo), f"retrieve assign[{ctx.shard}/{ctx.num_shards}]", unit="row",
                  enabled=cfg.embed.progress) as progress:
        for j, (start, stop) in todo:
            labels, _ = assign(pool.take(rows[start:stop]), centroids)
            atomic_save_npz(ctx.item_path(j), labels=labels.astype(np.int64))
            progress.update(stop - start)
            ctx.item_done()


def _cluster_merge(ctx: ShardContext, rows: np.ndarray) -> dict[str, tuple[np.ndarray, dict]]:
    from .knn import assign
    from .retrieve import select_from_clusters

    cfg = ctx.cfg
    centroids = np.load(ctx.work / "fit" / "centroids.npy")
    labels = np.concatenate([np.load(p)["labels"] for p in ctx.finished_items("assign", len(_items(cfg, len(rows))))])
    result = {}
    for name in _query_sets(cfg):
        query_labels, _ = assign(embeddings_in_ram(cfg, name), centroids)
        result[name] = select_from_clusters(labels, query_labels.astype(np.int64), len(centroids),
                                            min_queries=int(cfg.retrieve.min_queries),
                                            per_cluster=int(cfg.retrieve.per_cluster),
                                            cap=int(cfg.retrieve.cap_per_query_set), seed=int(cfg.seed))
    return result


# ---- merge ------------------------------------------------------------------------------------
def retrieve_merge(ctx: ShardContext) -> None:
    """The union over the query sets (each row keeps the reason of the first set that retrieved
    it) -> retrieve/selected.json."""
    cfg = ctx.cfg
    rows = _selection(cfg)
    path = out(cfg, "retrieve", "selected.json")
    if not _active(cfg):
        reasons = {int(r): "retrieval off: every dedup survivor passes" for r in rows}
        write_selected(path, "retrieve", rows, reasons, {"mode": "none"})
    else:
        per_set = _sample_merge(ctx, rows) if cfg.retrieve.mode == "sample" else _cluster_merge(ctx, rows)
        chosen, reasons, stats = set(), {}, {}
        for name, (local, st) in per_set.items():
            if cfg.retrieve.mode == "sample":
                why = f"among the {cfg.retrieve.k} nearest neighbours of a {name} image"
            else:
                why = f"in a pool cluster holding > {cfg.retrieve.min_queries} {name} images"
            stats[name] = st
            for r in rows[local]:
                reasons.setdefault(int(r), why)
                chosen.add(int(r))
        selected = np.array(sorted(chosen), dtype=np.int64)
        write_selected(path, "retrieve", selected, reasons,
                       {"mode": cfg.retrieve.mode, "sets": stats, "retrieved": len(selected)})
    record_stage(cfg, "retrieve", retrieve_inputs(cfg))
    remove_other_work(ctx)


def retrieve_phases(cfg: DictConfig) -> tuple[Phase, ...]:
    """sample: knn_train, knn, merge; cluster: fit, assign, merge; none (or no query set): merge."""
    merge = Phase("merge", retrieve_merge)
    if not _active(cfg):
        return (merge,)
    if cfg.retrieve.mode == "sample":
        return Phase("knn_train", knn_train), Phase("knn", knn_search, sharded=True), merge
    return Phase("fit", cluster_fit), Phase("assign", cluster_assign, sharded=True), merge


RETRIEVE = StageUnit("retrieve", retrieve_phases, inputs=retrieve_inputs)
