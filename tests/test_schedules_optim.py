import math

import pytest
import torch

from dinov2_repro.config import CONFIG_DIR, load_config
from dinov2_repro.train.optim import apply_schedule, build_optimizer, build_param_groups, layer_id_for
from dinov2_repro.train.schedules import build_schedules, scaled_lr


def test_vitg14_schedule_values_at_key_iterations():
    cfg = load_config(CONFIG_DIR / "train" / "vitg14.yaml")
    sched = build_schedules(cfg, world_size=256)  # 12 images x 256 GPUs = 3,072
    assert sched.total_iters == 625_000
    peak = 2e-4 * math.sqrt(3072 / 1024)
    assert cfg.optim.lr == pytest.approx(peak) and peak == pytest.approx(3.464e-4, rel=1e-3)
    warmup = 100_000
    assert sched.lr[0] == 0.0
    assert sched.lr[warmup // 2] == pytest.approx(peak / 2, rel=1e-4)
    assert sched.lr[warmup] == pytest.approx(peak)
    middle = warmup + (625_000 - warmup) // 2
    assert sched.lr[middle] == pytest.approx((peak + 1e-6) / 2, rel=1e-4)  # half-way down the cosine
    assert sched.lr[624_999] == pytest.approx(1e-6, abs=1e-9)
    assert sched.wd[0] == pytest.approx(0.04) and sched.wd[624_999] == pytest.approx(0.2, rel=1e-6)
    assert sched.momentum[0] == pytest.approx(0.994) and sched.momentum[624_999] == pytest.approx(1.0, abs=1e-9)
    assert sched.teacher_temp[0] == pytest.approx(0.04)
    assert sched.teacher_temp[30 * 1250 // 2] == pytest.approx(0.055)
    assert sched.teacher_temp[30 * 1250] == pytest.approx(0.07) and sched.teacher_temp[600_000] == pytest.approx(0.07)
    assert sched.last_layer_lr[1249] == 0.0  # frozen for the first epoch
    assert sched.last_layer_lr[1250] == pytest.approx(sched.lr[1250])


def test_lr_scaling_rule():
    assert scaled_lr(0.004, 1024) == pytest.approx(0.004)
    assert scaled_lr(0.004, 256) == pytest.approx(0.002)
    with pytest.raises(ValueError, match="scaling_rule"):
        scaled_lr(0.004, 256, "cube")


def test_param_groups_decay_multipliers_and_last_layer():
    names = {
        "backbone.patch_embed.proj.weight": (4, 4), "backbone.pos_embed": (1, 4, 4), "backbone.blocks.0.attn.qkv.weight": (4, 4),
        "backbone.blocks.0.attn.qkv.bias": (4,), "backbone.blocks.1.ls1.gamma": (4,), "backbone.blocks.1.mlp.fc1.weight": (4, 4),
        "backbone.norm.weight": (4,), "dino_head.mlp.0.weight": (4, 4), "dino_head.last_layer.weight_v": (4, 4),
    }
    params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in names.items()}
    groups = build_param_groups(params.items(), num_layers=2, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    g = lambda n: by_param[id(params[n])]  # noqa: E731
    assert g("backbone.patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.5 ** 3 * 0.2)
    assert g("backbone.pos_embed")["lr_multiplier"] == pytest.approx(0.5 ** 3)
    assert g("backbone.blocks.0.attn.qkv.weight")["lr_multiplier"] == pytest.approx(0.5 ** 2)
    assert g("backbone.blocks.1.mlp.fc1.weight")["lr_multiplier"] == pytest.approx(0.5)
    assert g("backbone.norm.weight")["lr_multiplier"] == 1.0 and g("dino_head.mlp.0.weight")["lr_multiplier"] == 1.0
    for no_decay in ("backbone.blocks.0.attn.qkv.bias", "backbone.blocks.1.ls1.gamma", "backbone.norm.weight"):
        assert g(no_decay)["wd_multiplier"] == 0.0
    assert g("backbone.blocks.0.attn.qkv.weight")["wd_multiplier"] == 1.0
    assert g("dino_head.last_layer.weight_v")["is_last_layer"] and not g("dino_head.mlp.0.weight")["is_last_layer"]
    assert layer_id_for("blocks.11.attn.qkv.weight", 12) == 12
    opt = build_optimizer(groups, betas=(0.9, 0.999), fused="auto", device=torch.device("cpu"))
    apply_schedule(opt, lr=1.0, wd=0.1, last_layer_lr=0.0)
    for group in opt.param_groups:
        assert group["lr"] == (0.0 if group["is_last_layer"] else group["lr_multiplier"])
        assert group["weight_decay"] == pytest.approx(0.1 * group["wd_multiplier"])


def test_weight_decay_exempts_only_biases_norms_and_gammas():
    """On the real student (backbone + heads): the reference's rule, by name. In particular the
    prototype layer's weight_g is decayed (it used to be exempt, unbounding the logit scale)."""
    from dinov2_repro.train.meta_arch import SSLMetaArch

    cfg = load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", ["ibot.separate_head=true", "student.arch=vit_micro"])
    student = SSLMetaArch(cfg).student
    groups = build_param_groups(student.named_parameters(), num_layers=student.backbone.depth,
                                layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    wd_of = {id(p): g["wd_multiplier"] for g in groups for p in g["params"]}
    for name, param in student.named_parameters():
        exempt = name.endswith(".bias") or "norm" in name or "gamma" in name
        assert wd_of[id(param)] == (0.0 if exempt else 1.0), name
    assert wd_of[id(student.dino_head.last_layer.weight_g)] == 1.0
    assert wd_of[id(student.ibot_head.last_layer.weight_g)] == 1.0


def test_vitg14_head_bottlenecks():
    cfg = load_config(CONFIG_DIR / "train" / "vitg14.yaml", [])
    assert cfg.ibot.separate_head
    assert (cfg.dino.head_bottleneck_dim, cfg.ibot.head_bottleneck_dim) == (384, 256)
    assert cfg.dino.head_n_prototypes == cfg.ibot.head_n_prototypes == 131072
