"""Train and evaluate segmentation heads on frozen features; save / load a segmentation run.

A run directory (``SEG_RUN``) holds ``seg_run.json`` (model kind, backbone reference, decoder,
bands, classes, input normalisation, tile size), ``head.safetensors`` (the trained weights) and
``metrics.json``; ``dinov2-repro predict seg`` rebuilds the model from it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...io.files import atomic_output, atomic_write_text
from .data import SPLITS, check_splits, discover_pairs, load_scene, mask_codes_present, spatial_tiles, tile_arrays
from .decoders import FrozenViTFeatures, build_head, build_segmenter
from .losses import LossFn, build_loss, choose_loss, parse_class_weights
from .metrics import confusion_matrix, segmentation_metrics
from .tracking import log_lr_run, log_result

if TYPE_CHECKING:
    from ...tracking import TrackerSet

RUN_FILE, HEAD_FILE, METRICS_FILE = "seg_run.json", "head.safetensors", "metrics.json"
BACKBONE_FILE = "backbone_finetuned.safetensors"  # only when the backbone trained (--train-backbone)


@dataclass
class SegData:
    """Tiles of every split, ready for training: images (N, C, T, T) in [0, 1], labels (N, T, T)."""

    data: str
    tile: int
    bands: list[int] | None
    class_values: list[int]
    class_names: list[str]
    ignore_index: int
    images: dict[str, Tensor]
    labels: dict[str, Tensor]

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    @property
    def in_channels(self) -> int:
        return int(self.images["train"].shape[1])


def prepare_data(*, data: str, workdir: Path, tile: int, bands: Sequence[int] | None = None,
                 classes: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                 ignore_index: int = 255, split_seed: int = 0) -> SegData:
    """Read every pair, map classes, cut spatially disjoint tiles; every check happens here, before training."""
    pairs = discover_pairs(data, workdir=workdir)
    if data == "landsat" and classes is None:
        from ...data.sample_data import LANDCOVER_CLASSES

        classes, class_names = list(range(1, len(LANDCOVER_CLASSES) + 1)), list(LANDCOVER_CLASSES)
    values = list(classes) if classes is not None else mask_codes_present(pairs, ignore_index=ignore_index)
    if not values:
        raise ConfigError(f"--data {data}: the masks hold no class values")
    names = list(class_names) if class_names else [str(v) for v in values]
    if len(names) != len(values):
        raise ConfigError(f"--class-names gives {len(names)} names for {len(values)} classes {values}")
    scenes = [load_scene(p, bands=bands, class_values=values, ignore_index=ignore_index) for p in pairs]
    channels = {s.image.shape[0] for s in scenes}
    if len(channels) > 1:
        raise ConfigError(f"--data {data}: images have different band counts {sorted(channels)}; choose --bands")
    tiles = spatial_tiles(scenes, tile=tile, ignore_index=ignore_index, seed=split_seed)
    check_splits(tiles, data=data, tile=tile)
    images, labels = {}, {}
    for split in SPLITS:
        x, y = tile_arrays(scenes, tiles[split], tile=tile)
        images[split], labels[split] = torch.from_numpy(x), torch.from_numpy(y)
    return SegData(data, tile, list(bands) if bands else None, values, names, ignore_index, images, labels)


# ---------------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """What a segmentation run is: ``kind`` vit (frozen backbone export + decoder), spectral or supervised."""

    name: str
    kind: str
    backbone: str | None = None
    decoder: str = "unet"
    # An RGB backbone on more bands: 'mean' or 'R,G,B' (1-based, among the bands read); see
    # dinov2_repro/band_expansion.py. None: the backbone must take the data's band count.
    expand_bands: str | None = None
    knn_k: int = 20  # decoder knn: neighbours per query patch
    guided_filter: int = 0  # decoder knn: guided-filter radius in px (0: off)
    train_backbone: str = "none"  # none | last:K | all (finetune.py)
    layer_decay: float = 1.0  # layer-wise lr decay when the backbone trains

    def head_options(self) -> dict[str, int]:
        return {"knn_k": self.knn_k, "guided_filter": self.guided_filter} if self.decoder == "knn" else {}


def build_model(spec: ModelSpec, *, data_channels: int, num_classes: int, seed: int = 0) -> tuple[nn.Module, nn.Module, dict]:
    """(features, head, backbone header or {}); ``vit`` with ``random_init=...`` rebuilds the export's
    architecture at a seeded random init (the baseline)."""
    torch.manual_seed(seed)
    if spec.kind in ("vit", "random_init"):
        from ...backbone_file import build_model_from_metadata, load_backbone

        if spec.expand_bands:
            backbone, meta = load_backbone(spec.backbone, in_chans=data_channels,
                                           rgb_bands=expansion_rgb_bands(spec.expand_bands, data_channels))
        else:
            backbone, meta = load_backbone(spec.backbone)
        if spec.kind == "random_init":
            backbone = build_model_from_metadata(meta).eval()
        if int(meta["in_chans"]) != data_channels:
            raise ConfigError(f"backbone {spec.backbone} takes in_chans={meta['in_chans']} bands but the data has "
                              f"{data_channels}; choose bands with --bands (e.g. --bands 3,2,1 for Landsat true colour) "
                              "or expand an RGB backbone with --expand-bands mean|R,G,B")
        features, head = build_segmenter(kind="vit", num_classes=num_classes, in_channels=data_channels,
                                         decoder=spec.decoder, backbone=backbone, **spec.head_options())
        return features, head, meta
    features, head = build_segmenter(kind=spec.kind, num_classes=num_classes, in_channels=data_channels)
    return features, head, {}


def expansion_rgb_bands(text: str, data_channels: int) -> tuple[int, int, int] | None:
    """0-based R, G, B channels of an ``--expand-bands`` value (None for 'mean'), checked against
    the number of bands read; errors name the option and 1-based band numbers."""
    from ...band_expansion import parse_band_expansion

    try:
        parsed = parse_band_expansion(text)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if parsed in (None, "mean"):
        return None
    outside = [b + 1 for b in parsed if b >= data_channels]
    if outside:
        raise ConfigError(f"--expand-bands {text}: band {outside[0]} is not one of the {data_channels} bands read "
                          f"(1..{data_channels}, counted after --bands)")
    if len(set(parsed)) != 3:
        raise ConfigError(f"--expand-bands {text}: red, green and blue must be three different bands")
    return parsed


def check_tile(features: nn.Module, data: SegData, spec: ModelSpec) -> None:
    """Tiles must be a whole number of patches: checked before any training."""
    patch = int(getattr(features, "patch_size", 1))
    if data.tile % patch:
        raise ConfigError(f"--tile {data.tile}: not a multiple of the patch size {patch} of {spec.backbone}")


def fresh_head(spec: ModelSpec, features: nn.Module, *, in_channels: int, num_classes: int, seed: int) -> nn.Module:
    """A newly initialised (seeded) head for already built features: no backbone reload."""
    torch.manual_seed(seed)
    if isinstance(features, FrozenViTFeatures):
        return build_head(decoder=spec.decoder, embed_dim=int(features.backbone.embed_dim), num_classes=num_classes,
                          **spec.head_options())
    return build_segmenter(kind=spec.kind, num_classes=num_classes, in_channels=in_channels)[1]


def input_normalisation(meta: dict, train_images: Tensor) -> tuple[list[float], list[float]]:
    """The export's mean/std when it has one per band, else per-band statistics of the training tiles."""
    channels = train_images.shape[1]
    if meta and len(meta.get("mean", [])) == channels:
        return [float(v) for v in meta["mean"]], [float(v) for v in meta["std"]]
    flat = train_images.transpose(0, 1).reshape(channels, -1)
    return flat.mean(1).tolist(), flat.std(1).clamp_min(1e-3).tolist()


def normalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    return (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


@torch.no_grad()
def cached_features(features: nn.Module, images: Tensor, *, batch_size: int = 32) -> list[Tensor]:
    """Frozen features of every image, computed once: a list of (N, ...) tensors. Refused for a
    backbone that trains: its cached features would go stale at the first step."""
    if getattr(features, "trainable", False) or any(p.requires_grad for p in features.parameters()):
        raise ConfigError("cached features cannot be used when the backbone trains (--train-backbone): "
                          "features must be recomputed at every step")
    features.eval()
    chunks = [features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return [torch.cat([chunk[level] for chunk in chunks]) for level in range(len(chunks[0]))]


@dataclass(frozen=True)
class LossChoice:
    """The training loss of a run: ``name`` (``--loss`` or the automatic rule), why, class weights."""

    name: str
    reason: str
    class_weights: list[float] | None

    def build(self, *, num_classes: int, ignore_index: int) -> LossFn:
        return build_loss(self.name, num_classes=num_classes, ignore_index=ignore_index, class_weights=self.class_weights)

    def record(self) -> dict[str, Any]:
        return {"loss": self.name, "loss_reason": self.reason, "class_weights": self.class_weights}


def resolve_loss(data: SegData, *, loss: str | None = None, class_weights: str | None = None,
                 labels: Tensor | None = None) -> LossChoice:
    """The loss for training on ``labels`` (default: all training tiles): checked before any training."""
    labels = data.labels["train"] if labels is None else labels
    common = dict(labels=labels, num_classes=data.num_classes, ignore_index=data.ignore_index)
    name, reason = choose_loss(loss, **common)
    return LossChoice(name, reason, parse_class_weights(class_weights, **common))


def train_head(head: nn.Module, feats: Sequence[Tensor], labels: Tensor, *, ignore_index: int, iterations: int = 200,
               lr: float = 1e-3, batch_size: int = 8, seed: int = 0, progress: bool = False,
               loss_fn: LossFn | None = None, curve: list[float] | None = None) -> nn.Module:
    """AdamW (wd 1e-4) with a cosine schedule on random batches of the cached features.
    ``loss_fn`` defaults to cross-entropy; ``curve`` (a list) receives the loss of every step."""
    if not (labels != ignore_index).any():
        raise ConfigError("the training tiles hold no labelled pixels")
    if getattr(head, "training_free", False):  # the kNN decoder: fitting fills its memory bank
        return head.fit(feats, labels, ignore_index=ignore_index).eval()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(iterations, 1))
    size = tuple(labels.shape[-2:])
    head.train()
    steps = range(iterations)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="train head", leave=False)
    for _ in steps:
        index = torch.randint(len(labels), (batch_size,), generator=generator)  # with replacement: n may be < batch
        logits = head([f[index] for f in feats], size)
        if loss_fn is None:
            loss = F.cross_entropy(logits, labels[index], ignore_index=ignore_index)
        else:
            loss = loss_fn(logits, labels[index])
        if curve is not None:
            curve.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return head.eval()


