"""The cluster stage as a unit (units.py): hierarchical k-means with level 1 sharded.

Level 1 (the points) is the only part that grows with the pool; the levels above it cluster
centroids (a few thousand at most) and run in the merge. Phases, for ``cluster.resampling_steps``
= S (hkmeans.fit_level does the same in RAM, with the same steps and seeds):

fit          (1 task)  level-1 k-means on a seeded sample of k x max_points_per_centroid selected
                       rows, read from the memory-mapped embeddings (every row when fewer).
assign_<s>   (N)       s = 1..S: items of ``cluster.shard_size`` selected rows; each item writes,
                       per centroid, its ``resample_points`` nearest rows (distance, position).
refit_<s>    (1 task)  per centroid the resample_points nearest over all items (exact: the best r
                       of a union are the best r of each part's best r; ties by position), then
                       k-means on those rows, started from the current centroids.
assign       (N)       nearest final centroid (label, squared distance) of every row, per item.
merge        (1 task)  labels of every row; levels >= 2 on the level-1 centroids; hierarchy.npz.

Items are fixed by the config (never by N), so hierarchy.npz is the same bytes for every N.
No task holds the N x D embeddings: an assign task holds one item, fit and refit hold their sample.
"""
from __future__ import annotations

import logging

import numpy as np
from omegaconf import DictConfig

from .fingerprint import record_stage
from .io import atomic_save_npy, atomic_save_npz
from .paths import current_selection, embedding_store, out
from .progress import Progress
from .sharded_knn import item_ranges
from .units import Phase, ShardContext, StageUnit, remove_other_work

log = logging.getLogger(__name__)


def cluster_inputs(cfg: DictConfig) -> list[str]:
    """The selection the k-means runs on (the latest of dedup/retrieve) and the embeddings."""
    return [current_selection(cfg, "sample")["stage"], "embed"]


def _selection(cfg: DictConfig) -> tuple[np.ndarray, str]:
    base = current_selection(cfg, "sample")
    rows = np.array(base["rows"], dtype=np.int64)
    if len(rows) == 0:
        raise ValueError(f"cluster: the {base['stage']} selection is empty; nothing to cluster")
    return rows, base["stage"]


def _level1_k(cfg: DictConfig, num_rows: int) -> int:
    return min(int(cfg.cluster.levels[0]), num_rows)


def _items(cfg: DictConfig, num_rows: int) -> list[tuple[int, int]]:
    """Positions [start, stop) in the selection of each assignment item (fixed by the config)."""
    return item_ranges(num_rows, int(cfg.cluster.shard_size))


def _centroids_before(ctx: ShardContext, step: int) -> np.ndarray:
    """Level-1 centroids after ``step`` resampling steps (0: the fit's)."""
    phase = "fit" if step == 0 else f"refit_{step}"
    return np.load(ctx.work / phase / "centroids.npy")


def _nearest_per_centroid(labels: np.ndarray, dist: np.ndarray, pos: np.ndarray, r: int) -> np.ndarray:
    """Indices of the ``r`` smallest (dist, pos) of each label, ordered by (label, dist, pos)."""
    order = np.lexsort((pos, dist, labels))
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    return order[np.arange(len(order)) - first < r]


# ---- fit -------------------------------------------------------------------------------------
def cluster_fit(ctx: ShardContext) -> None:
    """Level-1 k-means on a seeded sample (the sample kmeans() itself would draw from all rows)."""
    from .knn import kmeans, kmeans_sample

    cfg = ctx.cfg
    rows, _ = _selection(cfg)
    k = _level1_k(cfg, len(rows))
    picks = kmeans_sample(len(rows), k, seed=int(cfg.seed), max_points_per_centroid=int(cfg.cluster.max_points_per_centroid))
    log.info("cluster fit: k-means (k=%d) on %d of %d selected rows", k, len(picks), len(rows))
    x = embedding_store(cfg, "pool").take(rows[picks])
    centroids = kmeans(x, k, niter=int(cfg.cluster.kmeans_iters), seed=int(cfg.seed),
                       max_points_per_centroid=int(cfg.cluster.max_points_per_centroid))
    atomic_save_npy(ctx.phase_dir / "centroids.npy", centroids)


