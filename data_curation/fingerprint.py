"""Stage fingerprints: no stale selections.

Every stage writes ``<output_dir>/<stage>/stage.json`` when it finishes: the digest of the config
sections it depends on and, for each input stage, the digest of that input's outputs as they
were when it ran. A stage is stale when its config sections changed since, or when an input's
outputs on disk no longer match (the input was re-run with other settings or data). Export
refuses stale selections and names the stage to re-run.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .io import atomic_write_json, read_json, resolve_resource

# Config sections each stage's result depends on. The embed stage embeds the reference and query
# sets too: a set added later must re-run it (its completion markers would otherwise skip it).
STAGE_CONFIG = {"tile": ("tile", "pool"),
                "embed": ("embed", "sscd", "seed", "dedup.reference_manifests", "retrieve.query_manifests"),
                "dedup": ("dedup", "seed"),
                "retrieve": ("retrieve", "dedup.index", "dedup.nprobe", "cluster.max_points_per_centroid", "seed"),
                "cluster": ("cluster", "seed"),
                "sample": ("sample", "seed"), "export": ("export",)}


# The manifests a stage reads by path: their bytes count as well, so a reference or query set
# edited in place (same path) makes the stages that read it stale and re-runs their work.
STAGE_MANIFESTS = {"embed": ("dedup.reference_manifests", "retrieve.query_manifests"),
                   "dedup": ("dedup.reference_manifests",), "retrieve": ("retrieve.query_manifests",)}


class StaleStageError(ValueError):
    """A stage's result no longer matches its inputs or config."""


def _digest_bytes(chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]


def _manifest_bytes_digest(path: str) -> str | None:
    try:
        return _digest_bytes([resolve_resource(path).read_bytes()])
    except (OSError, ValueError):
        return None  # missing: the stage that reads it reports it in its own words


def config_digest(cfg: DictConfig, stage: str) -> str:
    """Digest of the config sections ``stage`` depends on and of the manifests it reads."""
    parts = {key: OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)
             if isinstance(OmegaConf.select(cfg, key), DictConfig) else OmegaConf.select(cfg, key)
             for key in STAGE_CONFIG[stage]}
    for key in STAGE_MANIFESTS.get(stage, ()):
        parts[f"{key} (bytes)"] = [_manifest_bytes_digest(str(path)) for path in OmegaConf.select(cfg, key) or []]
    return _digest_bytes([json.dumps(parts, sort_keys=True, default=str).encode()])


def output_files(cfg: DictConfig, stage: str) -> list[Path]:
    """The files whose bytes are the stage's result (what later stages consume)."""
    from .paths import out, pool_manifest

    if stage == "tile":
        return [pool_manifest(cfg)]
    if stage == "embed":
        folder = out(cfg, "embeddings", "pool")
        if not (folder / "index.json").is_file():
            return [folder / "index.json"]
        shards = read_json(folder / "index.json").get("shards", [])
        return [folder / "index.json", *[folder / s["file"] for s in shards]]
    if stage == "cluster":
        return [out(cfg, "cluster", "hierarchy.npz")]
    return [out(cfg, stage, "selected.json")]


def output_digest(cfg: DictConfig, stage: str) -> str | None:
    """Digest of the stage's outputs on disk now (None when they are missing)."""
    files = output_files(cfg, stage)
    if not all(f.is_file() for f in files):
        return None
    return _digest_bytes(f.read_bytes() for f in files)


def record_path(cfg: DictConfig, stage: str) -> Path:
    return Path(cfg.output_dir) / stage / "stage.json"


def record_stage(cfg: DictConfig, stage: str, inputs: list[str]) -> Path:
    """Write the stage's record after it finished (its inputs' output digests as used)."""
    return atomic_write_json(record_path(cfg, stage), {
        "stage": stage, "config": config_digest(cfg, stage), "output": output_digest(cfg, stage),
        "inputs": {name: output_digest(cfg, name) for name in inputs}})


def stale_reason(cfg: DictConfig, stage: str) -> str | None:
    """Why ``stage``'s result is stale, or None when it is current."""
    path = record_path(cfg, stage)
    if not path.is_file():
        return f"{stage} has no stage record ({path}): it ran with an older version or did not finish"
    record = read_json(path)
    if record.get("config") != config_digest(cfg, stage):
        return f"the config of {stage} ({', '.join(STAGE_CONFIG[stage])}) changed since it ran"
    if record.get("output") != output_digest(cfg, stage):
        return f"{stage}'s output files changed since it ran"
    for name, digest in record.get("inputs", {}).items():
        if output_digest(cfg, name) != digest:
            return f"{name} was re-run (or its output changed) after {stage} ran"
    return None


def require_fresh(cfg: DictConfig, stages: list[str], *, by: str) -> None:
    """Raise StaleStageError naming the earliest stale stage among ``stages`` (pipeline order)."""
    for stage in stages:
        reason = stale_reason(cfg, stage)
        if reason:
            raise StaleStageError(f"{by}: the {stage} result is stale ({reason}); re-run `curate {stage}` "
                                  f"and the stages after it")
