"""ONNX export: the exported graphs run in onnxruntime and match the torch models (fp32, <= 1e-4),
at the export's shape, at another batch size and, for backbones, at another image size.
Every test that exports is marked slow (each export takes 5-10 s of CPU); `make test` runs them."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dinov2_repro.backbone_file import load_backbone, save_backbone
from dinov2_repro.cli import main
from dinov2_repro.models import DinoV3VisionTransformer, DinoVisionTransformer
from dinov2_repro.models.vision_transformer import resample_pos_embed
from dinov2_repro.onnx_export.bicubic import resample_pos_embed_traceable

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4


def _visible(model: torch.nn.Module) -> torch.nn.Module:
    """Large pos-embed, tokens and LayerScale, so a wrong resampling or token order shows in the outputs
    (the default init keeps them near zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("pos_embed", "cls_token", "register_tokens", "gamma")):
                param.normal_(0.0, 0.5)
    return model.eval()


def _session(path: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _cli_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------- pos-embed resampling
@pytest.mark.parametrize("antialias,offset", [(False, 0.1), (False, 0.0), (True, 0.0), (True, 0.1)])
def test_traceable_resampling_is_torch_bicubic(antialias, offset):
    torch.manual_seed(0)
    side = 6
    pos = torch.randn(1, 1 + side * side, 8)
    worst = 0.0
    for grid in [(side, side), (side, 4), (3, 3), (9, 13), (side, 11), (1, 2), (20, 7)]:
        ours = resample_pos_embed_traceable(pos, *grid, antialias=antialias, offset=offset)
        torchs = resample_pos_embed(pos, grid, antialias=antialias, offset=offset)
        assert ours.shape == torchs.shape
        worst = max(worst, (ours - torchs).abs().max().item())
    assert worst < 1e-5, worst
    # It must be able to fail: the other kernel is visibly different.
    other = resample_pos_embed_traceable(pos, 9, 13, antialias=not antialias, offset=offset)
    assert (other - resample_pos_embed(pos, (9, 13), antialias=antialias, offset=offset)).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ backbones
@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory) -> Path:
    # Registers, antialiased resampling without offset: the released register models' setting.
    model = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=1, num_heads=2, num_register_tokens=2,
                                  interpolate_antialias=True, interpolate_offset=0.0)
    return save_backbone(_visible(model), tmp_path_factory.mktemp("v2") / "backbone.safetensors", arch="custom",
                         mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))


@pytest.mark.slow  # one export: 5-10 s of CPU
def test_dinov2_backbone_export_matches_torch_at_other_batch_and_size(dinov2_file, tmp_path, capsys):
    out = tmp_path / "backbone.onnx"
    report = _cli_json(capsys, "export", "--format", "onnx", "--backbone", str(dinov2_file), "--out", str(out))
    assert report["dynamic_axes"] == {"batch": True, "height": True, "width": True}
    shapes = [tuple(c["input_shape"]) for c in report["checks"]]
    assert shapes == [(2, 3, 56, 56), (3, 3, 56, 56), (1, 3, 70, 84)]
    assert report["max_abs_diff"] <= TOL

    # Checked here too, not only by the command's own report: a size it did not try, non-square.
    backbone, _ = load_backbone(dinov2_file)
    images = torch.randn(4, 3, 42, 98)
    with torch.no_grad():
        features = backbone.forward_features(images)
    cls, patches = _session(out).run(["cls_token", "patch_tokens"], {"images": images.numpy()})
    assert patches.shape == (4, 3 * 7, 32)
    assert np.abs(cls - features["x_norm_clstoken"].numpy()).max() <= TOL
    assert np.abs(patches - features["x_norm_patchtokens"].numpy()).max() <= TOL
    assert features["x_norm_patchtokens"].std() > 0.1  # outputs carry signal: equality is not trivial

    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["patch_size"] == "14" and json.loads(meta["mean"]) == [0.4, 0.4, 0.4]


