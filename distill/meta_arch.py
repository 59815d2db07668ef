"""The distillation meta-architecture: a frozen teacher (backbone + DINO/iBOT heads from a
pretraining checkpoint or a teacher bundle) and one or more students, each with fresh heads and an EMA copy of
its backbone (the exported model). It satisfies ``dinov2_repro.train.contract.MetaArch`` and
runs in the generic loop unchanged.

Per batch the teacher runs once on the two global crops; every student is trained against
the same (centred) targets: DINO on CLS (student global and local crops vs both teacher
global crops), iBOT on every patch token of the global crops (nothing is masked), KoLeo on the
student's global CLS. Students never interact: the total loss is the sum of their losses, and
each student's parameters, optimiser groups and EMA are its own.
"""
from __future__ import annotations

import copy
import logging
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from dinov2_repro.distributed.fsdp import local_tensor
from dinov2_repro.losses import DINOLoss, KoLeoLoss, SoftmaxCentering, iBOTPatchLoss
from dinov2_repro.teacher_bundle import build_bundle_teacher, bundle_centers, teacher_bundle_file
from dinov2_repro.train.checkpoint import _single_process_quiet
from dinov2_repro.train.meta_arch import SSLMetaArch, _head, build_backbone
from dinov2_repro.train.optim import build_param_groups

from .config import StudentSpec, student_specs, teacher_config
from .features import crop_feature_losses, multicrop_cls_loss, patch_feature_loss, projection_heads, teacher_features

logger = logging.getLogger("dinov2_repro")


def build_teacher(checkpoint: str | Path, *, attention_backend: str = "auto") -> tuple[nn.ModuleDict, DictConfig]:
    """(frozen {backbone, dino_head[, ibot_head]} loaded from ``checkpoint``, its training config).

    Only the ``teacher.*`` tensors are read from the DCP checkpoint, whatever world size wrote it.
    ``checkpoint`` may also be a teacher bundle (``export --with-heads``): the same teacher."""
    import torch.distributed.checkpoint as dcp

    if teacher_bundle_file(checkpoint) is not None:
        return build_bundle_teacher(checkpoint, attention_backend=attention_backend)
    source = teacher_config(Path(checkpoint))
    backbone = build_backbone(source.student, img_size=source.crops.global_crops_size, drop_path_rate=0.0,
                              attn_backend=attention_backend)
    teacher = nn.ModuleDict({"backbone": backbone, "dino_head": _head(source.dino, backbone.embed_dim)})
    if source.ibot.separate_head:
        teacher["ibot_head"] = _head(source.ibot, backbone.embed_dim)
    state = {"model": {f"teacher.{k}": v for k, v in teacher.state_dict().items()}}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(checkpoint))
    except Exception as err:
        raise RuntimeError(f"cannot load the teacher from {checkpoint}: {err}") from err
    teacher.load_state_dict({k[len("teacher."):]: v for k, v in state["model"].items()}, strict=True)
    teacher.requires_grad_(False)
    return teacher.eval(), source


def build_backbone_teacher(path: str | Path, *, attention_backend: str = "auto") -> nn.ModuleDict:
    """A frozen ``{backbone}`` from a backbone file (this project's export or, through
    ``backbone_file.load_backbone``, a released checkpoint): the teacher of feature distillation."""
    from dinov2_repro.backbone_file import load_backbone

    backbone, _ = load_backbone(path)
    if hasattr(backbone, "set_attention_backend"):
        backbone.set_attention_backend(attention_backend)
    teacher = nn.ModuleDict({"backbone": backbone})
    teacher.requires_grad_(False)
    return teacher.eval()


def _load_centers(checkpoint: str | Path, centers: dict[str, SoftmaxCentering]) -> None:
    """Start the softmax centers from the teacher run's own (when it used softmax centering)."""
    import torch.distributed.checkpoint as dcp

    if teacher_bundle_file(checkpoint) is not None:
        for which, center in bundle_centers(checkpoint).items():
            if which in centers and tuple(center.shape) == tuple(centers[which].center.shape):
                centers[which].center.copy_(center)
                logger.info("teacher %s center loaded from %s", which, checkpoint)
        return
    reader = dcp.FileSystemReader(str(checkpoint))
    known = reader.read_metadata().state_dict_metadata
    state = {"model": {f"{which}_center.center": c.center for which, c in centers.items()
                       if f"model.{which}_center.center" in known and tuple(known[f"model.{which}_center.center"].size) == tuple(c.center.shape)}}
    if state["model"]:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(checkpoint))
        logger.info("teacher centers %s loaded from %s", sorted(state["model"]), checkpoint)


