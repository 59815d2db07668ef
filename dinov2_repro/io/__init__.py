"""The data edge shared by curation and training: files, manifests and raster pixels.

- :mod:`dinov2_repro.io.files`: atomic writes, JSON reading, image extensions, ``pkg://`` paths.
- :mod:`dinov2_repro.io.manifest`: JSONL/Parquet manifests, row validation, relative paths.
- :mod:`dinov2_repro.io.raster`: GeoTIFF windows, the tile grid, bands, nodata and the one
  pixel-scaling policy (see that module's docstring) that every stage applies to a row.
"""
