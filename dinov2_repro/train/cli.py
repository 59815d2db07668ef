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
    """Parse, then call :func:`dinov2_repro.api.train` (``--dry-run`` describes the launch instead)."""
    if getattr(args, "dry_run", False):
        from ..config import load_config, resolve_config_file
        from ..plan.cli import print_dry_run

        config_file = resolve_config_file(args.config_file, recipes="train")
        cfg = load_config(config_file, args.overrides)
        child = ["train", *(["--config-file", str(config_file)] if config_file else []), *args.overrides]
        return print_dry_run(cfg, child, args)
    from dinov2_repro import api
    from dinov2_repro.launch.options import options_from_args

    result = api.train(args.config_file, args.overrides, launcher=options_from_args(args))
    if args.launcher != "none":
        return result["exit_code"]
    print(json.dumps(result))
    return 0
