"""Distillation from a backbone-only teacher (issue 19 item 5), at tiny scale on CPU.

    python benchmarks/distill_released.py [--student-iterations 100] [--output-dir DIR]

1. Teacher: vit_tiny pretrained with the tiny CPU recipe (200 iterations) on the shipped demo
   images, then only its backbone export is kept (no DINO/iBOT heads: the situation of the
   released DINOv2/DINOv3 files).
2. Students, both vit_micro (a quarter of the teacher's width and depth), on the same images for
   the same number of iterations with the SAME schedule (lr, weight decay, warmup), the SAME EMA
   (momentum schedule; the EMA is the exported model in both) and the same batch and crops:
   - distilled: ``dinov2-repro distill --teacher <export>`` (distill.method=features, head-free);
   - scratch: SSL pretraining (DINO + iBOT + KoLeo, the tiny recipe's heads and centering), its
     schedule keys copied from the distillation config.
3. Linear CKA and shared nearest neighbours of CLS features with the teacher on the land-cover
   tiles, and the land-cover kNN probe over 5 spatial splits.
Pass (issue): distilled > scratch on CKA and on the probe. Writes
``<output-dir>/distill_released_cpu_<student iterations>it.json``; the teacher is trained once per
``--work-dir`` and reused.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import torch  # noqa: E402

from backbone import machine_description  # noqa: E402
from dinov2_repro.config import CONFIG_DIR, load_config  # noqa: E402
from dinov2_repro.data.sample_data import write_demo_image_folder  # noqa: E402
from dinov2_repro.distill import load_distill_config, run_distillation, student_export_path  # noqa: E402
from dinov2_repro.distill.evidence import teacher_agreement  # noqa: E402
from dinov2_repro.eval.landcover import landcover_knn_report  # noqa: E402
from dinov2_repro.io.files import atomic_write_text  # noqa: E402
from dinov2_repro.train.pretrain import TEACHER_EXPORT, run_ssl_training  # noqa: E402

SPLITS = list(range(5))
SIZE = 56
STUDENT = "vit_micro"
# Every key that shapes the optimisation or the exported EMA: copied from the distillation config
# into the scratch run, so the two students differ only in what they learn from.
SHARED_KEYS = ("optim.epochs", "optim.warmup_epochs", "optim.base_lr", "optim.scaling_rule", "optim.min_lr",
               "optim.weight_decay", "optim.weight_decay_end", "optim.layerwise_decay", "optim.patch_embed_lr_mult",
               "optim.clip_grad", "optim.freeze_last_layer_epochs", "teacher.momentum_teacher",
               "teacher.final_momentum_teacher", "train.batch_size_per_gpu", "train.OFFICIAL_EPOCH_LENGTH",
               "train.max_iterations", "train.seed", "crops.global_crops_size", "crops.local_crops_size",
               "crops.local_crops_number", "crops.preset", "student.layerscale", "student.patch_size")


def _get(cfg, key: str):
    section, name = key.split(".")
    return cfg[section][name]


def distill_config(teacher: Path, images: Path, out_dir: Path, iterations: int, extra=()):
    return load_distill_config(CONFIG_DIR / "distill" / "tiny_cpu.yaml", [
        f"train.dataset_path=ImageFolder:root={images}", f"train.output_dir={out_dir}", "train.tensorboard=false",
        f"train.max_iterations={iterations}", f"optim.epochs={max(1, iterations // 20)}", f"distill.students=[{STUDENT}]",
        *extra], teacher=teacher)


def scratch_config(distill_cfg, images: Path, out_dir: Path):
    """The SSL run of the same student with the distillation run's schedule, EMA and budget."""
    shared = [f"{key}={_get(distill_cfg, key)}" for key in SHARED_KEYS]
    return load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        f"student.arch={STUDENT}", "student.drop_path_rate=0.0", f"train.dataset_path=ImageFolder:root={images}",
        f"train.output_dir={out_dir}", "train.tensorboard=false", *shared])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-arch", default="vit_tiny")
    parser.add_argument("--teacher-iterations", type=int, default=200)
    parser.add_argument("--student-iterations", type=int, default=100)
    parser.add_argument("--work-dir", default="/tmp/distill_released_bench")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine = machine_description(torch.device("cpu"))
    work = Path(args.work_dir)
    images = write_demo_image_folder(work / "images", tile=SIZE)
    t0 = time.perf_counter()
    teacher_cfg = load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        f"student.arch={args.teacher_arch}", f"train.dataset_path=ImageFolder:root={images}",
        f"train.output_dir={work / 'teacher'}", "train.tensorboard=false",
        f"train.max_iterations={args.teacher_iterations}", f"optim.epochs={max(1, args.teacher_iterations // 20)}"])
    teacher_export = work / "teacher" / TEACHER_EXPORT
    if not teacher_export.is_file():
        run_ssl_training(teacher_cfg)
    timings = {"teacher": round(time.perf_counter() - t0, 1)}

    n = args.student_iterations
    cfg = distill_config(teacher_export, images, work / f"distilled_{n}it", n)
    t0 = time.perf_counter()
    run_distillation(cfg)
    timings["distilled"] = round(time.perf_counter() - t0, 1)
    scratch = scratch_config(cfg, images, work / f"scratch_{n}it")
    t0 = time.perf_counter()
    run_ssl_training(scratch)
    timings["scratch"] = round(time.perf_counter() - t0, 1)
    same = {key: [_get(cfg, key), _get(scratch, key)] for key in SHARED_KEYS}
    assert all(a == b for a, b in same.values()), same

    report = {
        "benchmark": "distillation from a backbone-only teacher vs the same student from scratch (issue 19 item 5)",
        "command": "python benchmarks/distill_released.py " + " ".join(sys.argv[1:]),
        "settings": {"teacher": args.teacher_arch, "teacher_iterations": args.teacher_iterations, "student": STUDENT,
                     "student_iterations": args.student_iterations, "method": str(cfg.distill.method),
                     "feature_loss": str(cfg.distill.feature_loss), "data": "demo images (Landsat + RMNP + natural), 56 px",
                     "shared_settings": {k: v[0] for k, v in same.items()},
                     "probe": "land-cover kNN top-1, k=20, 5 spatial splits", "torch_threads": 1},
        "machine": machine, "seconds": timings,
    }
    distilled_export = student_export_path(work / f"distilled_{n}it", STUDENT)
    scratch_export = work / f"scratch_{n}it" / TEACHER_EXPORT
    for name, export in (("teacher", teacher_export), ("distilled", distilled_export), ("scratch", scratch_export)):
        probe = landcover_knn_report(export, size=SIZE, split_seeds=SPLITS)
        report[name] = {"landcover_knn_top1": probe["knn_top1_trained"], "random_init_top1": probe["knn_top1_random_init"],
                        "per_split_top1": [round(r["knn_top1_trained"], 4) for r in probe["per_split"]]}
        if name != "teacher":
            report[name].update(teacher_agreement(teacher_export, export, size=SIZE))
    d, s = report["distilled"], report["scratch"]
    report["pass"] = {"cka": d["cka"] > s["cka"], "landcover_probe": d["landcover_knn_top1"] > s["landcover_knn_top1"]}
    out = Path(args.output_dir) / f"distill_released_cpu_{n}it.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
