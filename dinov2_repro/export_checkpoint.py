"""``dinov2-repro export``: a training checkpoint -> one backbone safetensors file (``--format
timm``), or a checkpoint or backbone file -> an ONNX model (``--format onnx``, onnx_export/)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import ConfigError


def export_from_checkpoint(checkpoint: str | Path, out: str | Path, *, fmt: str = "timm", which: str = "teacher",
                           with_heads: bool = False) -> Path:
    """Write the backbone of ``which`` (or, ``with_heads``, a teacher bundle: backbone, DINO/iBOT
    heads and centres, see dinov2_repro/teacher_bundle.py) of a training checkpoint to ``out``."""
    # Imported here: the CLI imports this module for register(), and --help should not load torch.
    from .backbone_file import save_backbone

    if fmt != "timm":
        raise ValueError(f"export format {fmt!r} unknown; only 'timm' is supported")
    out = Path(out)
    if with_heads and out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: a teacher bundle is a .safetensors file; name it e.g. teacher.safetensors")
    meta_arch, cfg, meta = _load_checkpoint(checkpoint)
    if with_heads:
        from .teacher_bundle import write_teacher_bundle

        return write_teacher_bundle(meta_arch, cfg, out, which=which, iteration=meta.get("iteration"))
    backbone = getattr(meta_arch, which).backbone
    save_backbone(backbone, out, arch=cfg.student.arch, mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std))
    return out


def _load_checkpoint(checkpoint: str | Path) -> tuple["SSLMetaArch", "DictConfig", dict]:
    """(SSLMetaArch with the checkpoint's weights, its config, the checkpoint's meta)."""
    from omegaconf import OmegaConf

    from .train.checkpoint import load_model_state, read_meta, resolve_checkpoint
    from .train.meta_arch import SSLMetaArch

    checkpoint = resolve_checkpoint(checkpoint, what="--checkpoint")
    meta = read_meta(checkpoint)
    cfg = OmegaConf.create(meta["config"])
    meta_arch = SSLMetaArch(cfg)
    load_model_state(checkpoint, meta_arch)
    return meta_arch, cfg, meta


def backbone_from_checkpoint(checkpoint: str | Path, *, which: str = "teacher") -> tuple["torch.nn.Module", dict]:
    """(backbone of ``which``, a header as load_backbone returns: arch, mean, std) of a training checkpoint."""
    meta_arch, cfg, _ = _load_checkpoint(checkpoint)
    backbone = getattr(meta_arch, which).backbone.eval()
    header = {"arch": str(cfg.student.arch), "mean": list(cfg.crops.mean), "std": list(cfg.crops.std)}
    return backbone, header


def export_onnx(out: str | Path, *, backbone: str | Path | None = None, checkpoint: str | Path | None = None,
                which: str = "teacher", image_size: str | int | None = None, fixed_size: bool = False,
                opset: int | None = None, check: bool = True) -> dict:
    """ONNX model of a backbone file (``backbone``: an export, an imported or a released file) or
    of a training checkpoint's ``which`` backbone; returns the export's description and, with
    ``check``, the max abs differences between onnxruntime and torch (onnx_export/backbone.py)."""
    from .onnx_export import require_onnx

    require_onnx()
    from .onnx_export.backbone import export_backbone_onnx, parse_image_size
    from .onnx_export.graph import DEFAULT_OPSET

    if (backbone is None) == (checkpoint is None):
        raise ConfigError("--format onnx takes one of --backbone FILE or --checkpoint RUN")
    if backbone is not None:
        from .backbone_file import load_backbone

        model, header = load_backbone(backbone)
    else:
        model, header = backbone_from_checkpoint(checkpoint, which=which)
    size = parse_image_size(image_size) if image_size is not None else None
    return export_backbone_onnx(model, out, header=header, image_size=size, dynamic_size=not fixed_size,
                                opset=opset or DEFAULT_OPSET, check=check)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="a checkpoint -> backbone safetensors file, or a backbone -> ONNX model",
                                   description="Consolidate a (possibly sharded) training checkpoint into one "
                                               "backbone .safetensors file in timm's layout (--format timm), or "
                                               "export a backbone file or a checkpoint's backbone to ONNX "
                                               "(--format onnx: images in, CLS and patch tokens out; see docs/onnx.md).")
    parser.add_argument("--checkpoint", default=None, help="a run directory or one of its checkpoints/iter_* directories")
    parser.add_argument("--backbone", default=None, type=Path,
                        help="--format onnx: a backbone file (a training or import-weights export, or a released file)")
    parser.add_argument("--out", required=True, help="output path: .safetensors (timm) or .onnx (onnx)")
    parser.add_argument("--format", choices=["timm", "onnx"], default="timm",
                        help="timm: backbone safetensors in timm's DINOv2 layout; onnx: an ONNX model, checked with onnxruntime")
    parser.add_argument("--which", choices=["teacher", "student"], default="teacher")
    parser.add_argument("--with-heads", action="store_true",
                        help="write a teacher bundle (backbone + DINO/iBOT heads + centres, safe to share) that "
                             "`distill --teacher` accepts, instead of the backbone alone")
    parser.add_argument("--image-size", default=None, metavar="SIZE|H,W",
                        help="--format onnx: the size traced and checked first (default: the backbone's img_size)")
    parser.add_argument("--fixed-size", action="store_true",
                        help="--format onnx: fix height and width to --image-size (the batch stays dynamic)")
    parser.add_argument("--opset", type=int, default=None, help="--format onnx: ONNX opset (default 18)")
    parser.set_defaults(run=_run_export)


ONNX_ONLY_OPTIONS = (("backbone", "--backbone"), ("image_size", "--image-size"), ("fixed_size", "--fixed-size"),
                     ("opset", "--opset"))


def _run_export(args: argparse.Namespace) -> int:
    from .io.paths import files_in, refuse_overwriting_inputs

    if args.format != "onnx":
        given = [flag for name, flag in ONNX_ONLY_OPTIONS if getattr(args, name) not in (None, False)]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --format onnx")
        if args.checkpoint is None:
            raise ConfigError("--format timm needs --checkpoint RUN (a run directory or checkpoint)")
    elif args.with_heads:
        raise ConfigError("--with-heads writes a safetensors teacher bundle; it does not apply to --format onnx")
    inputs = {"--checkpoint": [args.checkpoint, *files_in(args.checkpoint)] if args.checkpoint else None,
              "--backbone": args.backbone}
    outputs = {"--out": args.out}
    if args.format == "onnx":
        outputs["--out (its weights file, for models over 1.8 GB)"] = str(args.out) + ".data"
    refuse_overwriting_inputs(outputs=outputs, inputs=inputs)
    if args.format == "onnx":
        result = export_onnx(args.out, backbone=args.backbone, checkpoint=args.checkpoint, which=args.which,
                             image_size=args.image_size, fixed_size=args.fixed_size, opset=args.opset)
        print(json.dumps(result, indent=2))
        from .onnx_export.graph import warn_if_far

        warn_if_far(result, prefix="dinov2-repro export")
        return 0
    path = export_from_checkpoint(args.checkpoint, args.out, fmt=args.format, which=args.which, with_heads=args.with_heads)
    print(f"wrote {path}")
    return 0
