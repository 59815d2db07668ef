"""Interop with timm's DINOv2 models (no download) and the safetensors backbone export."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from dinov2_repro.backbone_file import (
    from_timm_state_dict,
    load_backbone,
    load_backbone_into_timm,
    save_backbone,
    timm_model_for,
    timm_model_name,
    to_timm_state_dict,
)
from dinov2_repro.models import build_vit

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _visible(model):
    """Make every parameter matter: default init has LayerScale 1e-5 and near-zero tokens,
    which would hide key mix-ups (wrong cls/pos split, swapped SwiGLU halves) in the outputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gamma", "cls_token", "pos_embed", "register_tokens")) or "norm" in name:
                param.normal_(mean=0.5 if "norm" in name and name.endswith("weight") else 0.0, std=0.5)
    return model.eval()


def _compare(ours, timm_model, x):
    with torch.no_grad():
        mine = ours.forward_features(x)
        theirs = timm_model.forward_features(x)
    r = ours.num_register_tokens
    cls_diff = (mine["x_norm_clstoken"] - theirs[:, 0]).abs().max().item()
    patch_diff = (mine["x_norm_patchtokens"] - theirs[:, 1 + r :]).abs().max().item()
    assert cls_diff < TOL and patch_diff < TOL, (cls_diff, patch_diff)
    if r:
        assert (mine["x_norm_regtokens"] - theirs[:, 1 : 1 + r]).abs().max().item() < TOL
    # The outputs must carry signal, or equality would prove nothing.
    assert mine["x_norm_patchtokens"].std() > 0.1


def _assert_same_layout(ours_timm_keys, timm_model):
    reference = {k: tuple(v.shape) for k, v in timm_model.state_dict().items()}
    converted = {k: tuple(v.shape) for k, v in ours_timm_keys.items()}
    assert converted == reference


def test_timm_model_names_exist_in_timm():
    names = [timm_model_name(a, r) for a in ("vit_small", "vit_base", "vit_large", "vit_giant2") for r in (0, 4)]
    assert names[0] == "vit_small_patch14_dinov2" and names[-1] == "vit_giant_patch14_reg4_dinov2"
    for name in names:
        assert timm.is_model(name), name
    with pytest.raises(ValueError, match="vit_tiny"):
        timm_model_name("vit_tiny", 0)
    with pytest.raises(ValueError, match="num_register_tokens=2"):
        timm_model_name("vit_small", 2)


@pytest.mark.slow
@pytest.mark.parametrize("registers", [0, 4])
def test_full_size_small_matches_timm_both_ways(registers):
    # Real ViT-S/14 shapes and timm's released config (518 px, 37x37 pos-embed grid). Our model uses
    # timm's interpolation (antialias, no offset) so a non-native, non-square input must match too.
    ours = _visible(build_vit("vit_small", img_size=518, num_register_tokens=registers,
                              interpolate_offset=0.0, interpolate_antialias=True))
    reference = timm.create_model(timm_model_name("vit_small", registers), pretrained=False, dynamic_img_size=True).eval()
    exported = to_timm_state_dict(ours)
    assert "mask_token" not in exported and ("reg_token" in exported) == bool(registers)
    _assert_same_layout(exported, reference)
    reference.load_state_dict(exported, strict=True)
    x = torch.randn(2, 3, 70, 98)
    _compare(ours, reference, x)

    # timm -> ours, starting from timm's own (different) initialisation.
    fresh_timm = _visible_timm(timm.create_model(timm_model_name("vit_small", registers), pretrained=False, dynamic_img_size=True))
    back = build_vit("vit_small", img_size=518, num_register_tokens=registers, interpolate_offset=0.0, interpolate_antialias=True)
    converted = from_timm_state_dict(fresh_timm.state_dict())
    assert torch.count_nonzero(converted["mask_token"]) == 0
    back.load_state_dict(converted, strict=True)
    _compare(back.eval(), fresh_timm, x)


def _visible_timm(model):
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gamma", "cls_token", "pos_embed", "reg_token")):
                param.normal_(std=0.5)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,registers,ffn",
    [("vit_base", 0, "mlp"), ("vit_large", 4, "mlp"), ("vit_giant2", 0, "swiglu"), ("vit_giant2", 4, "swiglu")],
)
def test_real_width_two_blocks_match_timm_templates(arch, registers, ffn):
    # Real widths and timm's own templates (SwiGLU packing, mlp_ratio), only depth and image size cut.
    name = timm_model_name(arch, registers)
    reference = timm.create_model(name, pretrained=False, img_size=56, depth=2).eval()
    ours = _visible(build_vit(arch, depth=2, img_size=56, num_register_tokens=registers, ffn_layer=ffn))
    exported = to_timm_state_dict(ours)
    _assert_same_layout(exported, reference)
    reference.load_state_dict(exported, strict=True)
    x = torch.randn(1, 3, 56, 56)
    _compare(ours, reference, x)

    fresh_timm = _visible_timm(timm.create_model(name, pretrained=False, img_size=56, depth=2))
    back = build_vit(arch, depth=2, img_size=56, num_register_tokens=registers, ffn_layer=ffn)
    back.load_state_dict(from_timm_state_dict(fresh_timm.state_dict()), strict=True)
    _compare(back.eval(), fresh_timm, x)


