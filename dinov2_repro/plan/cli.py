"""``dinov2-repro plan``: FLOPs, per-GPU memory and GPU-hours of a recipe, without a GPU."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, atomic_write_text, load_config
from .hardware import GPUS, parse_gpu


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="predict FLOPs, per-GPU memory, step time and GPU-hours of a config (traced on fake tensors)")
    p.add_argument("--config-file", "--config", dest="config_file", required=True, help="train config YAML")
    p.add_argument("--nodes", type=_positive_int, default=1)
    p.add_argument("--gpus-per-node", type=_positive_int, default=8)
    p.add_argument("--gpu", default="a100-80gb", help=f"{' | '.join(GPUS)} | custom:TFLOPS,GB")
    p.add_argument("--mfu", type=float, default=None,
                   help="model-FLOPs utilisation; default: the one implied by the paper's 22,016 A100-hours for ViT-g")
    p.add_argument("--teacher-config", default=None,
                   help="distillation configs: the teacher's training YAML (e.g. configs/train/vitg14.yaml)")
    p.add_argument("--out", default="plan.json", help="where to write the plan as JSON")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(run=run_plan)


def plan_from_args(*, config_file: str, overrides: list[str], nodes: int, gpus_per_node: int, gpu: str,
                   mfu: float | None, teacher_config: str | None = None) -> dict[str, Any]:
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: must be in (0, 1]")
    from .distill import is_distill_config, load_planning_distill_config
    from .report import build_plan

    gpu_model = parse_gpu(gpu)
    if is_distill_config(config_file):
        cfg, build, shard = load_planning_distill_config(config_file, overrides, teacher_config=teacher_config)
        return build_plan(cfg, nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu_model, mfu=mfu,
                          config_name=str(config_file), build_meta_arch=build, shard_meta_arch=shard)
    cfg = load_config(config_file, overrides)
    return build_plan(cfg, nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu_model, mfu=mfu, config_name=str(config_file))


def run_plan(args: argparse.Namespace) -> int:
    from ..io.paths import refuse_overwriting_inputs

    refuse_overwriting_inputs(outputs={"--out": args.out},
                              inputs={"--config-file": args.config_file, "--teacher-config": args.teacher_config})
    from .. import api

    plan = api.plan(args.config_file, list(args.overrides), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                    gpu=args.gpu, mfu=args.mfu, teacher_config=args.teacher_config)
    from .report import format_plan

    print(format_plan(plan))
    atomic_write_text(Path(args.out), json.dumps(plan, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def print_dry_run(cfg: Any, child_argv: list[str], args: argparse.Namespace) -> int:
    """``train --dry-run``: the launch the flags describe (submitit parameters for Slurm) and the
    plan at its world size; nothing is submitted or run."""
    from dinov2_repro.launch.dispatch import describe_launch
    from dinov2_repro.launch.options import options_from_args

    from .report import build_plan, format_plan

    options = options_from_args(args)
    launch = describe_launch(child_argv, options)
    print(json.dumps(launch, indent=1, default=str))
    # CPU jobs (no GPUs per node) are planned per task, on the GPU model named by --plan-gpu.
    per_node = options.tasks_per_node if options.launcher == "slurm" else launch["world_size"]
    plan = build_plan(cfg, nodes=options.nodes if options.launcher == "slurm" else 1, gpus_per_node=per_node,
                      gpu=parse_gpu(args.plan_gpu), mfu=args.plan_mfu, config_name=str(args.config_file or "defaults"))
    print(format_plan(plan))
    print("dry run: nothing was launched")
    return 0