# ---- assign (resampling steps and final) ---------------------------------------------------------
def _assign_items(ctx: ShardContext, step: int | None) -> None:
    """This shard's items against the current centroids: per-centroid nearest rows (resampling
    ``step``) or every row's label and distance (``step`` None: the final assignment)."""
    from .knn import assign

    cfg = ctx.cfg
    rows, _ = _selection(cfg)
    centroids = _centroids_before(ctx, int(cfg.cluster.resampling_steps) if step is None else step - 1)
    r = int(cfg.cluster.resample_points)
    store = embedding_store(cfg, "pool")
    todo = ctx.pending(_items(cfg, len(rows)))
    with Progress(sum(b - a for _, (a, b) in todo), f"cluster {ctx.phase}[{ctx.shard}/{ctx.num_shards}]", unit="row",
                  enabled=cfg.embed.progress) as progress:
        for j, (start, stop) in todo:
            labels, dist = assign(store.take(rows[start:stop]), centroids)
            labels = labels.astype(np.int64)
            if step is None:
                atomic_save_npz(ctx.item_path(j), labels=labels, dist=dist)
            else:
                pos = np.arange(start, stop, dtype=np.int64)
                keep = _nearest_per_centroid(labels, dist, pos, r)
                atomic_save_npz(ctx.item_path(j), labels=labels[keep], dist=dist[keep], pos=pos[keep])
            progress.update(stop - start)
            ctx.item_done()


def _refit(ctx: ShardContext, step: int) -> None:
    """Merge the items' per-centroid nearest rows; k-means on them from the current centroids."""
    from .knn import kmeans

    cfg = ctx.cfg
    rows, _ = _selection(cfg)
    centroids = _centroids_before(ctx, step - 1)
    k = len(centroids)
    parts = [np.load(p) for p in ctx.finished_items(f"assign_{step}", len(_items(cfg, len(rows))))]
    labels, dist, pos = (np.concatenate([p[key] for p in parts]) for key in ("labels", "dist", "pos"))
    picked = pos[_nearest_per_centroid(labels, dist, pos, int(cfg.cluster.resample_points))]
    if len(picked) < k:  # hkmeans.fit_level stops resampling here: the centroids stay
        log.info("cluster refit_%d: %d points for k=%d; centroids kept", step, len(picked), k)
    else:
        centroids = kmeans(embedding_store(cfg, "pool").take(rows[picked]), k, niter=int(cfg.cluster.kmeans_iters),
                           seed=int(cfg.seed) + step, max_points_per_centroid=int(cfg.cluster.max_points_per_centroid),
                           init_centroids=centroids)
    atomic_save_npy(ctx.phase_dir / "centroids.npy", centroids)


# ---- merge -----------------------------------------------------------------------------------
def cluster_merge(ctx: ShardContext) -> None:
    """Every row's level-1 label, the upper levels (k-means on centroids, in RAM), hierarchy.npz."""
    from .hkmeans import fit_level

    cfg = ctx.cfg
    rows, from_stage = _selection(cfg)
    centroids = _centroids_before(ctx, int(cfg.cluster.resampling_steps))
    labels = np.concatenate([np.load(p)["labels"] for p in ctx.finished_items("assign", len(_items(cfg, len(rows))))])
    arrays = {"rows": rows, "from_stage": np.array(from_stage), "labels_0": labels, "centroids_0": centroids}
    nodes = centroids
    for depth, k in enumerate(list(cfg.cluster.levels)[1:], start=1):
        lab, cen = fit_level(nodes, min(int(k), len(nodes)), resampling_steps=int(cfg.cluster.resampling_steps),
                             resample_points=int(cfg.cluster.resample_points), niter=int(cfg.cluster.kmeans_iters),
                             seed=int(cfg.seed) + 1000 * depth, max_points_per_centroid=int(cfg.cluster.max_points_per_centroid))
        arrays[f"labels_{depth}"], arrays[f"centroids_{depth}"] = lab, cen
        nodes = cen
    atomic_save_npz(out(cfg, "cluster", "hierarchy.npz"), **arrays)
    record_stage(cfg, "cluster", cluster_inputs(cfg))
    remove_other_work(ctx)


def cluster_phases(cfg: DictConfig) -> tuple[Phase, ...]:
    """fit, (assign_s, refit_s) for each resampling step, assign, merge."""
    phases = [Phase("fit", cluster_fit)]
    for step in range(1, int(cfg.cluster.resampling_steps) + 1):
        phases.append(Phase(f"assign_{step}", lambda ctx, s=step: _assign_items(ctx, s), sharded=True))
        phases.append(Phase(f"refit_{step}", lambda ctx, s=step: _refit(ctx, s)))
    phases += [Phase("assign", lambda ctx: _assign_items(ctx, None), sharded=True), Phase("merge", cluster_merge)]
    return tuple(phases)


CLUSTER = StageUnit("cluster", cluster_phases, inputs=cluster_inputs)