@pytest.mark.slow  # one export: 5-10 s of CPU
def test_dinov3_backbone_with_rope_exports_with_dynamic_size(tmp_path, capsys):
    model = _visible(DinoV3VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                             num_register_tokens=2))
    path = save_backbone(model, tmp_path / "v3.safetensors", arch="custom", mean=(0.5,) * 3, std=(0.25,) * 3)
    out = tmp_path / "v3.onnx"
    report = _cli_json(capsys, "export", "--format", "onnx", "--backbone", str(path), "--out", str(out),
                       "--image-size", "48,64")
    assert [c["input_shape"] for c in report["checks"]] == [[2, 3, 48, 64], [3, 3, 48, 64], [1, 3, 64, 96]]
    assert report["max_abs_diff"] <= TOL
    # RoPE tables of a grid the export never saw, against the torch model.
    images = torch.randn(2, 3, 80, 32)
    with torch.no_grad():
        want = model.forward_features(images)["x_norm_patchtokens"].numpy()
    (got,) = _session(out).run(["patch_tokens"], {"images": images.numpy()})
    assert np.abs(got - want).max() <= TOL


@pytest.mark.slow
def test_fixed_size_export_keeps_the_batch_dynamic(dinov2_file, tmp_path, capsys, monkeypatch):
    from dinov2_repro.onnx_export import graph

    monkeypatch.setattr(graph, "EXTERNAL_DATA_BYTES", 0)  # the large-model layout: weights in FILE.onnx.data
    out = tmp_path / "fixed.onnx"
    report = _cli_json(capsys, "export", "--format", "onnx", "--backbone", str(dinov2_file), "--out", str(out),
                       "--fixed-size", "--image-size", "28")
    assert report["dynamic_axes"] == {"batch": True, "height": False, "width": False}
    assert [c["input_shape"] for c in report["checks"]] == [[2, 3, 28, 28], [3, 3, 28, 28]]
    assert report["max_abs_diff"] <= TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx", "fixed.onnx.data"]  # no staging left over
    with pytest.raises(Exception):  # another size is refused by the runtime, not silently wrong
        _session(out).run(None, {"images": np.zeros((1, 3, 42, 42), dtype=np.float32)})


# -------------------------------------------------------------------------------------- segmentation
@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> Path:
    """A saved `eval seg` run (U-Net decoder on 4 blocks, BatchNorm statistics made non-trivial) as save_run writes it."""
    from dinov2_repro.eval.segmentation.train import ModelSpec, build_model, save_run

    root = tmp_path_factory.mktemp("seg")
    backbone = save_backbone(_visible(DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=4, num_heads=2)),
                             root / "backbone.safetensors", arch="custom", mean=(0.5,) * 3, std=(0.25,) * 3)
    spec = ModelSpec(name="vit", kind="vit", backbone=str(backbone), decoder="unet")
    features, head, _ = build_model(spec, data_channels=3, num_classes=3)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    data = SimpleNamespace(tile=28, bands=[1, 2, 3], class_values=[1, 2, 5], class_names=["a", "b", "c"],
                           ignore_index=255, in_channels=3)
    run = root / "run"
    save_run(run, spec=spec, data=data, head=head, mean=[0.4] * 3, std=[0.2] * 3, metrics={})
    return run


@pytest.mark.slow  # one export: 5-10 s of CPU
def test_segmentation_run_exports_normalisation_backbone_and_head(seg_run, tmp_path, capsys):
    from dinov2_repro.eval.segmentation.train import load_run, normalise

    out = tmp_path / "seg.onnx"
    report = _cli_json(capsys, "predict", "seg", "--checkpoint", str(seg_run), "--export-onnx", str(out))
    assert [c["input_shape"] for c in report["checks"]] == [[2, 3, 28, 28], [3, 3, 28, 28]]
    assert report["max_abs_diff"] <= TOL

    # As predict seg computes a window's logits: scaled bands -> normalise -> features -> head.
    features, head, record = load_run(seg_run)
    tiles = torch.rand(5, 3, 28, 28)
    with torch.no_grad():
        want = head(features(normalise(tiles, record["mean"], record["std"])), (28, 28)).numpy()
    (got,) = _session(out).run(["logits"], {"images": tiles.numpy()})
    assert got.shape == (5, 3, 28, 28)
    assert np.abs(got - want).max() <= TOL and want.std() > 0.1


