"""``dinov2-repro distill``: distil a pretraining run's teacher into one or more students."""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    from dinov2_repro.launch.options import add_launcher_arguments

    p = subparsers.add_parser(
        "distill", help="distil a frozen pretrained teacher into smaller students; resumes from OUTPUT_DIR/checkpoints/last")
    p.add_argument("--config-file", default=None,
                   help="experiment YAML (e.g. configs/distill/vitg14_to_vitl14.yaml) merged over the SSL and distill defaults")
    p.add_argument("--teacher", default=None,
                   help="the teacher: a pretraining run directory, one of its checkpoints/iter_* directories, or a teacher "
                        "bundle from `export --with-heads` (overrides distill.teacher)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distill.students=[vit_base,vit_large]")
    add_launcher_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Parse, then call :func:`dinov2_repro.api.distill` (it checks config and teacher before launching)."""
    from dinov2_repro import api
    from dinov2_repro.launch.options import options_from_args

    result = api.distill(args.config_file, args.overrides, teacher=args.teacher, launcher=options_from_args(args))
    if args.launcher != "none":
        return result["exit_code"]
    print(json.dumps(result))
    return 0
