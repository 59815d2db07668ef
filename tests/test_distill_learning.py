"""Evidence that distillation transfers what the teacher learned (issue #9, item 6), on the
shipped data: a tiny teacher is pretrained, then the same tiny student is trained for the same
number of iterations on the same images (a) distilled from the teacher, (b) from scratch with
the SSL recipe on the distilled student's own schedule (iterations, batch, lr and warmup, EMA
momentum, frozen last layer: ``matching_schedule_overrides``), so neither arm wins on budget. The distilled student must be closer to the teacher (linear CKA and shared
nearest neighbours of CLS features on the land-cover tiles) and better on the land-cover kNN
probe, averaged over 5 spatial train/test splits of the scene (one split has ~100 test tiles,
so a single split's margin is within noise).

Sizes: teacher vit_micro pretrained TEACHER_ITERS iterations (the tiny recipe's full schedule),
students vit_micro STUDENT_ITERS iterations, 56 px crops, batch 32 (numbers in the README)."""
from __future__ import annotations

import json

import pytest

from dinov2_repro.config import CONFIG_DIR, load_config
from dinov2_repro.eval.landcover import landcover_knn_report
from dinov2_repro.train.pretrain import TEACHER_EXPORT, run_ssl_training
from dinov2_repro.distill import load_distill_config, run_distillation, student_export_path
from dinov2_repro.distill.config import merge_distill_config
from dinov2_repro.distill.evidence import matching_schedule_overrides, teacher_agreement
from dinov2_repro.train.schedules import build_schedules

TEACHER_ITERS = 200
STUDENT_ITERS = 30
SIZE = 56


SPLITS = range(5)


def _ssl_config(image_folder, out_dir, seed, schedule):
    return load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        "student.arch=vit_micro", f"train.dataset_path=ImageFolder:root={image_folder}", f"train.output_dir={out_dir}",
        "train.tensorboard=false", f"train.seed={seed}", *schedule,
    ])


def _distill_config(image_folder, out_dir, teacher):
    return load_distill_config(CONFIG_DIR / "distill" / "tiny_cpu.yaml", [
        f"train.dataset_path=ImageFolder:root={image_folder}", f"train.output_dir={out_dir}",
        "train.tensorboard=false", f"train.max_iterations={STUDENT_ITERS}", "distill.students=[vit_micro]",
    ], teacher=teacher)


def _ssl(image_folder, out_dir, seed, schedule):
    run_ssl_training(_ssl_config(image_folder, out_dir, seed, schedule))
    return out_dir / TEACHER_EXPORT


def test_scratch_student_has_the_distilled_students_schedule(tmp_path):
    """The two arms get the same per-iteration lr, last-layer lr, weight decay and EMA momentum
    (built without a teacher: the schedule does not depend on it)."""
    distill = merge_distill_config(CONFIG_DIR / "distill" / "tiny_cpu.yaml", [f"train.max_iterations={STUDENT_ITERS}",
                                                                              "distill.students=[vit_micro]"])
    scratch = _ssl_config(tmp_path, tmp_path, 1, matching_schedule_overrides(distill, student="vit_micro"))
    ours, theirs = build_schedules(scratch, world_size=1), build_schedules(distill, world_size=1)
    assert ours.total_iters == theirs.total_iters == STUDENT_ITERS
    for it in range(STUDENT_ITERS):
        assert ours.values(it) | {"teacher_temp": 0} == theirs.values(it) | {"teacher_temp": 0}, it


@pytest.fixture(scope="module")
def evidence(demo_image_folder, tmp_path_factory):
    # One intra-op thread, whatever earlier tests left set: the margins are a few tiles, and float
    # reductions (hence the runs) differ with the thread count.
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _evidence(demo_image_folder, tmp_path_factory)
    finally:
        torch.set_num_threads(previous)


def _evidence(demo_image_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_evidence")
    teacher_export = _ssl(demo_image_folder, root / "teacher", 0,
                          [f"train.max_iterations={TEACHER_ITERS}", "optim.epochs=10"])
    cfg = _distill_config(demo_image_folder, root / "distilled", root / "teacher")
    # Another seed: with the teacher's, the scratch run would replay the teacher's first iterations
    # from the same init and look "close to the teacher" for that reason alone.
    scratch_export = _ssl(demo_image_folder, root / "scratch", 1, matching_schedule_overrides(cfg, student="vit_micro"))
    run_distillation(cfg)
    distilled_export = student_export_path(root / "distilled", "vit_micro")
    report = {"teacher_iterations": TEACHER_ITERS, "student_iterations": STUDENT_ITERS}
    for name, export in (("teacher", teacher_export), ("distilled", distilled_export), ("scratch", scratch_export)):
        probe = landcover_knn_report(export, size=SIZE, split_seeds=SPLITS)
        report[name] = {"landcover_knn_top1": probe["knn_top1_trained"], "random_init_top1": probe["knn_top1_random_init"],
                        "per_split_top1": [round(r["knn_top1_trained"], 3) for r in probe["per_split"]]}
        if name != "teacher":
            report[name].update(teacher_agreement(teacher_export, export, size=SIZE))
    print(json.dumps(report, indent=2))
    return report


# With the scratch student on the distilled student's own schedule (before, it had a warmup longer
# than the run, a slower EMA that exported mostly its init and a frozen last layer for 20 of 30
# iterations) the result is mixed. Measured (1 thread, LayerScale init 1.0 on both students):
# land-cover kNN 0.930 distilled vs 0.887 scratch, better on 5 of 5 splits; but the scratch
# student is the closer one to the teacher: CKA 0.884 vs 0.872, neighbour overlap 0.480 vs 0.467.
# (With LayerScale 1e-5 students the probe went the other way: 0.890 vs 0.910.) The closeness
# tests are strict xfails: they fail the suite the day distillation wins there too, so the claim
# is restored then, not silently.
NEGATIVE = ("distilled student is not closer to the teacher than an equal-schedule scratch student "
            "at 30 iterations (numbers in the comment above)")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=NEGATIVE)
def test_distilled_student_is_closer_to_the_teacher(evidence):
    distilled, scratch = evidence["distilled"], evidence["scratch"]
    assert distilled["cka"] > scratch["cka"], evidence
    assert distilled["neighbour_overlap"] > scratch["neighbour_overlap"], evidence


@pytest.mark.slow
def test_distilled_student_probes_better_than_scratch(evidence):
    """Same schedule, same budget: the distilled student's land-cover kNN beats the scratch
    student's by 0.02 on average and on at least 4 of the 5 held-out splits."""
    distilled, scratch = evidence["distilled"], evidence["scratch"]
    assert distilled["landcover_knn_top1"] >= scratch["landcover_knn_top1"] + 0.02, evidence
    wins = sum(d > s for d, s in zip(distilled["per_split_top1"], scratch["per_split_top1"]))
    assert wins >= 4, evidence


@pytest.mark.slow
def test_distilled_student_learned_something(evidence):
    """What does hold: the distilled student probes well above the random-init baseline."""
    distilled = evidence["distilled"]
    assert distilled["landcover_knn_top1"] >= distilled["random_init_top1"] + 0.1, evidence