@dataclass(frozen=True)
class ObjectOptions:
    """Object matching of binary tasks (objects.py): IoU threshold, minimum area and size bins in pixels."""

    iou_threshold: float = 0.5
    min_area_px: float = 0.0
    size_bins_px: tuple[float, ...] = (100.0, 400.0, 1600.0)


@torch.no_grad()
def evaluate_head(head: nn.Module, feats: Sequence[Tensor], labels: Tensor, *, num_classes: int, ignore_index: int,
                  class_names: Sequence[str], batch_size: int = 32,
                  objects: ObjectOptions | None = ObjectOptions(), tta: str = "none",
                  features: nn.Module | None = None, images: Tensor | None = None) -> dict[str, Any]:
    """Metrics from one confusion matrix accumulated over all tiles of the split; binary tasks add
    object metrics (``objects``; polygons matched per tile, so an object cut by a tile border
    counts once per tile it touches; ignored pixels are background on both sides). With ``tta``
    other than none the views' features are computed from ``images`` (normalised) by ``features``."""
    from .objects import ObjectCounts, mask_object_counts
    from .tta import tta_probabilities

    if tta != "none" and (features is None or images is None):
        raise ValueError("test-time augmentation needs the feature extractor and the images")
    head.eval()
    guided = getattr(head, "training_free", False)  # the kNN head may refine with the image (guided filter)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    size = tuple(labels.shape[-2:])
    counts = ObjectCounts(size_bins_px=objects.size_bins_px) if objects is not None and num_classes == 2 else None
    for i in range(0, len(labels), batch_size):
        if tta == "none" and guided and images is not None:
            prediction = head([f[i:i + batch_size] for f in feats], size, guide=images[i:i + batch_size]).argmax(1)
        elif tta == "none":
            prediction = head([f[i:i + batch_size] for f in feats], size).argmax(1)
        else:
            prediction = tta_probabilities(lambda x: head(features(x), size, **({"guide": x} if guided else {})).softmax(1),
                                           images[i:i + batch_size], mode=tta).argmax(1)
        target = labels[i:i + batch_size]
        matrix += confusion_matrix(prediction, target, num_classes=num_classes, ignore_index=ignore_index)
        if counts is not None:
            for p, t in zip(prediction.numpy(), target.numpy()):
                counts.add(mask_object_counts(p == 1, t == 1, valid=t != ignore_index, iou_threshold=objects.iou_threshold,
                                              min_area_px=objects.min_area_px, size_bins_px=objects.size_bins_px))
    result = {**segmentation_metrics(matrix, class_names=class_names), "confusion_matrix": matrix.tolist()}
    if counts is not None:
        result["objects"] = counts.metrics(iou_threshold=objects.iou_threshold, min_area_px=objects.min_area_px)
    return result