def student_seed(base_seed: int, name: str) -> int:
    """A student's init seed depends on its name only (not its position in the list), so a
    student of a multi-student job starts exactly like the same student trained alone."""
    return (int(base_seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _build_student(spec: StudentSpec, cfg: DictConfig, *, img_size: int, embed_heads: DictConfig) -> nn.ModuleDict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(student_seed(cfg.train.seed, spec.name))
        backbone = build_backbone(spec.section, img_size=img_size, drop_path_rate=0.0,
                                  attn_backend=cfg.train.attention_backend, stochastic_depth=cfg.train.stochastic_depth)
        # As in pretraining: recompute the student's block activations in backward (the teacher
        # runs without gradients, so it keeps no activations to save).
        backbone.set_activation_checkpointing(cfg.train.activation_checkpointing,
                                              every=cfg.train.activation_checkpointing_every)
        student = nn.ModuleDict({"backbone": backbone, "dino_head": _head(embed_heads.dino, backbone.embed_dim)})
        if embed_heads.ibot.separate_head:
            student["ibot_head"] = _head(embed_heads.ibot, backbone.embed_dim)
    # Nothing is masked: the mask token never gets a gradient, so it stays out of the optimiser
    # (an optimiser state it never gets would make the checkpoint unloadable).
    backbone.mask_token.requires_grad_(False)
    return student


def _build_feature_student(spec: StudentSpec, cfg: DictConfig, *, img_size: int, teacher_dim: int) -> nn.ModuleDict:
    """A student of feature distillation: its backbone and the projections of its CLS and patch
    tokens to the teacher's width (seeded by name, like ``_build_student``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(student_seed(cfg.train.seed, spec.name))
        backbone = build_backbone(spec.section, img_size=img_size, drop_path_rate=0.0,
                                  attn_backend=cfg.train.attention_backend, stochastic_depth=cfg.train.stochastic_depth)
        student = nn.ModuleDict({"backbone": backbone, **projection_heads(backbone.embed_dim, teacher_dim)})
    backbone.mask_token.requires_grad_(False)  # nothing is masked (see _build_student)
    return student


class DistillMetaArch(nn.Module):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        if cfg.train.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"train.centering {cfg.train.centering!r} unknown; choose 'centering' or 'sinkhorn_knopp'")
        self.cfg = cfg
        self.specs = {spec.name: spec for spec in student_specs(cfg)}
        # "features": a backbone-only teacher, head-free feature distillation (distill/features.py).
        self.method = str(cfg.distill.get("method", "heads"))
        if self.method == "features":
            self._init_feature_distillation(cfg)
            return
        self.teacher, teacher_cfg = build_teacher(cfg.distill.teacher, attention_backend=cfg.train.attention_backend)
        self.teacher_patch = int(teacher_cfg.student.patch_size)
        self.grid = cfg.crops.global_crops_size // self.teacher_patch
        self.students = nn.ModuleDict()
        self.ema = nn.ModuleDict()  # EMA backbones: the exported models
        for name, spec in self.specs.items():
            student = _build_student(spec, cfg, img_size=self.student_size(spec, cfg.crops.global_crops_size),
                                     embed_heads=teacher_cfg)
            self.students[name] = student
            self.ema[name] = copy.deepcopy(student.backbone).requires_grad_(False)
        self.dino_loss = DINOLoss(student_temp=0.1)
        self.ibot_loss = iBOTPatchLoss(student_temp=0.1)
        self.koleo_loss = KoLeoLoss()
        if cfg.train.centering == "centering":
            ibot_prototypes = teacher_cfg.ibot.head_n_prototypes if teacher_cfg.ibot.separate_head else teacher_cfg.dino.head_n_prototypes
            self.dino_center = SoftmaxCentering(out_dim=teacher_cfg.dino.head_n_prototypes, momentum=0.9)
            self.ibot_center = SoftmaxCentering(out_dim=ibot_prototypes, momentum=0.9)
            _load_centers(cfg.distill.teacher, {"dino": self.dino_center, "ibot": self.ibot_center})

    def _init_feature_distillation(self, cfg: DictConfig) -> None:
        self.teacher = build_backbone_teacher(cfg.distill.teacher, attention_backend=cfg.train.attention_backend)
        self.teacher_patch = int(self.teacher.backbone.patch_size)
        self.students = nn.ModuleDict()
        self.ema = nn.ModuleDict()
        for name, spec in self.specs.items():
            student = _build_feature_student(spec, cfg, img_size=cfg.crops.global_crops_size,
                                             teacher_dim=int(self.teacher.backbone.embed_dim))
            self.students[name] = student
            self.ema[name] = copy.deepcopy(student.backbone).requires_grad_(False)

    def student_size(self, spec: StudentSpec, size: int) -> int:
        """Input size for the student: the crop size, or (other patch size, heads method) the size
        with the teacher's grid. Feature distillation resamples the teacher's grid instead."""
        if self.method == "features":
            return size
        return size // self.teacher_patch * int(spec.section.patch_size)

    # ---- the contract (dinov2_repro.train.contract.MetaArch) --------------------------------
    def train(self, mode: bool = True) -> "DistillMetaArch":
        super().train(mode)
        self.teacher.eval()
        self.ema.eval()
        return self

    def trainable(self) -> nn.Module:
        return self.students

    def clip_parts(self) -> dict[str, nn.Module]:
        # Per student and per part: one student's large gradient must not shrink another's.
        return {f"{name}/{part}": module for name, student in self.students.items() for part, module in student.items()}

    def param_groups(self) -> list[dict]:
        """Each student's own groups (layer-wise decay over its own depth); a student's
        ``base_lr`` scales its groups relative to the shared schedule's ``optim.base_lr``."""
        optim = self.cfg.optim
        groups: list[dict] = []
        for name, student in self.students.items():
            lr_scale = self.specs[name].base_lr / float(optim.base_lr)
            for group in build_param_groups(student.named_parameters(), num_layers=student.backbone.depth,
                                            layerwise_decay=optim.layerwise_decay,
                                            patch_embed_lr_mult=optim.patch_embed_lr_mult):
                group["lr_multiplier"] *= lr_scale
                group["student"] = name
                groups.append(group)
        return groups

    def export_backbone(self) -> nn.ModuleDict:
        return self.ema

    @torch.no_grad()
    def after_optimizer_step(self, values: dict[str, float]) -> None:
        """EMA of every student backbone: e <- m e + (1 - m) s (local shards under FSDP)."""
        momentum = values["mom"]
        for name, ema in self.ema.items():
            ema_params = [local_tensor(p) for p in ema.parameters()]
            student_params = [local_tensor(p) for p in self.students[name].backbone.parameters()]
            torch._foreach_mul_(ema_params, momentum)
            torch._foreach_add_(ema_params, student_params, alpha=1.0 - momentum)
        SSLMetaArch.update_centers(self)

    # ---- the distillation step ----------------------------------------------------------------
    def _center(self, which: str, logits: Tensor, temp: float) -> Tensor:
        return SSLMetaArch._center(self, which, logits, temp)  # same centering code as pretraining

    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor, temp: float) -> tuple[Tensor, Tensor]:
        """(DINO probs (2, B, K), iBOT probs (2B * n_patches, K')) for both global crops."""
        out = self.teacher.backbone(global_crops, is_training=True)
        cls_logits = self.teacher.dino_head(out["x_norm_clstoken"])
        patch_logits = self.teacher["ibot_head" if "ibot_head" in self.teacher else "dino_head"](
            out["x_norm_patchtokens"].flatten(0, 1))
        dino_probs = self._center("dino", cls_logits.float(), temp).reshape(2, -1, cls_logits.shape[-1])
        ibot_probs = self._center("ibot", patch_logits.float(), temp)
        return dino_probs, ibot_probs

    def _student_input(self, spec: StudentSpec, crops: Tensor) -> Tensor:
        size = self.student_size(spec, crops.shape[-1])
        if size == crops.shape[-1]:
            return crops
        return F.interpolate(crops, size=(size, size), mode="bicubic", align_corners=False, antialias=True)

    def student_losses(self, name: str, global_crops: Tensor, local_crops: Tensor, dino_probs: Tensor,
                       ibot_probs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, spec, student = self.cfg, self.specs[name], self.students[name]
        n_global_images = global_crops.shape[0]
        batch_size = n_global_images // 2
        n_local = local_crops.shape[0] // batch_size if local_crops.numel() else 0
        crops = [self._student_input(spec, global_crops)]
        if n_local:
            crops.append(self._student_input(spec, local_crops))
        outputs = student.backbone(crops, [None] * len(crops), is_training=True)  # no masking
        global_cls = outputs[0]["x_norm_clstoken"]
        patches = outputs[0]["x_norm_patchtokens"].flatten(0, 1)
        cls_tokens = torch.cat([global_cls] + ([outputs[1]["x_norm_clstoken"]] if n_local else []))
        cls_logits = student.dino_head(cls_tokens).float().reshape(2 + n_local, batch_size, -1)
        patch_logits = student["ibot_head" if "ibot_head" in student else "dino_head"](patches)

        # Every student crop against both teacher global crops: the frozen teacher's view of the
        # same crop is a valid target here (there is no collapse to avoid), so no diagonal is skipped.
        n_terms = 2 * (2 + n_local)
        dino_global = self.dino_loss(cls_logits[:2], dino_probs)
        dino_local = self.dino_loss(cls_logits[2:], dino_probs) if n_local else cls_logits.sum() * 0
        dino = (dino_global + dino_local) / n_terms
        n_patches = patches.shape[0] // n_global_images
        weights = torch.full((patches.shape[0],), 1.0 / n_patches, device=patches.device)
        ibot = self.ibot_loss(patch_logits.float(), ibot_probs, weights, n_images=n_global_images)
        koleo = sum(self.koleo_loss(part) for part in global_cls.float().chunk(2))
        total = cfg.dino.loss_weight * dino + cfg.dino.koleo_loss_weight * koleo + cfg.ibot.loss_weight * ibot
        terms = {"dino_global_crops_loss": dino_global / n_terms, "dino_local_crops_loss": dino_local / n_terms,
                 "koleo_loss": koleo, "ibot_loss": ibot, "loss": total}
        return total, {f"{name}/{k}": v.detach() for k, v in terms.items()}

    def feature_losses(self, global_crops: Tensor, local_crops: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Head-free distillation: every student's projected CLS and patch tokens against the frozen
        teacher's (``distill.feature_cls_targets``: of the same crop, averaged over the crop sets;
        or, for the CLS, of both global crops of the image)."""
        crop_sets = [global_crops] + ([local_crops] if local_crops.numel() else [])
        multicrop = str(self.cfg.distill.feature_cls_targets) == "global_crops"
        # Multi-crop pairing needs the teacher's global crops only (patch targets too).
        targets = [teacher_features(self.teacher.backbone, crops) for crops in crop_sets[:1 if multicrop else None]]
        kind, patch_weight = str(self.cfg.distill.feature_loss), float(self.cfg.distill.feature_patch_loss_weight)
        num_images = global_crops.shape[0] // 2
        total, terms = None, {}
        for name, student in self.students.items():
            outputs = student.backbone(crop_sets, [None] * len(crop_sets), is_training=True)  # one packed pass
            if multicrop:  # CLS of every crop against both global crops; patches on the global crops
                student_cls = student.cls_proj(torch.cat([out["x_norm_clstoken"] for out in outputs]))
                cls_loss = multicrop_cls_loss(student_cls, targets[0]["cls"], num_images, kind)
                patch_loss = patch_feature_loss(outputs[0], tuple(global_crops.shape[-2:]), targets[0], student, kind)
            else:
                cls_loss = patch_loss = 0.0
                for out, crops, target in zip(outputs, crop_sets, targets):
                    cls, patches = crop_feature_losses(out, tuple(crops.shape[-2:]), target, student, kind)
                    cls_loss, patch_loss = cls_loss + cls / len(targets), patch_loss + patches / len(targets)
            loss = cls_loss + patch_weight * patch_loss
            total = loss if total is None else total + loss
            terms.update({f"{name}/cls_feature_loss": cls_loss.detach(), f"{name}/patch_feature_loss": patch_loss.detach(),
                          f"{name}/loss": loss.detach()})
        return total, terms

    def compute_losses(self, batch: dict[str, Any], values: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        device = next(self.teacher.parameters()).device
        global_crops = batch["collated_global_crops"].to(device, non_blocking=True)
        local_crops = batch["collated_local_crops"].to(device, non_blocking=True)
        if self.method == "features":
            return self.feature_losses(global_crops, local_crops)
        dino_probs, ibot_probs = self.teacher_targets(global_crops, values["teacher_temp"])  # once for all students
        total, terms = None, {}
        for name in self.students:
            loss, student_terms = self.student_losses(name, global_crops, local_crops, dino_probs, ibot_probs)
            total = loss if total is None else total + loss
            terms.update(student_terms)
        return total, terms
