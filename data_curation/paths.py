"""Where the curation stages keep their files, and the selections they hand each other.

Layout under ``output_dir``::

    pool/manifest.jsonl          tile (or pool.manifest)       the uncurated pool
    embedder/sscd.safetensors    embed (trained when missing)  the default dedup embedder
    embeddings/<set>/            embed                         shard_XXXXX.npy (float16) + index.json
    dedup/                       dedup                         knn.npz, result.npz, selected.json
    retrieve/selected.json       retrieve
    cluster/hierarchy.npz        cluster
    sample/selected.json         sample
    export/manifest.jsonl        export                        + report.json and PNG plots
    <stage>/work/<fingerprint>/  every sharded stage           per-shard outputs (units.py)

Every stage reads the previous stage's ``selected.json`` (rows of the pool manifest kept so
far, with the reason each was kept) and writes its own atomically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from .io import atomic_write_json, read_json, resolve_resource


def out(cfg: DictConfig, *parts: str) -> Path:
    return Path(cfg.output_dir).joinpath(*parts)


def pool_manifest(cfg: DictConfig) -> Path:
    return resolve_resource(cfg.pool.manifest) if cfg.pool.manifest else out(cfg, "pool", "manifest.jsonl")


def embedding_sets(cfg: DictConfig) -> dict[str, Path]:
    """Name -> manifest of every set the embed stage embeds: the pool, references, queries."""
    sets = {"pool": pool_manifest(cfg)}
    for i, path in enumerate(cfg.dedup.reference_manifests):
        sets[f"reference_{i}"] = resolve_resource(path)
    for i, path in enumerate(cfg.retrieve.query_manifests):
        sets[f"query_{i}"] = resolve_resource(path)
    return sets


def sscd_checkpoint(cfg: DictConfig) -> Path:
    return Path(cfg.embed.checkpoint) if cfg.embed.checkpoint else out(cfg, "embedder", "sscd.safetensors")


def setup_threads(cfg: DictConfig) -> None:
    import faiss
    import torch

    torch.set_num_threads(int(cfg.num_threads))
    faiss.omp_set_num_threads(int(cfg.num_threads))


def require(path: Path, stage: str, hint: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{stage}: {path} does not exist; {hint}")
    return path


def embedding_store(cfg: DictConfig, name: str):
    """The memory-mapped embeddings of set ``name`` (store.py)."""
    from .store import EmbeddingStore

    return EmbeddingStore(require(out(cfg, "embeddings", name, "index.json"), "embeddings", "run the embed stage first").parent)


def embeddings_in_ram(cfg: DictConfig, name: str, rows: np.ndarray | None = None) -> np.ndarray:
    """L2-normalised float32 embeddings of set ``name`` (all rows, or ``rows``) in RAM: only for
    the steps where FAISS needs the whole matrix (the reference kNN of relative dedup)."""
    store = embedding_store(cfg, name)
    return store.take(np.arange(len(store)) if rows is None else rows)


def write_selected(path: Path, stage: str, rows: np.ndarray, reasons: dict[int, str], summary: dict) -> Path:
    return atomic_write_json(path, {"stage": stage, "rows": [int(r) for r in rows],
                                    "reasons": {str(int(r)): reasons[int(r)] for r in rows}, "summary": summary})


def read_selected(cfg: DictConfig, stage: str) -> dict:
    return read_json(require(out(cfg, stage, "selected.json"), stage, f"run the {stage} stage first"))


def current_selection(cfg: DictConfig, before: str) -> dict:
    """The selection the stage ``before`` works on: the latest earlier stage that ran."""
    order = ["dedup", "retrieve", "sample"]
    for stage in reversed(order[: order.index(before)] if before in order else order):
        if out(cfg, stage, "selected.json").is_file():
            return read_json(out(cfg, stage, "selected.json"))
    raise FileNotFoundError(f"{before}: no earlier selection found under {cfg.output_dir}; run dedup first")
