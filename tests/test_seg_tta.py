"""Test-time augmentation: the averaged views make the map equivariant, and symmetric inputs give symmetric maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dinov2_repro.eval.segmentation.tta import tta_probabilities, tta_views
from test_seg import _tiny_vit, geotiff_folder, tiny_backbone  # noqa: F401  (fixtures)


def _model():
    from dinov2_repro.eval.segmentation.decoders import build_segmenter

    features, head = build_segmenter(kind="vit", num_classes=3, in_channels=3, decoder="unet", backbone=_tiny_vit(3))
    torch.manual_seed(1)
    for p in head.parameters():  # a random head that is far from symmetric
        p.data.normal_(0, 0.2)
    return lambda x: head(features(x), tuple(x.shape[-2:])).softmax(1)


def _d4_symmetric(size: int = 28) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.rand(1, 3, size, size)
    images = [forward(x) for forward, _ in tta_views("d4")]
    return torch.stack(images).mean(0)  # the group average of an image is invariant under the group


def test_d4_tta_gives_a_symmetric_map_on_a_symmetric_input(one_torch_thread):
    model = _model()
    x = _d4_symmetric()
    with torch.no_grad():
        plain = tta_probabilities(model, x, mode="none")
        averaged = tta_probabilities(model, x, mode="d4")
    for forward, _ in tta_views("d4"):
        assert torch.allclose(forward(x), x, atol=1e-6)  # the input is symmetric
        assert torch.allclose(forward(averaged), averaged, atol=1e-5)  # so is the TTA map
    # without TTA the (random) model breaks the symmetry: the check above can fail
    assert max(float((forward(plain) - plain).abs().max()) for forward, _ in tta_views("d4")) > 1e-3
    assert torch.allclose(averaged.sum(1), torch.ones(1, 28, 28), atol=1e-5)


@pytest.mark.parametrize("mode", ["flip", "d4"])
def test_tta_is_equivariant_under_its_group(mode, one_torch_thread):
    model = _model()
    torch.manual_seed(2)
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        base = tta_probabilities(model, x, mode=mode)
        for forward, _ in tta_views(mode):
            assert torch.allclose(tta_probabilities(model, forward(x), mode=mode), forward(base), atol=1e-5)
    assert len(tta_views("d4")) == 8 and len({tuple(np.asarray(f(torch.arange(4.).view(1, 1, 2, 2))).ravel())
                                              for f, _ in tta_views("d4")}) == 8  # 8 distinct symmetries
    with pytest.raises(ValueError, match="--tta"):
        tta_views("d8")


def test_eval_and_predict_seg_take_tta(geotiff_folder, tiny_backbone, tmp_path, one_torch_thread):
    import json

    import rasterio

    from dinov2_repro.cli import main

    run = tmp_path / "run"
    assert main(["eval", "seg", "--data", str(geotiff_folder), "--backbone", str(tiny_backbone), "--tile", "28",
                 "--decoder", "linear", "--iterations", "5", "--tta", "d4", "--out-dir", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tta"] == "d4" and {"miou", "f1", "object_f1"} <= set(metrics["test_without_tta"])
    out = tmp_path / "map.tif"
    assert main(["predict", "seg", "--checkpoint", str(run), "--scene", str(geotiff_folder / "images" / "scene.tif"),
                 "--out", str(out), "--tta", "flip"]) == 0
    with rasterio.open(out) as src:
        assert set(np.unique(src.read(1)[6:, 6:]).tolist()) <= {1, 2}
