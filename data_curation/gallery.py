"""PNG galleries in ``export/``: images people can look at to judge what curation did.

- ``gallery_components.png``: the largest duplicate components, one row each, members side by
  side with their verdict (kept/removed) and best verification score to the rest;
- ``gallery_threshold.png``: candidate pairs just above and just below the verification
  threshold (verified vs rejected), with their scores;
- ``gallery_retrieval.png``: query images followed by their nearest kept pool images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

Loader = Callable[[int], np.ndarray]


def _thumb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) for imshow."""
    return np.clip(image.transpose(1, 2, 0)[..., :3], 0, 1)


def _grid(rows: list[list[tuple[np.ndarray, str]]], path: Path, title: str) -> Path | None:
    """Rows of (image, caption) as one PNG (atomic)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import _save_png

    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols, 2.1 * len(rows)), squeeze=False)
    for axis_row, items in zip(axes, rows):
        for ax in axis_row:
            ax.axis("off")
        for ax, (image, caption) in zip(axis_row, items):
            ax.imshow(_thumb(image))
            ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save_png(fig, path)
    plt.close(fig)
    return path


def components_gallery(labels: np.ndarray, keep: np.ndarray, edges: tuple[np.ndarray, np.ndarray, np.ndarray],
                       load: Loader, path: Path, *, max_components: int = 6, max_members: int = 8) -> Path | None:
    """The largest components (> 1 member); caption: row, verdict, best edge score to the rest."""
    src, dst, score = edges
    best = np.full(len(labels), -np.inf)
    np.maximum.at(best, src, score)
    np.maximum.at(best, dst, score)
    sizes = np.bincount(labels, minlength=len(labels))
    largest = [c for c in np.argsort(-sizes, kind="stable") if sizes[c] > 1][:max_components]
    rows = []
    for comp in largest:
        members = np.flatnonzero(labels == comp)
        members = members[np.argsort(~keep[members], kind="stable")][:max_members]  # the kept image first
        rows.append([(load(int(m)), f"#{m} {'KEPT' if keep[m] else 'removed'}\nscore {best[m]:.2f} (size {sizes[comp]})")
                     for m in members])
    return _grid(rows, path, "largest duplicate components (score: best verified edge to the component)")


def threshold_gallery(cand_src: np.ndarray, cand_dst: np.ndarray, cand_score: np.ndarray, threshold: float, load: Loader,
                      path: Path, *, per_side: int = 4) -> Path | None:
    """Pairs nearest the threshold on each side: verified (above) and rejected (below)."""
    above = np.flatnonzero(cand_score > threshold)
    below = np.flatnonzero(cand_score <= threshold)
    picks = list(above[np.argsort(cand_score[above])][:per_side]) + list(below[np.argsort(-cand_score[below])][:per_side])
    rows = [[(load(int(cand_src[e])), f"#{cand_src[e]}"),
             (load(int(cand_dst[e])), f"#{cand_dst[e]} {'VERIFIED' if cand_score[e] > threshold else 'rejected'}\n"
                                      f"score {cand_score[e]:.3f} (t={threshold:.3f})")] for e in picks]
    # Two pairs per figure row keeps the PNG compact.
    merged = [rows[i] + (rows[i + 1] if i + 1 < len(rows) else []) for i in range(0, len(rows), 2)]
    return _grid(merged, path, "candidate pairs nearest the verification threshold")


def retrieval_gallery(queries: Sequence[np.ndarray], neighbours: np.ndarray, sims: np.ndarray, load: Loader, path: Path,
                      ) -> Path | None:
    """Each query image followed by its retrieved pool images (with cosine)."""
    rows = [[(q, "query")] + [(load(int(n)), f"#{n} cos {s:.2f}") for n, s in zip(nb, sm) if n >= 0]
            for q, nb, sm in zip(queries, neighbours, sims)]
    return _grid(rows, path, "retrieval: queries and their nearest curated pool images")
