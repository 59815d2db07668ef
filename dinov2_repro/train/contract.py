"""The contract between ``train/loop.py`` and a meta-architecture, in one place.

Both meta-archs of the project satisfy it: SSL pretraining (``train.meta_arch.SSLMetaArch``)
and distillation (``distill.meta_arch.DistillMetaArch``). The loop only ever calls these
methods (plus ``nn.Module``'s own ``train()``/``to()``/state dict, which checkpointing uses).
``tests/test_distill.py`` checks that both classes provide every member.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class MetaArch(Protocol):
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups; each dict has ``params``, ``lr_multiplier``, ``wd_multiplier`` and
        ``is_last_layer`` (the loop's ``apply_schedule`` reads them every iteration)."""
        ...

    def compute_losses(self, batch: dict[str, Any], values: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss to backpropagate, {name: detached term to log}) for one batch; ``values``
        are this iteration's schedule values (lr, wd, mom, teacher_temp, last_layer_lr)."""
        ...

    def after_optimizer_step(self, values: dict[str, float]) -> None:
        """Work after each optimiser step: the EMA (of the teacher in SSL, of each student in distillation)."""
        ...

    def trainable(self) -> nn.Module:
        """Everything that receives gradients."""
        ...

    def clip_parts(self) -> dict[str, nn.Module]:
        """Parts whose gradients are clipped separately to ``optim.clip_grad`` (logged as
        ``grad_norm/<part>``): e.g. backbone, dino_head, ibot_head of each student."""
        ...

    def export_backbone(self) -> nn.Module:
        """What the run's export callable receives: the teacher backbone in SSL, a ModuleDict
        ``{student name: EMA backbone}`` in distillation."""
        ...
