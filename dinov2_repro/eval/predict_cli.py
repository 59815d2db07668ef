"""``dinov2-repro predict seg``: a class map of a whole GeoTIFF scene from a saved segmentation run."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _run_predict_seg(args: argparse.Namespace) -> int:
    from .. import api

    result = api.predict_seg(args.checkpoint, args.scene, args.out, overlap=args.overlap, batch_size=args.batch_size,
                             tta=args.tta, vector=args.vector, vector_min_area_px=args.vector_min_area_px,
                             vector_simplify=args.vector_simplify)
    print(json.dumps(result, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="map prediction: `predict seg --checkpoint SEG_RUN --scene S.tif --out map.tif`")
    tasks = parser.add_subparsers(dest="predict_task", required=True)
    seg = tasks.add_parser("seg", help="sliding-window segmentation of a GeoTIFF scene (streamed, any size)")
    seg.add_argument("--checkpoint", required=True, type=Path, help="an `eval seg --out-dir` run directory")
    seg.add_argument("--scene", required=True, type=Path, help="input GeoTIFF")
    seg.add_argument("--out", required=True, type=Path, help="output GeoTIFF (class codes); a .png preview is written beside it")
    seg.add_argument("--overlap", type=float, default=0.25, help="window overlap as a fraction of the tile")
    seg.add_argument("--batch-size", type=int, default=16)
    seg.add_argument("--vector", type=Path, default=None,
                     help="also write the map's polygons (class, area, pixels, mean_confidence) to a .gpkg or .geojson")
    seg.add_argument("--vector-min-area-px", type=float, default=0.0, help="drop polygons smaller than this (pixels)")
    seg.add_argument("--vector-simplify", type=float, default=0.0, help="simplification tolerance in CRS units (0: off)")
    seg.add_argument("--tta", choices=["none", "flip", "d4"], default="none",
                     help="test-time augmentation: average the 4 mirror views or the 8 dihedral views of each window")
    seg.set_defaults(run=_run_predict_seg)
