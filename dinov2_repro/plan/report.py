"""Turn traced steps into a plan: FLOPs, per-GPU memory, fit and remedies, step time, GPU-hours."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..config import CONFIG_DIR, load_config
from .hardware import GPU, PAPER, USABLE_MEMORY_FRACTION
from ..train.schedules import scaled_lr
from .trace import StepTrace, trace_step

GIB = 1024 ** 3
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
Tracer = Callable[[DictConfig, int], StepTrace]
_TRACES: dict[tuple, StepTrace] = {}


def total_iterations(cfg: DictConfig) -> int:
    return int(cfg.train.max_iterations) or int(cfg.optim.epochs) * int(cfg.train.OFFICIAL_EPOCH_LENGTH)


@functools.lru_cache(maxsize=1)
def paper_mfu() -> tuple[float, float]:
    """(MFU, FLOPs per GPU per step) implied by the paper's 22,016 A100-hours for ViT-g/14: the
    FLOPs come from a trace of this code's vitg14 step at 12 images per GPU, not from a formula."""
    cfg = load_config(CONFIG_DIR / PAPER.config)
    flops = trace_step(cfg, world_size=1, shard=False).flops["total"]
    return PAPER.mfu(flops), flops


def accumulation_of(cfg: DictConfig) -> int:
    return int(cfg.train.get("grad_accumulation", 1))


def _recipe_batch(cfg: DictConfig, trace: StepTrace, world: int, gpu: GPU, iterations: int,
                  tracer: Tracer) -> dict[str, Any] | None:
    """When this world size changes the recipe's global batch: what that changes (images seen,
    the lr after the scaling rule) and the per-GPU batch or accumulation that would keep it."""
    recipe = int(cfg.train.get("recipe_global_batch", 0))
    plan_batch = trace.batch_size_per_gpu * world * accumulation_of(cfg)
    if recipe <= 0 or recipe == plan_batch:
        return None
    rule = str(cfg.optim.scaling_rule)
    keep: list[dict[str, Any]] = []
    usable = gpu.memory_bytes * USABLE_MEMORY_FRACTION
    per_image = trace.activation_bytes / trace.batch_size_per_gpu
    base = trace.peak_bytes - trace.activation_bytes
    if recipe % world == 0:
        per_gpu = recipe // world
        # Fewest passes per step first: the per-GPU batch alone, then accumulation over smaller ones.
        for k in range(1, per_gpu + 1):
            if per_gpu % k:
                continue
            micro = per_gpu // k
            if base + per_image * micro > usable and micro > 1 and k > 1:
                continue  # estimated not to fit: try more accumulation
            change = {"train.batch_size_per_gpu": micro, "train.grad_accumulation": k}
            checked = tracer(with_overrides(cfg, **change), world)
            keep.append({"change": " ".join(f"{key}={value}" for key, value in change.items()),
                         "peak_bytes": checked.peak_bytes, "fits": _fits(checked.peak_bytes, gpu), "how": "traced"})
            if keep[-1]["fits"]:
                break
    return {
        "recipe_global_batch": recipe, "plan_global_batch": plan_batch,
        "images_seen": plan_batch * iterations, "recipe_images_seen": recipe * iterations,
        "scaling_rule": rule, "lr": scaled_lr(float(cfg.optim.base_lr), plan_batch, rule),
        "recipe_lr": scaled_lr(float(cfg.optim.base_lr), recipe, rule),
        "keep_recipe": keep or [{"change": f"none: {recipe:,} images is not a multiple of {world} ranks", "fits": False,
                                 "how": "arithmetic"}],
    }


