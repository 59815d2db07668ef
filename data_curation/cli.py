"""``dinov2-repro curate <stage> [--config FILE] [key=value ...]`` (also ``python -m data_curation.cli``)."""
from __future__ import annotations

import argparse
import logging
import sys

from .pipeline import PIPELINE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov2-repro curate", description="Curate an image pool into a training manifest.")
    parser.add_argument("stage", choices=PIPELINE + ["all"], help="stage to run; 'all' runs " + " -> ".join(PIPELINE))
    parser.add_argument("--config", default=None, help="experiment YAML over configs/curation/default.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its import chatter is not curation news
    from .config import ConfigError, load_curation_config
    from .pipeline import run_stage

    try:
        cfg = load_curation_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"curate: {err}", file=sys.stderr)
        return 2
    try:
        run_stage(cfg, args.stage)
    except (FileNotFoundError, ValueError) as err:
        print(f"curate {args.stage}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
