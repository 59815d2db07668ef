"""Sliding-window map prediction over a GeoTIFF scene of any size.

Windows overlap and their softmax outputs are summed with a tent weight (centre pixels count
more than window edges; the argmax needs no division by the weight sum). The scene is streamed: only one strip of window rows (tile x width x
classes) is held in memory; rows that no later window touches are written out at once.
The output GeoTIFF keeps the input's CRS, transform and size; input nodata pixels are nodata
in the output, stored under the input's nodata value whenever it fits the int32 class map.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...config import ConfigError
from ...io.files import atomic_output
from ...io.paths import files_in, refuse_overwriting_inputs
from ...io.raster import RasterScaling, read_window
from .data import check_bands, raster_valid
from .train import load_run, normalise
from .tta import tta_probabilities, tta_views
from .vectors import StreamingPolygonWriter, vector_driver


def tent_weights(size: int) -> np.ndarray:
    """(size, size) blending weights: 1 at the centre falling to ~1/size at the edges, never 0."""
    ramp = 1.0 - np.abs((np.arange(size) + 0.5) / size * 2.0 - 1.0)
    ramp = np.maximum(ramp, 1.0 / size)
    return np.outer(ramp, ramp).astype(np.float32)


def window_offsets(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with windows of ``tile`` every ``stride``, the last flush with the end."""
    if length <= tile:
        return [0]
    offsets = list(range(0, length - tile + 1, stride))
    if offsets[-1] != length - tile:
        offsets.append(length - tile)
    return offsets


def _output_nodata(input_nodata: float | None, class_values: list[int]) -> int:
    if input_nodata is not None and math.isfinite(input_nodata) and float(input_nodata).is_integer() \
            and -2**31 <= input_nodata < 2**31 and int(input_nodata) not in class_values:
        return int(input_nodata)
    candidate = -1
    while candidate in class_values:
        candidate -= 1
    return candidate


