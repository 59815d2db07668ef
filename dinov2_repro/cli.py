"""``dinov2-repro <verb>``: train, curate, export, eval, demo, info."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    from launch.options import add_launcher_arguments

    p = sub.add_parser("train", help="SSL pretraining (DINO + iBOT); resumes from OUTPUT_DIR/checkpoints/last")
    p.add_argument("--config-file", default=None, help="experiment YAML merged over configs/ssl_default_config.yaml")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.output_dir=runs/a")
    add_launcher_arguments(p)


def _cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .config import load_config

    cfg = load_config(args.config_file, args.overrides)  # validate before launching anything
    if args.launcher != "none":
        from .train.validate import validate_train_config

        validate_train_config(cfg)
        from launch.dispatch import launch_command
        from launch.options import options_from_args

        child = ["train", *(["--config-file", args.config_file] if args.config_file else []), *args.overrides]
        return launch_command(child, options_from_args(args))
    from .train.ssl import run_ssl_training

    result = run_ssl_training(cfg)
    print(json.dumps(result))
    return 0


def _cmd_export(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .export_checkpoint import export_from_checkpoint

    path = export_from_checkpoint(args.checkpoint, args.out, fmt=args.format, which=args.which)
    print(f"wrote {path}")
    return 0


def _cmd_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .eval.cli import main as eval_main

    return eval_main(args.rest)


def _cmd_curate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from data_curation.cli import main as curate_main

    return curate_main(args.rest)


def _cmd_demo(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .demo import run_demo

    return run_demo(output_dir=args.output_dir, overrides=tuple(args.overrides))


def _cmd_info(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import torch

    from .models import available_archs, build_vit
    from .models.layers.attention import resolve_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps({"torch": torch.__version__, "device": str(device),
                      "attention_backend": resolve_backend("auto", device)}))
    for arch in available_archs():
        with torch.device("meta"):
            model = build_vit(arch, ffn_layer="swiglu" if arch == "vit_giant2" else "mlp")
        print(f"{arch:12s} {sum(p.numel() for p in model.parameters()) / 1e6:8.1f}M parameters")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov2-repro", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    _add_train_parser(sub)
    p = sub.add_parser("export", help="consolidate a training checkpoint into one backbone safetensors file")
    p.add_argument("--checkpoint", required=True, help="a run directory or one of its checkpoints/iter_* directories")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--format", choices=["timm"], default="timm", help="key layout (timm's DINOv2 layout)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    for verb, text in (("eval", "evaluation: knn (see `dinov2-repro eval -h`)"),
                       ("curate", "data curation stages (see `dinov2-repro curate -h`)")):
        p = sub.add_parser(verb, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    p = sub.add_parser("demo", help="end-to-end demo on the data shipped with installed packages")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/train/vit_tiny_cpu.yaml")
    sub.add_parser("info", help="environment, attention backend and backbone sizes")
    return parser


_COMMANDS = {"train": _cmd_train, "export": _cmd_export, "eval": _cmd_eval, "curate": _cmd_curate,
             "demo": _cmd_demo, "info": _cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from .config import ConfigError

    try:
        return _COMMANDS[args.verb](args, argv[1:])
    except ConfigError as err:
        print(f"dinov2-repro {args.verb}: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
