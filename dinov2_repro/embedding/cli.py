"""``dinov2-repro embed``: backbone embeddings of a folder, a manifest or GeoTIFF tiles (docs/embed.md)."""
from __future__ import annotations

import argparse
import json
import logging

BACKBONE_HELP = ("a backbone file: a project export (.safetensors), or a released DINOv2/DINOv3 .pth or timm "
                 ".safetensors (docs/released-weights.md)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed", help="embed images, a manifest or GeoTIFF tiles with a backbone (sharded float16 .npy + manifest)",
        description="Embed a folder of images, a manifest and/or GeoTIFF scenes (cut into tiles that keep their "
                    "georeference) with a backbone file. Output: curation's embedding shards (float16 .npy + "
                    "index.json) and the rows' manifest; `curate embed --from-embeddings OUT` accepts it (docs/embed.md).")
    parser.add_argument("--backbone", required=True, help=BACKBONE_HELP)
    parser.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    inputs = parser.add_argument_group("inputs (any combination)")
    inputs.add_argument("--images", default=None, metavar="FOLDER", help="a folder of images (recursive)")
    inputs.add_argument("--manifest", default=None, metavar="FILE", help="a JSONL or Parquet manifest")
    inputs.add_argument("--scenes", nargs="+", default=[], metavar="GEOTIFF",
                        help="GeoTIFF files or folders of them, cut into --tile-size windows every --stride pixels")
    options = parser.add_argument_group("features")
    options.add_argument("--features", choices=["cls", "mean_patch", "both"], default="cls",
                         help="CLS token, mean of the patch tokens, or both concatenated (default: cls)")
    options.add_argument("--size", type=int, default=None,
                         help="model input side in px, a multiple of the patch size (default: the backbone's img_size)")
    options.add_argument("--batch-size", type=int, default=32)
    options.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    options.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                         help="compute precision (auto: bf16 on CUDA, fp32 on CPU); stored rows are float16")
    options.add_argument("--num-workers", type=int, default=0, help="DataLoader reading processes (0: read here)")
    raster = parser.add_argument_group("rasters")
    raster.add_argument("--tile-size", type=int, default=None, help="tile side in scene px (default: --size)")
    raster.add_argument("--stride", type=int, default=None, help="px between tiles (default: --tile-size)")
    raster.add_argument("--bands", default=None, help="1-based bands to read, e.g. 3,2,1 (default: all)")
    raster.add_argument("--scale", default="percentile",
                        help="band scaling to [0, 1]: percentile (per scene 2-98%%), LOW,HIGH or one pair per band")
    raster.add_argument("--nodata", type=float, default=None, help="nodata value (default: the file's)")
    raster.add_argument("--max-invalid-fraction", type=float, default=1.0,
                        help="drop tiles with more nodata pixels than this fraction (default 1.0: keep every tile)")
    output = parser.add_argument_group("output and sharding")
    output.add_argument("--shard-size", type=int, default=4096, help="rows per .npy shard")
    output.add_argument("--shards", type=int, default=1, help="split the shards over this many processes")
    output.add_argument("--shard-index", type=int, default=0, help="this process's share, 0 .. --shards - 1")
    output.add_argument("--index-format", choices=["jsonl", "parquet"], default="jsonl",
                        help="format of the rows' manifest (parquet needs pyarrow)")
    output.add_argument("--no-progress", action="store_true", help="no progress bar or progress log lines")
    parser.set_defaults(run=run_embed)


def _bands(text: str | None) -> list[int] | None:
    from ..config import ConfigError

    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--bands {text}: expected comma-separated 1-based band numbers, e.g. 3,2,1") from None


def run_embed(args: argparse.Namespace) -> int:
    """Run :func:`dinov2_repro.embedding.embed_files` and print its result as one JSON line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # GDAL's own messages about a broken file come as INFO records; the skip line names the file once.
    logging.getLogger("rasterio").setLevel(logging.WARNING)
    from .run import embed_files

    result = embed_files(
        args.backbone, args.out, images=args.images, manifest=args.manifest, scenes=args.scenes,
        features=args.features, size=args.size, tile_size=args.tile_size, stride=args.stride, bands=_bands(args.bands),
        scale=args.scale, nodata=args.nodata, max_invalid_fraction=args.max_invalid_fraction,
        batch_size=args.batch_size, device=args.device, precision=args.precision, shard_size=args.shard_size,
        shards=args.shards, shard_index=args.shard_index, index_format=args.index_format,
        num_workers=args.num_workers, progress=not args.no_progress)
    summary = {k: v for k, v in result.to_dict().items() if k not in ("skipped_rows", "skipped_files", "computed_shards")}
    summary.update(num_skipped_rows=len(result.skipped_rows), num_skipped_files=len(result.skipped_files))
    print(json.dumps(summary))
    return 0
