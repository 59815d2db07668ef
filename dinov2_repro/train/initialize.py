"""Start a run from other weights (``MODEL.WEIGHTS``).

- A run or checkpoint directory (e.g. the 518 px phase after pretraining): student, teacher,
  heads and centers are copied; pos-embeds are resampled to the new global crop grid.
- A backbone file (this project's ``.safetensors`` export, or whatever
  ``backbone_file.load_backbone`` reads): continued pretraining. Only the student and teacher
  backbones are initialised from it; the DINO/iBOT heads and the centers start fresh, which is
  why such a run should warm-start (``train.freeze_backbone_iterations``, see
  ``docs/released-weights.md``).

Optimiser state and schedules start fresh in both cases.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ..models.vision_transformer import resample_pos_embed
from .checkpoint import load_model_state, read_meta, resolve_checkpoint

logger = logging.getLogger("dinov2_repro")

# Export-header facts that must equal the `student:` section for the weights to fit.
_MATCHED_FACTS = {"patch_size": "patch_size", "in_chans": "in_chans", "num_register_tokens": "num_register_tokens",
                  "ffn": "ffn_layer"}


def is_backbone_file(weights: str | Path) -> bool:
    """True when ``MODEL.WEIGHTS`` names a file (a backbone), False for a run/checkpoint directory."""
    return Path(weights).is_file()


def _fit_pos_embed(state: dict[str, Tensor], target: dict[str, Tensor], model: nn.Module, prefix: str = "") -> None:
    """Resample every ``*pos_embed`` of ``state`` whose grid differs from ``target``'s, in place."""
    for key, value in list(state.items()):
        full = prefix + key
        if key.endswith("pos_embed") and full in target and value.shape != target[full].shape:
            side = int(round((target[full].shape[1] - 1) ** 0.5))
            owner = model.get_submodule(full.rsplit(".", 1)[0]) if "." in full else model
            state[key] = resample_pos_embed(value.float(), (side, side), antialias=owner.interpolate_antialias,
                                            offset=0.0).to(value.dtype)
            logger.info("resampled %s from %s to %s", full, tuple(value.shape), tuple(state[key].shape))


def read_backbone_header(path: str | Path, *, key: str) -> dict[str, Any]:
    """The header of a backbone file, cheaply: from the safetensors header alone for this project's
    export (no weights read), else by loading the file through ``backbone_file.load_backbone``.
    Errors become one ConfigError naming ``key`` and the file."""
    from ..backbone_file import _decode_metadata, load_backbone
    from ..config import ConfigError

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                raw = handle.metadata()
            if raw and "format" in raw:
                return _decode_metadata(raw, path)
        return load_backbone(path)[1]
    except Exception as err:  # noqa: BLE001  safetensors raises its own types for corrupt headers
        raise ConfigError(f"{key}={path}: cannot read the backbone file (corrupt, truncated or not a backbone?): "
                          f"{err}") from None


def check_backbone_fits(meta: dict[str, Any], student_cfg: DictConfig, weights: str | Path) -> None:
    """ConfigError naming the ``student.*`` key whose value differs from the backbone file's."""
    from ..config import ConfigError

    for fact, key in _MATCHED_FACTS.items():
        if fact in meta and str(meta[fact]) != str(student_cfg[key]):
            raise ConfigError(f"MODEL.WEIGHTS={weights} has {fact}={meta[fact]!r} but student.{key}="
                              f"{student_cfg[key]!r}; set student.{key}={meta[fact]} (the backbone's architecture)")
    import torch

    from .meta_arch import build_backbone

    with torch.device("meta"):  # shapes only, no memory
        student = build_backbone(student_cfg, img_size=student_cfg.patch_size, drop_path_rate=0.0)
    for fact in ("embed_dim", "depth"):
        if fact in meta and int(meta[fact]) != int(getattr(student, fact)):
            raise ConfigError(f"MODEL.WEIGHTS={weights} ({meta.get('arch')}) has {fact}={meta[fact]} but "
                              f"student.arch={student_cfg.arch} has {getattr(student, fact)}; set student.arch to "
                              "the backbone's architecture")


def read_backbone_weights(weights: str | Path, student_cfg: DictConfig) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(backbone state dict in this project's layout, export header) of a backbone file, checked
    against the ``student:`` section; ConfigError naming MODEL.WEIGHTS and the key otherwise."""
    from ..backbone_file import load_backbone
    from ..config import ConfigError

    try:
        backbone, meta = load_backbone(weights)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"MODEL.WEIGHTS={weights}: cannot read the backbone file: {err}") from None
    check_backbone_fits(meta, student_cfg, weights)
    return backbone.state_dict(), meta


def init_backbones_from_file(model: nn.Module, weights: str | Path) -> dict[str, Any]:
    """Continued pretraining: copy a backbone file into the student and teacher backbones. Heads
    and centers keep their fresh init. Returns the header."""
    from ..config import ConfigError

    state, meta = read_backbone_weights(weights, model.cfg.student)
    targets = {"student.backbone": model.student.backbone, "teacher.backbone": model.teacher.backbone}
    for name, backbone in targets.items():
        fitted = dict(state)
        _fit_pos_embed(fitted, backbone.state_dict(), backbone)
        try:
            backbone.load_state_dict(fitted, strict=True)
        except RuntimeError as err:
            raise ConfigError(f"MODEL.WEIGHTS={weights} ({meta.get('arch')}, embed_dim {meta.get('embed_dim')}, depth "
                              f"{meta.get('depth')}) does not fit student.arch={model.cfg.student.arch}: "
                              f"{str(err).splitlines()[0]}") from None
    logger.info("continued pretraining: backbones initialised from %s (%s); DINO/iBOT heads and centers start fresh",
                weights, meta.get("arch"))
    return meta


def init_from_pretrained(model: nn.Module, weights: str | Path) -> None:
    """Copy ``weights`` (a run or checkpoint directory, or a backbone file) into ``model`` (an
    unsharded SSL meta-arch)."""
    from .meta_arch import SSLMetaArch

    if is_backbone_file(weights):
        init_backbones_from_file(model, weights)
        return
    checkpoint = resolve_checkpoint(weights, what="MODEL.WEIGHTS")
    source = SSLMetaArch(OmegaConf.create(read_meta(checkpoint)["config"]))
    load_model_state(checkpoint, source)
    state = source.state_dict()
    target = model.state_dict()
    _fit_pos_embed(state, target, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"MODEL.WEIGHTS={weights}: weights do not fit this architecture: {err}") from err
    logger.info("initialised from %s", checkpoint)
