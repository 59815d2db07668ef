"""``dinov2-repro train``: SSL pretraining, in this process or through a launcher."""
from __future__ import annotations

import argparse
import json

from dinov2_repro.launch.options import add_launcher_arguments

from ..cli_args import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="SSL pretraining (DINO + iBOT); resumes from OUTPUT_DIR/checkpoints/last",
        description="SSL pretraining: configs/ssl_default_config.yaml, then --config-file, then key=value overrides.")
    add_config_arguments(parser, recipes="train")
    add_launcher_arguments(parser)
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..config import load_config, resolve_config_file

    config_file = resolve_config_file(args.config_file, recipes="train")
    cfg = load_config(config_file, args.overrides)  # validate before launching anything
    if args.launcher != "none":
        from dinov2_repro.launch.dispatch import launch_command
        from dinov2_repro.launch.options import options_from_args

        child = ["train", *(["--config-file", str(config_file)] if config_file else []), *args.overrides]
        return launch_command(child, options_from_args(args))
    from .pretrain import run_ssl_training

    result = run_ssl_training(cfg)
    print(json.dumps(result))
    return 0
