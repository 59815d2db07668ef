"""Fine-tuning modes: which parameters train, layer-wise lr decay, cached features refused, save / load."""
from __future__ import annotations

import json

import pytest
import torch

from dinov2_repro.config import ConfigError
from test_seg import _tiny_vit, geotiff_folder, tiny_backbone  # noqa: F401  (fixtures)


def _features():
    from dinov2_repro.eval.segmentation.decoders import build_segmenter

    return build_segmenter(kind="vit", num_classes=2, in_channels=3, decoder="linear", backbone=_tiny_vit(3))


def test_modes_choose_the_trainable_parts_and_decay_their_lr():
    from dinov2_repro.eval.segmentation.finetune import parameter_groups, parse_train_backbone, unfreeze

    features, head = _features()
    assert parse_train_backbone("none", depth=4) is None and parse_train_backbone("last:2", depth=4) == [2, 3]
    for bad in ("last:0", "last:5", "some"):
        with pytest.raises(ConfigError, match="--train-backbone"):
            parse_train_backbone(bad, depth=4)
    last2 = unfreeze(features, "last:2")
    names = {n for n, p in last2.backbone.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("blocks.2.", "blocks.3.", "norm.")) for n in names)
    assert not any(p.requires_grad for p in features.parameters())  # the original stays frozen
    every = unfreeze(features, "all")
    assert all(p.requires_grad for p in every.backbone.parameters())
    groups = parameter_groups(every, head, lr=1.0, layer_decay=0.5)
    rates = {id(g["params"][0]): g["lr"] for g in groups[1:]}
    block0 = every.backbone.blocks[0].norm1.weight
    block3 = every.backbone.blocks[3].norm1.weight
    assert rates[id(block3)] == 0.5 and rates[id(block0)] == 0.5 ** 4 and groups[0]["lr"] == 1.0
    assert rates[id(every.backbone.patch_embed.proj.weight)] == 0.5 ** 5


def test_cached_features_are_refused_when_the_backbone_trains():
    from dinov2_repro.eval.segmentation.finetune import unfreeze
    from dinov2_repro.eval.segmentation.train import cached_features

    features, _ = _features()
    assert len(cached_features(features, torch.rand(2, 3, 28, 28))) == 1  # frozen: cached
    with pytest.raises(ConfigError, match="cached features cannot be used when the backbone trains"):
        cached_features(unfreeze(features, "last:1"), torch.rand(2, 3, 28, 28))


@pytest.mark.slow  # ~10 s: fine-tunes the tiny backbone twice, then reloads the run (what predict seg uses)
def test_fine_tuned_run_trains_the_backbone_and_reloads_it(geotiff_folder, tiny_backbone, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    from dinov2_repro.cli import main
    from dinov2_repro.eval.segmentation.train import load_run

    run = tmp_path / "run"
    assert main(["eval", "seg", "--data", str(geotiff_folder), "--backbone", str(tiny_backbone), "--tile", "28",
                 "--decoder", "linear", "--iterations", "10", "--lrs", "0.01", "--train-backbone", "last:1",
                 "--layer-decay", "0.75", "--out-dir", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"]["train_backbone"] == "last:1" and metrics["trainable_parameters"] > 1000
    tuned = load_file(str(run / "backbone_finetuned.safetensors"))
    original = load_file(str(tiny_backbone))
    changed = [k for k in tuned if not torch.equal(tuned[k], original.get(k, tuned[k]))]
    assert changed and all(k.startswith(("blocks.3.", "norm.")) for k in changed)  # only the trained block moved
    features, _, _ = load_run(run)
    assert torch.equal(features.backbone.state_dict()["blocks.3.mlp.fc1.weight"], tuned["blocks.3.mlp.fc1.weight"])
    le = tmp_path / "le"
    assert main(["eval", "seg", "--data", str(geotiff_folder), "--backbone", str(tiny_backbone), "--tile", "28",
                 "--decoder", "linear", "--iterations", "3", "--train-backbone", "all", "--n-labelled", "1",
                 "--seeds", "0", "--baselines", "", "--out-dir", str(le)]) == 0
    assert json.loads((le / "label_efficiency.json").read_text())["models"]["teacher"]["train_backbone"] == "all"
