"""The SSL training loop end to end at micro scale: resume is bit-identical, a NaN loss stops
the run without touching the last good checkpoint, corrupt files are skipped, exports load in timm."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_repro.config import CONFIG_DIR, load_config
from dinov2_repro.train import pretrain
from dinov2_repro.train.checkpoint import last_checkpoint, load_model_state, read_meta
from dinov2_repro.train.loop import NonFiniteLossError, train
from dinov2_repro.train.meta_arch import SSLMetaArch
from dinov2_repro.train.metrics import read_metrics


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(24):
        # Smooth random fields: images with structure, not white noise.
        small = rng.integers(0, 255, size=(5, 5, 3), dtype=np.uint8)
        Image.fromarray(small).resize((48, 48), Image.BICUBIC).save(root / f"img_{i:02d}.png")
    return root


def micro_cfg(image_root, out_dir, *extra):
    return load_config(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml", [
        "student.arch=vit_micro", "crops.global_crops_size=28", "crops.local_crops_size=14", "crops.local_crops_number=2",
        "train.batch_size_per_gpu=4", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=3", "optim.warmup_epochs=1",
        "teacher.warmup_teacher_temp_epochs=1", "train.num_workers=0", "train.checkpoint_period_iterations=3",
        "train.tensorboard=false", "train.log_period_iterations=1",
        *[f"{k}.head_n_prototypes=64" for k in ("dino", "ibot")], *[f"{k}.head_hidden_dim=64" for k in ("dino", "ibot")],
        *[f"{k}.head_bottleneck_dim=32" for k in ("dino", "ibot")],
        f"train.dataset_path=ImageFolder:root={image_root}", f"train.output_dir={out_dir}", *extra,
    ])


class _Interrupted(Exception):
    pass


def _data_that_stops_after(n_batches):
    def build(cfg, start_iteration, env):
        stream = pretrain.build_ssl_data(cfg, start_iteration, env)
        for index, batch in enumerate(stream):
            if start_iteration + index >= n_batches:
                raise _Interrupted(f"simulated kill before iteration {n_batches}")
            yield batch
    return build


def _run(cfg, build_data=pretrain.build_ssl_data, meta_arch=SSLMetaArch):
    return train(cfg, build_meta_arch=meta_arch, build_data=build_data, export=pretrain.export_teacher)


def _model_state(run_dir):
    from omegaconf import OmegaConf

    checkpoint = last_checkpoint(run_dir)
    model = SSLMetaArch(OmegaConf.create(read_meta(checkpoint)["config"]))
    load_model_state(checkpoint, model)
    return read_meta(checkpoint)["iteration"], model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_resume_is_bit_identical(image_root, tmp_path, centering):
    separate = "true" if centering == "sinkhorn_knopp" else "false"  # cover both head layouts
    extra = (f"train.centering={centering}", f"ibot.separate_head={separate}")
    straight = micro_cfg(image_root, tmp_path / "straight", *extra)
    _run(straight)
    interrupted = micro_cfg(image_root, tmp_path / "resumed", *extra)
    with pytest.raises(_Interrupted):
        _run(interrupted, build_data=_data_that_stops_after(3))
    assert read_meta(last_checkpoint(tmp_path / "resumed"))["iteration"] == 3
    _run(micro_cfg(image_root, tmp_path / "resumed", *extra))

    it_a, state_a = _model_state(tmp_path / "straight")
    it_b, state_b = _model_state(tmp_path / "resumed")
    assert it_a == it_b == 6
    assert state_a.keys() == state_b.keys()
    mismatched = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not mismatched, f"resumed run differs in {mismatched[:5]}"
    # The teacher moved away from the student (EMA) and training changed the weights.
    assert not torch.equal(state_a["teacher.backbone.blocks.0.attn.qkv.weight"], state_a["student.backbone.blocks.0.attn.qkv.weight"])
    metrics = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for key in ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss",
                "lr", "wd", "mom", "teacher_temp", "images_per_s"):
        assert all(np.isfinite(m[key]) for m in metrics), key
    assert (tmp_path / "straight" / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.faults
def test_nan_loss_stops_and_keeps_last_good_checkpoint(image_root, tmp_path):
    class NaNAtIteration5(SSLMetaArch):
        calls = 0

        def compute_losses(self, batch, values):
            loss, terms = super().compute_losses(batch, values)
            NaNAtIteration5.calls += 1
            if NaNAtIteration5.calls == 5:
                loss = loss * float("nan")
            return loss, terms

    cfg = micro_cfg(image_root, tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"non-finite total loss nan at iteration 4.*iter_00000003"):
        _run(cfg, meta_arch=NaNAtIteration5)
    good = last_checkpoint(tmp_path / "run")
    assert good.name == "iter_00000003"
    iteration, state = _model_state(tmp_path / "run")
    assert iteration == 3 and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (tmp_path / "run" / "export" / "teacher_backbone.safetensors").exists()


@pytest.mark.slow
@pytest.mark.faults
def test_corrupt_files_are_skipped_and_export_loads_in_timm(image_root, tmp_path):
    import shutil

    from dinov2_repro.backbone_file import load_backbone, load_backbone_into_timm

    root = tmp_path / "images"
    root.mkdir()
    for good in sorted(image_root.glob("*.png"))[:6]:
        shutil.copy(good, root / good.name)
    (root / "broken.png").write_bytes((image_root / "img_00.png").read_bytes()[:60])
    (root / "not_an_image.jpg").write_text("hello")
    cfg = micro_cfg(root, tmp_path / "run", "optim.epochs=2")
    last = _run(cfg)
    assert last["iteration"] == 4
    skipped = sum(m["n_skipped"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl"))
    assert skipped >= 2  # 8 files, 16 draws: two passes over the data, each meets both bad files
    export = tmp_path / "run" / "export" / "teacher_backbone.safetensors"
    ours, meta = load_backbone(export)
    timm_model = load_backbone_into_timm(export).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), timm_model.forward_features(x)[:, 0], atol=1e-5)
    assert meta["arch"] == "vit_micro" and json.loads(json.dumps(meta["mean"])) == list(cfg.crops.mean)
