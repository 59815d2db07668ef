"""``embed_files``: a backbone over images, a manifest or GeoTIFF tiles -> curation's embedding shards.

The output folder holds exactly what ``curate embed --from-embeddings`` reads (the shard format
of dinov2_repro/curation/store.py, written by the curation embed stage's own helpers), plus the
rows' manifest (the index: path, window, bands, CRS, bounds per row)::

    OUT/manifest.jsonl      row i = embedding row i (or manifest.parquet)
    OUT/shard_00000.npy     float16 (rows, dim), rows [0, shard_size)
    OUT/index.json          num_rows, dim, shards, skipped rows, features, backbone, ...
    OUT/spec.json           the settings the shards were made with (resume check)

Shard j holds rows [j * shard_size, (j + 1) * shard_size); it is written atomically and skipped
when present, so a killed run resumes where it stopped, and ``shards``/``shard_index`` split the
shards between processes (process i takes j = i, i + N, ...). index.json is written by whichever
run finds every shard present. A row whose file fails to decode keeps an all-zero row and is
listed under ``skipped`` (curation's dedup drops those rows); a file that cannot be opened at all
has no row and is listed under ``skipped_files``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import ConfigError

log = logging.getLogger("dinov2_repro.embed")

INDEX_FORMATS = {"jsonl": "manifest.jsonl", "parquet": "manifest.parquet"}


@dataclass
class EmbedResult:
    """What ``embed_files`` did. ``index`` is None until every shard exists (other shard
    indexes still to run); ``skipped_rows`` are rows with an all-zero embedding."""

    out_dir: Path
    manifest: Path
    index: Path | None
    num_rows: int
    dim: int
    features: str
    computed_shards: list[int] = field(default_factory=list)
    missing_shards: list[int] = field(default_factory=list)
    skipped_rows: list[dict] = field(default_factory=list)
    skipped_files: list[dict] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.index is not None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out_dir=str(self.out_dir), manifest=str(self.manifest), index=str(self.index) if self.index else None,
                   complete=self.complete)
        return out


def _file_stamp(path: Path) -> dict:
    # Path, size and mtime: enough to notice a replaced backbone without hashing gigabytes.
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _check_options(*, features: str, batch_size: int, shards: int, shard_index: int, shard_size: int,
                   index_format: str, max_invalid_fraction: float) -> None:
    from .features import FEATURES

    if features not in FEATURES:
        raise ConfigError(f"--features {features!r} unknown; choose {', '.join(FEATURES)}")
    if batch_size < 1 or shard_size < 1:
        raise ConfigError(f"--batch-size {batch_size} / --shard-size {shard_size}: must be >= 1")
    if shards < 1 or not 0 <= shard_index < shards:
        raise ConfigError(f"--shard-index {shard_index} --shards {shards}: need 0 <= shard-index < shards")
    if index_format not in INDEX_FORMATS:
        raise ConfigError(f"--index-format {index_format!r} unknown; choose {', '.join(INDEX_FORMATS)}")
    if not 0.0 <= max_invalid_fraction <= 1.0:
        raise ConfigError(f"--max-invalid-fraction {max_invalid_fraction}: must be within [0, 1]")


def _refuse_inputs(out_dir: Path, index_name: str, *, backbone: Path, images, manifest, scenes) -> None:
    from ..io.paths import refuse_overwriting_inputs
    from .sources import image_files, scene_files

    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a folder")
    outputs = [out_dir / index_name, out_dir / "index.json", out_dir / "spec.json"]
    inputs = {"--backbone": backbone, "--manifest": manifest, "--scenes": scene_files(scenes) if scenes else None,
              "--images": image_files(images) if images is not None else None}
    refuse_overwriting_inputs(outputs={"--out": outputs}, inputs=inputs)
    shard_inputs = [p for p in [*(inputs["--images"] or []), *(inputs["--scenes"] or [])]
                    if p.parent.resolve() == out_dir.resolve() and p.name.startswith("shard_")]
    if shard_inputs:
        raise ConfigError(f"--out {out_dir}: input {shard_inputs[0]} would be overwritten; choose another output folder")


def _precision(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise ConfigError(f"--precision {name!r} unknown; choose auto, fp32, bf16 or fp16")
    return table[name]


def embed_files(
    backbone: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    scenes: Sequence[str | os.PathLike] = (),
    features: str = "cls",
    size: int | None = None,
    tile_size: int | None = None,
    stride: int | None = None,
    bands: Sequence[int] | None = None,
    scale: str = "percentile",
    nodata: float | None = None,
    max_invalid_fraction: float = 1.0,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    shard_size: int = 4096,
    shards: int = 1,
    shard_index: int = 0,
    index_format: str = "jsonl",
    num_workers: int = 0,
    progress: bool = True,
) -> EmbedResult:
    """Embed images with a backbone file into ``out_dir`` (curation's shard format + a manifest).

    Args:
        backbone: a project backbone export or a released DINOv2/DINOv3 file (``load_backbone``).
        out_dir: output folder; rerunning with the same settings resumes, other settings are refused.
        images / manifest / scenes: a folder of images, a JSONL/Parquet manifest, GeoTIFF files
            or folders of them (tiled); any combination, rows in the order scenes, images, manifest.
            ``pkg://<package>/<path>`` names a file shipped in an installed package.
        features: ``cls``, ``mean_patch`` or ``both`` (concatenated, see features.py).
        size: model input side in pixels (default the header's ``img_size``); images are resized to it.
        tile_size / stride: GeoTIFF tile grid in scene pixels (default ``size`` / ``tile_size``).
        bands: 1-based raster bands to read (default all; must match the backbone's ``in_chans``).
        scale: raster scaling, ``percentile`` (per scene 2-98 %) or ``LOW,HIGH`` or per-band pairs.
        nodata / max_invalid_fraction: tiles with more invalid pixels than this fraction are dropped.
        batch_size, device (auto/cpu/cuda), precision (auto: bf16 on CUDA, fp32 on CPU).
        shard_size: rows per shard; shards / shard_index: this process's share of the shards.
        index_format: ``jsonl`` or ``parquet`` for the rows' manifest.

    Returns:
        EmbedResult (paths, counts, skipped rows and files).
    """
    from ..backbone_file import load_backbone
    from ..curation.embed import check_spec, file_digest, shard_ranges, shard_file, write_index
    from ..device import resolve_device
    from ..io.manifest import write_manifest
    from .features import BackboneFeatures, check_header, feature_slices
    from .sources import list_rows

    _check_options(features=features, batch_size=batch_size, shards=shards, shard_index=shard_index,
                   shard_size=shard_size, index_format=index_format, max_invalid_fraction=max_invalid_fraction)
    if images is None and manifest is None and not scenes:
        raise ConfigError("nothing to embed: give --images FOLDER, --manifest FILE and/or --scenes GEOTIFF ...")
    from ..io.files import resolve_resource

    # Inputs may name files shipped in installed packages (pkg://<package>/<path>), as curation's do.
    images = resolve_resource(images) if images is not None else None
    manifest = resolve_resource(manifest) if manifest is not None else None
    scenes = [resolve_resource(s) for s in scenes]
    backbone, out_dir = resolve_resource(backbone), Path(out_dir)
    index_name = INDEX_FORMATS[index_format]
    _refuse_inputs(out_dir, index_name, backbone=backbone, images=images, manifest=manifest, scenes=scenes)
    torch_device = resolve_device(device, key="--device")
    model, meta = load_backbone(backbone, device="cpu")
    mean, std, in_chans, patch = check_header(meta, str(backbone))
    size = int(size or meta["img_size"])
    if size < patch or size % patch:
        raise ConfigError(f"--size {size}: must be a multiple of the backbone's patch size {patch}")
    tile_size = int(tile_size or size)
    stride = int(stride or tile_size)
    if tile_size < 1 or stride < 1:
        raise ConfigError(f"--tile-size {tile_size} / --stride {stride}: must be >= 1")

    out_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped_files = list_rows(out_dir, images=images, manifest=manifest, scenes=scenes, tile_size=tile_size,
                                    stride=stride, bands=bands, max_invalid_fraction=max_invalid_fraction, nodata=nodata)
    if not rows:
        first = f" (first unreadable: {skipped_files[0]['file']}: {skipped_files[0]['error']})" if skipped_files else ""
        raise ValueError(f"nothing to embed: the inputs hold no readable image or tile{first}")
    wrong = next((r for r in rows if r.get("bands") and len(bands or r["bands"]) != in_chans), None)
    if wrong is not None:  # known from the rows already: fail before any pixel is read
        raise ConfigError(f"{wrong['path']}: {len(bands or wrong['bands'])} band(s) {list(bands or wrong['bands'])} "
                          f"selected but the backbone takes {in_chans}; choose {in_chans} with --bands")
    manifest_path = out_dir / index_name
    # Written beside the target first: existing shards of other rows or settings must be refused
    # before their manifest is replaced. Every process of a sharded run writes the same bytes.
    pending = write_manifest(out_dir / f".pending-{os.getpid()}.{index_name}", rows)
    dim = int(meta["embed_dim"]) * (2 if features == "both" else 1)
    job = dict(manifest=str(manifest_path.resolve()), manifest_digest=file_digest(pending), out_dir=str(out_dir),
               embedder=f"backbone:{backbone.resolve()}", checkpoint=None, img_size=size,
               bands=[int(b) for b in bands] if bands else None, dihedral_pool=False, shard_size=shard_size, seed=0,
               spec_extra={"features": features, "backbone": _file_stamp(backbone), "scale": scale,
                           "precision": precision})
    try:
        check_spec(job)
    except ValueError:
        pending.unlink()
        raise
    os.replace(pending, manifest_path)

    extractor = BackboneFeatures(model, mean=mean, std=std, features=features).to(torch_device)
    ranges = shard_ranges(len(rows), shard_size)
    todo = [(j, r) for j, r in enumerate(ranges) if j % shards == shard_index and not shard_file(out_dir, j).is_file()]
    computed = _embed_shards(extractor, rows, todo, out_dir=out_dir, size=size, in_chans=in_chans, bands=bands,
                             scale=scale, batch_size=batch_size, device=torch_device,
                             dtype=_precision(precision, torch_device), num_workers=num_workers, progress=progress,
                             desc=f"embed[{shard_index}/{shards}]" if shards > 1 else "embed")
    missing = [j for j in range(len(ranges)) if not shard_file(out_dir, j).is_file()]
    index = None
    if not missing:
        extra = {"features": features, "feature_slices": feature_slices(features, int(meta["embed_dim"])),
                 "rows_file": index_name, "backbone": str(backbone.resolve()),
                 "backbone_header": {k: meta.get(k) for k in ("arch", "arch_family", "patch_size", "embed_dim",
                                                              "in_chans", "img_size", "mean", "std")},
                 "scale": scale, "shard_size": shard_size, "skipped_files": skipped_files}
        index = write_index(out_dir, job, extra=extra)
    elif shards > 1:
        log.info("embed: %d shard(s) still missing (other --shard-index runs); index.json is written by the "
                 "run that finds them all", len(missing))
    skipped_rows = _skipped_rows(out_dir, len(ranges))
    if skipped_files:  # (rows that failed to decode are counted by write_index)
        log.warning("embed: skipped %d file(s) that could not be opened (no rows; listed under 'skipped_files' in %s)",
                    len(skipped_files), out_dir / "index.json")
    return EmbedResult(out_dir=out_dir, manifest=manifest_path, index=index, num_rows=len(rows), dim=dim,
                       features=features, computed_shards=computed, missing_shards=missing, skipped_rows=skipped_rows,
                       skipped_files=skipped_files)


def _skipped_rows(out_dir: Path, num_shards: int) -> list[dict]:
    from ..curation.embed import skipped_file
    from ..io.files import read_json

    found: list[dict] = []
    for j in range(num_shards):
        if skipped_file(out_dir, j).is_file():
            found += read_json(skipped_file(out_dir, j))
    return found


def _embed_shards(extractor, rows: list[dict], todo: list[tuple[int, tuple[int, int]]], *, out_dir: Path, size: int,
                  in_chans: int, bands, scale: str, batch_size: int, device: torch.device, dtype: torch.dtype | None,
                  num_workers: int, progress: bool, desc: str) -> list[int]:
    """Write the shards in ``todo``; returns their numbers."""
    from torch.utils.data import DataLoader, Subset

    from ..curation.embed import write_shard
    from ..curation.progress import Progress
    from .features import RowImages

    dataset = RowImages(rows, manifest_dir=str(out_dir), size=size, in_chans=in_chans, bands=bands, scale=scale)
    bar = Progress(sum(stop - start for _, (start, stop) in todo), desc, unit="img", enabled=progress)
    done = []
    for shard, (start, stop) in todo:
        loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, multiprocessing_context="spawn" if num_workers else None)
        parts, skipped = [], []
        for indexes, batch, errors in loader:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                embedded = extractor(batch.to(device, non_blocking=True)).float().cpu()
            for i, error in enumerate(errors):
                if error:
                    row = int(indexes[i])
                    log.warning("embed: skipping unreadable file %s (row %d): %s", rows[row]["path"], row, error)
                    embedded[i] = 0.0
                    skipped.append({"row": row, "path": rows[row]["path"], "error": error})
            parts.append(embedded)
            bar.update(len(indexes))
        write_shard(out_dir, shard, parts, skipped)
        done.append(shard)
    bar.close()
    return done


def read_embeddings(out_dir: str | os.PathLike) -> tuple[np.ndarray, list[dict]]:
    """(embeddings as float32 (rows, dim), their manifest rows) of a finished ``embed`` output."""
    from ..curation.embed import load_embeddings
    from ..curation.store import check_index
    from ..io.manifest import read_manifest

    out_dir = Path(out_dir)
    index = check_index(out_dir)
    rows = read_manifest(out_dir / index.get("rows_file", "manifest.jsonl"))
    return load_embeddings(out_dir), rows