# ---------------------------------------------------------------------------------- one run
def run_segmentation(spec: ModelSpec, data: SegData, *, out_dir: Path | None, lrs: Sequence[float] = (1e-3,),
                     iterations: int = 200, batch_size: int = 8, seed: int = 0, progress: bool = True,
                     loss: str | None = None, class_weights: str | None = None,
                     objects: ObjectOptions = ObjectOptions(), tta: str = "none",
                     trackers: "TrackerSet | None" = None) -> dict[str, Any]:
    """Train one head per learning rate, keep the best on val mIoU, report test metrics (with
    ``tta``: of the averaged views, and the plain test mIoU beside them); saves the run.
    ``trackers`` (``eval seg --loggers``) receive the loss of every step and the results."""
    choice = resolve_loss(data, loss=loss, class_weights=class_weights)
    loss_fn = choice.build(num_classes=data.num_classes, ignore_index=data.ignore_index)
    features, _, meta = build_model(spec, data_channels=data.in_channels, num_classes=data.num_classes, seed=seed)
    check_tile(features, data, spec)
    mean, std = input_normalisation(meta, data.images["train"])
    if spec.train_backbone != "none":
        return _run_finetuning(spec, data, features, mean=mean, std=std, out_dir=out_dir, lrs=lrs, iterations=iterations,
                               batch_size=batch_size, seed=seed, choice=choice, loss_fn=loss_fn, objects=objects,
                               trackers=trackers)
    feats = {s: cached_features(features, normalise(data.images[s], mean, std)) for s in SPLITS}
    common = dict(num_classes=data.num_classes, ignore_index=data.ignore_index, class_names=data.class_names)
    best: tuple[float, float, nn.Module, dict] | None = None
    sweep, curves = {}, {}
    if spec.decoder == "knn" and spec.kind in ("vit", "random_init"):
        lrs = list(lrs)[:1]  # nothing is trained: a learning-rate sweep would repeat one result
    guides = {s: normalise(data.images[s], mean, std) for s in ("val", "test")} if spec.guided_filter else {}
    for index, lr in enumerate(lrs):
        head = fresh_head(spec, features, in_channels=data.in_channels, num_classes=data.num_classes, seed=seed)
        curve: list[float] = []
        train_head(head, feats["train"], data.labels["train"], ignore_index=data.ignore_index, iterations=iterations,
                   lr=lr, batch_size=batch_size, seed=seed, progress=progress, loss_fn=loss_fn, curve=curve)
        val = evaluate_head(head, feats["val"], data.labels["val"], **common, objects=objects, images=guides.get("val"))
        log_lr_run(trackers, index=index, lr=lr, iterations=iterations, curve=curve, val=val)
        sweep[str(lr)] = val["miou"]
        curves[str(lr)] = curve
        if best is None or val["miou"] > best[0]:
            best = (val["miou"], lr, head, val)
    assert best is not None
    _, lr, head, val = best
    curve = curves[str(lr)]
    test = evaluate_head(head, feats["test"], data.labels["test"], **common, objects=objects, images=guides.get("test"))
    tta_record: dict[str, Any] = {"tta": tta}
    if tta != "none":
        plain = test
        test = evaluate_head(head, feats["test"], data.labels["test"], **common, objects=objects, tta=tta,
                             features=features, images=normalise(data.images["test"], mean, std))
        tta_record["test_without_tta"] = {k: plain[k] for k in ("miou", "pixel_accuracy", "f1") if k in plain}
        if "objects" in plain:
            tta_record["test_without_tta"]["object_f1"] = plain["objects"]["object_f1"]
    result = {"task": "seg", "model": asdict(spec), "data": data.data, "tile_px": data.tile, "classes": data.class_names,
              "n_tiles": {s: len(data.labels[s]) for s in SPLITS}, "lr_sweep_val_miou": sweep, "lr": lr,
              "iterations": iterations, "seed": seed, **choice.record(), "train_loss_curve": _curve_summary(curve), **tta_record,
              "val": val, "test": test,
              "trainable_parameters": sum(p.numel() for p in head.parameters())}
    if out_dir is not None:
        save_run(out_dir, spec=spec, data=data, head=head, mean=mean, std=std, metrics=result)
        result["run_dir"] = str(out_dir)
    log_result(trackers, result, step=len(list(lrs)) * iterations, exports=[out_dir / HEAD_FILE] if out_dir else [])
    return result


