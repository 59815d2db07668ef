"""``dinov2-repro embed``: a folder round-trip equals the model's forward, GeoTIFF tiles keep their
georeference, curation takes the output with --from-embeddings, resume and shard split, and a
broken file is one line naming it (skipped and counted, not fatal)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2_repro.cli import main
from dinov2_repro.embedding import embed_files, read_embeddings

SIZE = 28  # the tiny backbone's img_size: 2 x 2 patches of 14 px


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    from dinov2_repro.backbone_file import load_backbone, save_backbone
    from dinov2_repro.models import build_vit

    torch.manual_seed(0)
    model = build_vit("vit_micro", depth=1, img_size=SIZE, patch_size=14, init_values=1.0)  # LayerScale 1: the block changes the tokens
    path = save_backbone(model, tmp_path_factory.mktemp("backbone") / "backbone.safetensors", mean=(0.4, 0.5, 0.6),
                         std=(0.2, 0.25, 0.3))
    return path, load_backbone(path)[0]


def _png_folder(folder: Path, count: int = 5) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _write_scene(path: Path, *, width: int = 84, height: int = 70, crs: str = "EPSG:32613") -> Path:
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(1)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="float32", crs=crs,
                       transform=Affine(30.0, 0.0, 445000.0, 0.0, -30.0, 4440000.0), nodata=-9999.0) as dst:
        dst.write(rng.normal(1000, 200, (3, height, width)).astype(np.float32))
    return path


def _forward(model: torch.nn.Module, pixels: np.ndarray, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(cls, mean patch) of (N, 3, S, S) pixels in [0, 1], computed here from the model."""
    x = (torch.from_numpy(pixels) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model.forward_features(x)
    return out["x_norm_clstoken"].numpy(), out["x_norm_patchtokens"].mean(dim=1).numpy()


def test_folder_round_trip_equals_the_models_forward(backbone, tmp_path, one_torch_thread):
    path, model = backbone
    paths = _png_folder(tmp_path / "images")
    result = embed_files(path, tmp_path / "out", images=tmp_path / "images", features="both", shard_size=2,
                         batch_size=3, device="cpu", progress=False)
    assert result.complete and result.num_rows == 5 and result.dim == 2 * model.embed_dim
    x, rows = read_embeddings(tmp_path / "out")
    assert [(tmp_path / "out" / r["path"]).resolve() for r in rows] == [p.resolve() for p in paths]
    assert np.load(tmp_path / "out" / "shard_00000.npy").dtype == np.float16
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(p), np.float32).transpose(2, 0, 1) / 255.0 for p in paths])
    cls, mean_patch = _forward(model, pixels, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["feature_slices"] == {"cls": [0, 96], "mean_patch": [96, 192]}
    np.testing.assert_allclose(x[:, :96], cls, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(x[:, 96:], mean_patch, rtol=2e-3, atol=2e-3)
    # Not trivially equal: the images give different features, and CLS differs from the patch mean.
    assert np.abs(cls - cls[:1]).max() > 1e-2 and np.abs(cls - mean_patch).max() > 1e-1


@pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")  # rasterio's bounds(), the oracle
def test_geotiff_tiles_keep_crs_and_bounds(backbone, tmp_path, one_torch_thread):
    import pyarrow.parquet as pq
    import rasterio
    from rasterio.windows import Window, bounds

    from dinov2_repro.io.raster import RasterScaling, apply_ranges, valid_mask

    path, model = backbone
    scene = _write_scene(tmp_path / "scene.tif")
    result = embed_files(path, tmp_path / "out", scenes=[scene], index_format="parquet", device="cpu", progress=False,
                         features="cls")
    assert result.manifest.name == "manifest.parquet" and result.num_rows == 6  # 3 x 2 full 28 px tiles of 84 x 70
    table = pq.read_table(result.manifest).to_pylist()
    x, rows = read_embeddings(tmp_path / "out")
    assert len(rows) == len(table) == len(x) == 6
    with rasterio.open(scene) as src:
        ranges = RasterScaling().ranges(scene, [1, 2, 3])
        for row in table:
            col, top, width, height = row["window"]
            assert (width, height) == (SIZE, SIZE) and row["crs"] == src.crs.to_string() == "EPSG:32613"
            np.testing.assert_allclose(row["bounds"], bounds(Window(col, top, width, height), src.transform))
            assert row["bands"] == [1, 2, 3] and Path(tmp_path / "out" / row["path"]).resolve() == scene.resolve()
        # The last tile's embedding is the model's forward on that window under the per-scene scaling.
        col, top, width, height = table[-1]["window"]
        data = src.read([1, 2, 3], window=Window(col, top, width, height)).astype(np.float64)
        pixels = apply_ranges(data, valid_mask(data, src.nodatavals, [1, 2, 3]), ranges)
    cls, _ = _forward(model, pixels[None], (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    np.testing.assert_allclose(x[-1], cls[0], rtol=2e-3, atol=2e-3)
    assert table[0]["bounds"][0] == 445000.0 and table[0]["bounds"][3] == 4440000.0  # the top-left tile


def test_curation_accepts_embed_output(backbone, tmp_path, capsys, one_torch_thread):
    from dinov2_repro.curation.io import read_json

    path, _ = backbone
    _png_folder(tmp_path / "images", count=12)
    out = tmp_path / "emb"
    assert main(["embed", "--backbone", str(path), "--out", str(out), "--images", str(tmp_path / "images"),
                 "--features", "mean_patch", "--shard-size", "5", "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["complete"] and summary["num_rows"] == 12
    run = tmp_path / "curation"
    common = [f"output_dir={run}", f"pool.manifest={out / 'manifest.jsonl'}", "embed.embedder=pixel", "num_threads=1",
              "device=cpu", "dedup.k=4", "dedup.verify.enabled=false", "embed.progress=false"]
    assert main(["curate", "embed", "--from-embeddings", str(out), *common]) == 0
    imported = read_json(run / "embeddings" / "pool" / "index.json")
    assert imported["imported_from"] == str(out.resolve()) and imported["num_rows"] == 12 and imported["dim"] == 96
    assert main(["curate", "dedup", "--from-embeddings", str(out), *common]) == 0
    assert len(read_json(run / "dedup" / "selected.json")["rows"]) >= 1


def test_resume_shards_and_refusals(backbone, tmp_path, capsys, one_torch_thread):
    path, _ = backbone
    _png_folder(tmp_path / "images", count=5)
    common = dict(images=tmp_path / "images", shard_size=2, device="cpu", progress=False)
    whole = embed_files(path, tmp_path / "whole", **common)
    # Two processes' shares: the index appears once every shard exists, with the same bytes.
    first = embed_files(path, tmp_path / "split", shards=2, shard_index=0, **common)
    assert first.index is None and first.computed_shards == [0, 2] and first.missing_shards == [1]
    second = embed_files(path, tmp_path / "split", shards=2, shard_index=1, **common)
    assert second.complete and second.computed_shards == [1]
    for j in range(3):
        name = f"shard_{j:05d}.npy"
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert embed_files(path, tmp_path / "whole", **common).computed_shards == []  # a rerun resumes: nothing to do
    with pytest.raises(ValueError, match="other settings"):
        embed_files(path, tmp_path / "whole", features="both", **common)
    assert whole.manifest.read_bytes() == (tmp_path / "split" / "manifest.jsonl").read_bytes()
    # The output may not replace an input: one line, exit 2.
    capsys.readouterr()
    assert main(["embed", "--backbone", str(path), "--out", str(tmp_path / "whole"), "--manifest",
                 str(tmp_path / "whole" / "manifest.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to overwrite an input" in err[0]


def test_bad_files_are_one_line_each_and_skipped(backbone, tmp_path, capsys, caplog, one_torch_thread):
    path, _ = backbone
    _png_folder(tmp_path / "images", count=3)
    whole = (tmp_path / "images" / "img_0.png").read_bytes()
    (tmp_path / "images" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "images" / "garbage.jpg").write_bytes(b"not an image")
    scene = _write_scene(tmp_path / "good.tif")
    data = scene.read_bytes()
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.INFO):
        assert main(["embed", "--backbone", str(path), "--out", str(tmp_path / "out"), "--images", str(tmp_path / "images"),
                     "--scenes", str(scene), str(tmp_path / "truncated.tif"), "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_rows"] == 6 + 4 and summary["num_skipped_rows"] == 1 and summary["num_skipped_files"] == 2
    for name in ("truncated.png", "garbage.jpg", "truncated.tif"):
        lines = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert len(lines) == 1 and "skipping unreadable file" in lines[0], (name, lines)
    x, rows = read_embeddings(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    (bad,) = index["skipped"]
    assert rows[bad["row"]]["path"].endswith("truncated.png") and not x[bad["row"]].any()
    assert np.abs(x).sum(axis=1).astype(bool).sum() == 9
    # Nothing readable at all: one error line naming a file, exit 1.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "garbage.png").write_bytes(b"nope")
    assert main(["embed", "--backbone", str(path), "--out", str(tmp_path / "out2"), "--images", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "garbage.png" in err[0]
    # Bands that do not fit the backbone are the user's mistake: one line naming the scene, exit 2.
    assert main(["embed", "--backbone", str(path), "--out", str(tmp_path / "out3"), "--scenes", str(scene),
                 "--bands", "1,2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "good.tif" in err[0] and "--bands" in err[0]


@pytest.mark.parametrize("family, case, size", [("dinov2", "vits14_reg4", 28), ("dinov3", "vits16", 32)])
def test_released_files_embed_like_their_forward(family, case, size, tmp_path, one_torch_thread):
    """A released .pth (random weights in the official layout) is read as is; rows equal its forward."""
    from PIL import Image
    from released_weights_helpers import (DINOV2_CASES, DINOV3_CASES, dinov2_official_from_timm,
                                          dinov3_official_from_timm, random_timm, timm_periods)

    from dinov2_repro.backbone_file import load_backbone

    name, filename = (DINOV2_CASES if family == "dinov2" else DINOV3_CASES)[case]
    theirs = random_timm(name, depth=1)
    state = (dinov2_official_from_timm(theirs.state_dict()) if family == "dinov2"
             else dinov3_official_from_timm(theirs.state_dict(), periods=timm_periods(theirs)))
    torch.save(state, tmp_path / filename)
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
    result = embed_files(tmp_path / filename, tmp_path / "out", images=tmp_path / "images", size=size,
                         features="mean_patch", device="cpu", progress=False)
    model, meta = load_backbone(tmp_path / filename)
    assert result.dim == meta["embed_dim"] == 384
    _, expected = _forward(model, pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0, meta["mean"], meta["std"])
    np.testing.assert_allclose(read_embeddings(tmp_path / "out")[0], expected, rtol=2e-3, atol=2e-3)
