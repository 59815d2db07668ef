"""The generic training loop. It runs any meta-architecture that satisfies the contract
``dinov2_repro.train.contract.MetaArch`` (param_groups / compute_losses / after_optimizer_step /
trainable / clip_parts / export_backbone; see that module for what each must do).

SSL pretraining (``SSLMetaArch``) and distillation (``distill.DistillMetaArch``) both run through ``train``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..config import save_config
from ..data.loader import close_loader_iterator
from ..device import dtype_from_name, resolve_device  # noqa: F401  (resolve_device: importable from here too)
from ..distributed import DistributedEnv, detect_env, init_distributed, setup_rank_logging, shutdown_distributed
from ..distributed.signals import StopRequest, TrainingStopped
from .checkpoint import last_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from ..tracking import TrackerSet, open_trackers, settings_from_config
from .metrics import format_eta
from .monitors import collapse_messages
from .optim import apply_schedule, build_optimizer
from .schedules import Schedules, build_schedules

logger = logging.getLogger("dinov2_repro")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stops and leaves the last good checkpoint intact."""


def autocast_for(cfg: DictConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    dtype_name = cfg.compute_precision.param_dtype
    dtype = dtype_from_name(dtype_name)
    if dtype_name == "fp16" and device.type != "cuda":
        raise ValueError("compute_precision.param_dtype=fp16 needs CUDA; use bf16 on CPU")
    if dtype_name == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def clip_gradients_per_part(parts: dict[str, nn.Module], max_norm: float) -> dict[str, float]:
    """Clip each part's gradients to ``max_norm`` on its own (the reference clips the backbone, the
    DINO head and the iBOT head separately); returns ``grad_norm/<part>`` pre-clip norms and
    ``grad_norm``, their combined norm. ``max_norm <= 0`` measures without clipping."""
    norms: dict[str, float] = {}
    for name, module in parts.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            continue
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        # Under FSDP2 the gradients are sharded DTensors and so is their norm: every rank takes
        # part in the reduction and clips its shard by the same global coefficient.
        norms[f"grad_norm/{name}"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    norms["grad_norm"] = math.sqrt(sum(v * v for v in norms.values()))
    return norms


def train(
    cfg: DictConfig,
    *,
    build_meta_arch: Callable[[DictConfig], nn.Module],
    build_data: Callable[[DictConfig, int, DistributedEnv], Iterator[dict[str, Any]]],
    export: Callable[[nn.Module, Path, DictConfig, DistributedEnv], Any] | None = None,
    wrap_model: Callable[[nn.Module, DictConfig, DistributedEnv], nn.Module] | None = None,
) -> dict[str, float]:
    """Run (or resume) a training run in ``cfg.train.output_dir``; returns the last logged metrics.

    ``build_data(cfg, start_iteration, env)`` returns an iterator of batches that continues the
    stream exactly from ``start_iteration``.

    However the run ends (done, an exception, a NaN stop, SIGTERM/SIGINT), its DataLoader workers
    are stopped and the process group is left (after a barrier only when every rank got here
    normally), so the process exits at once instead of hanging on workers or peers."""
    opened: list[Iterator[dict[str, Any]]] = []

    def tracked_build_data(cfg: DictConfig, start_iteration: int, env: DistributedEnv) -> Iterator[dict[str, Any]]:
        opened.append(build_data(cfg, start_iteration, env))
        return opened[-1]

    stop = StopRequest().install()
    clean = False
    opened_trackers: list[TrackerSet] = []
    try:
        result = _train(cfg, build_meta_arch=build_meta_arch, build_data=tracked_build_data, export=export,
                        wrap_model=wrap_model, stop=stop, opened_trackers=opened_trackers)
        clean = True
        return result
    except TrainingStopped as stopped:
        clean = True  # every rank agreed on the stop at the same iteration: they can meet at the barrier
        logger.warning("%s", stopped)
        raise
    finally:
        for trackers in opened_trackers:  # MLflow/W&B runs end FAILED, not left running (no-op once closed)
            trackers.close("FAILED")
        stop.restore()
        for data in opened:
            close_loader_iterator(data)
        shutdown_distributed(clean=clean)


def _train(
    cfg: DictConfig,
    *,
    build_meta_arch: Callable[[DictConfig], nn.Module],
    build_data: Callable[[DictConfig, int, DistributedEnv], Iterator[dict[str, Any]]],
    export: Callable[[nn.Module, Path, DictConfig, DistributedEnv], Any] | None,
    wrap_model: Callable[[nn.Module, DictConfig, DistributedEnv], nn.Module] | None,
    stop: StopRequest,
    opened_trackers: list[TrackerSet],
) -> dict[str, float]:
    # Under a launcher (torchrun variables or Slurm) join a process group even at world size 1,
    # so the sharded code path is the one that runs.
    env = init_distributed(force_process_group=detect_env().source != "single")
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_rank_logging(run_dir, env.rank)
    device = resolve_device(cfg.train.device, env)
    torch.manual_seed(cfg.train.seed + env.rank)

    model = build_meta_arch(cfg).to(device)
    if wrap_model is not None:
        model = wrap_model(model, cfg, env)
    schedules: Schedules = build_schedules(cfg, world_size=env.world_size)
    if env.rank == 0:
        save_config(cfg, run_dir)
    optimizer = build_optimizer(model.param_groups(), betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
                                fused=cfg.optim.fused, device=device)
    use_scaler = cfg.compute_precision.param_dtype == "fp16"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    autocast = autocast_for(cfg, device)

    start_iteration, restored_rng = 0, None
    checkpoint = last_checkpoint(run_dir)
    if checkpoint is not None:
        meta, restored_rng = load_checkpoint(checkpoint, model=model, optimizer=optimizer, rank=env.rank)
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        start_iteration = int(meta["iteration"])
        if restored_rng is None:  # another world size: a fresh, still deterministic stream per rank
            torch.manual_seed(cfg.train.seed + env.rank + 1_000_003 * start_iteration)
        logger.info("resumed from %s at iteration %d", checkpoint, start_iteration)

    data = build_data(cfg, start_iteration, env)
    # Restore RNG only after the data pipeline exists, so whatever it consumes at start-up
    # cannot make a resumed run diverge from an uninterrupted one.
    if restored_rng is not None:
        set_rng_state(restored_rng)

    total = schedules.total_iters
    epoch_len = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
    ckpt_period = int(cfg.train.checkpoint_period_iterations) or int(cfg.train.saveckp_freq) * epoch_len
    eval_period = int(cfg.evaluation.eval_period_iterations)
    log_period = max(int(cfg.train.log_period_iterations), 1)
    warmup_iters = int(cfg.optim.warmup_epochs * epoch_len)  # collapse_messages: rank ~1 is normal before
    # train.grad_accumulation micro-batches per optimizer step: the global batch of world_size x
    # accumulation ranks on world_size ranks (one EMA/centre update and one lr step per step).
    accumulation = int(cfg.train.grad_accumulation)
    images_per_step = cfg.train.batch_size_per_gpu * env.world_size * accumulation
    # Rank 0 logs for the run: metrics.jsonl always, plus train.loggers' trackers. A resumed run
    # continues its MLflow/W&B runs; resume_iteration is 0 without a checkpoint: old rows are stale.
    metrics = open_trackers(settings_from_config(cfg), config=OmegaConf.to_container(cfg, resolve=True),
                            enabled=env.rank == 0, resume_iteration=start_iteration, continue_runs=checkpoint is not None)
    opened_trackers.append(metrics)
    last_logged: dict[str, float] = {}
    model.train()
    started = time.perf_counter()

    def save(iteration: int) -> None:
        meta = {"world_size": env.world_size, "scaler": scaler.state_dict() if scaler else None,
                "config": OmegaConf.to_container(cfg, resolve=True)}
        save_checkpoint(run_dir, iteration, model=model, optimizer=optimizer, meta=meta, rank=env.rank,
                        keep_last=cfg.train.keep_last_checkpoints)

    for iteration in range(start_iteration, total):
        values = schedules.values(iteration)
        apply_schedule(optimizer, lr=values["lr"], wd=values["wd"], last_layer_lr=values["last_layer_lr"],
                       backbone_lr_scale=values["backbone_lr_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss_value, terms, n_skipped = 0.0, {}, 0
        for micro in range(accumulation):
            batch = next(data)
            n_skipped += int(batch.get("n_skipped", 0))
            with autocast():
                loss, micro_terms = model.compute_losses(batch, values)
            micro_value = float(loss.detach())
            if not math.isfinite(micro_value):
                bad = {k: float(v) for k, v in micro_terms.items()}
                raise NonFiniteLossError(
                    f"non-finite total loss {micro_value} at iteration {iteration} (terms: {bad}); "
                    f"stopping. The last good checkpoint is {last_checkpoint(run_dir)}"
                )
            # The mean over micro-batches, as ranks average their gradients (exact for powers of 2).
            if accumulation > 1:
                loss = loss / accumulation
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_value += micro_value / accumulation
            for key, value in micro_terms.items():
                terms[key] = terms.get(key, 0.0) + float(value) / accumulation
        if scaler is not None:
            scaler.unscale_(optimizer)
            grad_norms = clip_gradients_per_part(model.clip_parts(), cfg.optim.clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            grad_norms = clip_gradients_per_part(model.clip_parts(), cfg.optim.clip_grad)
            optimizer.step()
        model.after_optimizer_step(values)

        done = iteration + 1
        rank_due = hasattr(model, "feature_rank") and (done == total or (eval_period and done % eval_period == 0))
        if done % log_period == 0 or done == total or rank_due:
            elapsed = time.perf_counter() - started
            rate = (done - start_iteration) / elapsed
            last_logged = {"iteration": done, "total_loss": loss_value, **{k: float(v) for k, v in terms.items()},
                           **values, **grad_norms, "images_per_s": rate * images_per_step,
                           "n_skipped": n_skipped}
            if rank_due:
                last_logged["monitor/rankme"] = model.feature_rank()
            metrics.log_metrics(last_logged, step=done)
            for message in collapse_messages(last_logged, done, check_rank=done > warmup_iters):
                logger.warning(message)
            logger.info("it %d/%d  loss %.4f  lr %.2e  %.1f img/s  eta %s", done, total, loss_value, values["lr"],
                        rate * images_per_step, format_eta((total - done) / rate))
        if done % ckpt_period == 0 or done == total:
            save(done)
        signum = stop.agreed()
        if signum is not None and done < total:
            if done % ckpt_period:
                save(done)
            metrics.close("KILLED")
            raise TrainingStopped(signum, done)
        if export is not None and (done == total or (eval_period and done % eval_period == 0)):
            exported = export(model.export_backbone(), run_dir, cfg, env)
            if exported is not None:
                metrics.log_export(exported)  # the final export's path(s) end up in the trackers
    metrics.close()
    return last_logged
