"""Segmentation evaluation: metrics, decoder shapes, data checks, eval/predict CLIs, label efficiency."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2_repro.config import ConfigError
from dinov2_repro.eval.segmentation.metrics import confusion_matrix, segmentation_metrics

CRS = "EPSG:32119"


# ---------------------------------------------------------------------------------- metrics
def test_metrics_match_a_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    matrix = confusion_matrix(prediction, target, num_classes=4, ignore_index=255)
    # rows = truth: class 0 -> (0, 1); class 1 -> (1, 1, 2); class 2 -> (2, 0); 255 skipped; class 3 absent.
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(matrix, expected)
    metrics = segmentation_metrics(matrix, class_names=["a", "b", "c", "d"])
    # IoU a = 1 / (2 + 2 - 1) = 1/3; b = 2 / (3 + 3 - 2) = 1/2; c = 1 / (2 + 2 - 1) = 1/3; d absent
    assert metrics["per_class_iou"]["a"] == pytest.approx(1 / 3)
    assert metrics["per_class_iou"]["b"] == pytest.approx(1 / 2)
    assert metrics["per_class_iou"]["c"] == pytest.approx(1 / 3)
    assert metrics["per_class_iou"]["d"] is None
    assert metrics["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(4 / 7)
    assert metrics["n_pixels"] == 7 and "f1" not in metrics


def test_binary_metrics_report_pixel_f1_precision_recall():
    matrix = np.array([[50, 10], [5, 35]])  # tp=35, fp=10, fn=5
    metrics = segmentation_metrics(matrix)
    assert metrics["precision"] == pytest.approx(35 / 45)
    assert metrics["recall"] == pytest.approx(35 / 40)
    assert metrics["f1"] == pytest.approx(2 * 35 / (2 * 35 + 10 + 5))
    assert metrics["per_class_iou"]["1"] == pytest.approx(35 / 50)


def test_predicted_class_absent_from_ground_truth_counts_in_miou():
    matrix = np.array([[3, 1], [0, 0]])  # class 1 only predicted: IoU 0, still in the mean
    assert segmentation_metrics(matrix)["miou"] == pytest.approx((3 / 4 + 0) / 2)


# ---------------------------------------------------------------------------------- decoders
def _tiny_vit(in_chans: int = 3):
    from dinov2_repro.models import DinoVisionTransformer

    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=28, patch_size=14, in_chans=in_chans, embed_dim=32, depth=4, num_heads=2)


@pytest.mark.parametrize("decoder", ["linear", "unet", "upernet"])
def test_decoder_output_matches_any_input_multiple_of_the_patch(decoder, one_torch_thread):
    from dinov2_repro.eval.segmentation.decoders import build_segmenter

    features, head = build_segmenter(kind="vit", num_classes=5, in_channels=4, decoder=decoder, backbone=_tiny_vit(4))
    for size in [(14, 14), (28, 42), (56, 28), (70, 70)]:
        logits = head(features(torch.randn(2, 4, *size)), size)
        assert logits.shape == (2, 5, *size)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        features(torch.randn(1, 4, 30, 28))


def test_pyramid_block_indices_follow_the_protocol():
    from dinov2_repro.eval.segmentation.necks import pyramid_block_indices

    assert pyramid_block_indices(12) == [2, 5, 8, 11]
    assert pyramid_block_indices(24) == [5, 11, 17, 23]
    assert pyramid_block_indices(4) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------- synthetic data
def _write_tif(path: Path, array: np.ndarray, *, nodata=None, crs=CRS, origin=(1000.0, 2000.0), pixel=10.0) -> Path:
    import rasterio
    from affine import Affine

    array = array if array.ndim == 3 else array[None]
    profile = {"driver": "GTiff", "height": array.shape[1], "width": array.shape[2], "count": array.shape[0],
               "dtype": array.dtype.name, "crs": crs, "transform": Affine(pixel, 0.0, origin[0], 0.0, -pixel, origin[1]), "nodata": nodata}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
    return path


def _scene(height: int = 112, width: int = 168, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """3-band float scene whose bright half-planes are class 2, dark ones class 1; nodata in a corner."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width]
    labels = np.where(((rows // 20) + (cols // 24)) % 2 == 0, 2, 1).astype(np.uint8)
    image = np.stack([labels * 100.0 + rng.normal(0, 10, labels.shape) for _ in range(3)]).astype(np.float32)
    image[:, :6, :6] = -9999.0
    return image, labels


@pytest.fixture(scope="module")
def geotiff_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("segdata")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    image, labels = _scene()
    _write_tif(root / "images" / "scene.tif", image, nodata=-9999.0)
    _write_tif(root / "masks" / "scene.tif", labels, nodata=0)
    return root


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> Path:
    from dinov2_repro.backbone_file import save_backbone

    return save_backbone(_tiny_vit(3), tmp_path_factory.mktemp("bb") / "tiny.safetensors", arch="custom",
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


# ---------------------------------------------------------------------------------- data checks
def test_georeferenced_mask_is_aligned_by_bounds(tmp_path):
    from dinov2_repro.eval.segmentation.data import PairSource, read_mask

    labels = np.arange(20 * 30, dtype=np.int32).reshape(20, 30) % 7 + 1
    _write_tif(tmp_path / "m.tif", labels, origin=(1000.0, 2000.0))
    # image covers columns 5.. and rows 3.. of the mask grid, 10 x 12 px
    _write_tif(tmp_path / "i.tif", np.zeros((1, 10, 12), np.float32), origin=(1050.0, 1970.0))
    codes, missing = read_mask(PairSource(tmp_path / "i.tif", tmp_path / "m.tif"), (10, 12))
    assert np.array_equal(codes, labels[3:13, 5:17]) and not missing.any()


def test_bad_inputs_are_clear_errors_before_training(tmp_path, geotiff_folder, tiny_backbone):
    from dinov2_repro.eval.segmentation.train import ModelSpec, build_model, prepare_data, run_segmentation
    from PIL import Image

    image, labels = _scene(56, 56)
    folder = tmp_path / "sizes"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(folder / "images" / "a.png")
    Image.fromarray(np.zeros((42, 56), np.uint8)).save(folder / "masks" / "a.png")
    with pytest.raises(ConfigError, match=r"a\.png is 56x42 px"):
        prepare_data(data=str(folder), workdir=tmp_path, tile=28)

    crs = tmp_path / "crs"
    (crs / "images").mkdir(parents=True)
    (crs / "masks").mkdir()
    _write_tif(crs / "images" / "s.tif", image)
    _write_tif(crs / "masks" / "s.tif", labels, crs="EPSG:4326")
    with pytest.raises(ConfigError, match="has CRS EPSG:4326"):
        prepare_data(data=str(crs), workdir=tmp_path, tile=28)

    with pytest.raises(ConfigError, match=r"scene\.tif: class value 2 is not one of --classes 1"):
        prepare_data(data=str(geotiff_folder), workdir=tmp_path, tile=28, classes=[1])

    with pytest.raises(ConfigError, match="split 'val' has no 112x112"):
        prepare_data(data=str(geotiff_folder), workdir=tmp_path, tile=112)

    odd = prepare_data(data=str(geotiff_folder), workdir=tmp_path, tile=21)
    with pytest.raises(ConfigError, match="--tile 21: not a multiple of the patch size 14"):
        run_segmentation(ModelSpec("t", "vit", str(tiny_backbone)), odd, out_dir=None, iterations=1)

    data = prepare_data(data=str(geotiff_folder), workdir=tmp_path, tile=28, bands=[1, 2])
    with pytest.raises(ConfigError, match=r"tiny\.safetensors takes in_chans=3 bands but the data has 2"):
        build_model(ModelSpec("t", "vit", str(tiny_backbone)), data_channels=data.in_channels, num_classes=2)


def test_spatial_split_keeps_blocks_whole(geotiff_folder, tmp_path):
    from dinov2_repro.eval.segmentation.data import discover_pairs, load_scene, spatial_tiles

    scenes = [load_scene(p, bands=None, class_values=[1, 2], ignore_index=255) for p in discover_pairs(str(geotiff_folder), workdir=tmp_path)]
    tiles = spatial_tiles(scenes, tile=28, ignore_index=255, block_tiles=2)
    blocks = {split: {(t.row // 56, t.col // 56) for t in items} for split, items in tiles.items()}
    assert all(blocks[split] for split in blocks)
    assert not (blocks["train"] & blocks["val"]) and not (blocks["train"] & blocks["test"]) and not (blocks["val"] & blocks["test"])


# ---------------------------------------------------------------------------------- CLIs
def _cli(*argv: str) -> int:
    from dinov2_repro.cli import main

    return main(list(argv))


def test_eval_seg_cli_then_predict_keeps_georeference(geotiff_folder, tiny_backbone, tmp_path, one_torch_thread):
    import rasterio

    run = tmp_path / "run"
    assert _cli("eval", "seg", "--data", str(geotiff_folder), "--backbone", str(tiny_backbone), "--tile", "28",
                "--decoder", "linear", "--iterations", "30", "--lrs", "0.01,0.001", "--out-dir", str(run),
                "--out", str(tmp_path / "m.json")) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics["lr_sweep_val_miou"]) == {"0.01", "0.001"}
    assert {"miou", "pixel_accuracy", "per_class_iou", "f1", "precision", "recall"} <= set(metrics["test"])
    assert (run / "seg_run.json").is_file() and (run / "head.safetensors").is_file()

    scene = geotiff_folder / "images" / "scene.tif"
    out = tmp_path / "map" / "pred.tif"
    assert _cli("predict", "seg", "--checkpoint", str(run), "--scene", str(scene), "--out", str(out), "--overlap", "0.5") == 0
    with rasterio.open(scene) as src, rasterio.open(out) as pred:
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        assert pred.nodata == src.nodata == -9999
        codes = pred.read(1)
    assert (codes[:6, :6] == -9999).all()  # input nodata stays nodata
    assert set(np.unique(codes[6:, 6:]).tolist()) <= {1, 2}
    assert out.with_suffix(".png").is_file()


def test_sliding_window_offsets_cover_the_scene():
    from dinov2_repro.eval.segmentation.predict import tent_weights, window_offsets

    assert window_offsets(100, 28, 21) == [0, 21, 42, 63, 72]
    assert window_offsets(20, 28, 21) == [0]
    weights = tent_weights(28)
    assert weights.min() > 0 and weights[14, 14] > weights[0, 0]


@pytest.mark.slow  # ~4 s idle, ~20 s under load: trains 30 small heads incl. a ResNet-18 U-Net
def test_label_efficiency_has_every_model_and_every_n(geotiff_folder, tiny_backbone, tmp_path, one_torch_thread):
    out = tmp_path / "le"
    assert _cli("eval", "seg", "--data", str(geotiff_folder), "--backbone", str(tiny_backbone), "--tile", "28",
                "--decoder", "unet", "--iterations", "2", "--n-labelled", "1,2,all", "--seeds", "0,1",
                "--compare", f"student={tiny_backbone}", "--out-dir", str(out)) == 0
    result = json.loads((out / "label_efficiency.json").read_text())
    n_train = result["n_tiles"]["train"]
    assert set(result["models"]) == {"teacher", "student", "random_init", "spectral", "supervised"}
    for model in result["models"].values():
        assert sorted(int(n) for n in model["runs"]) == sorted({1, 2, n_train})
        assert all(set(run["miou"]) == {"0", "1"} for run in model["runs"].values())
    assert all(model["cpu_seconds"] >= 0 for model in result["models"].values())
    assert (out / "label_efficiency.png").stat().st_size > 1000


def test_eval_linear_cli_reports_top1_and_per_class(tmp_path, tiny_backbone, one_torch_thread):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(6):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (28, 28, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "linear.json"
    assert _cli("eval", "linear", "--backbone", str(tiny_backbone), "--train", f"ImageFolder:root={tmp_path / 'train'}:labels=subdirs",
                "--val", f"ImageFolder:root={tmp_path / 'val'}:labels=subdirs", "--n-blocks", "4", "--epochs", "30",
                "--out", str(out)) == 0
    result = json.loads(out.read_text())
    assert set(result["per_class_accuracy"]) == {"blue", "red"}
    assert result["top1"] == 1.0  # colour alone separates the classes, even through a random backbone
    assert result["feature_dim"] == 5 * 32
    # The cheap baselines go through the same probe; per-band statistics alone separate two colours.
    assert set(result["baselines"]) == {"random_init", "imagestats", "rcf"}
    assert result["baselines"]["imagestats"]["top1"] == 1.0


def test_pca_figure(tmp_path, one_torch_thread):
    from dinov2_repro.eval.visualize import pca_rgb, plot_pca

    images = torch.rand(3, 3, 28, 28)
    maps = pca_rgb(_tiny_vit(3), images)
    assert maps.shape == (3, 2, 2, 3) and 0 <= maps.min() and maps.max() <= 1
    path = plot_pca({"teacher": _tiny_vit(3)}, images, images.permute(0, 2, 3, 1).numpy(), tmp_path / "pca.png")
    assert path.stat().st_size > 1000


def test_manifest_rows_give_pairs_with_their_split(geotiff_folder, tmp_path):
    from dinov2_repro.eval.segmentation.data import discover_pairs

    image, mask = geotiff_folder / "images" / "scene.tif", geotiff_folder / "masks" / "scene.tif"
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps({"path": str(image), "mask": str(mask), "split": "test"}) + "\n"
                        + json.dumps({"path": str(image), "mask": str(mask)}) + "\n")
    pairs = discover_pairs(str(manifest), workdir=tmp_path)
    assert [(p.image, p.mask, p.split) for p in pairs] == [(image, mask, "test"), (image, mask, None)]
    manifest.write_text(json.dumps({"path": str(image)}) + "\n")
    with pytest.raises(ConfigError, match="row 1 has no 'mask'"):
        discover_pairs(str(manifest), workdir=tmp_path)


def test_split_folders_fix_the_split_and_png_masks_map_codes(tmp_path, one_torch_thread):
    from PIL import Image

    from dinov2_repro.eval.segmentation.train import prepare_data

    for split in ("train", "val", "test"):
        for sub in ("images", "masks"):
            (tmp_path / split / sub).mkdir(parents=True)
        mask = np.full((28, 28), 7, np.uint8)
        mask[:, 14:] = 9
        mask[0, 0] = 255  # ignore index
        Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / split / "images" / "a.png")
        Image.fromarray(mask).save(tmp_path / split / "masks" / "a.png")
    data = prepare_data(data=str(tmp_path), workdir=tmp_path, tile=28)
    assert data.class_values == [7, 9]
    assert {split: len(data.labels[split]) for split in ("train", "val", "test")} == {"train": 1, "val": 1, "test": 1}
    labels = data.labels["train"][0]
    assert labels[0, 0] == 255 and labels[1, 0] == 0 and labels[1, 20] == 1
