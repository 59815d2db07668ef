"""The DINOv3 ViT (models/vision_transformer_v3.py): RoPE per packed sequence, augmentations in
training only, masking + packing + efficient stochastic depth in a backward pass, the
training meta-arch with a DINOv3 student, and its export."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_repro.models import DinoV3VisionTransformer, available_archs, build_vit


def _crops(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 48, generator=g), torch.randn(3, 3, 16, 16, generator=g)


def test_registered_sizes_match_the_released_shapes():
    expected = {"vits16": (384, 12, 6, 1536), "vits16plus": (384, 12, 6, 1536), "vitb16": (768, 12, 12, 3072),
                "vitl16": (1024, 24, 16, 4096), "vith16plus": (1280, 32, 20, 5120), "vit7b16": (4096, 40, 32, 8192)}
    assert set(expected) | {"vitt16"} <= set(available_archs())
    for arch, (dim, depth, heads, hidden) in expected.items():
        with torch.device("meta"):
            model = build_vit(arch)
        mlp = model.blocks[0].mlp
        assert isinstance(model, DinoV3VisionTransformer) and (model.patch_size, model.num_register_tokens) == (16, 4)
        assert (model.embed_dim, model.depth, model.num_heads) == (dim, depth, heads)
        assert (mlp.w3.in_features if hasattr(mlp, "w3") else mlp.fc1.out_features) == hidden


def test_packed_crops_equal_separate_forwards_and_rope_matters(one_torch_thread):
    """RoPE is applied per packed sequence with its own grid: packing changes nothing."""
    torch.manual_seed(0)
    model = build_vit("vitt16", init_values=1.0).eval()
    a, b = _crops()
    masks = [torch.rand(2, 6) < 0.4, None]
    with torch.no_grad():
        packed = model.forward_features([a, b], masks)
        alone = [model.forward_features(a, masks[0]), model.forward_features(b)]
        for p, s in zip(packed, alone):
            for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
                torch.testing.assert_close(p[key], s[key], atol=1e-5, rtol=0)
        assert packed[1]["x_norm_regtokens"].shape == (3, 4, 128)
        # Positions matter: a transposed grid gives other patch features than the transposed output.
        flipped = model.forward_features(a.transpose(-1, -2))["x_norm_patchtokens"]
        assert (flipped - alone[0]["x_norm_patchtokens"].reshape(2, 2, 3, -1).transpose(1, 2).reshape(2, 6, -1)).abs().max() > 1e-3
        layers = model.get_intermediate_layers(a, n=2, reshape=True, return_class_token=True)
        assert layers[-1][0].shape == (2, 128, 2, 3) and layers[-1][1].shape == (2, 128)


def test_rope_augmentations_in_training_only(one_torch_thread):
    torch.manual_seed(0)
    model = build_vit("vitt16", init_values=1.0, rope_shift=0.1, rope_jitter=1.5, rope_rescale=2.0)
    a, _ = _crops()
    with torch.no_grad():
        model.train()
        first, second = model(a), model(a)
        model.eval()
        third, fourth = model(a), model(a)
    assert (first - second).abs().max() > 1e-4
    assert torch.equal(third, fourth)


def test_train_step_with_masking_packing_and_stochastic_depth(one_torch_thread):
    torch.manual_seed(0)
    model = build_vit("vitt16", init_values=1.0, drop_path_rate=0.5, drop_path_uniform=True,
                      stochastic_depth="efficient", local_cls_norm=True).train()
    a, b = _crops()
    masks = torch.zeros(2, 6, dtype=torch.bool)
    masks[:, :3] = True
    out = model.forward_features([a, b], [masks, None])
    loss = sum(o["x_norm_clstoken"].square().mean() + o["x_norm_patchtokens"].square().mean() for o in out)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["mask_token"].abs().sum() > 0 and grads["register_tokens"].abs().sum() > 0
    assert grads["local_cls_norm.weight"].abs().sum() > 0  # the local crops' CLS norm (ViT-7B recipe)
    # Activation checkpointing recomputes the same subsets and RoPE draws: same gradients.
    for mode in ("none", "blocks"):
        model.set_activation_checkpointing(mode)
        model.zero_grad()
        torch.manual_seed(1)
        out = model.forward_features([a, b], [masks, None])
        sum(o["x_norm_patchtokens"].sum() for o in out).backward()
        grads[mode] = model.blocks[1].attn.qkv.weight.grad.clone()
    torch.testing.assert_close(grads["none"], grads["blocks"])


@pytest.mark.slow
def test_meta_arch_trains_and_exports_a_dinov3_student(tmp_path):
    """``student.arch`` names a DINOv3 size: the SSL meta-arch trains it, the export is a DINOv3
    backbone file that load_backbone rebuilds (same features as the trained teacher)."""
    from dinov2_repro.backbone_file import load_backbone
    from dinov2_repro.config import CONFIG_DIR, load_config
    from dinov2_repro.train import pretrain
    from dinov2_repro.train.loop import train
    from dinov2_repro.train.meta_arch import SSLMetaArch
    from dinov2_repro.train.metrics import read_metrics

    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, size=(5, 5, 3), dtype=np.uint8)).resize((48, 48)).save(root / f"{i}.png")
    cfg = load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        "student.arch=vitt16", "student.patch_size=16", "student.num_register_tokens=4", "student.drop_path_rate=0.3",
        "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
        "train.batch_size_per_gpu=4", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=1", "optim.warmup_epochs=0",
        "teacher.warmup_teacher_temp_epochs=0", "train.num_workers=0", "train.tensorboard=false",
        "train.log_period_iterations=1", "train.checkpoint_period_iterations=2",
        *[f"{k}.head_n_prototypes=32" for k in ("dino", "ibot")], *[f"{k}.head_hidden_dim=32" for k in ("dino", "ibot")],
        *[f"{k}.head_bottleneck_dim=16" for k in ("dino", "ibot")],
        f"train.dataset_path=ImageFolder:root={root}", f"train.output_dir={tmp_path / 'run'}",
    ])
    train(cfg, build_meta_arch=SSLMetaArch, build_data=pretrain.build_ssl_data, export=pretrain.export_teacher)
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(metrics) == 2 and all(np.isfinite(m["total_loss"]) for m in metrics)
    assert any(m.get("ibot_loss", 0) > 0 for m in metrics)  # masked patches reached the iBOT loss
    model, meta = load_backbone(tmp_path / "run" / "export" / "teacher_backbone.safetensors")
    assert isinstance(model, DinoV3VisionTransformer) and meta["arch"] == "vitt16" and meta["arch_family"] == "dinov3"


def test_model_weights_takes_a_released_file(tmp_path):
    """MODEL.WEIGHTS=<released file>: both backbones take its weights, heads stay fresh; a file
    of another architecture stops with one line naming it."""
    from dinov2_repro.config import CONFIG_DIR, load_config
    from dinov2_repro.train.initialize import init_from_pretrained
    from dinov2_repro.train.meta_arch import SSLMetaArch

    def release(model, name):
        path = tmp_path / name
        torch.save({k.replace("register_tokens", "storage_tokens"): v for k, v in model.state_dict().items()}, path)
        return path

    torch.manual_seed(0)
    released = build_vit("vitt16")
    good = release(released, "dinov3_vitt16_pretrain_sat493m-00000000.pth")
    shallow = release(build_vit("vitt16", depth=2), "dinov3_vitt16_pretrain_lvd1689m-11111111.pth")
    cfg = load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        "student.arch=vitt16", "student.patch_size=16", "student.num_register_tokens=4", "crops.global_crops_size=32",
        "crops.local_crops_size=16", *[f"{k}.head_n_prototypes=16" for k in ("dino", "ibot")],
        *[f"{k}.head_hidden_dim=16" for k in ("dino", "ibot")], *[f"{k}.head_bottleneck_dim=8" for k in ("dino", "ibot")]])
    model = SSLMetaArch(cfg)
    with pytest.raises(ValueError, match=rf"MODEL.WEIGHTS=.*{shallow.name}.*depth=2 but student.arch=vitt16 has 4"):
        init_from_pretrained(model, shallow)
    heads_before = {k: v.clone() for k, v in model.student.dino_head.state_dict().items()}
    init_from_pretrained(model, good)
    for part in (model.student, model.teacher):
        for key, value in released.state_dict().items():
            torch.testing.assert_close(part.backbone.state_dict()[key], value)
    assert all(torch.equal(v, model.student.dino_head.state_dict()[k]) for k, v in heads_before.items())


def test_rope_augmentation_keys_reach_the_model_and_are_checked(tmp_path):
    """``student.rope_*`` set the DINOv3 backbone's coordinate augmentations; a DINOv2 arch
    (learned pos-embed) and invalid factors get one line naming the key."""
    from dinov2_repro.config import CONFIG_DIR, ConfigError, load_config
    from dinov2_repro.train.meta_arch import build_backbone
    from dinov2_repro.train.validate import validate_train_config

    def cfg(*overrides):
        return load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml",
                           [f"train.output_dir={tmp_path / 'run'}", "crops.global_crops_size=32",
                            "crops.local_crops_size=16", *overrides])

    v3 = cfg("student.arch=vitt16", "student.patch_size=16", "student.rope_jitter=1.5", "student.rope_shift=0.25")
    validate_train_config(v3, check_data=False)
    settings = build_backbone(v3.student, img_size=32, drop_path_rate=0.0).rope_settings
    assert (settings["jitter"], settings["shift"], settings["rescale"]) == (1.5, 0.25, 2.0)
    default = build_backbone(cfg("student.arch=vitt16", "student.patch_size=16").student, img_size=32, drop_path_rate=0.0)
    assert (default.rope_settings["jitter"], default.rope_settings["rescale"]) == (None, 2.0)
    with pytest.raises(ConfigError, match=r"student.rope_jitter=1.5: vit_tiny has a learned position embedding"):
        validate_train_config(cfg("student.rope_jitter=1.5"), check_data=False)
    with pytest.raises(ConfigError, match=r"student.rope_rescale=0.5: must be >= 1"):
        validate_train_config(cfg("student.arch=vitt16", "student.patch_size=16", "student.rope_rescale=0.5"),
                              check_data=False)
