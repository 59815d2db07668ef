"""Segmentation losses: the automatic choice, class weights, and no collapse to background on a rare-foreground task."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dinov2_repro.config import ConfigError
from dinov2_repro.eval.segmentation.losses import LOSSES, build_loss, choose_loss, parse_class_weights
from test_seg import _write_tif


def test_rule_switches_rare_binary_tasks_to_ce_dice_and_says_so(caplog):
    rare = torch.zeros(2, 10, 10, dtype=torch.long)
    rare[:, :2, :5] = 1  # 10% foreground
    rare[0, 9, 9] = 255  # ignored pixels are not counted
    with caplog.at_level(logging.WARNING):
        name, reason = choose_loss(None, labels=rare, num_classes=2, ignore_index=255)
    assert name == "ce+dice" and "foreground 10.1%" in reason and "ce+dice" in caplog.text
    balanced = torch.randint(0, 2, (2, 10, 10), generator=torch.Generator().manual_seed(0))
    assert choose_loss(None, labels=balanced, num_classes=2, ignore_index=255)[0] == "ce"
    assert choose_loss(None, labels=rare, num_classes=3, ignore_index=255)[0] == "ce"  # multi-class keeps ce
    assert choose_loss("lovasz", labels=rare, num_classes=2, ignore_index=255)[0] == "lovasz"  # the user's choice wins


def test_class_weights_auto_and_explicit():
    labels = torch.tensor([0] * 90 + [1] * 10 + [255] * 50).view(1, 15, 10)
    weights = parse_class_weights("auto", labels=labels, num_classes=3, ignore_index=255)
    # inverse frequencies 1/0.9 and 1/0.1, scaled to mean 1 over the present classes; class 2 absent -> 0
    assert weights == pytest.approx([0.2, 1.8, 0.0])
    assert parse_class_weights("1,4,0", labels=labels, num_classes=3, ignore_index=255) == [1.0, 4.0, 0.0]
    for bad in ("1,2", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(ConfigError, match="--class-weights"):
            parse_class_weights(bad, labels=labels, num_classes=3, ignore_index=255)


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_ignores_the_ignore_index_and_has_gradients(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[:, :4] = 255
    loss = build_loss(name, num_classes=3, ignore_index=255)
    value = loss(logits, labels)
    value.backward()
    assert torch.isfinite(value) and logits.grad[:, :, 4:].abs().sum() > 0
    assert logits.grad[:, :, :4].abs().max() == 0  # ignored pixels receive no gradient
    moved = logits.detach().clone()
    moved[:, :, :4] += 5.0  # what the head predicts under the ignore index does not matter
    assert torch.allclose(loss(moved, labels), value.detach(), atol=1e-5)


def _rare_buildings(height: int = 168, width: int = 224, seed: int = 0, fraction: float = 0.08):
    """Small bright rectangles ("buildings", ~8% of pixels) on a noisy background of similar brightness."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.uint8)
    while labels.mean() < fraction:
        r, c = rng.integers(0, height - 8), rng.integers(0, width - 8)
        labels[r:r + rng.integers(3, 8), c:c + rng.integers(3, 8)] = 1
    image = (100 + 25 * rng.normal(0, 1, (3, height, width)) + 30 * labels[None]).astype(np.float32)
    return image, labels


@pytest.mark.slow  # ~6 s: two 150-iteration per-pixel heads
def test_rare_foreground_does_not_collapse_to_background(tmp_path, one_torch_thread):
    from dinov2_repro.eval.segmentation.train import ModelSpec, prepare_data, run_segmentation

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image, labels = _rare_buildings()
    _write_tif(tmp_path / "images" / "s.tif", image)
    _write_tif(tmp_path / "masks" / "s.tif", labels)
    data = prepare_data(data=str(tmp_path), workdir=tmp_path, tile=28, classes=[0, 1])
    spec = ModelSpec("spectral", "spectral")
    auto = run_segmentation(spec, data, out_dir=None, iterations=150, progress=False)
    plain = run_segmentation(spec, data, out_dir=None, iterations=150, progress=False, loss="ce")
    assert auto["loss"] == "ce+dice" and plain["loss"] == "ce"
    # Plain CE on 8% foreground leaves most buildings as background (the failure users met) ...
    assert plain["test"]["recall"] < 0.3
    # ... the automatic ce+dice finds them: half the building pixels, and a real IoU.
    assert auto["test"]["recall"] > 0.4 and auto["test"]["per_class_iou"]["1"] > 0.25
    assert auto["train_loss_curve"]["loss"][-1] < auto["train_loss_curve"]["loss"][0]
    objects = auto["test"]["objects"]  # binary tasks report object metrics too
    assert objects["n_truth"] > 10 and objects["tp"] > 0 and objects["object_f1"] > plain["test"]["objects"]["object_f1"]