# --------------------------------------------------------------------------------------- user errors
def test_missing_onnx_packages_are_one_line_exit_2(dinov2_file, tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    assert main(["export", "--format", "onnx", "--backbone", str(dinov2_file), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onnxruntime" in err and "pip install" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("argv,message", [
    (["--format", "onnx", "--out", "{tmp}/m.onnx"], "one of --backbone"),
    (["--format", "onnx", "--backbone", "{bb}", "--out", "{tmp}/m.txt"], ".onnx"),
    (["--format", "onnx", "--backbone", "{bb}", "--out", "{tmp}/m.onnx", "--image-size", "30"], "multiples of the patch"),
    (["--format", "onnx", "--backbone", "{bb}", "--out", "{bb}"], "refusing to overwrite"),
    (["--checkpoint", "{tmp}", "--out", "{tmp}/m.safetensors", "--image-size", "28"], "only apply to --format onnx"),
])
def test_export_option_mistakes_are_one_line_exit_2(dinov2_file, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, bb=dinov2_file) for a in argv]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_predict_seg_without_scene_or_export_is_exit_2(tmp_path, capsys):
    assert main(["predict", "seg", "--checkpoint", str(tmp_path)]) == 2
    assert "--export-onnx" in capsys.readouterr().err
    assert main(["predict", "seg", "--checkpoint", str(tmp_path), "--export-onnx", str(tmp_path / "m.onnx"),
                 "--scene", str(tmp_path / "s.tif")]) == 2  # --scene without --out: refused before exporting
    assert "go together" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_checkpoint_export_exports_the_checkpoints_teacher(tmp_path, capsys, monkeypatch):
    """From a training checkpoint (random micro weights, as the loop writes them) instead of a backbone
    file: the command hands the checkpoint's teacher backbone and its config's normalisation to the
    same export as a backbone file (exported and checked above; not repeated, to save 20 s)."""
    from omegaconf import OmegaConf

    import dinov2_repro.onnx_export.backbone as onnx_backbone
    from dinov2_repro.config import CONFIG_DIR, load_config
    from dinov2_repro.train.checkpoint import save_checkpoint
    from dinov2_repro.train.meta_arch import SSLMetaArch
    from dinov2_repro.train.optim import build_optimizer

    heads = [f"{k}.{key}={v}" for k in ("dino", "ibot") for key, v in (("head_n_prototypes", 64), ("head_hidden_dim", 64),
                                                                        ("head_bottleneck_dim", 32))]
    cfg = load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", ["student.arch=vit_micro", "crops.global_crops_size=28",
                                                                   "crops.local_crops_size=14", *heads,
                                                                   f"train.output_dir={tmp_path / 'run'}"])
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    _visible(model.teacher.backbone)
    optimizer = build_optimizer(model.param_groups(), betas=(0.9, 0.999), fused=False, device=torch.device("cpu"))
    save_checkpoint(tmp_path / "run", 1, model=model, optimizer=optimizer,
                    meta={"world_size": 1, "config": OmegaConf.to_container(cfg, resolve=True)})
    seen = {}

    def fake_export(backbone, out, **kwargs):
        seen.update(backbone=backbone, out=out, **kwargs)
        return {"onnx": str(out), "max_abs_diff": 0.0}

    monkeypatch.setattr(onnx_backbone, "export_backbone_onnx", fake_export)
    out = tmp_path / "teacher.onnx"
    _cli_json(capsys, "export", "--format", "onnx", "--checkpoint", str(tmp_path / "run"), "--out", str(out),
              "--image-size", "28", "--fixed-size")
    exported = seen["backbone"].state_dict()
    for key, value in model.teacher.backbone.state_dict().items():
        assert torch.equal(exported[key], value), key
    assert not torch.equal(exported["pos_embed"], model.student.backbone.state_dict()["pos_embed"])  # not the student
    assert seen["header"]["arch"] == "vit_micro" and seen["header"]["mean"] == list(cfg.crops.mean)
    assert seen["image_size"] == (28, 28) and seen["dynamic_size"] is False
