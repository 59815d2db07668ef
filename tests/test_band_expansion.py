"""RGB backbones on more bands (issue 19 item 3): the two expansion rules, their exact properties,
their errors, and `eval seg --expand-bands` through to `predict seg`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2_repro.band_expansion import expand_normalisation, expand_patch_embed_weight

RGB_FILTERS = torch.tensor([[3.0, 6.0, 9.0], [1.0, 2.0, 6.0]])  # 2 output dims x (R, G, B), 1x1 patches


def _toy_weight() -> torch.Tensor:
    return RGB_FILTERS.view(2, 3, 1, 1).clone()


def test_mean_rule_exact_weights():
    # mean filters (6, 3); every band x 3/5: R, G, B on bands 0-2, the mean on bands 3-4.
    expected = torch.tensor([[1.8, 3.6, 5.4, 3.6, 3.6], [0.6, 1.2, 3.6, 1.8, 1.8]])
    assert torch.allclose(expand_patch_embed_weight(_toy_weight(), 5)[:, :, 0, 0], expected, atol=1e-6)


def test_rgb_rule_exact_weights():
    # rgb_bands=(4, 0, 2): band 4 = w_R - 0.4 m, band 0 = w_G - 0.4 m, band 2 = w_B - 0.4 m, others 0.6 m.
    expected = torch.tensor([[3.6, 3.6, 6.6, 3.6, 0.6], [0.8, 1.8, 4.8, 1.8, -0.2]])
    got = expand_patch_embed_weight(_toy_weight(), 5, rgb_bands=(4, 0, 2))[:, :, 0, 0]
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(1), RGB_FILTERS.sum(1))  # the filter sum over bands is kept
    # Three bands: a pure reordering (BGR data).
    assert torch.equal(expand_patch_embed_weight(_toy_weight(), 3, rgb_bands=(2, 1, 0))[:, :, 0, 0], RGB_FILTERS.flip(1))
    assert expand_normalisation([0.1, 0.2, 0.6], 5, rgb_bands=(4, 0, 2)) == pytest.approx([0.2, 0.3, 0.6, 0.3, 0.1])


@pytest.fixture(scope="module")
def rgb_export(tmp_path_factory) -> Path:
    from dinov2_repro.backbone_file import save_backbone
    from dinov2_repro.models import DinoVisionTransformer

    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=28, patch_size=14, in_chans=3, embed_dim=32, depth=2, num_heads=2)
    return save_backbone(model, tmp_path_factory.mktemp("bands") / "rgb.safetensors", arch="custom",
                         mean=(0.4, 0.5, 0.3), std=(0.2, 0.25, 0.15))


def _features(model, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.forward_features(image)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], dim=1)


def test_expanded_backbones_keep_what_the_rgb_model_sees(rgb_export, one_torch_thread):
    from dinov2_repro.backbone_file import load_backbone

    rgb_model, _ = load_backbone(rgb_export)
    torch.manual_seed(1)
    rgb = torch.randn(2, 3, 28, 28)
    grey = rgb[:, :1]

    # mean rule: a grey 6-band image embeds as the RGB model embeds the grey picture.
    mean_model, meta = load_backbone(rgb_export, in_chans=6)
    assert meta["in_chans"] == 6 and meta["band_expansion"]["rule"] == "mean"
    assert meta["mean"] == pytest.approx([0.4, 0.5, 0.3, 0.4, 0.4, 0.4])
    assert torch.allclose(_features(mean_model, grey.expand(-1, 6, -1, -1)), _features(rgb_model, grey.expand(-1, 3, -1, -1)), atol=1e-5)

    # rgb rule: extra bands equal to the mean of R, G, B -> exactly the RGB model on R, G, B.
    red, green, blue = 3, 5, 1
    rgb_bands_model, meta = load_backbone(rgb_export, in_chans=6, rgb_bands=(red, green, blue))
    assert meta["std"] == pytest.approx([0.2, 0.15, 0.2, 0.2, 0.2, 0.25])
    six = rgb.mean(1, keepdim=True).repeat(1, 6, 1, 1)
    six[:, [red, green, blue]] = rgb
    reference = _features(rgb_model, rgb)
    assert torch.allclose(_features(rgb_bands_model, six), reference, atol=1e-5)
    # The property is not automatic: the mean rule (colour shrunk by 3/N) and new information in an
    # extra band both change the embedding.
    assert (_features(mean_model, six[:, [red, green, blue, 0, 2, 4]]) - reference).abs().max() > 1e-2
    six[:, 0] += 1.0
    assert (_features(rgb_bands_model, six) - reference).abs().max() > 1e-2


def test_bad_band_indices_are_one_line_errors(rgb_export, tmp_path):
    from dinov2_repro.backbone_file import load_backbone, save_backbone
    from dinov2_repro.models import DinoVisionTransformer

    with pytest.raises(ValueError, match=r"rgb\.safetensors: rgb_bands=\[0, 1, 6\]: index 6 is outside the 6 input bands"):
        load_backbone(rgb_export, in_chans=6, rgb_bands=(0, 1, 6))
    with pytest.raises(ValueError, match="must be three different bands"):
        load_backbone(rgb_export, in_chans=6, rgb_bands=(0, 1, 1))
    with pytest.raises(ValueError, match="expected exactly three band indices"):
        load_backbone(rgb_export, in_chans=6, rgb_bands=(0, 1))
    with pytest.raises(ValueError, match="needs at least 3 input bands"):
        load_backbone(rgb_export, in_chans=2)
    four = save_backbone(DinoVisionTransformer(img_size=28, patch_size=14, in_chans=4, embed_dim=32, depth=1, num_heads=2),
                         tmp_path / "four.safetensors", arch="custom", mean=[0.5] * 4, std=[0.2] * 4)
    with pytest.raises(ValueError, match="starts from an RGB backbone, but this one has in_chans=4"):
        load_backbone(four, in_chans=6)


def _five_band_folder(root: Path) -> Path:
    """A 5-band 112x168 scene: class 2 where bands are bright, class 1 elsewhere."""
    import rasterio
    from affine import Affine

    rows, cols = np.mgrid[:112, :168]
    labels = np.where(((rows // 20) + (cols // 24)) % 2 == 0, 2, 1).astype(np.uint8)
    noise = np.random.default_rng(0).normal(0, 10, (5, 112, 168))
    image = (labels[None] * 100.0 + noise).astype(np.float32)
    for sub, array in (("images", image), ("masks", labels[None])):
        (root / sub).mkdir(parents=True)
        profile = {"driver": "GTiff", "height": 112, "width": 168, "count": array.shape[0], "dtype": array.dtype.name,
                   "crs": "EPSG:32119", "transform": Affine(10.0, 0.0, 1000.0, 0.0, -10.0, 2000.0)}
        with rasterio.open(root / sub / "scene.tif", "w", **profile) as dst:
            dst.write(array)
    return root


def test_eval_seg_expand_bands_then_predict(rgb_export, tmp_path, capsys, one_torch_thread):
    from dinov2_repro.cli import main

    data = _five_band_folder(tmp_path / "data")
    common = ["eval", "seg", "--data", str(data), "--backbone", str(rgb_export), "--tile", "28", "--decoder", "linear",
              "--iterations", "2"]
    assert main([*common, "--expand-bands", "3,2,9"]) == 2
    assert "--expand-bands 3,2,9: band 9 is not one of the 5 bands read (1..5" in capsys.readouterr().err
    assert main([*common, "--expand-bands", "red"]) == 2
    assert "expected 'mean' or three 1-based band numbers" in capsys.readouterr().err
    assert main(common) == 2  # 5 bands, an RGB backbone, no expansion asked for
    assert "--expand-bands mean|R,G,B" in capsys.readouterr().err

    run = tmp_path / "run"
    assert main([*common, "--expand-bands", "3,2,1", "--out-dir", str(run)]) == 0
    record = json.loads((run / "seg_run.json").read_text())
    assert record["model"]["expand_bands"] == "3,2,1" and record["in_channels"] == 5
    assert record["mean"] == pytest.approx([0.3, 0.5, 0.4, 0.4, 0.4])  # R=band 3, G=2, B=1; others the RGB mean
    out = tmp_path / "pred.tif"
    assert main(["predict", "seg", "--checkpoint", str(run), "--scene", str(data / "images" / "scene.tif"),
                 "--out", str(out)]) == 0
    assert out.is_file()
