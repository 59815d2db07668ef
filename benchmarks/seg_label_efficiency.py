"""Label efficiency of segmentation on the shipped task: test mIoU vs the number of labelled tiles,
for every decoder, the fine-tuning modes and the baselines, over the full grid of subset seeds.

    PYTHONPATH=. python benchmarks/seg_label_efficiency.py --work-dir /tmp/seg_le

Defaults are the full experiment (not the demo's single seed): n = 1, 2, 5 and all (35)
training tiles x subset seeds 0, 1, 2, the same subsets for every model (label_efficiency.py).
The task is the shipped one: the Landsat scene's 7 land-cover strata, bands 3,2,1, 56 px tiles,
spatially disjoint train / val / test blocks (``eval seg --data landsat``).

The backbone is the shipped tiny recipe (configs/train/vit_tiny_cpu.yaml, ViT-Tiny/14, 200
iterations), pretrained here on the demo pool (``--pretrain-iterations`` shortens it, ``--backbone``
reuses an export instead). The pool leaves out the held-out checkerboard blocks of the scene but
holds the other blocks' pixels, some of which are segmentation test tiles: pretraining saw those
images (never their labels). ``random_init`` rebuilds the same architecture at a seeded random
init with the header's LayerScale init (eval/baselines.py), the baseline for what pretraining adds.

Models (one line each in the JSON and the figure):
- frozen trained backbone with every decoder: knn (no training), linear, unet, upernet, dpt;
- fine-tuning the trained backbone under a linear head: ``last:K`` and ``all`` (layer-wise lr
  decay ``--layer-decay``); ``none`` is the frozen linear row;
- random init of the same architecture: knn, linear;
- the per-pixel spectral head (no backbone).
The supervised U-Net baseline (ResNet-18 from scratch) is left out: one run costs more than the
whole grid here.
Every head trains ``--iterations`` steps at lr ``--lr`` (AdamW, cosine, batch 8, the automatic
loss: ce on this multi-class task). Results (mean, min-max over seeds per n), wall and CPU seconds
per model and for pretraining, the machine and the exact command go to ``--out``; the figure
(mean line, min-max band) beside it with the suffix .png.
"""
from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import torch  # noqa: E402

FROZEN_DECODERS = ("knn", "linear", "unet", "upernet", "dpt")
RANDOM_DECODERS = ("knn", "linear")
# Relative CPU cost per job (measured: upernet ~37 cpu s at 200 steps, knn ~0.2), for scheduling only.
COST_RANK = {("upernet", "none"): 9, ("linear", "all"): 8, ("dpt", "none"): 7, ("unet", "none"): 6,
             ("linear", "last:2"): 5, ("spectral", "none"): 4, ("linear", "none"): 1}


def _one_thread() -> None:
    torch.set_num_threads(1)


