"""Evidence of learning (issue: pretraining, item 7): after the tiny CPU recipe, kNN land-cover
accuracy of the teacher's CLS features beats the same architecture at random init by a clear
margin, and the teacher's prototype usage has not collapsed; and issue 11 item 3's higher bar
(targets that sharpen without collapsing, a 0.15 kNN margin) holds for the shipped tiny recipe.

Data: the tiles of the shipped remote-sensing scenes and natural images (demo_image_folder).
Held-out labels: Landsat tiles labelled by the scene's strata map, spatially disjoint from
each other (dinov2_repro.data.sample_data.landcover_tiles)."""
from __future__ import annotations

import json

import pytest
import torch

from dinov2_repro.config import CONFIG_DIR, load_config
from dinov2_repro.data.sample_data import landcover_tiles
from dinov2_repro.eval.knn_classifier import images_to_tensor
from dinov2_repro.eval.landcover import landcover_knn_report
from dinov2_repro.train.checkpoint import last_checkpoint, load_model_state
from dinov2_repro.train.meta_arch import SSLMetaArch
from dinov2_repro.train.monitors import effective_rank, final_monitors
from dinov2_repro.train.pretrain import TEACHER_EXPORT, run_ssl_training

# A real training run shared by the module (minutes on 2 cores): the whole file is slow.
pytestmark = pytest.mark.slow

KNN_MARGIN = 0.05  # trained minus random-init top-1 accuracy, absolute (measured: 0.84-0.86 vs 0.60 after 200 iterations)
MIN_RANKME, MIN_PROTOTYPES_USED = 4.0, 8  # a collapsed teacher: RankMe < 1.5, 1-3 prototypes
# Issue 11 item 3: per-sample teacher entropy below 60% of log K (the targets sharpen), entropy of
# the batch-mean teacher distribution above 90% of log K (no collapse), kNN margin >= 0.15.
ITEM3_SHARP_ENTROPY, ITEM3_DIVERSE_ENTROPY, ITEM3_KNN_MARGIN = 0.6, 0.9, 0.15


@pytest.fixture(scope="module")
def trained_run(demo_image_folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        f"train.dataset_path=ImageFolder:root={demo_image_folder}", f"train.output_dir={run_dir}",
        "train.tensorboard=false",  # the shipped recipe as the demo runs it: 200 iterations, ~3 min on 2 idle cores
    ])
    run_ssl_training(cfg)
    return cfg, run_dir


def test_knn_beats_random_init(trained_run):
    cfg, run_dir = trained_run
    report = landcover_knn_report(run_dir / TEACHER_EXPORT, size=cfg.crops.global_crops_size)
    print(json.dumps(report, indent=2))
    assert report["knn_top1_trained"] >= report["knn_top1_random_init"] + KNN_MARGIN, report


def test_teacher_not_collapsed_on_unseen_tiles(trained_run):
    """On the land-cover tiles (never trained on), the teacher's CLS features keep many directions
    and its head many argmax prototypes. Collapse shows as RankMe near 1 and 1-3 prototypes; measured
    after the shipped recipe: RankMe 15.9, 20 distinct prototypes over 304 tiles (random init: 35.7, 21)."""
    cfg, run_dir = trained_run
    model = SSLMetaArch(cfg)
    load_model_state(last_checkpoint(run_dir), model)
    model.eval()
    train_x, _, test_x, _ = landcover_tiles()
    images = images_to_tensor(torch.cat([torch.as_tensor(train_x), torch.as_tensor(test_x)]),
                              mean=cfg.crops.mean, std=cfg.crops.std, size=cfg.crops.global_crops_size)
    with torch.no_grad():
        features = model.teacher.backbone(images)
        prototypes = model.teacher.dino_head(features).argmax(dim=-1)
    rank, used = float(effective_rank(features)), len(set(prototypes.tolist()))
    print(f"teacher on {len(images)} unseen tiles: RankMe {rank:.1f}, {used} distinct argmax prototypes")
    assert rank >= MIN_RANKME, rank
    assert used >= MIN_PROTOTYPES_USED, used


def test_item3_thresholds(trained_run):
    cfg, run_dir = trained_run
    monitors = final_monitors(run_dir / "metrics.jsonl")
    report = landcover_knn_report(run_dir / TEACHER_EXPORT, size=cfg.crops.global_crops_size)
    print(json.dumps({**monitors, **report}, indent=2))
    assert monitors["teacher_entropy_rel"] < ITEM3_SHARP_ENTROPY, monitors
    assert monitors["teacher_batch_entropy_rel"] > ITEM3_DIVERSE_ENTROPY, monitors
    assert report["margin"] >= ITEM3_KNN_MARGIN, report


def test_eval_cli_on_the_trained_export(trained_run, tmp_path):
    from PIL import Image

    from dinov2_repro.eval.cli import main as eval_main

    cfg, run_dir = trained_run
    export = run_dir / TEACHER_EXPORT
    out = tmp_path / "landcover.json"
    assert eval_main(["landcover", "--backbone", str(export), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "landcover_knn" and 0.0 <= report["knn_top1_trained"] <= 1.0
    # Generic kNN over labelled image folders (class = first-level subfolder).
    train_x, train_y, test_x, test_y = landcover_tiles()
    for split, xs, ys in (("train", train_x, train_y), ("val", test_x, test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            (tmp_path / split / f"class_{int(y)}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(tmp_path / split / f"class_{int(y)}" / f"{i:04d}.png")
    knn_out = tmp_path / "knn.json"
    assert eval_main(["knn", "--backbone", str(export), "--train", f"ImageFolder:root={tmp_path / 'train'}:labels=subdirs",
                      "--val", f"ImageFolder:root={tmp_path / 'val'}:labels=subdirs", "--out", str(knn_out)]) == 0
    knn = json.loads(knn_out.read_text())
    assert knn["n_train"] == len(train_y) and knn["n_val"] == len(test_y)
    # Same features, same neighbours: the folder round trip (lossless PNG) reproduces the in-memory probe.
    assert abs(knn["top1"] - report["knn_top1_trained"]) < 1e-6
