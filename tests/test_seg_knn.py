"""The training-free kNN decoder: exact on a toy bank, saved and loaded, in eval seg, label efficiency and predict seg."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dinov2_repro.eval.segmentation.knn_decoder import KnnHead, guided_filter, patch_votes
from test_seg import geotiff_folder, tiny_backbone  # noqa: F401  (fixtures)


def _toy_head(k: int, temperature: float = 0.1) -> KnnHead:
    # one 2 x 6 px tile = three 2x2 patches with features e1, e2 and (ignored) e1+e2
    feats = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)
    labels = torch.tensor([[0, 0, 1, 0, 255, 255], [0, 0, 1, 255, 255, 255]])[None]
    # patch 0: all class 0 -> votes (1, 0); patch 1: 2 of 3 labelled pixels are class 1 -> (1/3, 2/3); patch 2: no label
    return KnnHead(num_classes=2, k=k, temperature=temperature).fit([feats], labels, ignore_index=255)


def test_votes_are_label_fractions_of_each_patch():
    labels = torch.tensor([[0, 1, 2, 2], [255, 1, 2, 2]])[None]
    votes, has_label = patch_votes(labels, num_classes=3, ignore_index=255, patch=2)
    assert torch.allclose(votes[0, :, 0, 0], torch.tensor([1 / 3, 2 / 3, 0.0]))
    assert torch.allclose(votes[0, :, 0, 1], torch.tensor([0.0, 0.0, 1.0])) and has_label.all()


def test_knn_head_is_exact_on_a_toy_bank():
    head = _toy_head(k=1)
    assert head.bank.shape == (2, 2)  # the unlabelled patch is not in the bank
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)  # e1 and 2*e2 (cosine ignores the norm)
    probs = head.patch_probabilities(queries)[0, :, 0]
    assert torch.allclose(probs[:, 0], torch.tensor([1.0, 0.0])) and torch.allclose(probs[:, 1], torch.tensor([1 / 3, 2 / 3]))
    head2 = _toy_head(k=2, temperature=0.1)
    q = torch.tensor([0.8, 0.6]).view(1, 2, 1, 1)  # cosine 0.8 with e1, 0.6 with e2
    w1 = 1 / (1 + math.exp(-(0.8 - 0.6) / 0.1))  # exp(s/T) weights, normalised
    expected = w1 * torch.tensor([1.0, 0.0]) + (1 - w1) * torch.tensor([1 / 3, 2 / 3])
    assert torch.allclose(head2.patch_probabilities(q)[0, :, 0, 0], expected.float(), atol=1e-6)
    logits = head2([q], (4, 4))  # upsampled: a constant map of those probabilities
    assert logits.shape == (1, 2, 4, 4) and torch.allclose(logits.softmax(1)[0, :, 2, 3], expected.float(), atol=1e-6)
    # k larger than the bank uses the whole bank
    assert torch.allclose(_toy_head(k=50).patch_probabilities(q), head2.patch_probabilities(q))


def test_knn_head_survives_save_and_load():
    head = _toy_head(k=2)
    fresh = KnnHead(num_classes=2)
    fresh.load_state_dict({k: v.clone() for k, v in head.state_dict().items()})
    q = torch.randn(1, 2, 2, 2)
    assert fresh.k == 2 and torch.equal(fresh.patch_probabilities(q), head.patch_probabilities(q))


def test_guided_filter_keeps_constants_and_follows_edges():
    guide = torch.zeros(1, 1, 8, 8)
    guide[..., 4:] = 1.0
    flat = torch.full((1, 2, 8, 8), 0.5)
    assert torch.allclose(guided_filter(guide, flat, radius=2, eps=1e-4), flat, atol=1e-5)
    blurred = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(1, 1, 8, 8).contiguous()
    out = guided_filter(guide, blurred, radius=2, eps=1e-4)
    step = (out[..., 4] - out[..., 3]).mean()
    assert step > (blurred[..., 4] - blurred[..., 3]).mean() * 2  # sharper at the guide's edge


@pytest.mark.slow  # ~8 s idle, ~25 s under load: three CLI runs
def test_knn_decoder_in_eval_label_efficiency_and_predict(geotiff_folder, tiny_backbone, tmp_path, one_torch_thread):
    import rasterio

    from dinov2_repro.cli import main

    run = tmp_path / "run"
    assert main(["eval", "seg", "--data", str(geotiff_folder), "--backbone", str(tiny_backbone), "--tile", "28",
                 "--decoder", "knn", "--knn-k", "5", "--guided-filter", "2", "--out-dir", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == 0 and metrics["model"]["knn_k"] == 5
    # the synthetic classes differ in brightness, which even random patch features keep: far above chance
    assert metrics["test"]["miou"] > 0.6
    out = tmp_path / "map.tif"
    assert main(["predict", "seg", "--checkpoint", str(run), "--scene", str(geotiff_folder / "images" / "scene.tif"),
                 "--out", str(out)]) == 0
    with rasterio.open(out) as src:
        assert set(np.unique(src.read(1)[6:, 6:]).tolist()) == {1, 2}
    le = tmp_path / "le"
    assert main(["eval", "seg", "--data", str(geotiff_folder), "--backbone", str(tiny_backbone), "--tile", "28",
                 "--decoder", "knn", "--n-labelled", "1,2", "--seeds", "0,1", "--baselines", "random_init",
                 "--out-dir", str(le)]) == 0
    result = json.loads((le / "label_efficiency.json").read_text())
    assert set(result["models"]) == {"teacher", "random_init"} and set(result["models"]["teacher"]["runs"]) == {"1", "2"}
    assert main(["eval", "seg", "--data", str(geotiff_folder), "--decoder", "knn"]) == 2  # needs a backbone