def _run_one(spec, **kwargs) -> dict[str, Any]:
    from dinov2_repro.eval.segmentation.label_efficiency import run_label_efficiency

    return run_label_efficiency([spec], kwargs.pop("data"), progress=False, **kwargs)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pretrain(work_dir: Path, *, iterations: int | None, seed: int) -> tuple[Path, dict[str, Any]]:
    """The tiny recipe on the demo pool, one process and one torch thread; an export already in
    ``work_dir`` is reused (a rerun of the evaluation only). Returns (export, timing record)."""
    from dinov2_repro.config import CONFIG_DIR
    from dinov2_repro.data.sample_data import write_demo_image_folder
    from dinov2_repro.train.pretrain import TEACHER_EXPORT

    run_dir = work_dir / "pretrain"
    export = run_dir / TEACHER_EXPORT
    overrides = [f"train.seed={seed}", "train.tensorboard=false"]
    if iterations is not None:  # 10 epochs of OFFICIAL_EPOCH_LENGTH iterations in the recipe
        overrides += ["optim.epochs=1", f"train.OFFICIAL_EPOCH_LENGTH={iterations}", "optim.warmup_epochs=0",
                      "teacher.warmup_teacher_temp_epochs=0", "optim.freeze_last_layer_epochs=0"]
    record = {"config": "configs/train/vit_tiny_cpu.yaml", "overrides": overrides, "export": str(export)}
    if export.is_file():
        return export, {**record, "reused": True}
    pool = write_demo_image_folder(work_dir / "images", tile=56)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run_dir.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), _children_cpu_seconds()
    with open(run_dir / "train_stdout.log", "ab") as log:
        code = subprocess.call([sys.executable, "-m", "dinov2_repro.cli", "train", "--config-file",
                                str(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml"), f"train.dataset_path=ImageFolder:root={pool}",
                                f"train.output_dir={run_dir}", *overrides], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"pretraining failed: see {run_dir / 'train_stdout.log'}")
    return export, {**record, "reused": False, "seconds": round(time.perf_counter() - started, 1),
                    "cpu_seconds": round(_children_cpu_seconds() - cpu_started, 1)}


def model_specs(backbone: str, *, finetune_modes: list[str], layer_decay: float) -> dict[str, list]:
    """Panel title -> ModelSpecs (names are unique across panels)."""
    from dinov2_repro.eval.segmentation.train import ModelSpec

    frozen = [ModelSpec(f"trained {d}", "vit", backbone, d) for d in FROZEN_DECODERS]
    tuned = [ModelSpec(f"trained linear, train {m}", "vit", backbone, "linear", train_backbone=m, layer_decay=layer_decay)
             for m in finetune_modes]
    baselines = [ModelSpec(f"random-init {d}", "random_init", backbone, d) for d in RANDOM_DECODERS]
    baselines.append(ModelSpec("spectral (per pixel)", "spectral"))
    return {"frozen trained ViT-Tiny: decoders": frozen,
            "fine-tuning modes (linear head)": [frozen[1], *tuned],
            "baselines vs trained linear": [frozen[1], *baselines]}


def markdown_table(result: dict[str, Any]) -> str:
    """Test mIoU mean (min-max over seeds) per model and n, with CPU seconds: the docs' table."""
    ns = result["n_labelled"]
    train = result["n_tiles"]["train"]
    head = "| model | " + " | ".join(f"n = {n}" + (" (all)" if n == train else "") for n in ns) + " | cpu s |"
    lines = [head, "|" + "---|" * (len(ns) + 2)]
    names = list(dict.fromkeys(name for group in result["panels"].values() for name in group))
    kinds = {"vit": 0, "random_init": 1}
    for name in sorted(names, key=lambda m: (kinds.get(result["models"][m]["kind"], 2),
                                             result["models"][m]["train_backbone"] != "none", names.index(m))):
        model = result["models"][name]
        cells = []
        for n in ns:
            run = model["runs"][str(n)]
            cells.append(f"{run['miou_mean']:.3f} ({run['miou_min']:.3f}-{run['miou_max']:.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {model['cpu_seconds']:.0f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options; the defaults are the full experiment."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-labelled", default="1,2,5,all")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=200, help="head (and fine-tuning) steps per job")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--finetune", default="last:2,all", help="fine-tuning modes beside the frozen linear row")
    parser.add_argument("--layer-decay", type=float, default=0.75)
    parser.add_argument("--backbone", type=Path, default=None, help="reuse this export instead of pretraining")
    parser.add_argument("--pretrain-iterations", type=int, default=None, help="shorten the recipe (default: its 200)")
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="keeps the pool and the pretraining run (resumable)")
    parser.add_argument("--jobs", type=int, default=2, help="(model, seed) tasks run in parallel, one torch thread each")
    parser.add_argument("--quick", action="store_true", help="smoke test: n 1,all, seed 0, 5 steps, 2 pretraining iterations")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "seg_label_efficiency_cpu.json")
    return parser


