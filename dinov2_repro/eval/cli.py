"""``dinov2-repro eval knn|landcover``: frozen-backbone evaluations of an exported backbone."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # torch is imported when a task runs, not when the CLI is built
    import torch


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
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x, torch.tensor(labels)


def run_knn(args: argparse.Namespace) -> dict:
    from ..backbone_file import load_backbone
    from .knn_classifier import extract_features, knn_predict

    model, meta = load_backbone(args.backbone)
    size = args.size or int(meta["img_size"])
    train_x, train_y = _dataset_tensors(args.train, size=size, mean=meta["mean"], std=meta["std"])
    val_x, val_y = _dataset_tensors(args.val, size=size, mean=meta["mean"], std=meta["std"])
    predictions = knn_predict(extract_features(model, train_x), train_y, extract_features(model, val_x), k=args.k,
                              temperature=args.temperature, num_classes=int(max(train_y.max(), val_y.max())) + 1)
    return {"task": "knn", "backbone": str(args.backbone), "k": args.k, "top1": float((predictions == val_y).float().mean()),
            "n_train": len(train_y), "n_val": len(val_y), "size_px": size}


def run_landcover(args: argparse.Namespace) -> dict:
    from .landcover import landcover_knn_report

    return {"task": "landcover_knn", "backbone": str(args.backbone),
            **landcover_knn_report(args.backbone, size=args.size or None, k=args.k)}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="frozen-backbone evaluations: knn, landcover",
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
        if task == "knn":
            p.add_argument("--train", required=True, help="labelled dataset spec, e.g. ImageFolder:root=D:labels=subdirs")
            p.add_argument("--val", required=True, help="labelled dataset spec")
            p.add_argument("--temperature", type=float, default=0.07)
        p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..io.files import atomic_write_text

    result = run_knn(args) if args.task == "knn" else run_landcover(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


def main(argv: Sequence[str]) -> int:
    """``dinov2-repro eval ARGS`` (kept for callers that pass the eval arguments alone)."""
    from ..cli import main as cli_main

    return cli_main(["eval", *argv])
