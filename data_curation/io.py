"""Compatibility names for curation code: the implementations live in :mod:`dinov2_repro.io`
(one owner for files, manifests and raster pixels, shared with the trainer)."""
from __future__ import annotations

from dinov2_repro.io.files import (  # noqa: F401  (re-exported)
    PACKAGE_SCHEME,
    atomic_save_npy,
    atomic_save_npz,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    resolve_resource,
)
from dinov2_repro.io.manifest import portable_path, read_manifest, resolve_row_path, write_manifest  # noqa: F401
