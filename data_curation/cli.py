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


def _check_args(args: argparse.Namespace) -> None:
    from dinov2_repro.config import ConfigError

    if args.shards < 1:
        raise ConfigError(f"--shards={args.shards}: must be >= 1")
    if args.array_parallelism is not None and args.array_parallelism < 1:
        raise ConfigError(f"--array-parallelism={args.array_parallelism}: must be >= 1")
    if args.nproc != 1 or args.nodes != 1:
        raise ConfigError(f"--nproc={args.nproc} --nodes={args.nodes}: curate runs one process per task; "
                          f"use --shards (tasks per array) and --array-parallelism instead")


def run_curate(args: argparse.Namespace) -> int:
    """Run one stage (or all); a bad config raises ConfigError, a bad input FileNotFoundError/ValueError."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its import chatter is not curation news
    from dinov2_repro.config import resolve_config_file
    from dinov2_repro.launch.options import options_from_args

    from .config import load_curation_config
    from .runner import run

    _check_args(args)
    overrides = list(args.overrides) + ([f"embed.from_embeddings={args.from_embeddings}"] if args.from_embeddings else [])
    cfg = load_curation_config(resolve_config_file(args.config_file, recipes="curation"), overrides)
    stages = PIPELINE if args.stage == "all" else [args.stage]
    run(cfg, stages, launcher=args.launcher, num_shards=args.shards, array_parallelism=args.array_parallelism,
        options=options_from_args(args), dry_run=args.dry_run)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dinov2_repro.curation.cli STAGE ...``: the same as ``dinov2-repro curate STAGE ...``."""
    from dinov2_repro.cli import main as cli_main

    return cli_main(["curate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