def _run_finetuning(spec: ModelSpec, data: SegData, features: nn.Module, *, mean, std, out_dir: Path | None,
                    lrs: Sequence[float], iterations: int, batch_size: int, seed: int, choice: LossChoice, loss_fn: LossFn,
                    objects: ObjectOptions, trackers: "TrackerSet | None" = None) -> dict[str, Any]:
    """``run_segmentation`` when the backbone trains: every lr starts from the same pretrained
    backbone, features are recomputed at every step, and evaluation uses the trained backbone."""
    from .finetune import fresh_features, train_end_to_end, trainable_parameter_count, unfreeze

    if not isinstance(features, FrozenViTFeatures) or spec.decoder == "knn":
        raise ConfigError(f"--train-backbone {spec.train_backbone}: needs --backbone and a trained decoder (not knn)")
    images = {s: normalise(data.images[s], mean, std) for s in SPLITS}
    common = dict(num_classes=data.num_classes, ignore_index=data.ignore_index, class_names=data.class_names)
    best = None
    sweep, curves = {}, {}
    for index, lr in enumerate(lrs):
        trainable = unfreeze(features, spec.train_backbone)
        head = fresh_head(spec, features, in_channels=data.in_channels, num_classes=data.num_classes, seed=seed)
        curve: list[float] = []
        train_end_to_end(trainable, head, images["train"], data.labels["train"], loss_fn=loss_fn,
                         ignore_index=data.ignore_index, iterations=iterations, lr=lr, layer_decay=spec.layer_decay,
                         batch_size=batch_size, seed=seed, curve=curve)
        val = evaluate_head(head, fresh_features(trainable, images["val"]), data.labels["val"], **common, objects=objects)
        log_lr_run(trackers, index=index, lr=lr, iterations=iterations, curve=curve, val=val)
        sweep[str(lr)], curves[str(lr)] = val["miou"], curve
        if best is None or val["miou"] > best[0]:
            best = (val["miou"], lr, trainable, head, val)
    assert best is not None
    _, lr, trainable, head, val = best
    test = evaluate_head(head, fresh_features(trainable, images["test"]), data.labels["test"], **common, objects=objects)
    result = {"task": "seg", "model": asdict(spec), "data": data.data, "tile_px": data.tile, "classes": data.class_names,
              "n_tiles": {s: len(data.labels[s]) for s in SPLITS}, "lr_sweep_val_miou": sweep, "lr": lr,
              "iterations": iterations, "seed": seed, **choice.record(), "train_loss_curve": _curve_summary(curves[str(lr)]),
              "tta": "none", "val": val, "test": test, "trainable_parameters": trainable_parameter_count([trainable, head])}
    if out_dir is not None:
        save_run(out_dir, spec=spec, data=data, head=head, mean=mean, std=std, metrics=result, backbone=trainable.backbone)
        result["run_dir"] = str(out_dir)
    log_result(trackers, result, step=len(list(lrs)) * iterations,
               exports=[out_dir / HEAD_FILE, out_dir / BACKBONE_FILE] if out_dir else [])
    return result


