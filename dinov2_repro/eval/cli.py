"""``dinov2-repro eval knn|landcover|linear|seg``: frozen-backbone evaluations of an exported backbone."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..config import ConfigError

if TYPE_CHECKING:  # torch is imported when a task runs, not when the CLI is built
    import torch

BACKBONE_HELP = ("a backbone file: a project export (.safetensors), or a released DINOv2/DINOv3 .pth "
                 "or timm .safetensors (read as is; see docs/released-weights.md)")


def _dataset_tensors(spec: str, *, size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a labelled dataset, resized to ``size`` and normalised."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ..data import build_dataset

    dataset = build_dataset(spec)
    images, labels = [], []
    for index in range(len(dataset)):
        image, label = dataset[index]
        if label is None or (isinstance(label, int) and label < 0):
            raise ValueError(f"dataset {spec!r}: item {index} has no label (use labels=subdirs or a manifest with 'label')")
        if not isinstance(image, torch.Tensor):
            image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        images.append(F.interpolate(image[None].float(), size=(size, size), mode="bicubic", align_corners=False)[0])
        labels.append(int(label))
    x = torch.stack(images)
    if x.shape[1] != len(mean):
        from ..config import ConfigError

        raise ConfigError(f"dataset {spec!r} has {x.shape[1]} band(s) but the backbone expects {len(mean)} "
                          f"(its export's mean/std); evaluate on data with the bands it was trained on")
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x, torch.tensor(labels)


def run_knn(args: argparse.Namespace) -> dict:
    from ..backbone_file import load_backbone
    from .baselines import build_feature_baseline, parse_baselines
    from .knn_classifier import extract_features, knn_predict

    baselines = parse_baselines(args.baselines)
    model, meta = load_backbone(args.backbone)
    size = args.size or int(meta["img_size"])
    train_x, train_y = _dataset_tensors(args.train, size=size, mean=meta["mean"], std=meta["std"])
    val_x, val_y = _dataset_tensors(args.val, size=size, mean=meta["mean"], std=meta["std"])
    num_classes = int(max(train_y.max(), val_y.max())) + 1

    def top1(features_model: torch.nn.Module) -> float:
        predictions = knn_predict(extract_features(features_model, train_x), train_y, extract_features(features_model, val_x),
                                  k=args.k, temperature=args.temperature, num_classes=num_classes)
        return float((predictions == val_y).float().mean())

    result = {"task": "knn", "backbone": str(args.backbone), "k": args.k, "top1": top1(model),
              "n_train": len(train_y), "n_val": len(val_y), "size_px": size}
    for name in baselines:
        result[f"top1_{name}"] = top1(build_feature_baseline(name, meta=meta, train_images=train_x))
    return result


def run_landcover(args: argparse.Namespace) -> dict:
    from .baselines import parse_baselines
    from .landcover import landcover_knn_report

    return {"task": "landcover_knn", "backbone": str(args.backbone),
            **landcover_knn_report(args.backbone, size=args.size or None, k=args.k, baselines=parse_baselines(args.baselines),
                                   region=args.region)}


def run_linear(args: argparse.Namespace) -> dict:
    import torch

    from ..backbone_file import load_backbone
    from .baselines import build_feature_baseline, parse_baselines
    from .linear import linear_probe

    baselines = parse_baselines(args.baselines)
    model, meta = load_backbone(args.backbone)
    size = args.size or int(meta["img_size"])
    if args.landcover:
        from ..data.sample_data import LANDCOVER_CLASSES, landcover_tiles
        from .knn_classifier import images_to_tensor

        train_x, train_y, val_x, val_y = landcover_tiles(region=args.region)
        to_tensor = lambda x: images_to_tensor(x, mean=meta["mean"], std=meta["std"], size=size)  # noqa: E731
        train_t, val_t = to_tensor(train_x), to_tensor(val_x)
        train_l, val_l = torch.as_tensor(train_y).long(), torch.as_tensor(val_y).long()
        names, data = list(LANDCOVER_CLASSES), f"landcover ({args.region} blocks)"
    elif args.train and args.val:
        from ..data import build_dataset

        train_t, train_l = _dataset_tensors(args.train, size=size, mean=meta["mean"], std=meta["std"])
        val_t, val_l = _dataset_tensors(args.val, size=size, mean=meta["mean"], std=meta["std"])
        names, data = list(getattr(build_dataset(args.train), "classes", []) or []) or None, f"{args.train} -> {args.val}"
    else:
        raise ConfigError("eval linear: give --train and --val dataset specs, or --landcover")
    probe = dict(class_names=names, lrs=_floats(args.lrs, "--lrs"), n_blocks=args.n_blocks, epochs=args.epochs)
    result = linear_probe(model, train_t, train_l, val_t, val_l, **probe)
    # The same probe (lr sweep included) on each cheap baseline's features.
    compared = {name: linear_probe(build_feature_baseline(name, meta=meta, train_images=train_t), train_t, train_l, val_t,
                                   val_l, **probe) for name in baselines}
    extra = {"baselines": {name: {"top1": r["top1"], "lr": r["lr"], "feature_dim": r["feature_dim"]} for name, r in compared.items()}}
    return {"task": "linear", "backbone": str(args.backbone), "data": data, "size_px": size, **result, **extra}


def _floats(text: str, option: str) -> list[float]:
    from ..io.raster import parse_float_list

    return parse_float_list(text, what=option)


def _ints(text: str | None, option: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text}: expected comma-separated integers") from None


def run_seg(args: argparse.Namespace) -> dict:
    """Turn the command line into Python values, then call :func:`dinov2_repro.api.eval_seg`."""
    from .. import api

    compare = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--compare {item}: expected NAME=BACKBONE.safetensors")
        compare[name] = path
    return api.eval_seg(
        args.data, args.backbone, out_dir=args.out_dir, decoder=args.decoder, name=args.name, tile=args.tile,
        bands=_ints(args.bands, "--bands"), classes=_ints(args.classes, "--classes"),
        class_names=args.class_names.split(",") if args.class_names else None, ignore_index=args.ignore_index,
        split_seed=args.split_seed, lrs=_floats(args.lrs, "--lrs"), iterations=args.iterations,
        batch_size=args.batch_size, seed=args.seed, loss=args.loss, class_weights=args.class_weights, tta=args.tta,
        knn_k=args.knn_k, guided_filter=args.guided_filter, train_backbone=args.train_backbone,
        layer_decay=args.layer_decay, expand_bands=args.expand_bands, iou=args.iou, min_area_px=args.min_area_px,
        size_bins=_floats(args.size_bins, "--size-bins"), n_labelled=args.n_labelled,
        seeds=_ints(args.seeds, "--seeds") or [0], compare=compare,
        baselines=[b for b in args.baselines.split(",") if b], loggers=args.loggers, tracking=args.tracking)


def _add_object_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iou", type=float, default=0.5, help="object matching threshold (objects: IoU >= this)")
    p.add_argument("--min-area-px", type=float, default=0.0, help="objects smaller than this (pixels) are dropped on both sides")
    p.add_argument("--size-bins", default="100,400,1600", help="true-object area bin edges in pixels, for recall by size")


def run_objects(args: argparse.Namespace) -> dict:
    from .segmentation.objects import evaluate_object_files

    return evaluate_object_files(args.pred, args.truth, class_value=args.class_value, iou_threshold=args.iou,
                                 min_area_px=args.min_area_px, size_bins_px=_floats(args.size_bins, "--size-bins"),
                                 truth_instances=args.truth_instances)


def _add_seg_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="'landsat' (shipped scene + strata map), a folder with images/ and "
                   "masks/ (or train|val|test/{images,masks}), or a JSONL/Parquet manifest with path and mask columns")
    p.add_argument("--backbone", type=Path, default=None,
                   help="a backbone .safetensors export (frozen); without it the supervised U-Net is trained")
    p.add_argument("--name", default="teacher", help="name of --backbone in outputs")
    p.add_argument("--decoder", choices=["linear", "unet", "upernet", "dpt", "knn"], default="unet",
                   help="dpt: smp's DPT decoder on 4 blocks; knn: training-free patch-feature label propagation (few-shot)")
    p.add_argument("--knn-k", type=int, default=20, help="decoder knn: neighbours per query patch")
    p.add_argument("--train-backbone", default="none", metavar="none|last:K|all",
                   help="fine-tune the backbone (features recomputed every step, never cached); default: frozen")
    p.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise lr decay when the backbone trains (e.g. 0.75)")
    p.add_argument("--guided-filter", type=int, default=0, metavar="RADIUS",
                   help="decoder knn: refine the upsampled votes with a guided filter of this radius in px (0: off)")
    p.add_argument("--tile", type=int, default=56, help="tile size in px (a multiple of the patch size)")
    p.add_argument("--bands", default=None, help="1-based bands to read, e.g. 3,2,1 (default: all)")
    p.add_argument("--expand-bands", default=None, metavar="mean|R,G,B",
                   help="run an RGB backbone on more bands: 'mean' (bands 1-3 are R,G,B, the others get the mean RGB "
                        "filter, all scaled by 3/N) or the 1-based bands that are red, green, blue among those read, "
                        "e.g. 3,2,1 for Landsat (see docs/band_expansion.md)")
    p.add_argument("--classes", default=None, help="mask values that are classes, in order (default: those found)")
    p.add_argument("--class-names", default=None, help="comma-separated names, one per class")
    p.add_argument("--ignore-index", type=int, default=255, help="mask value excluded from loss and metrics")
    p.add_argument("--lrs", default="0.001", help="learning-rate sweep, best on val (label efficiency: the first)")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--loss", choices=["ce", "dice", "focal", "ce+dice", "lovasz"], default=None,
                   help="head training loss (default: ce; ce+dice for binary tasks with foreground < 20%%)")
    p.add_argument("--class-weights", default=None, help="'auto' (inverse frequency, capped at 10) or W1,W2,... per class")
    _add_object_arguments(p)  # binary tasks: object metrics of the test tiles
    p.add_argument("--tta", choices=["none", "flip", "d4"], default="none",
                   help="test-time augmentation of the test tiles (4 mirror views or 8 dihedral views; the plain score is kept too)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the block-to-split assignment")
    p.add_argument("--n-labelled", default=None, help="label efficiency, e.g. 2,4,8,16,all")
    p.add_argument("--seeds", default="0,1,2", help="label-efficiency subset seeds")
    p.add_argument("--compare", action="append", default=[], help="NAME=BACKBONE.safetensors (repeatable), e.g. a student")
    p.add_argument("--baselines", default="random_init,spectral,supervised", help="label-efficiency baselines")
    p.add_argument("--out-dir", type=Path, default=None, help="run directory (seg_run.json, head, metrics / curves)")
    p.add_argument("--loggers", default="", metavar="NAME,...",
                   help="experiment trackers besides metrics.jsonl in --out-dir (always on): tensorboard, mlflow, wandb "
                        "(see docs/trackers.md)")
    p.add_argument("--tracking", action="append", default=[], metavar="KEY=VALUE",
                   help="a tracker setting of the config's tracking: section, e.g. mlflow.tracking_uri=file:/tmp/mlruns "
                        "or wandb.mode=offline (repeatable)")


def _add_baseline_arguments(p: argparse.ArgumentParser, *, region: bool) -> None:
    p.add_argument("--baselines", default="random_init,imagestats,rcf",
                   help="feature baselines evaluated the same way: random_init (the export's architecture and init "
                        "values), imagestats (per-band mean/std/quantiles), rcf (512 random 3x3 conv features); 'none'")
    if region:
        p.add_argument("--region", choices=["heldout", "tune"], default="heldout",
                       help="land-cover tiles of the held-out blocks (never in a pretraining pool; reported figures) "
                            "or of the pretraining blocks (for tuning only)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="frozen-backbone evaluations: knn, landcover, linear, seg, objects",
                                   description="Frozen-backbone evaluations of an exported backbone.")
    parser.set_defaults(help_parser=parser)  # `dinov2-repro eval` alone prints this parser's help
    tasks = parser.add_subparsers(dest="task", metavar="TASK", title="tasks")
    for task, text in (("knn", "weighted kNN top-1 on labelled datasets"),
                       ("landcover", "kNN on the shipped Landsat land-cover tiles vs random init")):
        p = tasks.add_parser(task, help=text, description=text)
        p.add_argument("--backbone", required=True, type=Path, help="a backbone .safetensors export")
        p.add_argument("--k", type=int, default=20)
        p.add_argument("--size", type=int, default=0, help="input size in px (default: the export's img_size)")
        p.add_argument("--out", type=Path, default=None, help="write the metrics JSON here too")
        _add_baseline_arguments(p, region=task == "landcover")
        if task == "knn":
            p.add_argument("--train", required=True, help="labelled dataset spec, e.g. ImageFolder:root=D:labels=subdirs")
            p.add_argument("--val", required=True, help="labelled dataset spec")
            p.add_argument("--temperature", type=float, default=0.07)
        p.set_defaults(run=run_eval)
    p = tasks.add_parser("linear", help="linear probe on frozen CLS + pooled patch features (lr sweep)",
                         description="Linear probe: CLS of the last 1 or 4 blocks + mean patch token; lr sweep.")
    p.add_argument("--backbone", required=True, type=Path, help="a backbone .safetensors export")
    p.add_argument("--train", default=None, help="labelled dataset spec, e.g. ImageFolder:root=D:labels=subdirs")
    p.add_argument("--val", default=None, help="labelled dataset spec")
    p.add_argument("--landcover", action="store_true", help="use the shipped Landsat land-cover tiles")
    p.add_argument("--n-blocks", type=int, choices=[1, 4], default=1, help="CLS tokens of the last 1 or 4 blocks")
    p.add_argument("--lrs", default="0.01,0.1,1.0", help="learning-rate sweep")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--size", type=int, default=0, help="input size in px (default: the export's img_size)")
    p.add_argument("--out", type=Path, default=None, help="write the metrics JSON here too")
    _add_baseline_arguments(p, region=True)
    p.set_defaults(run=run_eval)
    p = tasks.add_parser("seg", help="segmentation: frozen backbone + linear/unet/upernet/dpt/knn decoder; label efficiency",
                         description="Frozen-backbone segmentation on image+mask pairs; --n-labelled for label efficiency.")
    _add_seg_arguments(p)
    p.add_argument("--out", type=Path, default=None, help="write the metrics JSON here too")
    p.set_defaults(run=run_eval)
    p = tasks.add_parser("objects", help="object-level precision / recall / F1 of a binary map (SpaceNet-style matching)",
                         description="Polygonise a predicted class map and match it one-to-one to true objects "
                                     "(IoU >= --iou, highest IoU first).")
    p.add_argument("--pred", required=True, type=Path, help="class-code GeoTIFF, e.g. from `predict seg`")
    p.add_argument("--truth", required=True, type=Path,
                   help="mask GeoTIFF on the map's grid, or polygons (.geojson / .gpkg) in the map's CRS")
    _add_object_arguments(p)
    p.add_argument("--class-value", type=int, default=1, help="the map's (and mask's) code of the object class")
    p.add_argument("--truth-instances", action="store_true",
                   help="the truth raster holds one id per object (keeps touching buildings apart)")
    p.add_argument("--out", type=Path, default=None, help="write the metrics JSON here too")
    p.set_defaults(run=run_eval)


def _refuse_overwriting_inputs(args: argparse.Namespace) -> None:
    """No output of an eval task may be one of its inputs (io.paths): checked before any work."""
    from ..io.paths import refuse_overwriting_inputs

    inputs = {f"--{name.replace('_', '-')}": getattr(args, name, None)
              for name in ("backbone", "train", "val", "data", "pred", "truth")}
    inputs["--compare"] = [item.partition("=")[2] for item in getattr(args, "compare", [])]
    out_dir = getattr(args, "out_dir", None)
    run_files = None
    if out_dir is not None:
        from .segmentation.train import BACKBONE_FILE, HEAD_FILE, METRICS_FILE, RUN_FILE

        from .segmentation.tracking import RUN_FILES as TRACKER_FILES

        names = (RUN_FILE, HEAD_FILE, METRICS_FILE, BACKBONE_FILE, "label_efficiency.json", "label_efficiency.png",
                 "landsat_6band.tif", *TRACKER_FILES)
        run_files = [Path(out_dir) / name for name in names]
    refuse_overwriting_inputs(outputs={"--out": getattr(args, "out", None), "--out-dir": run_files}, inputs=inputs)


def run_eval(args: argparse.Namespace) -> int:
    from ..io.files import atomic_write_text

    _refuse_overwriting_inputs(args)
    runners = {"knn": run_knn, "landcover": run_landcover, "linear": run_linear, "seg": run_seg, "objects": run_objects}
    result = runners[args.task](args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


def main(argv: Sequence[str]) -> int:
    """``dinov2-repro eval ARGS`` (kept for callers that pass the eval arguments alone)."""
    from ..cli import main as cli_main

    return cli_main(["eval", *argv])
