"""Argument conventions every ``dinov2-repro`` verb shares (kept apart from ``cli.py`` so that
verb modules can use them without importing the CLI that imports them).

- ``--config-file`` (alias ``--config``): a YAML path or the name of a shipped recipe;
- ``key=value`` config overrides, accepted anywhere on the line (``cli.main`` gathers the ones
  argparse leaves over after the options);
- ``--debug``: show the traceback of a user error instead of the one-line message.
"""
from __future__ import annotations

import argparse
import re

# A config override: a dotted key (letters, digits, _, -), then '=' and anything.
OVERRIDE = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)*=")


def add_config_arguments(parser: argparse.ArgumentParser, *, recipes: str) -> argparse.ArgumentParser:
    """``--config-file/--config`` and the positional ``overrides`` on a verb's parser.

    ``recipes`` names the shipped recipe folder the name form is looked up in (e.g. ``train``)."""
    parser.add_argument("--config-file", "--config", dest="config_file", default=None, metavar="FILE",
                        help=f"experiment YAML: a path, or the name of a shipped recipe in configs/{recipes}/ "
                             "(e.g. the file name with or without .yaml)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="config overrides with dotted keys, anywhere on the line (e.g. train.output_dir=runs/a)")
    return parser


def add_debug_argument(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    # Sub-parsers must not reset a --debug given before the verb, hence SUPPRESS below the top.
    parser.add_argument("--debug", action="store_true", default=False if top_level else argparse.SUPPRESS,
                        help="show Python tracebacks for errors (also DINOV2_REPRO_DEBUG=1)")
