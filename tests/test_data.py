"""Data stage: augmentations, iBOT masks, collate, datasets on shipped data, corrupt files, sampler, loader."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

from dinov2_repro.data import augmentations as aug_module
from dinov2_repro.data import (
    DataAugmentationDINO,
    InfiniteSampler,
    MaskingGenerator,
    build_dataset,
    collate_data_and_cast,
    make_data_loader,
)
from dinov2_repro.data.collate import stratified_masks
from dinov2_repro.data.sample_data import (
    LANDCOVER_CLASSES,
    landcover_tiles,
    landsat_scene_paths,
    natural_images,
    rmnp_rgb_path,
    write_demo_image_folder,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_aug(n_local: int = 2, bands: int = 3, blur_rates: str = "stated") -> DataAugmentationDINO:
    return DataAugmentationDINO(
        global_crops_scale=(0.32, 1.0),
        local_crops_scale=(0.05, 0.32),
        local_crops_number=n_local,
        global_crops_size=32,
        local_crops_size=16,
        blur_rates=blur_rates,
        mean=[0.45] * bands,
        std=[0.25] * bands,
    )


# ------------------------------------------------------------------------------------ augmentations
def test_augmentation_rgb_shapes_and_determinism(demo_image_folder: Path) -> None:
    image = Image.open(next((demo_image_folder / "natural").glob("*.png"))).convert("RGB")
    aug = tiny_aug(n_local=3)
    torch.manual_seed(0)
    out = aug(image)
    assert [tuple(c.shape) for c in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in out["global_crops"] + out["local_crops"])
    assert out["global_crops_teacher"][0] is out["global_crops"][0]
    # Normalised values: in [(0-mean)/std, (1-mean)/std].
    assert out["global_crops"][0].min() >= -0.45 / 0.25 - 1e-4 and out["global_crops"][0].max() <= 0.55 / 0.25 + 1e-4
    torch.manual_seed(0)
    again = aug(np.asarray(image))  # numpy (H, W, 3) input takes the same path as PIL
    assert all(torch.equal(a, b) for a, b in zip(out["local_crops"], again["local_crops"]))
    torch.manual_seed(1)
    other = aug(image)
    assert not torch.equal(out["global_crops"][0], other["global_crops"][0])


def test_augmentation_multispectral(landsat_stack_path: Path) -> None:
    tile, _ = build_dataset(f"GeoTiff:root={landsat_stack_path}:tile=48")[5]
    assert tile.shape == (6, 48, 48)
    out = tiny_aug(n_local=2, bands=6)(tile)
    assert [tuple(c.shape) for c in out["global_crops"] + out["local_crops"]] == [(6, 32, 32)] * 2 + [(6, 16, 16)] * 2
    with pytest.raises(ValueError, match="6 bands but mean/std have 3"):
        tiny_aug(bands=3)(tile)
    with pytest.raises(ValueError, match=r"scaled to \[0, 1\]"):
        tiny_aug(bands=6)(tile * 255)
    with pytest.raises(ValueError, match="blur_rates"):
        tiny_aug(blur_rates="reference")


@pytest.mark.parametrize("rates", ["stated", "released"])
def test_blur_and_solarize_rates(rates: str, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {"global1": 0, "global2": 0, "local": 0, "solarize": 0}
    original_blur = aug_module.RandomGaussianBlur.blur
    original_solarize = aug_module.RandomSolarize.__call__

    def counting_blur(self, img):
        counts[self.tag] += 1
        return original_blur(self, img)

    def counting_solarize(self, img):
        out = original_solarize(self, img)
        counts["solarize"] += int(out is not img)
        return out

    monkeypatch.setattr(aug_module.RandomGaussianBlur, "blur", counting_blur)
    monkeypatch.setattr(aug_module.RandomSolarize, "__call__", counting_solarize)
    n_draws, n_local = 300, 2
    aug = tiny_aug(n_local=n_local, bands=1, blur_rates=rates)  # 1 band: skips the (slow) colour jitter
    image = torch.rand(1, 24, 24)
    torch.manual_seed(123)
    for _ in range(n_draws):
        aug(image)
    expected = aug_module.BLUR_RATES[rates]
    trials = {"global1": n_draws, "global2": n_draws, "local": n_draws * n_local, "solarize": n_draws}
    for key, p in zip(("global1", "global2", "local", "solarize"), (*expected, 0.2)):
        rate = counts[key] / trials[key]
        tolerance = 4.5 * math.sqrt(p * (1 - p) / trials[key])  # 0 for p in {0, 1}: exact
        assert abs(rate - p) <= tolerance, f"{rates} {key}: rate {rate:.3f}, expected {p}"


# ------------------------------------------------------------------------------------------ masking
def test_block_masking_limits_and_fill() -> None:
    gen = MaskingGenerator(input_size=(16, 16))
    assert gen.max_num_patches == 128
    rng = np.random.default_rng(0)
    fills = []
    for request in [0, 3, 26, 64, 128, 200, 256]:
        for _ in range(20):
            mask = gen(request, generator=rng)
            assert mask.shape == (16, 16) and mask.dtype == bool
            assert mask.sum() <= min(request, 128)
            if request >= 26:
                fills.append(mask.sum() / min(request, 128))
    assert gen(3, generator=rng).sum() == 0  # below the 4-patch minimum block
    assert np.mean(fills) > 0.8  # block masking gets close to the requested count
    a = MaskingGenerator(input_size=(8, 8))(20, generator=np.random.default_rng(5))
    b = MaskingGenerator(input_size=(8, 8))(20, generator=np.random.default_rng(5))
    assert np.array_equal(a, b)


def _fake_samples(batch: int, n_local: int, seed0: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed0)
    return [
        {
            "crops": {
                "global_crops": [torch.rand(3, 32, 32, generator=g) for _ in range(2)],
                "local_crops": [torch.rand(3, 16, 16, generator=g) for _ in range(n_local)],
            },
            "label": -1,
            "seed": seed0 * 1000 + i,
            "n_skipped": i % 2,
        }
        for i in range(batch)
    ]


def test_collate_layout_masks_and_weights() -> None:
    batch, n_tokens = 8, 64
    gen = MaskingGenerator(input_size=(8, 8))
    requested: list[int] = []

    class Recording:
        def get_shape(self):
            return gen.get_shape()

        def __call__(self, n, *, generator=None):
            requested.append(n)
            return gen(n, generator=generator)

    samples = _fake_samples(batch, n_local=3)
    out = collate_data_and_cast(samples, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, dtype=torch.bfloat16, n_tokens=n_tokens, mask_generator=Recording())
    g, loc = out["collated_global_crops"], out["collated_local_crops"]
    assert g.shape == (16, 3, 32, 32) and loc.shape == (24, 3, 16, 16) and g.dtype == torch.bfloat16
    assert torch.equal(g[1 * batch + 5], samples[5]["crops"]["global_crops"][1].bfloat16())  # crop-major
    assert torch.equal(loc[2 * batch + 3], samples[3]["crops"]["local_crops"][2].bfloat16())
    masks = out["collated_masks"]
    assert masks.shape == (16, n_tokens) and masks.dtype == torch.bool
    n_masked_images = int(2 * batch * 0.5)
    assert int(masks.any(dim=1).sum()) == n_masked_images
    bounds = np.linspace(0.1, 0.5, n_masked_images + 1)
    nonzero_requests = [r for r in requested if r > 0]
    assert len(nonzero_requests) == n_masked_images
    for i, r in enumerate(requested[:n_masked_images]):  # one ratio per stratum, in order
        assert int(n_tokens * bounds[i]) <= r <= int(n_tokens * bounds[i + 1])
    assert out["upperbound"] == sum(int(n_tokens * b) for b in bounds[1:])
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert int(out["n_masked_patches"][0]) == int(masks.sum())
    per_image = torch.zeros(16).index_add_(0, out["mask_indices_list"] // n_tokens, out["masks_weight"])
    assert torch.allclose(per_image[masks.any(1)], torch.ones(n_masked_images))
    assert torch.all(per_image[~masks.any(1)] == 0)
    assert out["n_skipped"] == sum(s["n_skipped"] for s in samples)
    # Masks are a function of the batch's first sample seed.
    kw = dict(n_tokens=n_tokens, mask_generator=gen)
    again = collate_data_and_cast(_fake_samples(batch, 3), **kw)["collated_masks"]
    assert torch.equal(again, collate_data_and_cast(_fake_samples(batch, 3), **kw)["collated_masks"])
    assert not torch.equal(again, collate_data_and_cast(_fake_samples(batch, 3, seed0=7), **kw)["collated_masks"])


def test_stratified_ratio_statistics() -> None:
    """Over many batches the achieved masked fraction of masked images stays inside [0.1, 0.5]."""
    gen = MaskingGenerator(input_size=(14, 14))
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(30):
        masks, _ = stratified_masks(n_images=8, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, n_tokens=196, mask_generator=gen, rng=rng)
        r = masks.float().mean(1)
        assert int((r > 0).sum()) == 4
        ratios.extend(r[r > 0].tolist())
    assert max(ratios) <= 0.5 + 1e-6 and min(ratios) > 0.05
    assert 0.2 < np.mean(ratios) <= 0.3 + 1e-6  # the strata average to 0.3; block masking may under-fill a little


# ----------------------------------------------------------------------------------------- datasets
def test_shipped_sample_data() -> None:
    paths = landsat_scene_paths()
    assert len(paths.bands) == 6 and all(p.is_file() for p in paths.bands)
    with rasterio.open(paths.multiband) as src:
        assert src.count == 5  # the shipped multiband file holds ETM+ 1-5 only
    images = natural_images()
    assert len(images) >= 10 and all(v.ndim == 3 and v.shape[2] == 3 and v.dtype == np.uint8 for v in images.values())
    train_x, train_y, test_x, test_y = landcover_tiles(tile=28, seed=0)
    assert train_x.shape[1:] == (28, 28, 3) and train_x.dtype == np.uint8 and len(train_x) == len(train_y)
    assert set(train_y.tolist()) == set(test_y.tolist()) and len(set(train_y.tolist())) >= 3
    assert max(train_y.max(), test_y.max()) < len(LANDCOVER_CLASSES)
    train_bytes = {x.tobytes() for x in train_x}
    assert not any(x.tobytes() in train_bytes for x in test_x)


def test_image_folder(demo_image_folder: Path, tmp_path: Path) -> None:
    ds = build_dataset(f"ImageFolder:root={demo_image_folder}:labels=subdirs")
    assert ds.classes == ["landsat", "natural", "rmnp"] and len(ds) > 100
    image, label = ds[len(ds) - 1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (56, 56) and label == 2
    # Rebuilding with the same parameters is a no-op; a foreign non-empty folder is never overwritten.
    assert write_demo_image_folder(demo_image_folder, tile=56) == demo_image_folder
    assert len(build_dataset(f"ImageFolder:root={demo_image_folder}")) == len(ds)
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        write_demo_image_folder(tmp_path, tile=56)
    with pytest.raises(ValueError, match="no images"):
        build_dataset(f"ImageFolder:root={demo_image_folder}:extensions=jpg")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        build_dataset(f"ImageFolder:root={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="unknown keys"):
        build_dataset(f"ImageFolder:root={demo_image_folder}:colour=yes")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("Folder:root=x")


def test_geotiff_dataset(landsat_stack_path: Path) -> None:
    ds = build_dataset(f"GeoTiff:root={landsat_stack_path}:tile=64:stride=32")
    image, label = ds[0]
    assert image.shape == (6, 64, 64) and image.dtype == torch.float32 and label == -1
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and image.std() > 0.01
    assert str(landsat_stack_path) in ds.describe(0)
    # Band selection reads the same scaled data as the matching planes of the full stack.
    sub = build_dataset(f"GeoTiff:root={landsat_stack_path}:tile=64:stride=32:bands=4,3,2")
    assert torch.allclose(sub[7][0], ds[7][0][[3, 2, 1]])
    # With max_nodata=0 every tile touching the nodata border is dropped, and only those.
    strict = build_dataset(f"GeoTiff:root={landsat_stack_path}:tile=64:stride=32:max_nodata=0")
    assert 0 < len(strict) < len(ds)
    with rasterio.open(landsat_stack_path) as src:
        raw = src.read(1)
    for i in range(len(strict)):
        col, row, w, h = strict.window(i)
        assert np.all(raw[row : row + h, col : col + w] != -99999)
    # Explicit scale: raw / 255 with nodata -> 0.
    fixed = build_dataset(f"GeoTiff:root={landsat_stack_path}:tile=64:scale=0,255:max_nodata=1")
    col, row, w, h = fixed.window(0)
    expected = np.clip(raw[row : row + h, col : col + w] / 255.0, 0, 1)
    expected[raw[row : row + h, col : col + w] == -99999] = 0
    assert np.allclose(fixed[0][0][0].numpy(), expected, atol=1e-6)
    multiband = build_dataset(f"GeoTiff:root={landsat_scene_paths().multiband}:tile=96")
    assert multiband[0][0].shape == (5, 96, 96)
    with pytest.raises(ValueError, match="has 6 bands"):
        build_dataset(f"GeoTiff:root={landsat_stack_path}:bands=1,9")


def test_manifest_dataset(demo_image_folder: Path, landsat_stack_path: Path, tmp_path: Path) -> None:
    png = next((demo_image_folder / "rmnp").glob("*.png"))
    shutil.copy(png, tmp_path / "tile.png")
    shutil.copy(landsat_stack_path, tmp_path / "scene.tif")
    meta = {"crs": "EPSG:32119", "scene_id": "lsat7_2000", "gsd": 28.5, "bounds": [0, 0, 1, 1], "provenance": {"stage": "test"}}
    rows = [
        {"path": "tile.png", "label": "rmnp"},
        {"path": "scene.tif", "window": [100, 120, 40, 40], "bands": [3, 2, 1], "label": "landsat", **meta},
        {"path": str(tmp_path / "scene.tif"), "window": [480, 0, 40, 40], "bands": [1], "label": "landsat"},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = build_dataset(f"Manifest:path={manifest}")
    assert len(ds) == 3 and ds.classes == ["landsat", "rmnp"] and ds.labels == [1, 0, 0]
    assert isinstance(ds[0][0], Image.Image)
    tile, label = ds[1]
    assert tile.shape == (3, 40, 40) and label == 0 and 0 <= float(tile.min()) and float(tile.max()) <= 1 and tile.std() > 0.01
    edge, _ = ds[2]  # window reaches past the scene's right edge (489 px): outside pixels are 0
    assert edge.shape == (1, 40, 40) and torch.all(edge[:, :, 9:] == 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "tile.png"}\n{"label": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        build_dataset(f"Manifest:path={bad}")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "m.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            build_dataset(f"Manifest:path={tmp_path / 'm.parquet'}")


# ------------------------------------------------------------------------------------ corrupt files
def _truncate(src: Path, dst: Path, keep: float = 0.4) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def _mask_collate(n_tokens: int = 64):
    gen = MaskingGenerator(input_size=(int(math.isqrt(n_tokens)),) * 2)
    return lambda samples: collate_data_and_cast(samples, n_tokens=n_tokens, mask_generator=gen)


@pytest.mark.faults
def test_corrupt_files_are_skipped_and_counted(demo_image_folder: Path, landsat_stack_path: Path, tmp_path: Path, caplog) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for png in sorted((demo_image_folder / "natural").glob("*.png"))[:6]:
        shutil.copy(png, folder / png.name)
    bad_png = _truncate(folder / sorted(p.name for p in folder.iterdir())[0], folder / "zz_truncated.png")
    bad_tif = _truncate(rmnp_rgb_path(), folder / "zz_truncated.tif")
    ds = build_dataset(f"ImageFolder:root={folder}:extensions=png,tif")
    assert len(ds) == 8
    loader = make_data_loader(dataset=ds, transform=tiny_aug(n_local=1), collate_fn=_mask_collate(), batch_size=8,
                              num_workers=0, seed=0, rank=0, world_size=1, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="dinov2_repro.data"):
        batch = next(iter(loader))
    assert batch["n_skipped"] == 2 and batch["collated_global_crops"].shape[0] == 16
    assert str(bad_png) in caplog.text and str(bad_tif) in caplog.text

    # GeoTIFF tiles through a manifest: a truncated scene is skipped the same way, also in workers.
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    shutil.copy(landsat_stack_path, scenes / "scene.tif")
    bad_scene = _truncate(landsat_stack_path, scenes / "broken.tif", keep=0.5)
    rows = [{"path": "scene.tif", "window": [64 * i, 100, 48, 48]} for i in range(1, 5)]
    rows += [{"path": "broken.tif", "window": [100, 300, 48, 48]}]
    (scenes / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = build_dataset(f"Manifest:path={scenes / 'm.jsonl'}")
    loader = make_data_loader(dataset=ds, transform=tiny_aug(n_local=1, bands=6), collate_fn=_mask_collate(), batch_size=5,
                              num_workers=2, seed=0, rank=0, world_size=1, shuffle=False, persistent_workers=False)
    batch = next(iter(loader))
    assert batch["n_skipped"] == 1 and batch["collated_global_crops"].shape == (10, 6, 32, 32)
    # The GeoTiff dataset drops the unreadable scene at construction and names it.
    with caplog.at_level(logging.WARNING, logger="dinov2_repro.data"):
        geo = build_dataset(f"GeoTiff:root={scenes}:tile=64")
    assert geo.bad_files == [str(bad_scene)] and str(bad_scene) in caplog.text and len(geo) > 0


@pytest.mark.faults
def test_all_corrupt_raises(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    loader = make_data_loader(dataset=build_dataset(f"ImageFolder:root={tmp_path}"), transform=tiny_aug(), collate_fn=_mask_collate(),
                              batch_size=2, num_workers=0, seed=0)
    with pytest.raises(RuntimeError, match="consecutive unreadable samples"):
        next(iter(loader))


# --------------------------------------------------------------------------------- sampler, loader
def test_infinite_sampler_sharding_and_resume() -> None:
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(InfiniteSampler(size=10, seed=3, with_seeds=True), 40)
    for epoch in range(4):
        assert sorted(i for i, _ in full[10 * epoch : 10 * epoch + 10]) == list(range(10))
    assert [i for i, _ in full[:10]] != [i for i, _ in full[10:20]]  # reshuffled each epoch
    rank1 = take(InfiniteSampler(size=10, seed=3, rank=1, world_size=3, with_seeds=True), 10)
    assert rank1 == full[1::3][:10]
    resumed = take(InfiniteSampler(size=10, seed=3, rank=1, world_size=3, start=4, with_seeds=True), 6)
    assert resumed == rank1[4:10]
    assert all(InfiniteSampler(size=10, seed=3, with_seeds=True).item_at(g) == full[g] for g in (0, 13, 39))
    assert len({seed for _, seed in full}) == len(full)  # every position has its own sample seed
    assert take(InfiniteSampler(size=10, seed=4), 10) != [i for i, _ in full[:10]]
    assert take(InfiniteSampler(size=5, shuffle=False), 7) == [0, 1, 2, 3, 4, 0, 1]


def test_loader_determinism_resume_and_workers(demo_image_folder: Path) -> None:
    ds = build_dataset(f"ImageFolder:root={demo_image_folder}")
    batch_size = 4

    def batches(num_workers: int, start_batch: int, count: int) -> list[dict]:
        loader = make_data_loader(dataset=ds, transform=tiny_aug(n_local=2), collate_fn=_mask_collate(), batch_size=batch_size,
                                  num_workers=num_workers, seed=11, rank=0, world_size=1, start_sample=start_batch * batch_size,
                                  persistent_workers=False)
        it = iter(loader)
        return [next(it) for _ in range(count)]

    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    from_start = batches(0, 0, 3)
    assert torch.equal(torch.rand(3), expected_next)  # the loader did not touch the caller's RNG
    resumed = batches(0, 2, 1)[0]
    from_start_workers = batches(2, 0, 3)
    resumed_workers = batches(2, 2, 1)[0]
    keys = ["collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list", "masks_weight"]
    for other in (resumed, from_start_workers[2], resumed_workers):
        for key in keys:
            assert torch.equal(from_start[2][key], other[key]), key
    for key in keys[:2]:
        assert torch.equal(from_start[1][key], from_start_workers[1][key])
    assert not torch.equal(from_start[1]["collated_global_crops"], from_start[2]["collated_global_crops"])
    assert from_start[2]["collated_masks"].any(1).sum() == 4