def with_overrides(cfg: DictConfig, **values: Any) -> DictConfig:
    """A copy of ``cfg`` with dotted keys replaced (``{"train.batch_size_per_gpu": 8}``)."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg))
    for key, value in values.items():
        OmegaConf.update(copy, key, value)
    return copy


def _memory(trace: StepTrace, cfg: DictConfig) -> dict[str, int]:
    compute_bytes = _DTYPE_BYTES.get(str(cfg.compute_precision.param_dtype), 4)
    # FSDP2 all-gathers one unit while the previous one computes: two units' compute-dtype copies.
    largest = sorted(trace.unit_param_counts, reverse=True)[:2]
    return {
        "student_params_fp32_shard": trace.student_param_bytes,
        "student_grads_shard": trace.grad_bytes,
        "adamw_states_shard": trace.optimizer_state_bytes,
        "teacher_params_shard": trace.teacher_param_bytes,
        "unsharded_compute_copies_2_units": sum(largest) * compute_bytes,
        "activations_end_of_forward": trace.activation_bytes,
        "persistent": trace.persistent_bytes,
        "peak": trace.peak_bytes,
    }


def _fits(peak: int, gpu: GPU) -> bool:
    return peak <= gpu.memory_bytes * USABLE_MEMORY_FRACTION


def _remedies(cfg: DictConfig, trace: StepTrace, gpu: GPU, *, gpus_per_node: int, tracer: Tracer) -> list[dict[str, Any]]:
    """What would fit, each checked by a trace where the change alters the step itself."""
    usable = gpu.memory_bytes * USABLE_MEMORY_FRACTION
    remedies: list[dict[str, Any]] = []
    if cfg.train.activation_checkpointing != "blocks":
        checkpointed = tracer(with_overrides(cfg, **{"train.activation_checkpointing": "blocks"}), trace.world_size)
        remedies.append({"change": "train.activation_checkpointing=blocks", "peak_bytes": checkpointed.peak_bytes,
                         "fits": _fits(checkpointed.peak_bytes, gpu), "how": "traced",
                         "cost": "recomputes the student block forward in backward (~+1/3 student FLOPs)"})
    # Smaller per-GPU batch: activations scale with the images per GPU; check the estimate by a trace.
    per_image = trace.activation_bytes / trace.batch_size_per_gpu
    batch = min(trace.batch_size_per_gpu - 1, math.floor((usable - (trace.peak_bytes - trace.activation_bytes)) / per_image))
    if batch >= 1:
        smaller = tracer(with_overrides(cfg, **{"train.batch_size_per_gpu": batch}), trace.world_size)
        remedies.append({"change": f"train.batch_size_per_gpu={batch}", "peak_bytes": smaller.peak_bytes,
                         "fits": _fits(smaller.peak_bytes, gpu), "how": "traced",
                         "cost": "smaller global batch (rescale the lr, or add ranks to keep it)"})
    # Gradient accumulation: a smaller per-GPU batch k times per step keeps the global batch
    # (and so the recipe's lr and images seen) at k times the step time.
    for k in range(2, trace.batch_size_per_gpu + 1):
        if trace.batch_size_per_gpu % k == 0:
            micro = trace.batch_size_per_gpu // k
            if (trace.peak_bytes - trace.activation_bytes) + per_image * micro <= usable or micro == 1:
                accumulated = tracer(with_overrides(cfg, **{"train.batch_size_per_gpu": micro,
                                                            "train.grad_accumulation": k * accumulation_of(cfg)}),
                                     trace.world_size)
                remedies.append({"change": f"train.batch_size_per_gpu={micro} train.grad_accumulation={k * accumulation_of(cfg)}",
                                 "peak_bytes": accumulated.peak_bytes, "fits": _fits(accumulated.peak_bytes, gpu),
                                 "how": "traced", "cost": f"same global batch and lr; {k} forward/backward passes per step"})
                break
    # More ranks: only the sharded state shrinks (1/W); the rest stays.
    sharded = trace.student_param_bytes + trace.grad_bytes + trace.optimizer_state_bytes + trace.teacher_param_bytes
    rest = trace.peak_bytes - sharded
    step = max(gpus_per_node, 1)
    for world in range(trace.world_size + step, 16_385, step):
        if rest + sharded * trace.world_size / world <= usable:
            remedies.append({"change": f"{world} ranks ({world // step} nodes)",
                             "peak_bytes": int(rest + sharded * trace.world_size / world), "fits": True,
                             "how": "sharded state scaled by world size",
                             "cost": "more GPUs; the global batch grows with them unless the per-GPU batch shrinks"})
            break
    else:
        remedies.append({"change": "more ranks", "fits": False, "how": "sharded state scaled by world size",
                         "cost": f"not enough: the unsharded part alone is {rest / GIB:.1f} GiB"})
    return remedies


def build_plan(cfg: DictConfig, *, nodes: int, gpus_per_node: int, gpu: GPU, mfu: float | None = None,
               config_name: str = "", build_meta_arch: Callable[[DictConfig], nn.Module] | None = None,
               shard_meta_arch: Callable[[nn.Module, DictConfig], nn.Module] | None = None) -> dict[str, Any]:
    """The plan of ``cfg`` on ``nodes x gpus_per_node`` GPUs of type ``gpu`` (JSON-ready dict)."""
    world = nodes * gpus_per_node

    def tracer(config: DictConfig, world_size: int) -> StepTrace:
        # Memory and FLOPs do not depend on the GPU model: plans of one config on several GPUs
        # in one process (the README table) share their traces.
        key = (OmegaConf.to_yaml(config), world_size, build_meta_arch)
        if key not in _TRACES:
            _TRACES[key] = trace_step(config, world_size=world_size, build_meta_arch=build_meta_arch,
                                      shard_meta_arch=shard_meta_arch)
        return _TRACES[key]

    trace = tracer(cfg, world)
    anchor = None
    if mfu is None:
        mfu, anchor_flops = paper_mfu()
        anchor = {"gpu_hours": PAPER.gpu_hours, "iterations": PAPER.iterations, "global_batch": PAPER.global_batch,
                  "gpus": PAPER.gpus, "gpu": PAPER.gpu, "traced_flops_per_gpu_step": anchor_flops, "mfu": mfu}
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu {mfu} must be in (0, 1]")
    flops = trace.flops
    accumulation = accumulation_of(cfg)
    per_gpu_step = flops["total"] * accumulation  # one traced forward/backward per micro-batch
    step_s = per_gpu_step / (gpu.peak_tflops * 1e12 * mfu)
    iterations = total_iterations(cfg)
    memory = _memory(trace, cfg)
    fits = _fits(trace.peak_bytes, gpu)
    return {
        "config": config_name,
        "arch": cfg.student.arch if "distill" not in cfg else
                f"{cfg.distill.teacher_arch} -> {', '.join(str(s if isinstance(s, str) else s.arch) for s in cfg.distill.students)}",
        "world_size": world, "nodes": nodes, "gpus_per_node": gpus_per_node,
        "gpu": dataclasses.asdict(gpu),
        "batch_size_per_gpu": trace.batch_size_per_gpu, "grad_accumulation": accumulation,
        "global_batch": trace.batch_size_per_gpu * world * accumulation,
        "recipe_batch": _recipe_batch(cfg, trace, world, gpu, iterations, tracer),
        "crops": {"global": int(cfg.crops.global_crops_size), "local": int(cfg.crops.local_crops_size),
                  "local_number": int(cfg.crops.local_crops_number)},
        "activation_checkpointing": str(cfg.train.activation_checkpointing),
        "stochastic_depth_kept_fraction": trace.kept_fraction,
        "masked_tokens_per_gpu": trace.n_masked_tokens,
        "flops_per_gpu_step": flops,
        "flops_per_step": per_gpu_step * world,
        "flops_per_image": per_gpu_step / (trace.batch_size_per_gpu * accumulation),
        "memory_bytes": memory,
        "usable_memory_bytes": int(gpu.memory_bytes * USABLE_MEMORY_FRACTION),
        "fits": fits,
        "remedies": [] if fits else _remedies(cfg, trace, gpu, gpus_per_node=gpus_per_node, tracer=tracer),
        "mfu": mfu, "mfu_source": "paper" if anchor else "given", "paper_anchor": anchor,
        "mfu_origin": mfu_origin(anchor),
        "step_time_s": step_s,
        "iterations": iterations,
        "wall_clock_hours": step_s * iterations / 3600.0,
        "gpu_hours": step_s * iterations * world / 3600.0,
        "images_per_s_per_gpu": trace.batch_size_per_gpu * accumulation / step_s,
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n:,}"


def mfu_origin(anchor: dict[str, Any] | None) -> str:
    """Where the plan's MFU comes from, in words (printed with every plan)."""
    if anchor is None:
        return "given with --mfu"
    return (f"assumed, not measured: solved so that this code's traced {PAPER.config} step "
            f"({anchor['traced_flops_per_gpu_step'] / 1e12:.1f} TFLOP per GPU at {PAPER.global_batch // PAPER.gpus}/GPU) "
            f"takes the paper's {PAPER.gpu_hours:,.0f} {PAPER.gpu} GPU-hours for {PAPER.iterations:,} iterations on "
            f"{PAPER.gpus} GPUs; a plan of that recipe therefore returns the paper's figures by construction. "
            f"Pass --mfu to use a measured value")


