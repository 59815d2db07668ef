"""``dinov2-repro <verb>``: the project's command line.

Each verb lives in its own module exposing ``register(subparsers)``, which adds the verb's parser
and sets ``run=<callable(args) -> int>`` on it; this module only lists them, parses, gathers the
``key=value`` overrides wherever they are on the line, and turns user mistakes into one line.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Sequence

from .cli_args import OVERRIDE, add_debug_argument
from .config import ConfigError
from .curation.cli import register as register_curate
from .distill.cli import register as register_distill
from .embedding.cli import register as register_embed
from .eval.cli import register as register_eval
from .eval.predict_cli import register as register_predict
from .export_checkpoint import register as register_export
from .misc_cli import register_demo, register_info
from .plan.cli import register as register_plan
from .train.cli import register as register_train
from .weights.cli import register as register_import_weights

# Exceptions that mean "the command line or the files it names are wrong": one line, no traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ValueError)
DEBUG_ENV = "DINOV2_REPRO_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov2-repro", description="DINOv2 reproduction for remote sensing: "
                                     "curation, SSL pretraining, export, evaluation.")
    add_debug_argument(parser, top_level=True)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    register_train(sub)
    register_curate(sub)
    register_distill(sub)
    register_plan(sub)
    register_export(sub)
    register_embed(sub)
    register_import_weights(sub)
    register_eval(sub)
    register_predict(sub)
    register_demo(sub)
    register_info(sub)
    for verb_parser in sub.choices.values():
        _add_debug_everywhere(verb_parser)
    return parser


def _add_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """--debug on a verb parser and on its own sub-verb parsers, so it may follow the verb too."""
    if not any("--debug" in action.option_strings for action in parser._actions):
        add_debug_argument(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug_everywhere(child)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` tokens argparse leaves over (overrides after an option) are
    appended, in order, to the verb's ``overrides``."""
    args, extra = parser.parse_known_args(list(argv))
    overrides = [token for token in extra if OVERRIDE.match(token)]
    unknown = [token for token in extra if not OVERRIDE.match(token)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (see `dinov2-repro {args.verb or ''} --help`)")
    if overrides:
        if not hasattr(args, "overrides"):
            parser.error(f"`dinov2-repro {args.verb}` takes no key=value overrides, got {' '.join(overrides)}")
        args.overrides = [*args.overrides, *overrides]
    # The positional list takes any word; only key=value ones are overrides.
    stray = [token for token in getattr(args, "overrides", []) if not OVERRIDE.match(token)]
    if stray:
        parser.error(f"unexpected argument(s) {' '.join(stray)}: overrides are key=value "
                     f"(see `dinov2-repro {args.verb} --help`)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parse_args(parser, argv)
    if getattr(args, "run", None) is None:  # bare `dinov2-repro` (or a verb that needs a sub-verb)
        (args.help_parser if hasattr(args, "help_parser") else parser).print_help()
        return 0 if args.verb is None else 2
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"dinov2-repro {args.verb}: error: {message}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"dinov2-repro {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