@torch.no_grad()
def predict_scene(run_dir: str | os.PathLike, scene: str | os.PathLike, out: str | os.PathLike, *, overlap: float = 0.25,
                  batch_size: int = 16, progress: bool = True, tta: str = "none", vector: str | os.PathLike | None = None,
                  vector_min_area_px: float = 0.0, vector_simplify: float = 0.0) -> dict[str, Any]:
    """Write the class map of ``scene`` to ``out`` (GeoTIFF, class codes) plus ``out`` with .png
    (colour preview), and with ``vector`` its polygons (vectors.py), built strip by strip."""
    import rasterio

    scene, out = Path(scene), Path(out)
    vector = Path(vector) if vector is not None else None
    refuse_overwriting_inputs(outputs={"--out": out, "--out (its .png preview)": out.with_suffix(".png"), "--vector": vector},
                              inputs={"--scene": scene, "--checkpoint": files_in(run_dir)})
    if vector is not None:
        vector_driver(vector)  # a wrong suffix fails before any work
    features, head, record = load_run(Path(run_dir))
    if not scene.is_file():
        raise ConfigError(f"--scene {scene} does not exist")
    tta_views(tta)  # an unknown mode fails before any work
    if not 0 <= overlap < 1:
        raise ConfigError(f"--overlap {overlap}: must be in [0, 1)")
    tile = int(record["tile"])
    bands = check_bands(scene, record["bands"])
    if len(bands) != int(record["in_channels"]):
        raise ConfigError(f"--scene {scene}: read with {len(bands)} bands but the run {run_dir} was trained on "
                          f"{record['in_channels']}")
    class_values = [int(v) for v in record["class_values"]]
    lookup = np.asarray(class_values, dtype=np.int32)
    ranges = RasterScaling().ranges(str(scene), bands)  # per-scene percentiles, as in training
    stride = max(1, int(round(tile * (1 - overlap))))
    weight = tent_weights(tile)
    with rasterio.open(scene) as src:
        height, width = src.height, src.width
        out_nodata = _output_nodata(src.nodata, class_values)
        profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": "int32", "crs": src.crs,
                   "transform": src.transform, "nodata": out_nodata, "compress": "deflate"}
        if height >= 256 and width >= 256:
            profile.update(tiled=True, blockxsize=256, blockysize=256)
        rows, cols = window_offsets(height, tile, stride), window_offsets(width, tile, stride)
        k = len(class_values)
        acc_width = max(width, tile)
        acc = np.zeros((k, tile, acc_width), dtype=np.float32)
        weight_sum = np.zeros((tile, acc_width), dtype=np.float32)  # for the confidence of --vector
        iterator = rows
        if progress:
            from tqdm import tqdm

            iterator = tqdm(rows, desc=f"predict {scene.name}", unit="row")
        with atomic_output(out, suffix=".tif") as tmp, contextlib.ExitStack() as stack:
            polygons = None
            if vector is not None:
                vector_tmp = stack.enter_context(atomic_output(vector, suffix=vector.suffix))
                vector_tmp.unlink()  # GDAL creates the file itself
                polygons = StreamingPolygonWriter(vector_tmp, transform=src.transform, crs=src.crs, width=width,
                                                  nodata=out_nodata, min_area_px=vector_min_area_px, simplify=vector_simplify)
            with rasterio.open(tmp, "w", **profile) as dst:
                for i, row in enumerate(iterator):
                    for start in range(0, len(cols), batch_size):
                        chunk = cols[start:start + batch_size]
                        windows = [read_window(scene, bands, (c, row, tile, tile), ranges) for c in chunk]
                        images = normalise(torch.from_numpy(np.stack(windows)), record["mean"], record["std"])
                        guided = getattr(head, "training_free", False)  # kNN head: guided filter on the image
                        probs = tta_probabilities(
                            lambda x: head(features(x), (tile, tile), **({"guide": x} if guided else {})).softmax(1),
                            images, mode=tta).numpy() * weight
                        for c, p in zip(chunk, probs):
                            acc[:, :, c:c + tile] += p[:, :, : acc_width - c]
                            weight_sum[:, c:c + tile] += weight[:, : acc_width - c]
                    done = (rows[i + 1] if i + 1 < len(rows) else height) - row
                    codes = _write_rows(scene, dst, bands, acc[:, :done, :width], row, done, lookup, out_nodata)
                    if polygons is not None and codes is not None:
                        confidence = acc[:, :len(codes), :width].max(0) / np.maximum(weight_sum[:len(codes), :width], 1e-12)
                        polygons.add_strip(codes, confidence, row, last=i + 1 == len(rows))
                    acc = np.roll(acc, -done, axis=1)
                    acc[:, -done:] = 0
                    weight_sum = np.roll(weight_sum, -done, axis=0)
                    weight_sum[-done:] = 0
                dst.update_tags(source_scene=str(scene), seg_run=str(run_dir), input_nodata=str(src.nodata))
            n_polygons = polygons.close() if polygons is not None else None
    preview = write_preview(out, class_values)
    return {"map": str(out), "preview": str(preview), "tile_px": tile, "stride_px": stride, "windows": len(rows) * len(cols), "tta": tta,
            **({"vector": str(vector), "polygons": n_polygons} if vector is not None else {}),
            "nodata": out_nodata, "size": [height, width]}


def _write_rows(scene: Path, dst, bands, scores: np.ndarray, row: int, count: int, lookup: np.ndarray,
                nodata: int) -> np.ndarray | None:
    """Rows ``row .. row + count`` of the map: argmax class codes, nodata where the input is (returned too)."""
    from rasterio.windows import Window

    count = min(count, dst.height - row)
    if count <= 0:
        return None
    codes = lookup[scores[:, :count].argmax(0)]
    codes[~raster_valid(scene, bands, (0, row, dst.width, count))] = nodata
    dst.write(codes[None].astype(np.int32), window=Window(0, row, dst.width, count))
    return codes


def write_preview(map_path: Path, class_values: list[int], *, max_side: int = 1024) -> Path:
    """A colour PNG of a class-code GeoTIFF, decimated to at most ``max_side`` px (nodata black)."""
    import rasterio
    from PIL import Image

    from ..visualize import colour_classes

    with rasterio.open(map_path) as src:
        factor = max(1, math.ceil(max(src.height, src.width) / max_side))
        codes = src.read(1, out_shape=(math.ceil(src.height / factor), math.ceil(src.width / factor)))
        nodata = src.nodata
    indices = np.full(codes.shape, -1, dtype=np.int64)
    for index, value in enumerate(class_values):
        indices[codes == value] = index
    if nodata is not None:
        indices[codes == nodata] = -1
    preview = map_path.with_suffix(".png")
    with atomic_output(preview, suffix=".png") as tmp:
        Image.fromarray(colour_classes(indices)).save(tmp)
    return preview
