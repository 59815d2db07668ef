"""Polygons of a class map, written while the map is streamed strip by strip (``predict seg --vector``).

Each strip of finished rows is cut into 4-connected components per class (nodata excluded);
every component becomes one polygon in the scene's CRS with its pixel count and summed
confidence (the top class's probability). A polygon that touches the strip's lower edge may
continue in the next strip: it stays open, and the next strip's polygons of the same class that
share a boundary segment with it are merged into it (union; pixel counts and confidence sums
add). A polygon whose strip is done and that touches no open edge is final and written at once,
so memory holds one strip plus the polygons crossing its lower edge.

Attributes: ``class`` (the class code), ``area`` (CRS units squared, m² for a projected CRS),
``pixels`` and ``mean_confidence``. Optional ``min_area_px`` drops small polygons and
``simplify`` (CRS units) simplifies the written outline (topology preserved per polygon).
GeoPackage (``.gpkg``) goes through pyogrio (GDAL); GeoJSON (``.geojson``/``.json``) is written
as text, feature by feature.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...config import ConfigError

VECTOR_FORMATS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}


@dataclass
class _Piece:
    cls: int
    geometry: Any
    pixels: int
    confidence_sum: float


def vector_driver(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in VECTOR_FORMATS:
        raise ConfigError(f"--vector {path}: use a .gpkg (GeoPackage) or .geojson file name")
    return VECTOR_FORMATS[suffix]


class _GeoJsonSink:
    def __init__(self, path: Path, crs) -> None:
        self.handle = open(path, "w", encoding="utf-8")
        name = crs.to_string() if crs is not None else None
        header = {"type": "FeatureCollection"}
        if name:  # GeoJSON (RFC 7946) assumes WGS 84; the scene's CRS is named the way GDAL reads it back
            header["crs"] = {"type": "name", "properties": {"name": name}}
        self.handle.write(json.dumps(header)[:-1] + ', "features": [\n')
        self.first = True

    def write(self, rows: list[tuple[Any, dict]]) -> None:
        for geometry, properties in rows:
            feature = {"type": "Feature", "properties": properties, "geometry": geometry.__geo_interface__}
            self.handle.write(("" if self.first else ",\n") + json.dumps(feature))
            self.first = False

    def close(self) -> None:
        self.handle.write("\n]}\n")
        self.handle.close()


class _GpkgSink:
    def __init__(self, path: Path, crs) -> None:
        self.path, self.crs, self.started = path, crs, False

    def write(self, rows: list[tuple[Any, dict]]) -> None:
        import pyogrio.raw
        import shapely

        if not rows:
            return
        names = list(rows[0][1])
        fields = [np.asarray([props[name] for _, props in rows]) for name in names]
        pyogrio.raw.write(str(self.path), shapely.to_wkb([shapely.MultiPolygon([g]) if g.geom_type == "Polygon" else g
                                                           for g, _ in rows]),
                          fields, names, crs=self.crs.to_wkt() if self.crs is not None else None, driver="GPKG",
                          geometry_type="MultiPolygon", append=self.started, layer="classes")
        self.started = True

    def close(self) -> None:
        if not self.started:  # an empty layer still makes a valid file
            import pyogrio.raw

            pyogrio.raw.write(str(self.path), np.array([], dtype=object), [np.array([], dtype=np.int64)], ["class"],
                              crs=self.crs.to_wkt() if self.crs is not None else None, driver="GPKG",
                              geometry_type="MultiPolygon", layer="classes")


class StreamingPolygonWriter:
    """Feed finished strips of class codes with :meth:`add_strip`, then :meth:`close`."""

    def __init__(self, path: str | os.PathLike, *, transform, crs, width: int, nodata: int,
                 min_area_px: float = 0.0, simplify: float = 0.0) -> None:
        self.path, self.transform, self.crs, self.width, self.nodata = Path(path), transform, crs, width, nodata
        self.pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
        self.min_area_px, self.simplify = float(min_area_px), float(simplify)
        driver = vector_driver(path)
        self.sink = _GeoJsonSink(self.path, crs) if driver == "GeoJSON" else _GpkgSink(self.path, crs)
        self.open: list[_Piece] = []  # polygons touching the lower edge of the last strip
        self.written = 0

    def _pieces(self, codes: np.ndarray, confidence: np.ndarray, row: int) -> list[tuple[_Piece, bool, bool]]:
        """(piece, touches top edge, touches bottom edge) for every component of the strip."""
        import shapely.geometry
        from affine import Affine
        from rasterio import features
        from scipy import ndimage

        pieces = []
        four = ndimage.generate_binary_structure(2, 1)
        offset = self.transform @ Affine.translation(0, row)
        for cls in np.unique(codes[codes != self.nodata]):
            components, count = ndimage.label(codes == cls, structure=four)
            if not count:
                continue
            flat = components.ravel()
            pixels = np.bincount(flat, minlength=count + 1)
            sums = np.bincount(flat, weights=confidence.ravel(), minlength=count + 1)
            top = set(np.unique(components[0]).tolist()) - {0}
            bottom = set(np.unique(components[-1]).tolist()) - {0}
            for geometry, value in features.shapes(components.astype(np.int32), mask=components > 0, connectivity=4,
                                                   transform=offset):
                v = int(value)
                piece = _Piece(int(cls), shapely.geometry.shape(geometry), int(pixels[v]), float(sums[v]))
                pieces.append((piece, v in top, v in bottom))
        return pieces

    def add_strip(self, codes: np.ndarray, confidence: np.ndarray, row: int, *, last: bool = False) -> None:
        """Rows ``row ..`` of the map (class codes, nodata where invalid) and their confidence."""
        carried, self.open = self.open, []
        finished: list[_Piece] = []
        new = self._pieces(codes, confidence, row)
        # union-find over carried pieces and this strip's top-edge pieces sharing an edge segment
        groups: dict[int, list[_Piece]] = {}
        still_open: list[tuple[_Piece, bool]] = []
        parent = list(range(len(carried)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        attached: list[tuple[_Piece, bool, list[int]]] = []
        for piece, touches_top, touches_bottom in new:
            links = [i for i, c in enumerate(carried) if touches_top and c.cls == piece.cls
                     and c.geometry.intersection(piece.geometry).length > 0]
            for a, b in zip(links, links[1:]):
                parent[find(a)] = find(b)
            attached.append((piece, touches_bottom, links))
        for i, c in enumerate(carried):
            groups.setdefault(find(i), []).append(c)
        merged_into: dict[int, list[tuple[_Piece, bool]]] = {}
        for piece, touches_bottom, links in attached:
            if links:
                merged_into.setdefault(find(links[0]), []).append((piece, touches_bottom))
            else:
                still_open.append((piece, touches_bottom))
        for root, members in groups.items():
            extra = merged_into.get(root, [])
            if not extra:
                finished += members  # nothing continues it: final
                continue
            from shapely.ops import unary_union

            everything = members + [p for p, _ in extra]
            union = _Piece(members[0].cls, unary_union([p.geometry for p in everything]),
                           sum(p.pixels for p in everything), sum(p.confidence_sum for p in everything))
            still_open.append((union, any(b for _, b in extra)))
        for piece, touches_bottom in still_open:
            (self.open if touches_bottom and not last else finished).append(piece)
        self._write(finished)

    def _write(self, pieces: list[_Piece]) -> None:
        rows = []
        for piece in pieces:
            if piece.pixels < self.min_area_px:
                continue
            geometry = piece.geometry.simplify(self.simplify, preserve_topology=True) if self.simplify > 0 else piece.geometry
            rows.append((geometry, {"class": piece.cls, "area": round(piece.pixels * self.pixel_area, 6),
                                    "pixels": piece.pixels,
                                    "mean_confidence": round(piece.confidence_sum / max(piece.pixels, 1), 6)}))
        self.sink.write(rows)
        self.written += len(rows)

    def close(self) -> int:
        """Write what is still open; returns the number of polygons written."""
        self._write(self.open)
        self.open = []
        self.sink.close()
        return self.written
