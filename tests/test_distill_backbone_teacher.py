"""Distillation from a backbone-only teacher (issue 19 item 5): ``distill --teacher <backbone
file>`` runs head-free feature distillation (distill.method=features) through the same loop;
a patch-16 teacher teaches a patch-14 student and the reverse (the teacher's patch map is
resampled onto the student's grid); bad input fails with one line; the released-weight recipes
load and plan. The teachers are random exports: these tests are about the machinery; the
learning evidence is benchmarks/distill_released.py (results in benchmarks/results/distill_released_cpu*.json)."""
from __future__ import annotations

import json

import pytest
import torch

from dinov2_repro.backbone_file import load_backbone, save_backbone
from dinov2_repro.config import CONFIG_DIR, ConfigError
from dinov2_repro.distill import DistillMetaArch, load_distill_config, run_distillation, student_export_path
from dinov2_repro.distill.features import resample_patch_tokens, teacher_sized
from dinov2_repro.models import available_archs, build_vit
from dinov2_repro.train.metrics import read_metrics
from test_train import image_root  # noqa: F401 (the micro image folder fixture)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Backbone-only vit_micro exports with patch 16 and patch 14 (the DINOv2 ViT with another patch
    size: the distillation code only reads patch_size and the token outputs)."""
    root = tmp_path_factory.mktemp("backbone_teachers")
    torch.manual_seed(7)
    return {patch: save_backbone(build_vit("vit_micro", patch_size=patch, img_size=4 * patch, init_values=1.0),
                                 root / f"teacher_p{patch}.safetensors") for patch in (14, 16)}


def features_cfg(teacher, out_dir, image_root, *, student_patch=14, extra=()):
    size = 2 * student_patch  # a 2x2 student grid on global crops, 1x1 on local crops
    return load_distill_config(CONFIG_DIR / "distill" / "tiny_cpu.yaml", [
        f"crops.global_crops_size={size}", f"crops.local_crops_size={size // 2}", "crops.local_crops_number=2",
        "train.batch_size_per_gpu=4", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=1", "optim.warmup_epochs=0",
        "train.num_workers=0", "train.tensorboard=false", "train.log_period_iterations=1",
        f"student.patch_size={student_patch}", "distill.students=[vit_micro]",
        f"train.dataset_path=ImageFolder:root={image_root}", f"train.output_dir={out_dir}", *extra], teacher=teacher)


# ---- resampling ------------------------------------------------------------------------------------
def test_resample_patch_tokens_keeps_maps_and_shapes():
    ramp = torch.linspace(0, 1, 7).repeat(7, 1)  # a horizontal ramp on a 7x7 grid (patch 16 on 112 px)
    tokens = torch.stack([ramp, 2 * ramp.T], dim=-1).reshape(1, 49, 2)
    out = resample_patch_tokens(tokens, (7, 7), (8, 8))  # onto the patch-14 grid of the same 112 px
    assert out.shape == (1, 64, 2)
    grid = out.reshape(8, 8, 2)
    assert torch.all(grid[:, 1:, 0] >= grid[:, :-1, 0]) and torch.all(grid[1:, :, 1] >= grid[:-1, :, 1])
    assert abs(float(grid[..., 0].mean()) - 0.5) < 1e-5  # the ramp's mean is kept
    constant = torch.full((2, 16, 3), 0.25)
    assert torch.allclose(resample_patch_tokens(constant, (4, 4), (3, 3)), torch.full((2, 9, 3), 0.25))
    assert resample_patch_tokens(tokens, (7, 7), (7, 7)) is tokens
    with pytest.raises(ValueError, match="do not fill"):
        resample_patch_tokens(tokens, (8, 8), (7, 7))


def test_teacher_input_is_resized_to_its_patch_multiple():
    crops = torch.rand(2, 3, 56, 56)
    assert teacher_sized(crops, 14) is crops
    assert teacher_sized(crops, 16).shape[-2:] == (64, 64)  # 3.5 patches -> 4
    assert teacher_sized(torch.rand(1, 3, 28, 28), 16).shape[-2:] == (32, 32)


# ---- one run per direction ------------------------------------------------------------------------
@pytest.mark.slow
def test_patch16_teacher_distils_into_patch14_student(teachers, image_root, tmp_path, one_torch_thread):  # noqa: F811
    cfg = features_cfg(teachers[16], tmp_path / "run", image_root)
    assert cfg.distill.method == "features" and cfg.distill.teacher_patch_size == 16
    run_distillation(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["total_loss"])) for r in rows)
    student, meta = load_backbone(student_export_path(tmp_path / "run", "vit_micro"))
    assert meta["patch_size"] == 14 and meta["distilled_from"] == str(teachers[16].resolve())
    assert meta["mean"] == load_backbone(teachers[16])[1]["mean"]


def test_patch14_teacher_steps_a_patch16_student(teachers, image_root, tmp_path, one_torch_thread):  # noqa: F811
    """One step of the meta-arch (the reverse direction): losses on both crop sets, gradients reach
    every student part and only the students and their EMA change."""
    cfg = features_cfg(teachers[14], tmp_path, image_root, student_patch=16, extra=["distill.feature_loss=smooth_l1"])
    model = DistillMetaArch(cfg)
    assert set(model.clip_parts()) == {"vit_micro/backbone", "vit_micro/cls_proj", "vit_micro/patch_proj"}
    batch = {"collated_global_crops": torch.rand(4, 3, 32, 32), "collated_local_crops": torch.rand(4, 3, 16, 16)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, terms = model.compute_losses(batch, {"teacher_temp": 0.07})
    loss.backward()
    assert torch.isfinite(loss) and {"vit_micro/cls_feature_loss", "vit_micro/patch_feature_loss"} <= set(terms)
    assert all(p.grad is None for p in model.teacher.parameters())
    for part in ("cls_proj", "patch_proj", "backbone"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.students["vit_micro"][part].parameters()), part
    torch.optim.SGD(model.trainable().parameters(), lr=0.1).step()
    model.after_optimizer_step({"mom": 0.5})
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"students", "ema"}, changed


def test_multicrop_cls_targets_pair_every_student_crop_with_both_teacher_globals(teachers, image_root, tmp_path):  # noqa: F811
    """distill.feature_cls_targets=global_crops: the CLS loss is the mean over (student crop view,
    teacher global view) pairs of the same image (hand-computed here); the teacher reads the
    global crops only."""
    from dinov2_repro.distill.features import feature_loss, multicrop_cls_loss

    student, teacher = torch.randn(4 * 3, 8), torch.randn(2 * 3, 8)  # 4 student views, 2 teacher views, 3 images
    expected = sum(feature_loss(student[3 * v:3 * v + 3], teacher[3 * t:3 * t + 3], "cosine")
                   for v in range(4) for t in range(2)) / 8
    assert torch.allclose(multicrop_cls_loss(student, teacher, 3, "cosine"), expected)
    # A mismatched pairing (image i against image j != i) must not give the same value.
    assert not torch.allclose(multicrop_cls_loss(student, teacher.roll(1, 0), 3, "cosine"), expected)

    cfg = features_cfg(teachers[14], tmp_path, image_root, extra=["distill.feature_cls_targets=global_crops"])
    model = DistillMetaArch(cfg)
    seen = []
    model.teacher.backbone.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[-1]))
    batch = {"collated_global_crops": torch.rand(4, 3, 28, 28), "collated_local_crops": torch.rand(4, 3, 14, 14)}
    loss, terms = model.compute_losses(batch, {"teacher_temp": 0.07})
    loss.backward()
    assert torch.isfinite(loss) and seen == [28]
    with pytest.raises(ConfigError, match="feature_cls_targets='local' unknown"):
        features_cfg(teachers[14], tmp_path / "bad", image_root, extra=["distill.feature_cls_targets=local"])


# ---- checks before any work ---------------------------------------------------------------------
def test_backbone_teacher_config_errors(teachers, image_root, tmp_path):  # noqa: F811
    def check(teacher, *extra, student_patch=14):
        return features_cfg(teacher, tmp_path / "out", image_root, student_patch=student_patch, extra=extra)

    with pytest.raises(ConfigError, match="distill.method=features needs a backbone file"):
        check(tmp_path, "distill.method=features")
    with pytest.raises(ConfigError, match="needs the heads"):
        check(teachers[16], "distill.method=heads")
    with pytest.raises(ConfigError, match="teacher_patch_size=14 but the teacher file"):
        check(teachers[16], "distill.teacher_patch_size=14")
    with pytest.raises(ConfigError, match="feature_loss='l2' unknown"):
        check(teachers[16], "distill.feature_loss=l2")
    with pytest.raises(ConfigError, match="train.freeze_backbone_iterations=5 is a continued-pretraining setting"):
        check(teachers[16], "train.freeze_backbone_iterations=5")
    with pytest.raises(ConfigError, match="must be a multiple of student 'vit_micro'"):
        check(teachers[14], "crops.global_crops_size=28", "crops.local_crops_size=14", student_patch=16)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(teachers[16].read_bytes()[:100])
    with pytest.raises(ConfigError, match="distill.teacher=.*truncated.safetensors: cannot read the backbone file"):
        check(truncated)


def test_cli_distill_names_a_bad_teacher_file(image_root, tmp_path, capsys):  # noqa: F811
    from dinov2_repro.cli import main

    bad = tmp_path / "teacher.safetensors"
    bad.write_bytes(b"\x00" * 64)
    code = main(["distill", "--config-file", str(CONFIG_DIR / "distill" / "tiny_cpu.yaml"), "--teacher", str(bad),
                 f"train.output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(bad) in err[0], err


# ---- recipes and the planner -------------------------------------------------------------------------
def test_released_dinov2_recipe_loads_and_checks_the_teacher(teachers, tmp_path):
    from dinov2_repro.distill.config import merge_distill_config, student_specs

    path = CONFIG_DIR / "distill" / "dinov2_vitg14_to_vitb14_released.yaml"
    cfg = merge_distill_config(path)
    assert cfg.distill.method == "features" and [s.section.arch for s in student_specs(cfg)] == ["vit_base"]
    assert cfg.train.batch_size_per_gpu * 128 == 2048 and cfg.distill.teacher_embed_dim == 1536
    with pytest.raises(ConfigError, match="teacher_arch=.vit_giant2. but the teacher file"):  # not the ViT-g: refused
        load_distill_config(path, [f"train.output_dir={tmp_path}"], teacher=teachers[16])


@pytest.mark.slow
def test_plan_traces_feature_distillation(tmp_path, one_torch_thread):
    """The planner's stand-in teacher for a backbone-only teacher (a training YAML describes it):
    one teacher forward, a student step, the projections in the student's parameters."""
    from dinov2_repro.cli import main

    out = tmp_path / "plan.json"
    code = main(["plan", "--config-file", str(CONFIG_DIR / "distill" / "tiny_cpu.yaml"), "--teacher-config",
                 str(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml"), "--gpus-per-node", "1", "--mfu", "0.5",
                 "--out", str(out), "distill.method=features", "student.arch=vit_micro", "crops.global_crops_size=28",
                 "crops.local_crops_size=14", "crops.local_crops_number=2", "train.batch_size_per_gpu=2",
                 "distill.students=[vit_micro]", "student.patch_size=14"])
    assert code == 0
    flops = json.loads(out.read_text())["flops_per_gpu_step"]
    assert flops["teacher_forward"] > 0 and flops["student_backward"] > 0


@pytest.mark.skipif(not {"vitl16", "vits16"} <= set(available_archs()),
                    reason="the DINOv3 archs vitl16/vits16 come with the DINOv3 model (issue 19 item 2); enable after it is merged")
@pytest.mark.slow
def test_plan_traces_the_dinov3_sat_recipe(tmp_path, one_torch_thread):
    from dinov2_repro.cli import main

    out = tmp_path / "plan.json"
    code = main(["plan", "--config-file", str(CONFIG_DIR / "distill" / "dinov3_vitl16_sat_to_vits16.yaml"),
                 "--gpus-per-node", "8", "--nodes", "2", "--out", str(out)])
    assert code == 0 and json.loads(out.read_text())["flops_per_gpu_step"]["teacher_forward"] > 0
