"""Label-efficiency curves: the same n labelled training tiles (drawn per seed, shared by every
model) train a head per model; test mIoU vs n, mean and spread over seeds (evaluation.md)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...config import ConfigError
from ...io.files import atomic_write_text
from .data import SPLITS
from .train import (ModelSpec, ObjectOptions, SegData, build_model, cached_features, check_tile, evaluate_head,
                    fresh_head, input_normalisation, normalise, resolve_loss, train_head)


def parse_n_labelled(text: str) -> list[int | None]:
    """'2,4,8,all' -> [2, 4, 8, None] (None = every training tile)."""
    values: list[int | None] = []
    for item in text.split(","):
        item = item.strip()
        if item == "all":
            values.append(None)
        elif item.isdigit() and int(item) > 0:
            values.append(int(item))
        else:
            raise ConfigError(f"--n-labelled {text}: {item!r} is neither a positive integer nor 'all'")
    return values


def label_subsets(n_train: int, n_values: Sequence[int | None], seeds: Sequence[int]) -> dict[tuple[int, int], list[int]]:
    """{(n, seed): tile indices}: drawn from the tile count alone, so every model gets the same subsets.
    n larger than the training split means all tiles (reported as the real n)."""
    subsets = {}
    for n in n_values:
        count = n_train if n is None else min(n, n_train)
        for seed in seeds:
            order = np.random.default_rng(seed).permutation(n_train)
            subsets[(count, seed)] = sorted(order[:count].tolist())
    return subsets


def _summarise(entry: dict[str, Any]) -> None:
    """Mean, std, min and max of an (n) entry's per-seed test mIoU."""
    values = np.array(list(entry["miou"].values()))
    entry.update(miou_mean=float(values.mean()), miou_std=float(values.std()),
                 miou_min=float(values.min()), miou_max=float(values.max()))


