"""Continued pretraining from a backbone-only file (issue 19 item 4): ``MODEL.WEIGHTS=<backbone
.safetensors>`` initialises the student and teacher backbones (pos-embed resampled to the run's
grid), the heads start fresh, the backbone stays exactly frozen for
``train.freeze_backbone_iterations`` and then ramps up; bad input fails with one line. The tiny-scale evidence (land-cover probe before/after, naive vs
warm start) is benchmarks/warm_start.py (benchmarks/results/warm_start_cpu.json)."""
from __future__ import annotations

import pytest
import torch

from dinov2_repro.backbone_file import load_backbone, save_backbone
from dinov2_repro.config import ConfigError
from dinov2_repro.models import build_vit
from dinov2_repro.train.checkpoint import load_model_state
from dinov2_repro.train.meta_arch import SSLMetaArch
from dinov2_repro.train.metrics import read_metrics
from dinov2_repro.train.pretrain import run_ssl_training
from dinov2_repro.train.schedules import FrozenThenRamp
from dinov2_repro.train.validate import validate_train_config
from test_train import image_root, micro_cfg  # noqa: F401 (the micro image folder fixture and config)

FREEZE, RAMP = 3, 2


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A backbone-only export of vit_micro made for 56 px (a 4x4 grid; the runs here use 28 px)."""
    torch.manual_seed(123)
    model = build_vit("vit_micro", img_size=56, init_values=1.0)
    return save_backbone(model, tmp_path_factory.mktemp("released") / "backbone.safetensors")


def _backbone_state(path):
    return load_backbone(path)[0].state_dict()


def test_frozen_then_ramp_schedule():
    scale = FrozenThenRamp(frozen_iters=3, ramp_iters=2)
    assert [scale[i] for i in range(7)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    assert [FrozenThenRamp(frozen_iters=0, ramp_iters=0)[i] for i in range(2)] == [1.0, 1.0]


@pytest.mark.slow
def test_warm_start_freezes_then_trains_the_backbone(released, image_root, tmp_path, one_torch_thread):  # noqa: F811
    out = tmp_path / "run"
    cfg = micro_cfg(image_root, out, f"MODEL.WEIGHTS={released}", f"train.freeze_backbone_iterations={FREEZE}",
                    f"train.unfreeze_lr_ramp_iterations={RAMP}", "student.layerscale=1.0")
    run_ssl_training(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["backbone_lr_scale"] for r in rows] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    source = _backbone_state(released)

    def state_at(iteration):
        model = SSLMetaArch(cfg)
        load_model_state(out / "checkpoints" / f"iter_{iteration:08d}", model)
        return model

    frozen, final = state_at(FREEZE), state_at(6)
    for key, value in frozen.student.backbone.state_dict().items():
        expected = source[key]
        if key == "pos_embed":  # resampled from the file's 4x4 grid to the run's 2x2
            assert value.shape[1] == 5 and expected.shape[1] == 17
            assert torch.equal(value[:, 0], expected[:, 0])
            continue
        assert torch.equal(value, expected), f"student.backbone.{key} moved while frozen"
        assert torch.allclose(frozen.teacher.backbone.state_dict()[key], expected, atol=1e-6), key
    # The heads trained during the freeze; the backbone trains after it.
    torch.manual_seed(cfg.train.seed)
    fresh = SSLMetaArch(cfg)
    assert not torch.equal(frozen.student.dino_head.mlp[0].weight, fresh.student.dino_head.mlp[0].weight)
    moved = [k for k, v in final.student.backbone.state_dict().items()
             if k != "mask_token" and k in source and v.shape == source[k].shape and not torch.equal(v, source[k])]
    assert len(moved) > 10, moved


def test_warm_start_config_errors(released, image_root, tmp_path):  # noqa: F811
    def check(*overrides):
        validate_train_config(micro_cfg(image_root, tmp_path / "out", *overrides), check_data=False)

    check(f"MODEL.WEIGHTS={released}", "train.freeze_backbone_iterations=2")  # fine
    with pytest.raises(ConfigError, match="MODEL.WEIGHTS is empty"):
        check("train.freeze_backbone_iterations=2")
    with pytest.raises(ConfigError, match="must be smaller than the run's 6 iterations"):
        check(f"MODEL.WEIGHTS={released}", "train.freeze_backbone_iterations=6")
    with pytest.raises(ConfigError, match="unfreeze_lr_ramp_iterations=-1"):
        check(f"MODEL.WEIGHTS={released}", "train.unfreeze_lr_ramp_iterations=-1")
    with pytest.raises(ConfigError, match=r"patch_size=14 but student.patch_size=16"):
        check(f"MODEL.WEIGHTS={released}", "student.patch_size=16", "crops.global_crops_size=32",
              "crops.local_crops_size=16")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(released.read_bytes()[:200])
    with pytest.raises(ConfigError, match=f"MODEL.WEIGHTS={corrupt}: cannot read the backbone file"):
        check(f"MODEL.WEIGHTS={corrupt}")


def test_backbone_of_another_width_is_refused(image_root, tmp_path):  # noqa: F811
    other = save_backbone(build_vit("vit_tiny", depth=2, img_size=28), tmp_path / "tiny.safetensors")
    cfg = micro_cfg(image_root, tmp_path / "out", f"MODEL.WEIGHTS={other}")
    with pytest.raises(ConfigError, match=r"MODEL.WEIGHTS=.*has embed_dim=192 but student.arch=vit_micro has 96"):
        validate_train_config(cfg, check_data=False)


def test_cli_names_a_bad_weights_file(image_root, tmp_path, capsys):  # noqa: F811
    from dinov2_repro.cli import main

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code = main(["train", "--config-file", "vit_tiny_cpu", f"MODEL.WEIGHTS={bad}", f"train.output_dir={tmp_path / 'o'}",
                 f"train.dataset_path=ImageFolder:root={image_root}", "train.freeze_backbone_iterations=5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(bad) in err[0] and "MODEL.WEIGHTS" in err[0], err
