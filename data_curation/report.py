"""The export report: JSON numbers and PNG plots of what curation did.

- similarity histogram (best non-self neighbour cosine per pool image), threshold marked;
- removed fraction against threshold (components recomputed from the stored kNN edges);
- duplicate-component sizes;
- leaf-cluster sizes before and after balanced sampling.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from .dedup import components, pick_representatives
from .io import atomic_write_bytes, atomic_write_json

THRESHOLD_GRID = [round(t, 2) for t in np.arange(0.3, 1.0, 0.05)]


def removed_fraction_curve(num_nodes: int, src: np.ndarray, dst: np.ndarray, sims: np.ndarray,
                           thresholds: list[float]) -> list[float]:
    """Fraction removed by self-dedup at each threshold (edges are those above the run's
    threshold, so points below it are lower bounds)."""
    fractions = []
    for t in thresholds:
        keep = sims > t
        labels = components(num_nodes, src[keep], dst[keep])
        kept = pick_representatives(labels, np.zeros(num_nodes)).sum()
        fractions.append(float(1 - kept / max(num_nodes, 1)))
    return fractions


def _save_png(fig, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def write_report(cfg: DictConfig, export_dir: Path, history: dict, *, num_pool: int) -> Path:
    dedup_dir = Path(cfg.output_dir) / "dedup"
    report: dict = {"pool": num_pool, "stages": {s: {"kept": len(sel["rows"]), **sel.get("summary", {})} for s, sel in history.items()}}
    result = dedup_dir / "result.npz"
    if result.is_file():
        data = np.load(result)
        top1 = data["top1"]
        top1 = top1[np.isfinite(top1)]
        hist, edges = np.histogram(top1, bins=40, range=(-1.0, 1.0))
        report["similarity_histogram"] = {"counts": hist.tolist(), "edges": edges.tolist(), "threshold": cfg.dedup.threshold}
        # Edges were thresholded at the run's threshold; recompute them lower from the kNN shards when present.
        src, dst, sims = _all_edges(dedup_dir)
        report["removed_fraction_vs_threshold"] = {
            "thresholds": THRESHOLD_GRID, "removed_fraction": removed_fraction_curve(num_pool, src, dst, sims, THRESHOLD_GRID)}
        sizes = np.bincount(np.bincount(data["labels"]))
        report["component_sizes"] = {str(size): int(count) for size, count in enumerate(sizes) if count and size}
    sample = history.get("sample", {}).get("summary", {})
    if "leaf_sizes_before" in sample:
        report["cluster_sizes"] = {k: sample[k] for k in ("leaf_sizes_before", "leaf_sizes_after", "balance_before", "balance_after")}
    verification = history.get("dedup", {}).get("summary", {}).get("verification")
    if verification:
        # The calibrated (or configured) thresholds and the calibration's estimates.
        report["verification"] = verification
    path = atomic_write_json(export_dir / "report.json", report)
    if cfg.export.plots:
        _plots(report, export_dir)
        _galleries(cfg, export_dir, history, verification)
    return path


def _galleries(cfg: DictConfig, export_dir: Path, history: dict, verification: dict | None) -> None:
    from .gallery import components_gallery, retrieval_gallery, threshold_gallery
    from .io import read_manifest
    from .paths import embedding_sets, embeddings_in_ram as _embeddings, pool_manifest
    from .verified_dedup import row_loader

    manifest = pool_manifest(cfg)
    rows = read_manifest(manifest)
    bands = list(cfg.embed.bands) if cfg.embed.bands else None
    load = row_loader(rows, manifest.parent, bands)
    result = Path(cfg.output_dir) / "dedup" / "result.npz"
    if result.is_file():
        data = np.load(result)
        components_gallery(data["labels"], data["keep"], (data["edge_src"], data["edge_dst"], data["edge_sim"]), load,
                           export_dir / "gallery_components.png")
        if verification and "cand_score" in data.files and len(data["cand_score"]):
            threshold_gallery(data["cand_src"], data["cand_dst"], data["cand_score"], verification["verify_threshold"], load,
                              export_dir / "gallery_threshold.png")
    if "retrieve" in history and cfg.retrieve.query_manifests and cfg.retrieve.mode != "none":
        from .images import load_row_image
        from .knn import brute_force_knn

        retrieved = np.array(history["retrieve"]["rows"], dtype=np.int64)
        query_manifest = embedding_sets(cfg)["query_0"]
        query_rows = read_manifest(query_manifest)[:6]
        if len(retrieved) and query_rows:
            q = _embeddings(cfg, "query_0")[: len(query_rows)]
            sims, local = brute_force_knn(q, _embeddings(cfg, "pool", retrieved), min(5, len(retrieved)))
            queries = [load_row_image(r, query_manifest.parent, bands) for r in query_rows]
            retrieval_gallery(queries, retrieved[local], sims, load, export_dir / "gallery_retrieval.png")


def _all_edges(dedup_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from .dedup import knn_edges

    merged = np.load(dedup_dir / "knn.npz")  # the kNN merged over its shards (stages_dedup.py)
    scores, ids = merged["scores"], merged["ids"]
    return knn_edges(scores, ids, min(THRESHOLD_GRID) - 1e-6)


def _plots(report: dict, export_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "similarity_histogram" in report:
        h = report["similarity_histogram"]
        fig, ax = plt.subplots(1, 3, figsize=(15, 3.8))
        centers = 0.5 * (np.array(h["edges"][1:]) + np.array(h["edges"][:-1]))
        ax[0].bar(centers, h["counts"], width=centers[1] - centers[0])
        ax[0].axvline(h["threshold"], color="red", label=f"threshold {h['threshold']}")
        ax[0].set(xlabel="best-neighbour cosine", ylabel="images", title="similarity histogram")
        ax[0].legend()
        c = report["removed_fraction_vs_threshold"]
        ax[1].plot(c["thresholds"], c["removed_fraction"], marker="o")
        ax[1].axvline(h["threshold"], color="red")
        ax[1].set(xlabel="threshold", ylabel="removed fraction", title="removed fraction vs threshold")
        sizes = report["component_sizes"]
        ax[2].bar([int(s) for s in sizes], list(sizes.values()))
        ax[2].set(xlabel="component size", ylabel="components", yscale="log", title="duplicate components")
        _save_png(fig, export_dir / "dedup.png")
        plt.close(fig)
    if "cluster_sizes" in report:
        c = report["cluster_sizes"]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        before = np.sort(c["leaf_sizes_before"])[::-1]
        after = np.array(c["leaf_sizes_after"])[np.argsort(c["leaf_sizes_before"])[::-1]]
        ax.bar(range(len(before)), before, label="before", alpha=0.6)
        ax.bar(range(len(after)), after, label="after balancing", alpha=0.8)
        ax.set(xlabel="leaf cluster (by size)", ylabel="images", title="cluster sizes before/after balanced sampling")
        ax.legend()
        _save_png(fig, export_dir / "clusters.png")
        plt.close(fig)
