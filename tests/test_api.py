"""The Python API (dinov2_repro.api): light to import, what each CLI verb calls, structured
results, and a backbone object that embeds images; examples/quickstart.py runs end to end."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_NAMES = ("train", "distill", "curate", "load_backbone", "eval_seg", "predict_seg", "plan")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_import_is_light_and_every_api_name_is_callable() -> None:
    done = _python("import sys, dinov2_repro; heavy = [m for m in ('torch', 'faiss', 'rasterio') if m in sys.modules]; "
                   "print(heavy); import dinov2_repro.train.cli, dinov2_repro.plan.cli; "
                   f"print(all(callable(getattr(dinov2_repro, n)) for n in {API_NAMES!r}))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True"], done.stdout


class Recorder:
    """Stands in for an API function: records the call, returns what the real one would shape."""

    def __init__(self, result: dict) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.result = result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


@pytest.mark.parametrize("argv,name,expected", [
    (["train", "--config-file", "vit_tiny_cpu", "train.max_iterations=3"], "train",
     (("vit_tiny_cpu", ["train.max_iterations=3"]), {})),
    (["distill", "--config-file", "tiny_cpu.yaml", "--teacher", "runs/t", "a.b=1"], "distill",
     (("tiny_cpu.yaml", ["a.b=1"]), {"teacher": "runs/t"})),
    (["curate", "dedup", "--shards", "3", "output_dir=x"], "curate",
     (("dedup", None, ["output_dir=x"]), {"shards": 3, "array_parallelism": None, "from_embeddings": None, "dry_run": False})),
    (["eval", "seg", "--data", "landsat", "--bands", "3,2,1", "--decoder", "linear", "--lrs", "0.1,0.01",
      "--compare", "s=b.safetensors"], "eval_seg",
     (("landsat", None), {"bands": [3, 2, 1], "decoder": "linear", "lrs": [0.1, 0.01], "compare": {"s": "b.safetensors"}})),
    (["predict", "seg", "--checkpoint", "runs/seg", "--scene", "s.tif", "--out", "m.tif", "--tta", "flip"], "predict_seg",
     ((Path("runs/seg"), Path("s.tif"), Path("m.tif")), {"tta": "flip"})),
    (["plan", "--config-file", "configs/train/vitg14.yaml", "--nodes", "4", "--gpu", "h100-80gb", "--mfu", "0.4"], "plan",
     (("configs/train/vitg14.yaml", []), {"nodes": 4, "gpu": "h100-80gb", "mfu": 0.4})),
])
def test_each_verb_calls_its_api_function(argv, name, expected, monkeypatch, tmp_path, capsys) -> None:
    from dinov2_repro import api
    from dinov2_repro.cli import main

    results = {"train": {"iteration": 3}, "distill": {"iteration": 3}, "curate": {"stages": ["dedup"]},
               "eval_seg": {"miou": 0.5}, "predict_seg": {"out": "m.tif"},
               "plan": {"fits": True}}
    recorder = Recorder(results[name])
    monkeypatch.setattr(api, name, recorder)
    if name == "plan":  # the verb prints the plan table and writes plan.json
        monkeypatch.setattr("dinov2_repro.plan.report.format_plan", lambda plan: "PLAN")
        argv = [*argv, "--out", str(tmp_path / "plan.json")]
    assert main(argv) == 0
    assert len(recorder.calls) == 1, f"`dinov2-repro {' '.join(argv)}` did not call api.{name}"
    args, kwargs = recorder.calls[0]
    want_args, want_kwargs = expected
    assert args == want_args
    assert {key: kwargs[key] for key in want_kwargs} == want_kwargs
    if name in ("train", "distill", "curate"):
        assert kwargs["launcher"].launcher == "none"


def test_backbone_embeds_any_image_form(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    import dinov2_repro
    from dinov2_repro.backbone_file import save_backbone
    from dinov2_repro.models.registry import build_vit

    torch.manual_seed(0)
    path = save_backbone(build_vit("vit_tiny", depth=2, img_size=28, patch_size=14, init_values=1.0), tmp_path / "b.safetensors",
                         mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    backbone = dinov2_repro.load_backbone(path)
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28, 3), dtype=np.uint8)
    cls = backbone.embed(pixels)
    assert cls.shape == (3, backbone.embed_dim) and cls.dtype == torch.float32
    as_tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    assert torch.allclose(backbone.embed(as_tensor), cls, atol=1e-5)
    assert torch.allclose(backbone.embed([Image.fromarray(p) for p in pixels]), cls, atol=1e-5)
    # Different images give different features (a constant output would pass the shape checks).
    assert (cls[0] - cls[1]).abs().max() > 1e-3
    patches = backbone.patch_features(pixels, size=56)
    assert patches.shape == (3, 4, 4, backbone.embed_dim)
    # The same numbers as the bare module fed by hand.
    model, meta = dinov2_repro.backbone_file.load_backbone(path)
    x = (as_tensor - 0.4) / 0.2
    with torch.no_grad():
        assert torch.allclose(model(x), cls, atol=1e-5)
    with pytest.raises(ValueError, match="band"):
        backbone.embed(torch.zeros(1, 4, 28, 28))


def test_api_errors_are_config_errors() -> None:
    import dinov2_repro
    from dinov2_repro.config import ConfigError

    with pytest.raises(ConfigError, match="unknown stage"):
        dinov2_repro.curate("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        dinov2_repro.train("no_such_recipe.yaml")


@pytest.mark.slow
def test_quickstart_example_runs(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "tiny" / "export" / "teacher_backbone.safetensors").is_file()
    assert "'cls_shape': [32, 192]" in done.stdout and "'plan_fits': True" in done.stdout, done.stdout[-2000:]
