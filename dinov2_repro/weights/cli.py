"""``dinov2-repro import-weights FILE --out backbone.safetensors``: a released DINOv2 / DINOv3
file (reference .pth or timm .safetensors) -> the project's self-describing backbone export."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DATASETS = ("lvd142m", "lvd1689m", "sat493m")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-weights", help="convert a released DINOv2/DINOv3 weights file into a backbone export",
        description="Read a released backbone file (dinov2_vit*14[_reg4]_pretrain.pth, "
                    "dinov3_vit*16_pretrain_<dataset>-<hash>.pth, or a timm .safetensors of those models) "
                    "without running code, detect its architecture from the tensors, and write the project's "
                    "backbone export (safetensors in timm's layout with a rebuild header).")
    parser.add_argument("file", help="the released weights file (.pth, .pt or .safetensors); nothing is downloaded")
    parser.add_argument("--out", required=True, help="output .safetensors path (written atomically)")
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="training set of the weights, which picks the normalisation (default: from the file "
                             "name; sat493m uses the SAT-493M mean/std, the others ImageNet's)")
    parser.add_argument("--mean", type=_floats, default=None, help="override the normalisation mean, e.g. 0.43,0.411,0.296")
    parser.add_argument("--std", type=_floats, default=None, help="override the normalisation std")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads, for shapes other than the released ones (default: width / 64; 32 for ViT-7B)")
    parser.set_defaults(run=_run_import)


def import_weights(file: str | Path, out: str | Path, **options) -> dict:
    """Read ``file`` and write its export to ``out``; returns the export header."""
    from ..backbone_file import save_backbone
    from .released import read_released

    model, meta = read_released(file, **options)
    extra = {"dataset": meta["dataset"], "source_file": meta["source_file"], "source_layout": meta["source_layout"]}
    if meta.get("arch_family") != "dinov3":
        extra["arch_family"] = "dinov2"
    save_backbone(model, out, arch=meta["arch"], mean=meta["mean"], std=meta["std"], extra_metadata=extra)
    return meta


def _run_import(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"--out {out}: the export is a .safetensors file; give a path ending in .safetensors")
    meta = import_weights(args.file, out, dataset=args.dataset, mean=args.mean, std=args.std, num_heads=args.num_heads)
    summary = {key: meta.get(key) for key in ("arch_family", "arch", "patch_size", "embed_dim", "depth", "num_heads",
                                               "num_register_tokens", "ffn", "dataset", "mean", "std")}
    print(json.dumps({"wrote": str(out), **summary}))
    return 0
