"""The label-efficiency benchmark's model grid and its figure (benchmarks/seg_label_efficiency.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("seg_label_efficiency", ROOT / "benchmarks" / "seg_label_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_covers_every_decoder_mode_and_baseline():
    bench = _benchmark()
    panels = bench.model_specs("tiny.safetensors", finetune_modes=["last:2", "all"], layer_decay=0.75)
    specs = {s.name: s for group in panels.values() for s in group}
    trained = [s for s in specs.values() if s.kind == "vit"]
    assert {s.decoder for s in trained if s.train_backbone == "none"} == {"knn", "linear", "unet", "upernet", "dpt"}
    assert {s.train_backbone for s in trained if s.decoder == "linear"} == {"none", "last:2", "all"}
    assert all(s.layer_decay == 0.75 for s in trained if s.train_backbone != "none")
    # the random-init baseline rebuilds the export's own architecture (LayerScale from its header)
    assert {s.decoder for s in specs.values() if s.kind == "random_init"} == {"knn", "linear"}
    assert all(s.backbone == "tiny.safetensors" for s in specs.values() if s.kind != "spectral")
    assert "spectral" in {s.kind for s in specs.values()}
    # every panel holds the frozen trained linear row, the reference the others are read against
    assert all("trained linear" in [s.name for s in group] for group in list(panels.values())[1:])


def test_grid_default_is_the_full_experiment():
    defaults = _benchmark().build_parser().parse_args([])
    assert (defaults.n_labelled, defaults.seeds, defaults.iterations) == ("1,2,5,all", "0,1,2", 200)
    assert defaults.backbone is None  # pretrains the tiny recipe unless told to reuse an export


def test_figure_draws_one_panel_per_group_with_bands(tmp_path):
    pytest.importorskip("matplotlib")
    from dinov2_repro.eval.visualize import plot_label_efficiency

    def model(base):
        return {"runs": {str(n): {"miou_mean": base + n / 100, "miou_min": base, "miou_max": base + n / 50}
                         for n in (1, 2, 5)}}

    result = {"data": "toy", "tile_px": 28, "seeds": [0, 1, 2], "models": {"a": model(0.1), "b": model(0.2), "c": model(0.3)}}
    path = plot_label_efficiency(result, tmp_path / "le.png", panels={"first": ["a", "b"], "second": ["a", "c"]})
    from PIL import Image

    width, height = Image.open(path).size
    assert width > 1.6 * height  # two panels side by side
    single = plot_label_efficiency(result, tmp_path / "single.png")
    assert Image.open(single).size[0] < width
    with pytest.raises(KeyError):
        plot_label_efficiency(result, tmp_path / "bad.png", panels={"x": ["missing"]})


def test_merging_seed_parts_recomputes_the_band():
    from dinov2_repro.eval.segmentation.label_efficiency import merge_label_efficiency

    def part(seed, miou):
        return {"task": "seg_label_efficiency", "seeds": [seed], "n_labelled": [1, 35],
                "models": {"m": {"kind": "vit", "seconds": 2.0, "cpu_seconds": 1.0,
                                 "runs": {str(n): {"miou": {str(seed): miou + n / 100}, "pixel_accuracy": {str(seed): 0.5},
                                                   "miou_mean": miou + n / 100} for n in (1, 35)}}}}

    merged = merge_label_efficiency([part(2, 0.3), part(0, 0.1), part(1, 0.2)])
    assert merged["seeds"] == [0, 1, 2]
    run = merged["models"]["m"]["runs"]["1"]
    assert list(run["miou"]) == ["0", "1", "2"]
    assert (run["miou_min"], run["miou_max"]) == pytest.approx((0.11, 0.31))
    assert run["miou_mean"] == pytest.approx(0.21)
    assert merged["models"]["m"]["cpu_seconds"] == 3.0 and merged["models"]["m"]["seconds"] == 6.0
