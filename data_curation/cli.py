"""``dinov2-repro curate <stage> [--config-file FILE] [key=value ...]`` (also ``python -m dinov2_repro.curation.cli``)."""
from __future__ import annotations

import argparse
import logging
import sys

from dinov2_repro.cli_args import add_config_arguments

from .pipeline import PIPELINE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("curate", help="data curation stages: " + ", ".join(PIPELINE) + ", all",
                                   description="Curate an image pool into a training manifest.")
    _add_arguments(parser)
    parser.set_defaults(run=run_curate)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=PIPELINE + ["all"], help="stage to run; 'all' runs " + " -> ".join(PIPELINE))
    add_config_arguments(parser, recipes="curation")


def run_curate(args: argparse.Namespace) -> int:
    """Run one stage (or all); a bad config raises ConfigError, a bad input FileNotFoundError/ValueError."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its import chatter is not curation news
    from dinov2_repro.config import resolve_config_file

    from .config import load_curation_config
    from .pipeline import run_stage

    cfg = load_curation_config(resolve_config_file(args.config_file, recipes="curation"), args.overrides)
    run_stage(cfg, args.stage)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dinov2_repro.curation.cli STAGE ...``: the same as ``dinov2-repro curate STAGE ...``."""
    from dinov2_repro.cli import main as cli_main

    return cli_main(["curate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
