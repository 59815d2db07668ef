"""Loading files from elsewhere runs no code (issue 19 item 6; docs/security.md).

A crafted pickle, whose unpickling creates a marker file, is fed to every verb that reads a file
the user may have been sent: train MODEL.WEIGHTS=DIR, resume, export --checkpoint, distill
--teacher (run directory, bundle, other file) and eval --backbone. The marker must never appear.
Also: the teacher bundle written by ``export --with-heads`` gives distillation exactly the
teacher that the run directory gives.

These checkpoints hold random weights (written without training): the tests are about what is
read and how, not about what the weights learned."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dinov2_repro.cli import main
from dinov2_repro.config import CONFIG_DIR, load_config
from dinov2_repro.train.checkpoint import last_checkpoint, read_meta, save_checkpoint
from dinov2_repro.train.meta_arch import SSLMetaArch
from dinov2_repro.train.optim import build_optimizer

# Spelled out rather than imported, so that this file also runs (and fails) on the code before
# issue 19, which pickled meta.pt and unpickled it with weights_only=False.
META_FILE, LEGACY_META_FILE = "meta.json", "meta.pt"
TRAIN_CONFIG = str(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml")
DISTILL_CONFIG = str(CONFIG_DIR / "distill" / "tiny_cpu.yaml")
MICRO = ["student.arch=vit_micro", "crops.global_crops_size=28", "crops.local_crops_size=14", "crops.local_crops_number=2",
         "train.batch_size_per_gpu=4", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=2", "optim.warmup_epochs=1",
         "teacher.warmup_teacher_temp_epochs=1", "train.num_workers=0", "train.tensorboard=false",
         "train.centering=centering", "ibot.separate_head=true",
         *[f"{k}.{key}={v}" for k in ("dino", "ibot") for key, v in
           (("head_n_prototypes", 64), ("head_hidden_dim", 64), ("head_bottleneck_dim", 32))]]


class _TouchOnUnpickle:
    """Unpickling this calls open(marker, 'w'): the file appears iff the pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _write_crafted(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"world_size": 1, "iteration": 1, "payload": _TouchOnUnpickle(marker)}, path)
    return path


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).resize((32, 32)).save(root / f"{i}.png")
    return root


def _overrides(image_root: Path, out_dir: Path) -> list[str]:
    return [*MICRO, f"train.dataset_path=ImageFolder:root={image_root}", f"train.output_dir={out_dir}"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, image_root) -> Path:
    """A pretraining run directory with one checkpoint (softmax centres set to non-zero values)."""
    run = tmp_path_factory.mktemp("teacher_run")
    cfg = load_config(TRAIN_CONFIG, _overrides(image_root, run))
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    with torch.no_grad():
        model.dino_center.center.normal_()
        model.ibot_center.center.normal_()
    optimizer = build_optimizer(model.param_groups(), betas=(0.9, 0.999), fused=False, device=torch.device("cpu"))
    save_checkpoint(run, 1, model=model, optimizer=optimizer,
                    meta={"world_size": 1, "config": OmegaConf.to_container(cfg, resolve=True)})
    return run


def _copy_run(run: Path, dst: Path) -> tuple[Path, Path]:
    shutil.copytree(run, dst)
    return dst, last_checkpoint(dst)


def test_metadata_is_json_and_rng_files_load_weights_only(teacher_run):
    checkpoint = last_checkpoint(teacher_run)
    assert (checkpoint / META_FILE).is_file() and not (checkpoint / LEGACY_META_FILE).exists()
    assert read_meta(checkpoint)["iteration"] == 1
    state = torch.load(checkpoint / "rng_rank0.pt", weights_only=True)  # no allow-list needed
    assert isinstance(state["torch"], torch.Tensor) and state["numpy_keys"].shape == (624,)