def test_wrong_key_mapping_would_be_caught():
    # Sensitivity check for the comparisons above: swapping SwiGLU's gate and value halves
    # (the packing order timm and we must agree on) has to break equality.
    ours = _visible(build_vit("vit_tiny", depth=1, img_size=28, ffn_layer="swiglu"))
    reference = timm_model_for(ours)
    state = reference.state_dict()
    weight = state["blocks.0.mlp.fc1.weight"]
    state["blocks.0.mlp.fc1.weight"] = torch.cat(weight.chunk(2)[::-1])
    reference.load_state_dict(state)
    with pytest.raises(AssertionError):
        _compare(ours, reference, torch.randn(1, 3, 28, 28))


@pytest.mark.parametrize("registers,ffn,in_chans", [(4, "mlp", 6), (0, "swiglu", 3)])
def test_safetensors_round_trip(tmp_path, registers, ffn, in_chans):
    ours = _visible(build_vit("vit_tiny", depth=2, img_size=42, num_register_tokens=registers, ffn_layer=ffn, in_chans=in_chans))
    mean, std = [0.1 * i for i in range(in_chans)], [0.5 + 0.1 * i for i in range(in_chans)]
    path = save_backbone(ours, tmp_path / "export" / "backbone.safetensors", mean=mean, std=std,
                         extra_metadata={"iteration": 1234})
    assert sorted(p.name for p in path.parent.iterdir()) == ["backbone.safetensors"]  # no temp file left

    raw = load_file(str(path))
    assert set(raw) == set(to_timm_state_dict(ours)) and "mask_token" not in raw

    loaded, meta = load_backbone(path)
    assert meta["arch"] == "vit_tiny" and meta["depth"] == 2 and meta["num_register_tokens"] == registers
    assert meta["ffn"] == ffn and meta["in_chans"] == in_chans and meta["img_size"] == 42
    assert meta["mean"] == pytest.approx(mean) and meta["std"] == pytest.approx(std) and meta["iteration"] == 1234
    assert meta["interpolate_offset"] == ours.interpolate_offset
    x = torch.randn(2, in_chans, 42, 56)
    with torch.no_grad():
        before, after = ours.forward_features(x), loaded.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        assert before[key].shape == after[key].shape, key
        if before[key].numel():
            assert (before[key] - after[key]).abs().max().item() < TOL, key

    # The same file straight into timm (native size: no pos-embed resampling involved).
    x_native = torch.randn(2, in_chans, 42, 42)
    timm_model = load_backbone_into_timm(path)
    assert timm_model.pretrained_cfg["mean"] == pytest.approx(tuple(mean))
    _compare(ours, timm_model, x_native)


def test_save_needs_mean_std_for_non_rgb(tmp_path):
    model = build_vit("vit_tiny", depth=1, img_size=28, in_chans=6)
    with pytest.raises(ValueError, match="in_chans=6"):
        save_backbone(model, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="override"):
        save_backbone(build_vit("vit_tiny", depth=1, img_size=28), tmp_path / "b.safetensors", extra_metadata={"arch": "x"})


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    model = build_vit("vit_tiny", depth=1, img_size=28)
    good = save_backbone(model, tmp_path / "good.safetensors")
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_backbone(truncated)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_backbone(garbage)

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_backbone(tmp_path / "missing.safetensors")

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(good)), str(bare))  # same tensors, no header: read as a timm DINOv2 file
    loaded, bare_meta = load_backbone(bare)
    assert bare_meta["source_layout"] == "timm" and bare_meta["embed_dim"] == 192

    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors"):
        load_backbone(foreign)

    partial = tmp_path / "partial.safetensors"
    save_file(load_file(str(good)), str(partial), metadata={"arch": json.dumps("vit_tiny")})
    with pytest.raises(ValueError, match="patch_size"):
        load_backbone(partial)

    mismatched = tmp_path / "mismatched.safetensors"
    header = {k: json.dumps(v) for k, v in load_backbone(good)[1].items()}
    header["depth"] = "2"
    save_file(load_file(str(good)), str(mismatched), metadata=header)
    with pytest.raises(ValueError, match="mismatched.safetensors"):
        load_backbone(mismatched)


def test_conversion_rejects_foreign_keys():
    timm_state = to_timm_state_dict(build_vit("vit_tiny", depth=1, img_size=28))
    with pytest.raises(ValueError, match="head.weight"):
        from_timm_state_dict({**timm_state, "head.weight": torch.zeros(3, 192)})
    with pytest.raises(KeyError, match="cls_token"):
        to_timm_state_dict({"blocks.0.norm1.weight": torch.zeros(3)})
