"""The demo's curation step: the shipped scenes + sample photos -> a curated manifest.

Called by ``dinov2-repro demo`` (dinov2_repro/demo.py) before pretraining; the same as
``dinov2-repro curate all --config configs/curation/demo.yaml output_dir=<output_dir>``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .config import CURATION_CONFIG_DIR, load_curation_config
from .pipeline import run_stage

DEMO_CONFIG = CURATION_CONFIG_DIR / "demo.yaml"


def curate_demo_pool(output_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> Path:
    """Run every curation stage on the demo pool; returns the exported manifest."""
    cfg = load_curation_config(DEMO_CONFIG, [f"output_dir={output_dir}", *overrides])
    run_stage(cfg, "all")
    return Path(output_dir) / "export" / "manifest.jsonl"
