"""Consolidate a training checkpoint into one backbone file (``dinov2-repro export``)."""
from __future__ import annotations

import argparse
from pathlib import Path


def export_from_checkpoint(checkpoint: str | Path, out: str | Path, *, fmt: str = "timm", which: str = "teacher",
                           with_heads: bool = False) -> Path:
    """Write the backbone of ``which`` (or, ``with_heads``, a teacher bundle: backbone, DINO/iBOT
    heads and centres, see dinov2_repro/teacher_bundle.py) of a training checkpoint to ``out``."""
    # Imported here: the CLI imports this module for register(), and --help should not load torch.
    from omegaconf import OmegaConf

    from .backbone_file import save_backbone
    from .train.checkpoint import load_model_state, read_meta, resolve_checkpoint
    from .train.meta_arch import SSLMetaArch

    if fmt != "timm":
        raise ValueError(f"export format {fmt!r} unknown; only 'timm' is supported")
    out = Path(out)
    if with_heads and out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: a teacher bundle is a .safetensors file; name it e.g. teacher.safetensors")
    checkpoint = resolve_checkpoint(checkpoint, what="--checkpoint")
    meta = read_meta(checkpoint)
    cfg = OmegaConf.create(meta["config"])
    meta_arch = SSLMetaArch(cfg)
    load_model_state(checkpoint, meta_arch)
    if with_heads:
        from .teacher_bundle import write_teacher_bundle

        return write_teacher_bundle(meta_arch, cfg, out, which=which, iteration=meta.get("iteration"))
    backbone = getattr(meta_arch, which).backbone
    save_backbone(backbone, out, arch=cfg.student.arch, mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std))
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="consolidate a training checkpoint into one backbone safetensors file",
                                   description="Consolidate a (possibly sharded) training checkpoint into one "
                                               "backbone .safetensors file in timm's layout.")
    parser.add_argument("--checkpoint", required=True, help="a run directory or one of its checkpoints/iter_* directories")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--format", choices=["timm"], default="timm", help="key layout (timm's DINOv2 layout)")
    parser.add_argument("--which", choices=["teacher", "student"], default="teacher")
    parser.add_argument("--with-heads", action="store_true",
                        help="write a teacher bundle (backbone + DINO/iBOT heads + centres, safe to share) that "
                             "`distill --teacher` accepts, instead of the backbone alone")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .io.paths import files_in, refuse_overwriting_inputs

    refuse_overwriting_inputs(outputs={"--out": args.out}, inputs={"--checkpoint": [args.checkpoint, *files_in(args.checkpoint)]})
    path = export_from_checkpoint(args.checkpoint, args.out, fmt=args.format, which=args.which, with_heads=args.with_heads)
    print(f"wrote {path}")
    return 0
