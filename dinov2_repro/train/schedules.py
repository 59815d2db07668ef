"""Per-iteration schedules: lr, weight decay, teacher momentum, teacher temperature, last-layer lr."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig


class CosineScheduler:
    """Linear warmup from ``start_warmup_value``, then a half-cosine from ``base_value`` to ``final_value``; ``final_value`` after ``total_iters``."""

    def __init__(self, *, base_value: float, final_value: float, total_iters: int, warmup_iters: int = 0,
                 start_warmup_value: float = 0.0) -> None:
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        cosine_iters = max(total_iters - warmup_iters, 0)
        steps = np.arange(cosine_iters)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(cosine_iters, 1)))
        self.schedule = np.concatenate((warmup, cosine))[:total_iters]
        self.final_value = final_value
        self.total_iters = total_iters

    def __getitem__(self, it: int) -> float:
        return float(self.schedule[it]) if it < len(self.schedule) else float(self.final_value)


class LinearWarmupThenConstant:
    def __init__(self, *, start: float, end: float, warmup_iters: int) -> None:
        self.start, self.end, self.warmup_iters = start, end, warmup_iters

    def __getitem__(self, it: int) -> float:
        if it >= self.warmup_iters:
            return float(self.end)
        return float(self.start + (self.end - self.start) * it / max(self.warmup_iters, 1))


class FrozenThenRamp:
    """0 for ``frozen_iters``, then a linear ramp to 1 over ``ramp_iters``, then 1: the backbone's
    lr multiplier of a warm start (both 0: always 1, i.e. no warm start)."""

    def __init__(self, *, frozen_iters: int, ramp_iters: int) -> None:
        self.frozen_iters, self.ramp_iters = int(frozen_iters), int(ramp_iters)

    def __getitem__(self, it: int) -> float:
        if it < self.frozen_iters:
            return 0.0
        done = it - self.frozen_iters + 1  # the first unfrozen iteration already moves the backbone
        return min(1.0, done / self.ramp_iters) if self.ramp_iters else 1.0


def scaled_lr(base_lr: float, total_batch_size: int, rule: str = "sqrt_wrt_1024") -> float:
    """The recipe's lr scaling: base_lr * sqrt(total_batch / 1024)."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(total_batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return base_lr * total_batch_size / 256.0
    if rule == "none":
        return base_lr
    raise ValueError(f"optim.scaling_rule {rule!r} unknown; choose sqrt_wrt_1024, linear_wrt_256 or none")


@dataclass
class Schedules:
    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: LinearWarmupThenConstant
    last_layer_lr: CosineScheduler
    total_iters: int
    backbone_lr_scale: FrozenThenRamp = FrozenThenRamp(frozen_iters=0, ramp_iters=0)

    def values(self, it: int) -> dict[str, float]:
        return {
            "lr": self.lr[it], "wd": self.wd[it], "mom": self.momentum[it],
            "teacher_temp": self.teacher_temp[it], "last_layer_lr": self.last_layer_lr[it],
            "backbone_lr_scale": self.backbone_lr_scale[it],
        }


def total_iterations(cfg: DictConfig) -> int:
    return int(cfg.train.max_iterations) or int(cfg.optim.epochs) * int(cfg.train.OFFICIAL_EPOCH_LENGTH)


def build_schedules(cfg: DictConfig, *, world_size: int) -> Schedules:
    """Schedules in iterations from the config's epoch-based recipe; sets ``cfg.optim.lr``."""
    epoch_len = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
    total = total_iterations(cfg)
    # The global batch of one optimizer step: every rank's micro-batches of gradient accumulation.
    global_batch = cfg.train.batch_size_per_gpu * world_size * int(cfg.train.get("grad_accumulation", 1))
    lr = scaled_lr(cfg.optim.base_lr, global_batch, cfg.optim.scaling_rule)
    cfg.optim.lr = lr
    lr_kwargs = dict(base_value=lr, final_value=cfg.optim.min_lr, total_iters=total,
                     warmup_iters=int(cfg.optim.warmup_epochs * epoch_len), start_warmup_value=0.0)
    return Schedules(
        lr=CosineScheduler(**lr_kwargs),
        wd=CosineScheduler(base_value=cfg.optim.weight_decay, final_value=cfg.optim.weight_decay_end, total_iters=total),
        momentum=CosineScheduler(base_value=cfg.teacher.momentum_teacher, final_value=cfg.teacher.final_momentum_teacher,
                                 total_iters=total),
        teacher_temp=LinearWarmupThenConstant(start=cfg.teacher.warmup_teacher_temp, end=cfg.teacher.teacher_temp,
                                              warmup_iters=int(cfg.teacher.warmup_teacher_temp_epochs * epoch_len)),
        last_layer_lr=_frozen_then(CosineScheduler(**lr_kwargs), int(cfg.optim.freeze_last_layer_epochs * epoch_len)),
        total_iters=total,
        backbone_lr_scale=FrozenThenRamp(frozen_iters=int(cfg.train.freeze_backbone_iterations),
                                         ramp_iters=int(cfg.train.unfreeze_lr_ramp_iterations)),
    )


def _frozen_then(schedule: CosineScheduler, freeze_iters: int) -> CosineScheduler:
    # The head's last layer follows the lr schedule but is held at 0 for the first epoch(s);
    # unlike a freeze prefix, this does not shift the warmup.
    schedule.schedule = schedule.schedule.copy()
    schedule.schedule[:freeze_iters] = 0.0
    return schedule