def main() -> int:
    from backbone import machine_description
    from dinov2_repro.eval.segmentation.label_efficiency import merge_label_efficiency, parse_n_labelled
    from dinov2_repro.eval.segmentation.train import prepare_data
    from dinov2_repro.eval.visualize import plot_label_efficiency
    from dinov2_repro.io.files import atomic_write_json

    parser = build_parser()
    args = parser.parse_args()
    if args.quick:
        args.n_labelled, args.seeds, args.iterations = "1,all", "0", 5
        args.pretrain_iterations = args.pretrain_iterations or 2
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    n_values = parse_n_labelled(args.n_labelled)
    seeds = [int(s) for s in args.seeds.split(",")]
    started, cpu_started = time.perf_counter(), time.process_time()
    machine = machine_description(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="seg_le_") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        if args.backbone:
            backbone, pretraining = args.backbone, {"export": str(args.backbone), "reused": True}
        else:
            backbone, pretraining = pretrain(work_dir, iterations=args.pretrain_iterations, seed=args.pretrain_seed)
        data = prepare_data(data="landsat", workdir=work_dir / "seg", tile=56, bands=[3, 2, 1])
        panels = model_specs(str(backbone), finetune_modes=[m for m in args.finetune.split(",") if m],
                             layer_decay=args.layer_decay)
        specs = list({s.name: s for group in panels.values() for s in group}.values())
        order = [s.name for s in specs]
        # One task per (model, seed), heaviest first, so that --jobs workers finish together; the
        # subsets depend on (n, seed) only, so every task of a seed draws the same ones.
        specs.sort(key=lambda s: -COST_RANK.get((s.decoder if s.kind != "spectral" else "spectral", s.train_backbone), 0))
        common = dict(data=data, n_values=n_values, lr=args.lr, iterations=args.iterations)
        parts: list[dict[str, Any]] = []
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"),
                                 initializer=_one_thread) as pool:
            futures = {pool.submit(_run_one, spec, seeds=[seed], **common): (spec.name, seed) for spec in specs for seed in seeds}
            for future in as_completed(futures):
                part = future.result()
                parts.append(part)
                name, seed = futures[future]
                model = part["models"][name]
                print(f"{name} seed {seed}: " + ", ".join(f"n={n} {r['miou_mean']:.3f}" for n, r in model["runs"].items())
                      + f"  ({model['seconds']} s, {model['cpu_seconds']} cpu s)", flush=True)
                if args.work_dir:  # what has finished so far survives an interrupted run
                    atomic_write_json(work_dir / "label_efficiency_partial.json", merge_label_efficiency(parts))
        result = merge_label_efficiency(parts)
        result["models"] = {name: result["models"][name] for name in order}
    result.update(
        benchmark="segmentation label efficiency", command="PYTHONPATH=. python " + shlex.join(["benchmarks/seg_label_efficiency.py", *sys.argv[1:]]),
        backbone="tiny recipe (ViT-Tiny/14) pretrained here" if not args.backbone else str(args.backbone),
        pretraining=pretraining, layer_decay=args.layer_decay, panels={k: [s.name for s in v] for k, v in panels.items()},
        machine={**machine, "load_average_at_end": os.getloadavg()},
        seconds=round(time.perf_counter() - started, 1),
        jobs=args.jobs,
        cpu_seconds_models=round(sum(m["cpu_seconds"] for m in result["models"].values()), 1),
        cpu_seconds=round(time.process_time() - cpu_started + pretraining.get("cpu_seconds", 0.0)
                          + sum(m["cpu_seconds"] for m in result["models"].values()), 1),
        note="wall seconds on a 2-core machine shared with other jobs; cpu_seconds (this process and the pretraining "
             "child) are the load-independent cost")
    if not args.quick or args.out != parser.get_default("out"):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)
        plot_label_efficiency(result, args.out.with_suffix(".png"), panels=result["panels"])
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
