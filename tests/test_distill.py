"""Distillation at micro scale: the contract, the checks made before any work, resume is
bit-identical, each student of a multi-student job equals the same student trained alone,
and the CLI fails with one line on a bad teacher.

The teachers here are random (a pretraining checkpoint written without training): these tests
are about the machinery; tests/test_distill_learning.py shows that distillation transfers
what a trained teacher learned."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dinov2_repro.config import CONFIG_DIR, ConfigError, load_config
from dinov2_repro.backbone_file import load_backbone
from dinov2_repro.train.checkpoint import last_checkpoint, load_model_state, read_meta, save_checkpoint
from dinov2_repro.train.contract import MetaArch
from dinov2_repro.train.loop import train
from dinov2_repro.train.meta_arch import SSLMetaArch
from dinov2_repro.train.optim import build_optimizer
from dinov2_repro.distill import DistillMetaArch, load_distill_config, student_export_path
from dinov2_repro.distill.run import build_distill_data, build_distill_meta_arch, export_students
from test_train import image_root  # noqa: F401 (the micro image folder fixture)

MICRO_HEADS = [f"{k}.{key}={v}" for k in ("dino", "ibot")
               for key, v in (("head_n_prototypes", 64), ("head_hidden_dim", 64), ("head_bottleneck_dim", 32))]


def micro_teacher_cfg(out_dir, *extra):
    """The SSL config of the micro teachers (28 px global crops: a 2x2 token grid)."""
    return load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        "student.arch=vit_micro", "crops.global_crops_size=28", "crops.local_crops_size=14", *MICRO_HEADS,
        f"train.output_dir={out_dir}", *extra])


def write_teacher_checkpoint(run_dir, *extra, modules=None):
    """A pretraining checkpoint (random weights) as the loop writes it; ``modules`` replaces the meta-arch."""
    cfg = micro_teacher_cfg(run_dir, *extra)
    torch.manual_seed(0)
    model = modules if modules is not None else SSLMetaArch(cfg)
    params = model.param_groups() if hasattr(model, "param_groups") else [
        {"params": list(model.parameters()), "lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": False}]
    optimizer = build_optimizer(params, betas=(0.9, 0.999), fused=False, device=torch.device("cpu"))
    from omegaconf import OmegaConf

    save_checkpoint(run_dir, 1, model=model, optimizer=optimizer,
                    meta={"world_size": 1, "config": OmegaConf.to_container(cfg, resolve=True)})
    return run_dir


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """Softmax centering, shared DINO/iBOT head."""
    return write_teacher_checkpoint(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def sk_teacher_run(tmp_path_factory):
    """Sinkhorn-Knopp centering, separate iBOT head."""
    return write_teacher_checkpoint(tmp_path_factory.mktemp("teacher_sk"), "train.centering=sinkhorn_knopp",
                                    "ibot.separate_head=true")


def distill_cfg(teacher, out_dir, image_root, *extra):
    return load_distill_config(CONFIG_DIR / "distill" / "tiny_cpu.yaml", [
        "crops.global_crops_size=28", "crops.local_crops_size=14", "crops.local_crops_number=2",
        "train.batch_size_per_gpu=4", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=3", "optim.warmup_epochs=1",
        "train.num_workers=0", "train.checkpoint_period_iterations=3", "train.tensorboard=false",
        "train.log_period_iterations=1", "distill.students=[vit_micro]",
        f"train.dataset_path=ImageFolder:root={image_root}", f"train.output_dir={out_dir}", *extra,
    ], teacher=teacher)


# ---- the contract ------------------------------------------------------------------------------
def test_meta_archs_satisfy_the_contract(teacher_run, image_root, tmp_path):
    model = DistillMetaArch(distill_cfg(teacher_run, tmp_path, image_root))
    assert isinstance(model, MetaArch)
    assert set(model.clip_parts()) == {"vit_micro/backbone", "vit_micro/dino_head"}
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert [n for n, p in model.trainable().named_parameters() if not p.requires_grad] == ["vit_micro.backbone.mask_token"]
    ssl = SSLMetaArch(micro_teacher_cfg(tmp_path))
    assert isinstance(ssl, MetaArch)


def test_teacher_loaded_frozen_and_students_get_its_heads(sk_teacher_run, image_root, tmp_path):
    cfg = distill_cfg(sk_teacher_run, tmp_path, image_root, "dino.head_n_prototypes=999",
                      "train.centering=centering")  # softmax centering here: its running centres must update
    assert cfg.dino.head_n_prototypes == 64 and cfg.ibot.separate_head  # taken from the teacher
    model = DistillMetaArch(cfg)
    source = SSLMetaArch(micro_teacher_cfg(tmp_path, "train.centering=sinkhorn_knopp", "ibot.separate_head=true"))
    load_model_state(last_checkpoint(sk_teacher_run), source)
    for key, value in source.teacher.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[key], value), key
    student = model.students["vit_micro"]
    assert student.ibot_head.out_dim == 64 and all(block.drop_path == 0.0 for block in student.backbone.blocks)
    # One step changes the students only.
    batch = next(build_distill_data(cfg, 0, _single_env()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, terms = model.compute_losses(batch, {"teacher_temp": 0.07})
    loss.backward()
    assert torch.isfinite(loss) and {"vit_micro/ibot_loss", "vit_micro/dino_global_crops_loss"} <= set(terms)
    assert all(p.grad is None for p in model.teacher.parameters())
    optimizer = build_optimizer(model.param_groups(), betas=(0.9, 0.999), fused=False, device=torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    optimizer.step()
    model.after_optimizer_step({"mom": 0.5})
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"students", "ema", "dino_center", "ibot_center"}, changed  # the teacher: unchanged


def _single_env():
    from dinov2_repro.distributed import detect_env

    return detect_env()


# ---- checks before any work ------------------------------------------------------------------
def test_teacher_path_errors(teacher_run, image_root, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        distill_cfg(tmp_path / "nowhere", tmp_path / "out", image_root)
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no finished checkpoint"):
        distill_cfg(tmp_path / "empty_run", tmp_path / "out", image_root)
    export = tmp_path / "run" / "export" / "teacher_backbone.safetensors"
    export.parent.mkdir(parents=True)
    export.write_bytes(b"x")
    for path in (export, tmp_path / "run"):
        with pytest.raises(ConfigError, match="needs the heads"):
            distill_cfg(path, tmp_path / "out", image_root, "distill.method=heads")
    # distill.method=auto takes a file for a backbone-only teacher (head-free features): a corrupt one is named.
    with pytest.raises(ConfigError, match="cannot read the backbone file"):
        distill_cfg(export, tmp_path / "out", image_root)
    with pytest.raises(ConfigError, match="--teacher"):
        distill_cfg("", tmp_path / "out", image_root)


def test_checkpoint_without_heads_is_refused(image_root, tmp_path):
    from dinov2_repro.models import build_vit

    headless = torch.nn.ModuleDict({"teacher": torch.nn.ModuleDict({"backbone": build_vit("vit_micro", img_size=28)})})
    run = write_teacher_checkpoint(tmp_path / "headless", modules=headless)
    with pytest.raises(ConfigError, match="no teacher DINO head"):
        distill_cfg(run, tmp_path / "out", image_root)


@pytest.mark.parametrize("override, message", [
    ("distill.teacher_patch_size=16", "teacher_patch_size=16"),
    ("distill.teacher_embed_dim=1536", "teacher_embed_dim=1536"),
    ("distill.teacher_in_chans=6", "teacher_in_chans=6"),
    ("distill.teacher_arch=vit_giant2", "teacher_arch='vit_giant2'"),
    ("distill.students=[{arch: vit_micro, patch_size: 7}]", "token grids"),
    ("distill.students=[{arch: vit_micro, drop_path_rate: 0.1}]", "no stochastic depth"),
    ("distill.students=[vit_micro,vit_micro]", "occur twice"),
    ("distill.students=[vit_huge]", "unknown arch"),
    ("distill.students=[{arch: vit_micro, colour: red}]", "unknown key"),
    ("distill.student=[vit_micro]", "unknown config key"),
])
def test_config_mismatches_are_clear_errors(teacher_run, image_root, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        distill_cfg(teacher_run, tmp_path, image_root, override)


def test_other_patch_size_with_resize_and_larger_student_warns(teacher_run, image_root, tmp_path):
    cfg = distill_cfg(teacher_run, tmp_path, image_root, "distill.resize_student_input=true",
                      "distill.students=[{arch: vit_micro, patch_size: 7, name: p7}]")
    model = DistillMetaArch(cfg)
    batch = next(build_distill_data(cfg, 0, _single_env()))
    loss, _ = model.compute_losses(batch, {"teacher_temp": 0.07})  # a 2x2 grid at 14 px for the student
    assert torch.isfinite(loss) and model.students["p7"].backbone.img_size == 14
    with pytest.warns(UserWarning, match="larger than the teacher"):
        distill_cfg(teacher_run, tmp_path, image_root, "distill.students=[vit_tiny]")


# ---- end to end through the loop -----------------------------------------------------------------
class _Interrupted(Exception):
    pass


def _run(cfg, stop_after=None):
    def build_data(cfg, start_iteration, env):
        for index, batch in enumerate(build_distill_data(cfg, start_iteration, env)):
            if stop_after is not None and start_iteration + index >= stop_after:
                raise _Interrupted(f"simulated kill before iteration {stop_after}")
            yield batch
    return train(cfg, build_meta_arch=build_distill_meta_arch, build_data=build_data, export=export_students)


def _students_state(run_dir):
    from omegaconf import OmegaConf

    checkpoint = last_checkpoint(run_dir)
    model = DistillMetaArch(OmegaConf.create(read_meta(checkpoint)["config"]))
    load_model_state(checkpoint, model)
    return read_meta(checkpoint)["iteration"], {k: v for k, v in model.state_dict().items() if not k.startswith("teacher.")}


@pytest.mark.parametrize("which", ["softmax", "sinkhorn"])
def test_resume_is_bit_identical(teacher_run, sk_teacher_run, image_root, tmp_path, which):
    teacher = teacher_run if which == "softmax" else sk_teacher_run
    _run(distill_cfg(teacher, tmp_path / "straight", image_root))
    with pytest.raises(_Interrupted):
        _run(distill_cfg(teacher, tmp_path / "resumed", image_root), stop_after=3)
    assert read_meta(last_checkpoint(tmp_path / "resumed"))["iteration"] == 3
    _run(distill_cfg(teacher, tmp_path / "resumed", image_root))
    it_a, state_a = _students_state(tmp_path / "straight")
    it_b, state_b = _students_state(tmp_path / "resumed")
    assert it_a == it_b == 6 and state_a.keys() == state_b.keys()
    mismatched = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not mismatched, f"resumed run differs in {mismatched[:5]}"
    # The EMA lags the student, and both moved away from the initialisation.
    assert not torch.equal(state_a["ema.vit_micro.blocks.0.attn.qkv.weight"],
                           state_a["students.vit_micro.backbone.blocks.0.attn.qkv.weight"])
    exported, meta = load_backbone(student_export_path(tmp_path / "straight", "vit_micro"))
    assert meta["arch"] == "vit_micro" and meta["distilled_from"] == str(last_checkpoint(teacher))
    for key, value in exported.state_dict().items():
        assert torch.equal(value, state_a[f"ema.vit_micro.{key}"]), key


def test_each_student_of_a_two_student_job_equals_it_trained_alone(teacher_run, image_root, tmp_path):
    # Gradient clipping off: the loop (until it clips per part, see contract.clip_parts) clips the
    # norm of all students together, which would couple them.
    second = "{arch: vit_micro, name: b, num_register_tokens: 1, base_lr: 0.003}"
    common = ("optim.clip_grad=0", "optim.epochs=2")
    _run(distill_cfg(teacher_run, tmp_path / "both", image_root, *common, f"distill.students=[vit_micro,{second}]"))
    _run(distill_cfg(teacher_run, tmp_path / "a", image_root, *common, "distill.students=[vit_micro]"))
    _run(distill_cfg(teacher_run, tmp_path / "b", image_root, *common, f"distill.students=[{second}]"))
    _, both = _students_state(tmp_path / "both")
    for name, alone_dir in (("vit_micro", "a"), ("b", "b")):
        _, alone = _students_state(tmp_path / alone_dir)
        keys = [k for k in alone if k.split(".")[1] == name]
        assert keys and all(torch.equal(both[k], alone[k]) for k in keys), name
        a, _ = load_backbone(student_export_path(tmp_path / "both", name))
        b, _ = load_backbone(student_export_path(tmp_path / alone_dir, name))
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(both["students.vit_micro.backbone.cls_token"], both["students.b.backbone.cls_token"])


# ---- the command ---------------------------------------------------------------------------------
def test_cli_bad_teacher_is_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dinov2_repro.cli", "distill", "--config-file",
                             str(CONFIG_DIR / "distill" / "tiny_cpu.yaml"), "--teacher", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "distill.teacher=" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


# ---- the recipe configs ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, students", [("vitg14_to_vitl14", ["vit_large"]), ("vitg14_to_vitb14", ["vit_base"]),
                                            ("vitg14_to_vitl14_vitb14", ["vit_large", "vit_base"])])
def test_recipe_configs(teacher_run, tmp_path, name, students):
    from dinov2_repro.distill.config import merge_distill_config, student_specs

    cfg = merge_distill_config(CONFIG_DIR / "distill" / f"{name}.yaml")
    specs = student_specs(cfg)
    assert [s.section.arch for s in specs] == students
    assert all(s.section.drop_path_rate == 0.0 and s.section.ffn_layer == "mlp" and s.base_lr == 1e-3 for s in specs)
    assert cfg.optim.scaling_rule == "none" and cfg.train.batch_size_per_gpu * 128 == 2048
    assert cfg.distill.teacher_arch == "vit_giant2" and cfg.distill.teacher_patch_size == 14
    # A teacher that is not the ViT-g the config expects is refused before anything is built.
    with pytest.raises(ConfigError, match="teacher_arch='vit_giant2'"):
        load_distill_config(CONFIG_DIR / "distill" / f"{name}.yaml", [f"train.output_dir={tmp_path}"], teacher=teacher_run)


@pytest.mark.slow
def test_cli_local_launcher_two_ranks_then_resume_on_one(teacher_run, image_root, tmp_path):
    """`--launcher local --nproc 2` (FSDP2 over gloo, both students exported), then the same run
    resumed in one process: the 2-rank checkpoint reshards."""
    from dinov2_repro.train.metrics import read_metrics

    out = tmp_path / "run"
    args = ["distill", "--config-file", str(CONFIG_DIR / "distill" / "tiny_cpu.yaml"), "--teacher", str(teacher_run),
            "crops.global_crops_size=28", "crops.local_crops_size=14", "crops.local_crops_number=2",
            "train.batch_size_per_gpu=2", "train.num_workers=0", "train.tensorboard=false", "train.log_period_iterations=1",
            f"train.dataset_path=ImageFolder:root={image_root}", f"train.output_dir={out}",
            "distill.students=[vit_micro,{arch: vit_micro, name: b, num_register_tokens: 1}]"]
    cli = [sys.executable, "-m", "dinov2_repro.cli"]
    first = subprocess.run([*cli, *args, "train.max_iterations=2", "--launcher", "local", "--nproc", "2"],
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert read_meta(last_checkpoint(out))["world_size"] == 2
    second = subprocess.run([*cli, *args, "train.max_iterations=3"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert [m["iteration"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    for name in ("vit_micro", "b"):
        model, meta = load_backbone(student_export_path(out, name))
        assert meta["num_register_tokens"] == (1 if name == "b" else 0)


# ---- activation checkpointing ------------------------------------------------------------------
def test_activation_checkpointing_reaches_the_students_and_keeps_loss_and_gradients(teacher_run, image_root, tmp_path):
    """train.activation_checkpointing is read by distillation too (the planner offers it for distill
    configs): the students' blocks are checkpointed and one step's loss and gradients are unchanged."""
    cfg = distill_cfg(teacher_run, tmp_path, image_root, "train.activation_checkpointing=blocks")
    model = DistillMetaArch(cfg).train()
    backbone = model.students["vit_micro"].backbone
    assert backbone.checkpointed_blocks == frozenset(range(len(backbone.blocks)))
    batch = next(build_distill_data(cfg, 0, _single_env()))
    results = {}
    for mode in ("blocks", "none"):
        backbone.set_activation_checkpointing(mode)
        model.zero_grad(set_to_none=True)
        loss, _ = model.compute_losses(batch, {"teacher_temp": 0.07})
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.students.named_parameters() if p.grad is not None})
    (loss_ref, grads_ref), (loss, grads) = results["none"], results["blocks"]
    assert torch.equal(loss, loss_ref) and grads.keys() == grads_ref.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ref[name], rtol=1e-6, atol=1e-7), name
