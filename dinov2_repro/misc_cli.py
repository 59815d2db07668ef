"""``dinov2-repro demo`` and ``dinov2-repro info``."""
from __future__ import annotations

import argparse
import json




def register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="end-to-end demo on the data shipped with installed packages",
                                   description="Curate the shipped scenes, pretrain the tiny ViT, kNN vs random init.")
    parser.add_argument("--output-dir", default="demo_output", help="where everything is written")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="overrides of the tiny CPU recipe (configs/train/vit_tiny_cpu.yaml)")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(output_dir=args.output_dir, overrides=tuple(args.overrides))


def register_info(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="environment, attention backend and backbone sizes",
                                   description="Print torch version, device, attention backend and backbone sizes.")
    parser.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import torch

    from .device import resolve_device
    from .models import available_archs, build_vit
    from .models.layers.attention import resolve_backend

    device = resolve_device("auto")
    print(json.dumps({"torch": torch.__version__, "device": str(device),
                      "attention_backend": resolve_backend("auto", device)}))
    for arch in available_archs():
        with torch.device("meta"):
            model = build_vit(arch, **({"ffn_layer": "swiglu"} if arch == "vit_giant2" else {}))
        print(f"{arch:12s} {sum(p.numel() for p in model.parameters()) / 1e6:8.1f}M parameters")
    return 0
