"""``dinov2-repro predict seg``: a class map of a whole GeoTIFF scene from a saved segmentation run,
or (``--export-onnx``) the run's model as an ONNX file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _run_predict_seg(args: argparse.Namespace) -> int:
    from .. import api
    from ..config import ConfigError

    if args.export_onnx is None and (args.scene is None or args.out is None):
        raise ConfigError("predict seg needs --scene and --out (or --export-onnx OUT.onnx to export the model only)")
    if (args.scene is None) != (args.out is None):
        raise ConfigError("predict seg: --scene and --out go together")
    if args.export_onnx is not None:
        _export_onnx(args)
        if args.scene is None:
            return 0

    result = api.predict_seg(args.checkpoint, args.scene, args.out, overlap=args.overlap, batch_size=args.batch_size,
                             tta=args.tta, vector=args.vector, vector_min_area_px=args.vector_min_area_px,
                             vector_simplify=args.vector_simplify)
    print(json.dumps(result, indent=2))
    return 0


def _export_onnx(args: argparse.Namespace) -> None:
    from ..io.paths import files_in, refuse_overwriting_inputs
    from ..onnx_export import require_onnx

    require_onnx("--export-onnx")
    from ..onnx_export.segmentation import export_segmentation_onnx

    refuse_overwriting_inputs(outputs={"--export-onnx": args.export_onnx, "--out": args.out,
                                       "--export-onnx (its weights file, for models over 1.8 GB)": str(args.export_onnx) + ".data"},
                              inputs={"--checkpoint": files_in(args.checkpoint), "--scene": args.scene})
    from ..onnx_export.graph import warn_if_far

    result = export_segmentation_onnx(args.checkpoint, args.export_onnx)
    print(json.dumps(result, indent=2))
    warn_if_far(result, prefix="dinov2-repro predict seg")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="map prediction: `predict seg --checkpoint SEG_RUN --scene S.tif --out map.tif`")
    tasks = parser.add_subparsers(dest="predict_task", required=True)
    seg = tasks.add_parser("seg", help="sliding-window segmentation of a GeoTIFF scene (streamed, any size)")
    seg.add_argument("--checkpoint", required=True, type=Path, help="an `eval seg --out-dir` run directory")
    seg.add_argument("--scene", type=Path, default=None, help="input GeoTIFF (required unless only --export-onnx)")
    seg.add_argument("--out", type=Path, default=None,
                     help="output GeoTIFF (class codes); a .png preview is written beside it (required with --scene)")
    seg.add_argument("--export-onnx", type=Path, default=None, metavar="OUT.onnx",
                     help="write the run's model (normalisation, backbone, head; one tile in, class logits out) as "
                          "ONNX, checked against torch with onnxruntime (see docs/onnx.md)")
    seg.add_argument("--overlap", type=float, default=0.25, help="window overlap as a fraction of the tile")
    seg.add_argument("--batch-size", type=int, default=16)
    seg.add_argument("--vector", type=Path, default=None,
                     help="also write the map's polygons (class, area, pixels, mean_confidence) to a .gpkg or .geojson")
    seg.add_argument("--vector-min-area-px", type=float, default=0.0, help="drop polygons smaller than this (pixels)")
    seg.add_argument("--vector-simplify", type=float, default=0.0, help="simplification tolerance in CRS units (0: off)")
    seg.add_argument("--tta", choices=["none", "flip", "d4"], default="none",
                     help="test-time augmentation: average the 4 mirror views or the 8 dihedral views of each window")
    seg.set_defaults(run=_run_predict_seg)