def _flops_text(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:10.2f} {unit}"
    return f"{flops / 1e6:10.2f} MFLOP"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as an aligned text table."""
    flops, memory = plan["flops_per_gpu_step"], plan["memory_bytes"]
    tf = _flops_text
    gb = lambda n: f"{n / GIB:10.2f} GiB"  # noqa: E731
    rows = [
        ("config", f"{plan['config']} ({plan['arch']})"),
        ("GPUs", f"{plan['world_size']} x {plan['gpu']['name']} ({plan['nodes']} nodes x {plan['gpus_per_node']})"),
        ("batch", f"{plan['batch_size_per_gpu']} / GPU"
                  f"{' x ' + str(plan['grad_accumulation']) + ' accumulated' if plan['grad_accumulation'] > 1 else ''}, "
                  f"{plan['global_batch']} global; crops "
                  f"{plan['crops']['global']} px x2 + {plan['crops']['local']} px x{plan['crops']['local_number']}"),
        ("kept by stochastic depth", f"{plan['stochastic_depth_kept_fraction']:.3f} of student block tokens"),
        ("-- FLOPs per GPU per step", ""),
        ("student forward", tf(flops["student_forward"])),
        ("student backward", tf(flops["student_backward"])),
        ("teacher forward", tf(flops["teacher_forward"])),
        ("  of which student heads", tf(flops["student_heads_forward"] + flops["student_heads_backward"])),
        ("total per GPU", tf(flops["total"])),
        ("per image", tf(plan["flops_per_image"])),
        ("per step (all GPUs)", tf(plan["flops_per_step"])),
        ("-- memory per GPU", ""),
        ("student params (fp32 shard)", gb(memory["student_params_fp32_shard"])),
        ("student grads (shard)", gb(memory["student_grads_shard"])),
        ("AdamW states (shard)", gb(memory["adamw_states_shard"])),
        ("teacher params (shard)", gb(memory["teacher_params_shard"])),
        ("compute copies (2 units)", gb(memory["unsharded_compute_copies_2_units"])),
        ("activations (end of fwd)", gb(memory["activations_end_of_forward"])),
        ("peak", gb(memory["peak"])),
        ("fits", f"{'yes' if plan['fits'] else 'NO'} (usable {plan['usable_memory_bytes'] / GIB:.1f} GiB)"),
    ]
    for remedy in plan["remedies"]:
        peak = f"peak {remedy['peak_bytes'] / GIB:.1f} GiB, " if "peak_bytes" in remedy else ""
        rows.append(("  would fit?" if remedy["fits"] else "  would not fit",
                     f"{remedy['change']}: {peak}{'fits' if remedy['fits'] else 'does not fit'} ({remedy['how']}; {remedy['cost']})"))
    recipe = plan.get("recipe_batch")
    if recipe:
        rows += [
            ("-- NOT the recipe's global batch", ""),
            ("global batch", f"{recipe['plan_global_batch']:,} instead of the recipe's {recipe['recipe_global_batch']:,}"),
            ("images seen", f"{_count(recipe['images_seen'])} instead of {_count(recipe['recipe_images_seen'])}"),
            ("peak lr", f"{recipe['lr']:.3e} instead of {recipe['recipe_lr']:.3e} ({recipe['scaling_rule']} scaling rule)"),
        ]
        for option in recipe["keep_recipe"]:
            peak = f"peak {option['peak_bytes'] / GIB:.1f} GiB, " if "peak_bytes" in option else ""
            rows.append(("  keeps the recipe", f"{option['change']}: {peak}{'fits' if option['fits'] else 'does not fit'} "
                                               f"({option['how']})"))
    rows += [
        ("-- time", ""),
        ("MFU", f"{plan['mfu']:.3f}"),
        ("  MFU origin", plan["mfu_origin"]),
        ("step time", f"{plan['step_time_s']:10.3f} s ({plan['images_per_s_per_gpu']:.1f} img/s/GPU)"),
        ("iterations", f"{plan['iterations']:,}"),
        ("wall clock", f"{plan['wall_clock_hours']:10.1f} h"),
        ("GPU-hours", f"{plan['gpu_hours']:10,.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" if value else name for name, value in rows)
