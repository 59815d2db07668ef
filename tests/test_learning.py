"""Evidence of learning (issue 20 item 3): the shipped tiny recipe, trained as the demo trains it, is
compared with baselines computed in the same test, never with constants a random init passes.

- kNN on land-cover tiles of the Landsat scene's held-out blocks (never in the pretraining pool:
  tests/test_heldout.py) beats the same architecture at a random init built with the trained
  config's init values (LayerScale 1.0) by a clear margin, and imagestats by a small one (3 seeds in
  benchmarks/learning.py: +0.040 to +0.081). It does *not* beat RCF reliably (+0.006 on average over
  3 seeds, seed 0 loses: 0.873 vs 0.888), so that is reported (docs/results-learning.md), not asserted.
- The teacher keeps a feature rank and a prototype usage comparable to the same model at init (same
  seed, same config, same tiles): a collapse guard, which the model at init passes by design.
- Not asserted, because it does not hold by a margin at this budget: that the teacher's targets on
  held-out tiles are sharper than those of the same model at init (per-sample entropy 0.656 -> 0.641
  log K on seed 0). The statistics are printed by test_no_collapse_relative_to_the_model_at_init.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from dinov2_repro.config import CONFIG_DIR, load_config
from dinov2_repro.data.sample_data import landcover_tiles
from dinov2_repro.eval.knn_classifier import images_to_tensor
from dinov2_repro.eval.landcover import landcover_knn_report
from dinov2_repro.train.checkpoint import last_checkpoint, load_model_state
from dinov2_repro.train.meta_arch import SSLMetaArch
from dinov2_repro.train.monitors import effective_rank
from dinov2_repro.train.pretrain import TEACHER_EXPORT, run_ssl_training

# A real training run shared by the module (minutes on 2 cores): the whole file is slow.
pytestmark = pytest.mark.slow

# Trained minus random-init kNN top-1 on the held-out blocks (absolute), averaged over 3 spatial probe
# splits (one split's 168 test tiles come from few blocks: split-to-split swings reach 0.15). Measured
# on seed 0: +0.091 on average (splits 0 / 1 / 2: 0.946 / 0.849 / 0.824 vs 0.756 / 0.807 / 0.784).
KNN_MARGIN_RANDOM_INIT = 0.05
# Trained minus imagestats, same average: +0.038 in the test's own run (0.871 vs 0.833), +0.040 to
# +0.081 over the benchmark's 3 seeds.
KNN_MARGIN_IMAGESTATS = 0.01
PROBE_SPLITS = (0, 1, 2)
# Collapse shows as RankMe ~1 and a handful of prototypes: the trained teacher must keep at least
# this fraction of what the same model at init has on the same tiles (measured on seed 0: RankMe
# 13.1 vs 30.7 at init, 16 vs 11 distinct argmax prototypes over 424 tiles).
RANK_FRACTION, PROTOTYPE_FRACTION = 0.25, 0.5


@pytest.fixture(scope="module")
def trained_run(demo_image_folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        f"train.dataset_path=ImageFolder:root={demo_image_folder}", f"train.output_dir={run_dir}",
        "train.tensorboard=false",  # the shipped recipe as the demo runs it: 200 iterations, ~3 min on 2 idle cores
    ])
    run_ssl_training(cfg)
    return cfg, run_dir


@pytest.fixture(scope="module")
def knn_report(trained_run):
    cfg, run_dir = trained_run
    # RCF is left out (not asserted, and its ~10 s would only be printed); benchmarks/learning.py runs it.
    report = landcover_knn_report(run_dir / TEACHER_EXPORT, size=cfg.crops.global_crops_size,
                                  baselines=("random_init", "imagestats"), split_seeds=PROBE_SPLITS)
    print(json.dumps(report, indent=2))
    return report


def teacher_statistics(model: SSLMetaArch, images: torch.Tensor, *, temperature: float) -> dict[str, float]:
    """On ``images``: per-sample entropy of the teacher's training targets (the recipe's centering at
    ``temperature``; fraction of log K), RankMe of its CLS features, distinct argmax prototypes."""
    model.eval()
    with torch.no_grad():
        features = model.teacher.backbone(images)
        logits = model.teacher.dino_head(features).float()
        probs = model._center("dino", logits, temperature)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
    return {"entropy_rel": float(entropy) / math.log(probs.shape[-1]), "rankme": effective_rank(features),
            "prototypes_used": len(set(logits.argmax(-1).tolist()))}


@pytest.fixture(scope="module")
def init_vs_trained(trained_run):
    """teacher_statistics of the model at init (rebuilt as the training loop builds it: same seed,
    same config) and after training, on every held-out land-cover tile."""
    cfg, run_dir = trained_run
    torch.manual_seed(cfg.train.seed)
    at_init = SSLMetaArch(cfg)
    trained = SSLMetaArch(cfg)
    load_model_state(last_checkpoint(run_dir), trained)
    train_x, _, test_x, _ = landcover_tiles()
    images = images_to_tensor(torch.cat([torch.as_tensor(train_x), torch.as_tensor(test_x)]),
                              mean=cfg.crops.mean, std=cfg.crops.std, size=cfg.crops.global_crops_size)
    temperature = float(cfg.teacher.teacher_temp)
    stats = {"init": teacher_statistics(at_init, images, temperature=temperature),
             "trained": teacher_statistics(trained, images, temperature=temperature), "n_images": len(images)}
    print(json.dumps(stats, indent=2))
    return stats


def test_knn_beats_random_init_and_imagestats_on_heldout_blocks(knn_report):
    assert knn_report["region"] == "heldout" and knn_report["layerscale_init"] == 1.0, knn_report
    assert knn_report["knn_top1_trained"] >= knn_report["knn_top1_random_init"] + KNN_MARGIN_RANDOM_INIT, knn_report
    assert knn_report["knn_top1_trained"] >= knn_report["knn_top1_imagestats"] + KNN_MARGIN_IMAGESTATS, knn_report


def test_no_collapse_relative_to_the_model_at_init(init_vs_trained):
    init, trained = init_vs_trained["init"], init_vs_trained["trained"]
    assert trained["rankme"] >= RANK_FRACTION * init["rankme"], init_vs_trained
    assert trained["prototypes_used"] >= PROTOTYPE_FRACTION * init["prototypes_used"], init_vs_trained


def test_eval_cli_on_the_trained_export(trained_run, knn_report, tmp_path):
    from PIL import Image

    from dinov2_repro.eval.cli import main as eval_main

    cfg, run_dir = trained_run
    export = run_dir / TEACHER_EXPORT
    out = tmp_path / "landcover.json"
    assert eval_main(["landcover", "--backbone", str(export), "--out", str(out), "--baselines", "random_init"]) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "landcover_knn" and report["region"] == "heldout"
    # Same export, same tiles (split 0), same seeded random init: the CLI reproduces the in-memory report.
    split0 = knn_report["per_split"][0]
    assert report["knn_top1_trained"] == split0["knn_top1_trained"]
    assert report["knn_top1_random_init"] == split0["knn_top1_random_init"]
    # Generic kNN over labelled image folders (class = first-level subfolder), with the cheap baselines.
    train_x, train_y, test_x, test_y = landcover_tiles()
    for split, xs, ys in (("train", train_x, train_y), ("val", test_x, test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            (tmp_path / split / f"class_{int(y)}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(tmp_path / split / f"class_{int(y)}" / f"{i:04d}.png")
    knn_out = tmp_path / "knn.json"
    assert eval_main(["knn", "--backbone", str(export), "--train", f"ImageFolder:root={tmp_path / 'train'}:labels=subdirs",
                      "--val", f"ImageFolder:root={tmp_path / 'val'}:labels=subdirs", "--out", str(knn_out),
                      "--baselines", "random_init,imagestats"]) == 0
    knn = json.loads(knn_out.read_text())
    assert knn["n_train"] == len(train_y) and knn["n_val"] == len(test_y)
    # Same features, same neighbours: the folder round trip (lossless PNG) reproduces the in-memory probe,
    # for the trained export and the baselines that do not depend on the images' order (RCF draws its
    # filters from the training images in order; it is left out here to save its ~10 s).
    for key, expected in (("top1", "knn_top1_trained"), ("top1_random_init", "knn_top1_random_init"),
                          ("top1_imagestats", "knn_top1_imagestats")):
        assert abs(knn[key] - split0[expected]) < 1e-6, (key, knn, split0)
    assert "top1_rcf" not in knn
