"""``dinov2-repro curate <stage> [--config-file FILE] [key=value ...]`` (also ``python -m dinov2_repro.curation.cli``).

``--shards N --launcher none|local|slurm [--array-parallelism K]`` runs every sharded phase of
the stage as N tasks (runner.py); the Slurm options are the ones ``train`` takes. ``--dry-run``
prints the job arrays instead of running them.
"""
from __future__ import annotations

import argparse
import logging
import sys

from dinov2_repro.cli_args import add_config_arguments

from .pipeline import PIPELINE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("curate", help="data curation stages: " + ", ".join(PIPELINE) + ", all",
                                   description="Curate an image pool into a training manifest (docs/curation.md).")
    _add_arguments(parser)
    parser.set_defaults(run=run_curate)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from dinov2_repro.launch.options import add_launcher_arguments

    parser.add_argument("stage", choices=PIPELINE + ["all"], help="stage to run; 'all' runs " + " -> ".join(PIPELINE))
    add_config_arguments(parser, recipes="curation")
    group = parser.add_argument_group("sharding")
    group.add_argument("--shards", type=int, default=1, help="tasks per sharded phase (the result is the same for any N)")
    group.add_argument("--array-parallelism", type=int, default=None,
                       help="at most this many tasks of an array at once (default: all)")
    group.add_argument("--from-embeddings", default=None, metavar="DIR",
                       help="pool embeddings made by any extractor (index.json + float16 .npy shards; docs/curation.md); "
                            "the same as embed.from_embeddings=DIR")
    add_launcher_arguments(parser)


def run_curate(args: argparse.Namespace) -> int:
    """Parse, then call :func:`dinov2_repro.api.curate`; a bad config raises ConfigError, a bad
    input FileNotFoundError/ValueError."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its import chatter is not curation news
    from dinov2_repro import api
    from dinov2_repro.launch.options import options_from_args

    api.curate(args.stage, args.config_file, args.overrides, shards=args.shards, launcher=options_from_args(args),
               array_parallelism=args.array_parallelism, from_embeddings=args.from_embeddings, dry_run=args.dry_run)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dinov2_repro.curation.cli STAGE ...``: the same as ``dinov2-repro curate STAGE ...``."""
    from dinov2_repro.cli import main as cli_main

    return cli_main(["curate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