def merge_label_efficiency(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from results of the same data run on separate seeds and/or models (e.g. in
    parallel processes): per-seed values joined, seed statistics recomputed, seconds summed."""
    if not parts:
        raise ValueError("nothing to merge")
    merged = {key: value for key, value in parts[0].items() if key not in ("models", "outputs")}
    merged["seeds"] = sorted({seed for part in parts for seed in part["seeds"]})
    merged["n_labelled"] = sorted({n for part in parts for n in part["n_labelled"]})
    models: dict[str, Any] = {}
    for part in parts:
        for name, model in part["models"].items():
            target = models.setdefault(name, {**{k: v for k, v in model.items() if k not in ("runs", "seconds", "cpu_seconds")},
                                              "runs": {}, "seconds": 0.0, "cpu_seconds": 0.0})
            target["seconds"] = round(target["seconds"] + model["seconds"], 1)
            target["cpu_seconds"] = round(target["cpu_seconds"] + model.get("cpu_seconds", 0.0), 1)
            for n, run in model["runs"].items():
                entry = target["runs"].setdefault(n, {})
                for key, per_seed in run.items():
                    if isinstance(per_seed, dict):
                        entry.setdefault(key, {}).update(per_seed)
    for model in models.values():
        model["runs"] = {n: model["runs"][n] for n in sorted(model["runs"], key=int)}
        for entry in model["runs"].values():
            entry.update({key: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for key, v in entry.items()})
            _summarise(entry)
    merged["models"] = models
    return merged


def run_label_efficiency(specs: Sequence[ModelSpec], data: SegData, *, n_values: Sequence[int | None], seeds: Sequence[int],
                         lr: float = 1e-3, iterations: int = 200, batch_size: int = 8, out_dir: Path | None = None,
                         progress: bool = True, loss: str | None = None, class_weights: str | None = None,
                         objects: ObjectOptions = ObjectOptions()) -> dict[str, Any]:
    """Train every (model, n, seed) head on cached features; JSON (and PNG) under ``out_dir``.
    The loss (``--loss`` or the automatic rule) is chosen once from all training tiles, so every
    subset and model trains with the same one."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be unique, got {names}")
    subsets = label_subsets(len(data.labels["train"]), n_values, seeds)
    choice = resolve_loss(data, loss=loss, class_weights=class_weights)
    loss_fn = choice.build(num_classes=data.num_classes, ignore_index=data.ignore_index)
    counts = sorted({n for n, _ in subsets})
    common = dict(num_classes=data.num_classes, ignore_index=data.ignore_index, class_names=data.class_names, objects=objects)
    models: dict[str, Any] = {}
    jobs = [(n, seed) for n in counts for seed in seeds]
    built = []
    for spec in specs:  # every model is built and checked before the first head trains
        features, _, meta = build_model(spec, data_channels=data.in_channels, num_classes=data.num_classes)
        check_tile(features, data, spec)
        built.append((spec, features, meta))
    for spec, features, meta in built:
        started, cpu_started = time.perf_counter(), time.process_time()
        mean, std = input_normalisation(meta, data.images["train"])
        finetune = spec.train_backbone != "none"  # features recomputed every step, never cached
        if finetune:
            images = {s: normalise(data.images[s], mean, std) for s in ("train", "test")}
        else:
            feats = {s: cached_features(features, normalise(data.images[s], mean, std)) for s in ("train", "test")}
        runs: dict[str, Any] = {}
        iterator = jobs
        if progress:
            from tqdm import tqdm

            iterator = tqdm(jobs, desc=f"label efficiency: {spec.name}", leave=False)
        for n, seed in iterator:
            index = subsets[(n, seed)]
            head = fresh_head(spec, features, in_channels=data.in_channels, num_classes=data.num_classes, seed=seed)
            if finetune:
                from .finetune import fresh_features, train_end_to_end, unfreeze

                trainable = unfreeze(features, spec.train_backbone)  # every job starts from the pretrained backbone
                train_end_to_end(trainable, head, images["train"][index], data.labels["train"][index], loss_fn=loss_fn,
                                 ignore_index=data.ignore_index, iterations=iterations, lr=lr, layer_decay=spec.layer_decay,
                                 batch_size=batch_size, seed=seed)
                test = evaluate_head(head, fresh_features(trainable, images["test"]), data.labels["test"], **common)
            else:
                train_head(head, [f[index] for f in feats["train"]], data.labels["train"][index], ignore_index=data.ignore_index,
                           iterations=iterations, lr=lr, batch_size=batch_size, seed=seed, loss_fn=loss_fn)
                test = evaluate_head(head, feats["test"], data.labels["test"], **common)
            entry = runs.setdefault(str(n), {"miou": {}, "pixel_accuracy": {}, "per_class_iou": {}})
            entry["miou"][str(seed)] = test["miou"]
            entry["pixel_accuracy"][str(seed)] = test["pixel_accuracy"]
            entry["per_class_iou"][str(seed)] = test["per_class_iou"]
            for key in ("f1", "recall", "precision"):
                if key in test:
                    entry.setdefault(key, {})[str(seed)] = test[key]
            if "objects" in test:
                entry.setdefault("object_f1", {})[str(seed)] = test["objects"]["object_f1"]
        for entry in runs.values():
            _summarise(entry)
        models[spec.name] = {"kind": spec.kind, "backbone": spec.backbone, "decoder": spec.decoder if spec.kind in ("vit", "random_init") else None,
                             "train_backbone": spec.train_backbone,
                             "runs": runs, "seconds": round(time.perf_counter() - started, 1),
                             "cpu_seconds": round(time.process_time() - cpu_started, 1)}  # wall time alone misleads on a shared machine
    test_support = np.bincount(data.labels["test"][data.labels["test"] != data.ignore_index].numpy(), minlength=data.num_classes)
    result = {"task": "seg_label_efficiency", "metric": "test mIoU", "data": data.data, "tile_px": data.tile,
              "n_labelled": counts, "seeds": list(seeds), "lr": lr, "iterations": iterations, **choice.record(),
              "n_tiles": {s: len(data.labels[s]) for s in SPLITS},
              "test_classes": [name for name, c in zip(data.class_names, test_support) if c > 0],
              "models": models}
    if out_dir is not None:
        from ..visualize import plot_label_efficiency

        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "label_efficiency.json", json.dumps(result, indent=2) + "\n")
        plot_label_efficiency(result, out_dir / "label_efficiency.png")
        result["outputs"] = [str(out_dir / "label_efficiency.json"), str(out_dir / "label_efficiency.png")]
    return result