def _assert_refused(capsys, marker: Path, argv: list[str], *fragments: str) -> None:
    try:
        code = main(argv)
    except Exception as error:  # noqa: BLE001 - a traceback is a failure too, but the marker is checked first
        code = error
    err = capsys.readouterr().err
    assert not marker.exists(), f"the crafted pickle ran: {' '.join(argv)}"
    assert not isinstance(code, Exception), f"{' '.join(argv)} raised {code!r} instead of a one-line error"
    assert code != 0, (argv, err)
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_crafted_pickles_are_never_run(teacher_run, image_root, tmp_path, capsys, one_torch_thread):
    marker = tmp_path / "PWNED"

    # The layout of older versions: metadata pickled as meta.pt (here crafted).
    legacy = tmp_path / "legacy"
    shutil.copytree(teacher_run, legacy)
    checkpoint = legacy / "checkpoints" / (teacher_run / "checkpoints" / "last").read_text().strip()
    (checkpoint / META_FILE).unlink(missing_ok=True)
    _write_crafted(checkpoint / LEGACY_META_FILE, marker)
    _assert_refused(capsys, marker, ["train", "--config-file", TRAIN_CONFIG, *_overrides(image_root, tmp_path / "new"),
                                     f"MODEL.WEIGHTS={legacy}"], "meta.pt", "not read")
    _assert_refused(capsys, marker, ["train", "--config-file", TRAIN_CONFIG, *_overrides(image_root, legacy)],
                    "meta.pt", "not read")  # resume
    _assert_refused(capsys, marker, ["export", "--checkpoint", str(legacy), "--out", str(tmp_path / "b.safetensors")],
                    "meta.pt")
    _assert_refused(capsys, marker, ["export", "--checkpoint", str(checkpoint), "--with-heads",
                                     "--out", str(tmp_path / "t.safetensors")], "meta.pt")
    _assert_refused(capsys, marker, ["distill", "--config-file", DISTILL_CONFIG, "--teacher", str(legacy)], "meta.pt")

    # The current layout with a crafted RNG file. The old layout's meta.pt (a genuine one) is
    # written too, so that this also fails on the code before issue 19, which read meta.pt and
    # then unpickled the RNG file with weights_only=False.
    rng_run, checkpoint = _copy_run(teacher_run, tmp_path / "rng_run")
    torch.save(read_meta(checkpoint), checkpoint / LEGACY_META_FILE)
    _write_crafted(checkpoint / "rng_rank0.pt", marker)
    _assert_refused(capsys, marker, ["train", "--config-file", TRAIN_CONFIG, *_overrides(image_root, rng_run)],
                    "rng_rank0.pt", "refused")

    # Files handed over directly: a backbone, a teacher bundle, released-style .pth files.
    for name in ("backbone.safetensors", "backbone.pth"):
        crafted = _write_crafted(tmp_path / "files" / name, marker)
        _assert_refused(capsys, marker, ["eval", "linear", "--backbone", str(crafted), "--landcover"], name)
    for name in ("teacher.safetensors", "teacher.pth"):
        crafted = _write_crafted(tmp_path / "files" / name, marker)
        _assert_refused(capsys, marker, ["distill", "--config-file", DISTILL_CONFIG, "--teacher", str(crafted)], name)
        _assert_refused(capsys, marker, ["train", "--config-file", TRAIN_CONFIG, *_overrides(image_root, tmp_path / "w"),
                                         f"MODEL.WEIGHTS={crafted}"], name)


def test_teacher_bundle_gives_the_run_directory_teacher(teacher_run, image_root, tmp_path, one_torch_thread):
    from dinov2_repro.distill import DistillMetaArch, load_distill_config
    from dinov2_repro.teacher_bundle import read_teacher_bundle

    bundle = tmp_path / "teacher.safetensors"
    assert main(["export", "--checkpoint", str(teacher_run), "--with-heads", "--out", str(bundle)]) == 0
    tensors, header = read_teacher_bundle(bundle)
    assert {"dino_center", "ibot_center"} <= set(tensors) and any(k.startswith("ibot_head.") for k in tensors)
    assert "dataset_path" not in str(header["config"]) and header["backbone"]["in_chans"] == 3

    def distill_model(teacher: Path) -> DistillMetaArch:
        cfg = load_distill_config(DISTILL_CONFIG, [
            "crops.global_crops_size=28", "crops.local_crops_size=14", "train.centering=centering",
            f"train.dataset_path=ImageFolder:root={image_root}", f"train.output_dir={tmp_path / 'out'}"], teacher=teacher)
        return DistillMetaArch(cfg)

    from_run, from_bundle = distill_model(teacher_run), distill_model(bundle)
    crops = torch.randn(4, 3, 28, 28)
    for first, second in zip(from_run.teacher_targets(crops, 0.07), from_bundle.teacher_targets(crops, 0.07)):
        assert torch.equal(first, second)
    for which in ("dino_center", "ibot_center"):
        assert torch.equal(getattr(from_run, which).center, getattr(from_bundle, which).center)
        assert getattr(from_run, which).center.abs().sum() > 0  # the run's own (non-zero) centres
    out = from_run.teacher.backbone.forward_features(crops)
    assert torch.equal(out["x_norm_patchtokens"], from_bundle.teacher.backbone.forward_features(crops)["x_norm_patchtokens"])