def _curve_summary(curve: Sequence[float], points: int = 10) -> dict[str, list]:
    """The training loss at ``points`` evenly spaced steps, each the mean of the steps since the last
    point (a smoothed curve, small enough for the metrics JSON)."""
    if not curve:
        return {"step": [], "loss": []}
    edges = np.linspace(0, len(curve), min(points, len(curve)) + 1).round().astype(int)
    return {"step": [int(e) for e in edges[1:]],
            "loss": [round(float(np.mean(curve[a:b])), 5) for a, b in zip(edges[:-1], edges[1:])]}


def save_run(out_dir: Path, *, spec: ModelSpec, data: SegData, head: nn.Module, mean: Sequence[float],
             std: Sequence[float], metrics: dict, backbone: nn.Module | None = None) -> None:
    """The run directory; ``backbone`` (fine-tuning modes) saves the trained backbone weights too."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    if backbone is not None:
        with atomic_output(out_dir / BACKBONE_FILE, suffix=".safetensors") as tmp:
            save_file({k: v.detach().contiguous() for k, v in backbone.state_dict().items()}, str(tmp))
    record = {"model": {**asdict(spec), "backbone": str(Path(spec.backbone).resolve()) if spec.backbone else None},
              "tile": data.tile, "bands": data.bands, "class_values": data.class_values, "class_names": data.class_names,
              "ignore_index": data.ignore_index, "seed": int(metrics.get("seed", 0)), "mean": list(mean), "std": list(std), "in_channels": data.in_channels}
    with atomic_output(out_dir / HEAD_FILE, suffix=".safetensors") as tmp:
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(tmp))
    atomic_write_text(out_dir / RUN_FILE, json.dumps(record, indent=2) + "\n")
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")


def load_run(run_dir: Path) -> tuple[nn.Module, nn.Module, dict]:
    """(features, head, record) of a saved segmentation run."""
    from safetensors.torch import load_file

    record_path = Path(run_dir) / RUN_FILE
    if not record_path.is_file():
        raise ConfigError(f"--checkpoint {run_dir}: no {RUN_FILE} (is it an `eval seg --out-dir` run?)")
    record = json.loads(record_path.read_text())
    model = record["model"]
    spec = ModelSpec(name=model["name"], kind=model["kind"], backbone=model["backbone"], decoder=model["decoder"],
                     expand_bands=model.get("expand_bands"),
                     knn_k=int(model.get("knn_k", 20)), guided_filter=int(model.get("guided_filter", 0)),
                     train_backbone=str(model.get("train_backbone", "none")), layer_decay=float(model.get("layer_decay", 1.0)))
    features, head, _ = build_model(spec, data_channels=int(record["in_channels"]), num_classes=len(record["class_values"]),
                                   seed=int(record.get("seed", 0)))
    head.load_state_dict(load_file(str(Path(run_dir) / HEAD_FILE)))
    if spec.train_backbone != "none":  # the fine-tuned backbone replaces the export's weights
        features.backbone.load_state_dict(load_file(str(Path(run_dir) / BACKBONE_FILE)))
    return features.eval(), head.eval(), record
