"""Start a run from another run's weights (``MODEL.WEIGHTS``), e.g. the 518 px phase after
pretraining: student, teacher, heads and centers are copied; pos-embeds are resampled to the
new global crop grid and keep training; optimiser state and schedules start fresh."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf
from torch import nn

from ..models.vision_transformer import resample_pos_embed
from .checkpoint import load_model_state, read_meta, resolve_checkpoint

logger = logging.getLogger("dinov2_repro")


def init_from_pretrained(model: nn.Module, weights: str | Path) -> None:
    """Copy ``weights`` (a run or checkpoint directory) into ``model`` (an unsharded meta-arch).
    A backbone file (an export, a released DINOv2/DINOv3 .pth or timm .safetensors) sets the
    student and teacher backbones only; the heads keep their fresh initialisation."""
    from ..weights.into_model import is_backbone_file
    from .meta_arch import SSLMetaArch

    if is_backbone_file(weights):
        init_backbones_from_file(model, weights)
        return
    checkpoint = resolve_checkpoint(weights, what="MODEL.WEIGHTS")
    source = SSLMetaArch(OmegaConf.create(read_meta(checkpoint)["config"]))
    load_model_state(checkpoint, source)
    state = source.state_dict()
    target = model.state_dict()
    for key, value in state.items():
        if key.endswith("backbone.pos_embed") and key in target and value.shape != target[key].shape:
            side = int(round((target[key].shape[1] - 1) ** 0.5))
            backbone = model.get_submodule(key.rsplit(".", 1)[0])
            state[key] = resample_pos_embed(value.float(), (side, side), antialias=backbone.interpolate_antialias,
                                            offset=0.0)
            logger.info("resampled %s from %s to %s", key, tuple(value.shape), tuple(state[key].shape))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"MODEL.WEIGHTS={weights}: weights do not fit this architecture: {err}") from err
    logger.info("initialised from %s", checkpoint)


def init_backbones_from_file(model: nn.Module, path: str | Path) -> None:
    """Student and teacher backbones from one backbone file (checked against the configured
    architecture; a learned pos-embed is resampled to the global crop grid)."""
    from ..weights.into_model import backbone_state_for

    for part in ("student", "teacher"):
        backbone = model.get_submodule(f"{part}.backbone")
        try:
            state, meta = backbone_state_for(backbone, path)
        except ValueError as err:
            raise ValueError(f"MODEL.WEIGHTS={err}") from None
        backbone.load_state_dict(state, strict=True)
    logger.info("initialised the student and teacher backbones from %s (%s %s); heads start fresh", path,
                meta.get("arch_family", "dinov2"), meta.get("arch"))
