"""Distillation from a backbone-only teacher at tiny scale on CPU.

    python benchmarks/distill_released.py [--teacher-iterations 200] [--teacher-stride 56]
        [--teacher-finetune-steps 0] [--student-iterations 100] [--seeds 0,1,2]

1. Teacher: vit_tiny pretrained with the tiny CPU recipe (200 iterations) on the shipped demo
   images, then only its backbone export is kept (no DINO/iBOT heads: the situation of the
   released DINOv2/DINOv3 files). ``--teacher-stride`` below 56 gives the teacher a larger pool
   than the students' (the same sources tiled at that stride, still no held-out pixel), as a
   released model has seen more than its user's pool. ``--teacher-finetune-steps N`` then
   fine-tunes that teacher on the land-cover labels of the ``tune`` region (a teacher that knows
   more than the pool can teach; its tune figures are contaminated, its held-out ones are not).
2. Students, both vit_micro (half the teacher's width, a third of its depth), on the demo images
   tiled at stride 56 for the same number of iterations with the SAME schedule (lr, weight
   decay, warmup), the SAME EMA (momentum schedule; the EMA is the exported model in both) and
   the same batch and crops:
   - distilled: ``dinov2-repro distill --teacher <export>`` (distill.method=features, head-free);
   - scratch: SSL pretraining (DINO + iBOT + KoLeo, the tiny recipe's heads and centering), its
     schedule keys copied from the distillation config.
3. Linear CKA and shared nearest neighbours of CLS features with the teacher on the land-cover
   tiles, and the land-cover kNN probe over 5 spatial splits.
Several ``--seeds`` train both students once per seed (the figures are means over seeds). The
probe is reported on the ``tune`` region too, where the teacher's budget was chosen; the pass
is judged on the held-out region only: distilled > scratch on CKA and on the probe. Writes
``<output-dir>/distill_released_cpu[<teacher settings>]_<student iterations>it.json``; each
teacher is trained once per ``--work-dir`` and reused.
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
from dinov2_repro.backbone_file import backbone_metadata, load_backbone, save_backbone  # noqa: E402
from dinov2_repro.config import CONFIG_DIR, load_config  # noqa: E402
from dinov2_repro.data.sample_data import LANDCOVER_CLASSES, landcover_tiles, write_demo_image_folder  # noqa: E402
from dinov2_repro.distill import load_distill_config, run_distillation, student_export_path  # noqa: E402
from dinov2_repro.distill.evidence import teacher_agreement  # noqa: E402
from dinov2_repro.eval.knn_classifier import images_to_tensor  # noqa: E402
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


def _probe(export: Path) -> dict:
    """Land-cover kNN on both regions: ``tune`` (where settings such as the teacher's budget were
    chosen) and ``heldout`` (reported, never looked at while choosing)."""
    out = {}
    for region in ("tune", "heldout"):
        probe = landcover_knn_report(export, size=SIZE, split_seeds=SPLITS, region=region)
        out[region] = {"knn_top1": round(probe["knn_top1_trained"], 4),
                       "per_split": [round(r["knn_top1_trained"], 4) for r in probe["per_split"]]}
    out["random_init_heldout"] = round(probe["knn_top1_random_init"], 4)
    return out


def finetune_on_tune_labels(export: Path, out: Path, *, steps: int, seed: int = 0) -> Path:
    """A teacher that knows more than its students can learn from the pool alone: the SSL
    teacher fine-tuned end to end (CLS + a linear layer, cross-entropy) on the land-cover labels of
    the ``tune`` region's tiles, then exported as a backbone only. The held-out blocks are never
    read. Fixed before any run: AdamW, lr 1e-4, weight decay 0.05, batch 64, flips and 90 degree
    rotations."""
    if out.is_file():
        return out
    model, meta = load_backbone(export)
    tiles = landcover_tiles(seed=0, region="tune")
    images = images_to_tensor(torch.cat([torch.as_tensor(tiles[0]), torch.as_tensor(tiles[2])]),
                              mean=meta["mean"], std=meta["std"], size=SIZE)
    labels = torch.cat([torch.as_tensor(tiles[1]), torch.as_tensor(tiles[3])]).long()
    head = torch.nn.Linear(model.embed_dim, len(LANDCOVER_CLASSES))
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(labels), (64,), generator=generator)
        batch = images[index]
        if torch.rand((), generator=generator) < 0.5:
            batch = batch.flip(-1)
        batch = torch.rot90(batch, int(torch.randint(4, (), generator=generator)), dims=(-2, -1))
        cls = model.forward_features(batch)["x_norm_clstoken"]
        loss = torch.nn.functional.cross_entropy(head(cls), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    base = backbone_metadata(model, arch=meta["arch"], mean=meta["mean"], std=meta["std"])
    return save_backbone(model, out, arch=meta["arch"], mean=meta["mean"], std=meta["std"],
                         extra_metadata={k: v for k, v in meta.items() if k not in base})


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-arch", default="vit_tiny")
    parser.add_argument("--teacher-iterations", type=int, default=200)
    parser.add_argument("--teacher-stride", type=int, default=SIZE,
                        help="tile stride of the teacher's pool (the students' is always %(default)s)")
    parser.add_argument("--teacher-finetune-steps", type=int, default=0,
                        help="fine-tune the SSL teacher on the tune region's land-cover labels for this many "
                             "steps before distilling (0: the SSL teacher as is)")
    parser.add_argument("--student-iterations", type=int, default=100)
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values; each trains both students")
    parser.add_argument("--work-dir", default="/tmp/distill_released_bench")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    machine = machine_description(torch.device("cpu"))
    work = Path(args.work_dir)
    images = write_demo_image_folder(work / "images", tile=SIZE)
    teacher_images = images if args.teacher_stride == SIZE else write_demo_image_folder(
        work / f"images_stride{args.teacher_stride}", tile=SIZE, stride=args.teacher_stride)
    # The teacher's directory names its settings, so one --work-dir can hold several teachers.
    teacher_tag = "" if args.teacher_iterations == 200 else f"_teacher{args.teacher_iterations}it"
    teacher_tag += "" if args.teacher_stride == SIZE else f"_stride{args.teacher_stride}"
    teacher_dir = work / f"teacher{teacher_tag}"
    t0 = time.perf_counter()
    teacher_cfg = load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        f"student.arch={args.teacher_arch}", f"train.dataset_path=ImageFolder:root={teacher_images}",
        f"train.output_dir={teacher_dir}", "train.tensorboard=false",
        f"train.max_iterations={args.teacher_iterations}", f"optim.epochs={max(1, args.teacher_iterations // 20)}"])
    teacher_export = teacher_dir / TEACHER_EXPORT
    if not teacher_export.is_file():
        run_ssl_training(teacher_cfg)
    if args.teacher_finetune_steps:
        teacher_tag += f"_finetuned{args.teacher_finetune_steps}"
        teacher_export = finetune_on_tune_labels(
            teacher_export, teacher_dir / f"finetuned{args.teacher_finetune_steps}.safetensors", steps=args.teacher_finetune_steps)
    timings = {"teacher": round(time.perf_counter() - t0, 1)}
    n = args.student_iterations
    report = {
        "benchmark": "distillation from a backbone-only teacher vs the same student from scratch",
        "command": "python benchmarks/distill_released.py " + " ".join(sys.argv[1:]),
        "machine": machine, "seconds": timings, "teacher": _probe(teacher_export), "seeds": {},
    }
    for seed in seeds:
        suffix = f"{n}it" if seed == 0 else f"{n}it_seed{seed}"
        cfg = distill_config(teacher_export, images, work / f"distilled{teacher_tag}_{suffix}", n, extra=(f"train.seed={seed}",))
        t0 = time.perf_counter()
        run_distillation(cfg)
        timings[f"distilled_seed{seed}"] = round(time.perf_counter() - t0, 1)
        scratch = scratch_config(cfg, images, work / f"scratch_{suffix}")
        t0 = time.perf_counter()
        run_ssl_training(scratch)
        timings[f"scratch_seed{seed}"] = round(time.perf_counter() - t0, 1)
        same = {key: [_get(cfg, key), _get(scratch, key)] for key in SHARED_KEYS}
        assert all(a == b for a, b in same.values()), same
        report["settings"] = {
            "teacher": args.teacher_arch, "teacher_iterations": args.teacher_iterations,
            "teacher_pool": f"demo images, 56 px tiles at stride {args.teacher_stride}",
            "teacher_finetune_steps_on_tune_labels": args.teacher_finetune_steps, "student": STUDENT,
            "student_iterations": n, "method": str(cfg.distill.method), "feature_loss": str(cfg.distill.feature_loss),
            "data": "demo images (Landsat + RMNP + natural), 56 px", "seeds": seeds,
            "shared_settings": {k: v[0] for k, v in same.items() if k != "train.seed"},
            "probe": "land-cover kNN top-1, k=20, 5 spatial splits of each region", "torch_threads": 1}
        runs = {}
        for name, export in (("distilled", student_export_path(work / f"distilled{teacher_tag}_{suffix}", STUDENT)),
                             ("scratch", work / f"scratch_{suffix}" / TEACHER_EXPORT)):
            runs[name] = {**_probe(export), **teacher_agreement(teacher_export, export, size=SIZE)}
        report["seeds"][str(seed)] = runs
        print(json.dumps({"seed": seed, **runs}), flush=True)
    summary = {}
    for name in ("distilled", "scratch"):
        per_seed = [report["seeds"][str(s)][name] for s in seeds]
        summary[name] = {"cka": _mean([r["cka"] for r in per_seed]),
                         "neighbour_overlap": _mean([r["neighbour_overlap"] for r in per_seed]),
                         "heldout_knn_top1": _mean([r["heldout"]["knn_top1"] for r in per_seed]),
                         "tune_knn_top1": _mean([r["tune"]["knn_top1"] for r in per_seed])}
    d, s = summary["distilled"], summary["scratch"]
    wins = sum(a > b for seed in seeds for a, b in zip(report["seeds"][str(seed)]["distilled"]["heldout"]["per_split"],
                                                      report["seeds"][str(seed)]["scratch"]["heldout"]["per_split"]))
    summary["heldout_split_wins"] = f"{wins}/{len(seeds) * len(SPLITS)}"
    report["summary"] = summary
    report["pass"] = {"cka": d["cka"] > s["cka"], "landcover_probe": d["heldout_knn_top1"] > s["heldout_knn_top1"]}
    out = Path(args.output_dir) / f"distill_released_cpu{teacher_tag}_{n}it.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(json.dumps({"summary": summary, "pass": report["pass"]}, indent=2))


if __name__ == "__main__":
    main()
