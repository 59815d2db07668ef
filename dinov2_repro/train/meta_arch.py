"""The DINOv2 self-supervised meta-architecture: an EMA teacher, a student with DINO and iBOT
heads, KoLeo, both centering modes. ``train/loop.py`` runs it (and distill's meta-arch) unchanged."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ..distributed.fsdp import local_tensor
from ..losses import DINOLoss, KoLeoLoss, SoftmaxCentering, iBOTPatchLoss, sinkhorn_knopp_center
from ..models import build_vit
from ..models.heads import DINOHead
from .monitors import effective_rank, teacher_monitors
from .optim import build_param_groups


ROPE_KEYS = ("rope_shift", "rope_jitter", "rope_rescale")


def rope_kwargs(student_cfg: DictConfig) -> dict[str, float]:
    """The set (non-null) ``student.rope_*`` keys as DINOv3 model keywords (older configs have none)."""
    return {key: float(student_cfg[key]) for key in ROPE_KEYS if student_cfg.get(key) is not None}


def build_backbone(student_cfg: DictConfig, *, img_size: int, drop_path_rate: float, attn_backend: str = "auto",
                   stochastic_depth: str = "efficient") -> nn.Module:
    """A backbone from the ``student`` config section (the teacher uses the same with no drop path)."""
    return build_vit(
        student_cfg.arch,
        img_size=img_size,
        patch_size=student_cfg.patch_size,
        in_chans=student_cfg.in_chans,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=student_cfg.drop_path_uniform,
        init_values=student_cfg.layerscale,
        ffn_layer=student_cfg.ffn_layer,
        qkv_bias=student_cfg.qkv_bias,
        proj_bias=student_cfg.proj_bias,
        ffn_bias=student_cfg.ffn_bias,
        num_register_tokens=student_cfg.num_register_tokens,
        interpolate_antialias=student_cfg.interpolate_antialias,
        interpolate_offset=student_cfg.interpolate_offset,
        stochastic_depth=stochastic_depth,
        attn_backend=attn_backend,
        **rope_kwargs(student_cfg),
    )


def _head(section: DictConfig, in_dim: int) -> DINOHead:
    return DINOHead(in_dim=in_dim, out_dim=section.head_n_prototypes, hidden_dim=section.head_hidden_dim,
                    bottleneck_dim=section.head_bottleneck_dim, nlayers=section.head_nlayers)


def build_student_and_teacher(cfg: DictConfig) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    kwargs = dict(img_size=cfg.crops.global_crops_size, attn_backend=cfg.train.attention_backend,
                  stochastic_depth=cfg.train.stochastic_depth)
    student = nn.ModuleDict({"backbone": build_backbone(cfg.student, drop_path_rate=cfg.student.drop_path_rate, **kwargs)})
    teacher = nn.ModuleDict({"backbone": build_backbone(cfg.student, drop_path_rate=0.0, **kwargs)})
    embed_dim = student.backbone.embed_dim
    # Only the student keeps activations for a backward pass; the teacher runs under no_grad.
    student.backbone.set_activation_checkpointing(cfg.train.activation_checkpointing,
                                                  every=cfg.train.activation_checkpointing_every)
    for modules in (student, teacher):
        modules["dino_head"] = _head(cfg.dino, embed_dim)
        if cfg.ibot.separate_head:
            modules["ibot_head"] = _head(cfg.ibot, embed_dim)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        if cfg.train.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"train.centering {cfg.train.centering!r} unknown; choose 'centering' or 'sinkhorn_knopp'")
        self.cfg = cfg
        self.student, self.teacher = build_student_and_teacher(cfg)
        self.dino_loss = DINOLoss(student_temp=0.1)
        self.ibot_loss = iBOTPatchLoss(student_temp=0.1)
        self.koleo_loss = KoLeoLoss()
        ibot_prototypes = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
        self._last_teacher_cls: Tensor | None = None  # for the RankMe monitor, refreshed every step
        if cfg.train.centering == "centering":
            self.dino_center = SoftmaxCentering(out_dim=cfg.dino.head_n_prototypes, momentum=0.9)
            self.ibot_center = SoftmaxCentering(out_dim=ibot_prototypes, momentum=0.9)

    # ---- what the generic loop needs --------------------------------------------------
    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths
        return self

    def trainable(self) -> nn.Module:
        return self.student

    def clip_parts(self) -> dict[str, nn.Module]:
        """Clipped separately to optim.clip_grad, as in the reference: the backbone and each head."""
        return {name: module for name, module in self.student.items()}

    def feature_rank(self) -> float | None:
        """RankMe of the teacher CLS features of the last step's global crops (None before a step)."""
        return None if self._last_teacher_cls is None else effective_rank(self._last_teacher_cls)

    def param_groups(self) -> list[dict]:
        optim = self.cfg.optim
        return build_param_groups(self.student.named_parameters(), num_layers=self.student.backbone.depth,
                                  layerwise_decay=optim.layerwise_decay, patch_embed_lr_mult=optim.patch_embed_lr_mult)

    def export_backbone(self) -> nn.Module:
        return self.teacher.backbone

    @torch.no_grad()
    def after_optimizer_step(self, values: dict[str, float]) -> None:
        """Teacher EMA: t <- m t + (1 - m) s (works on local shards under FSDP)."""
        momentum = values["mom"]
        student_params = [local_tensor(p) for p in self.student.parameters()]
        teacher_params = [local_tensor(p) for p in self.teacher.parameters()]
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
        self.update_centers()

    def update_centers(self) -> None:
        """One EMA step of the softmax centres over every batch of this optimizer step (all the
        micro-batches of gradient accumulation); the centre used by a step is never its own."""
        for which in ("dino", "ibot"):
            center = getattr(self, f"{which}_center", None)
            if center is not None:
                center.apply_accumulated()

    # ---- the SSL step ----------------------------------------------------------------
    def _ibot_head(self, modules: nn.ModuleDict) -> nn.Module:
        return modules["ibot_head"] if "ibot_head" in modules else modules["dino_head"]

    def _center(self, which: str, logits: Tensor, temp: float) -> Tensor:
        if self.cfg.train.centering == "sinkhorn_knopp":
            return sinkhorn_knopp_center(logits, temp, n_iterations=self.cfg.train.sinkhorn_iterations)
        center: SoftmaxCentering = getattr(self, f"{which}_center")
        probs = center(logits, temp)
        center.accumulate(logits)  # applied once per optimizer step, in after_optimizer_step
        return probs

    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor, mask_indices: Tensor, temp: float) -> tuple[Tensor, Tensor]:
        out = self.teacher.backbone(global_crops, is_training=True)
        self._last_teacher_cls = out["x_norm_clstoken"].detach()
        cls_logits = self.teacher.dino_head(out["x_norm_clstoken"])
        masked_patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        patch_logits = self._ibot_head(self.teacher)(masked_patches)
        n_global_crops = 2
        dino_probs = self._center("dino", cls_logits.float(), temp).reshape(n_global_crops, -1, cls_logits.shape[-1])
        # n_samples=None: Sinkhorn-Knopp counts the masked tokens of every rank itself.
        ibot_probs = self._center("ibot", patch_logits.float(), temp)
        return dino_probs, ibot_probs

    def compute_losses(self, batch: dict[str, Any], values: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        device = next(self.student.parameters()).device
        global_crops = batch["collated_global_crops"].to(device, non_blocking=True)
        local_crops = batch["collated_local_crops"].to(device, non_blocking=True)
        masks = batch["collated_masks"].to(device, non_blocking=True)
        mask_indices = batch["mask_indices_list"].to(device, non_blocking=True)
        masks_weight = batch["masks_weight"].to(device, non_blocking=True)
        n_global_images = global_crops.shape[0]
        batch_size = n_global_images // 2
        n_local = local_crops.shape[0] // batch_size if local_crops.numel() else 0

        dino_probs, ibot_probs = self.teacher_targets(global_crops, mask_indices, values["teacher_temp"])

        # One packed pass over every student crop (globals masked), efficient stochastic depth inside.
        crops, crop_masks = [global_crops], [masks]
        if n_local:
            crops.append(local_crops)
            crop_masks.append(None)
        # Called through __call__ (not forward_features) so FSDP's hooks unshard the parameters.
        outputs = self.student.backbone(crops, crop_masks, is_training=True)
        global_cls = outputs[0]["x_norm_clstoken"]
        masked_patches = outputs[0]["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        cls_tokens = torch.cat([global_cls] + ([outputs[1]["x_norm_clstoken"]] if n_local else []))
        if "ibot_head" in self.student:
            cls_logits = self.student.dino_head(cls_tokens)
            patch_logits = self.student.ibot_head(masked_patches)
        else:  # shared head: one call for CLS and masked patch tokens
            logits = self.student.dino_head(torch.cat([cls_tokens, masked_patches]))
            cls_logits, patch_logits = logits[: cls_tokens.shape[0]], logits[cls_tokens.shape[0]:]
        cls_logits = cls_logits.float().reshape(2 + n_local, batch_size, -1)

        # 2 swapped global terms + n_local x 2 local terms, averaged over the terms, as DINOv2 does. With
        # no local crops the reference still counts one local term (max(n_local * 2, 1)): match it.
        n_terms = 2 + max(2 * n_local, 1)
        dino_global = self.dino_loss(cls_logits[:2], dino_probs, ignore_diagonal=True)
        dino_local = self.dino_loss(cls_logits[2:], dino_probs) if n_local else cls_logits.sum() * 0
        dino = (dino_global + dino_local) / n_terms
        koleo = sum(self.koleo_loss(part) for part in global_cls.float().chunk(2))
        if mask_indices.numel():
            ibot = self.ibot_loss(patch_logits.float(), ibot_probs, masks_weight, n_images=n_global_images)
        else:
            ibot = patch_logits.sum() * 0
        total = cfg.dino.loss_weight * dino + cfg.dino.koleo_loss_weight * koleo + cfg.ibot.loss_weight * ibot
        terms = {"dino_local_crops_loss": dino_local / n_terms, "dino_global_crops_loss": dino_global / n_terms,
                 "koleo_loss": koleo, "ibot_loss": ibot}
        # dino_global sums the 2 swapped pairs' batch-mean cross-entropies.
        terms.update(teacher_monitors(dino_probs, dino_global.detach() / 2))
        return total, {k: v.detach() for k, v in terms.items()}
