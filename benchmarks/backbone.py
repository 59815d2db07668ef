"""Backbone benchmark: our ViT vs timm, packed vs crop-by-crop, efficient SD vs DropPath.

    python benchmarks/backbone.py [--device cpu|cuda] [--quick] [--output-dir DIR]

Timed configurations run side by side in one process, interleaved repetition by repetition
(the order rotates every repetition) so that drifting machine load hits all of them alike;
medians and ratios are reported. Peak memory is measured per configuration in a fresh
subprocess (see MEMORY_METHOD). Writes ``<output-dir>/backbone_<device>.json`` and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dinov2_repro.backbone_file import timm_model_for  # noqa: E402
from dinov2_repro.io.files import atomic_write_json  # noqa: E402
from dinov2_repro.models import build_vit  # noqa: E402

CONFIGS = ("ours_forward", "timm_forward", "packed_fwd_bwd", "crop_by_crop_fwd_bwd", "efficient_sd_fwd_bwd", "droppath_fwd_bwd")
MEMORY_METHOD = {
    "cpu": "fresh subprocess per config; model and inputs built first, then one step; the kernel's resident "
           "high-water mark (VmHWM) is reset via /proc/self/clear_refs just before the step; value = VmHWM after "
           "the step minus VmRSS before it, in MiB: the step's resident peak (activations, grads, allocator "
           "workspace) above the built model. hwm_reset=false: reset not permitted, ru_maxrss used instead, "
           "so earlier peaks (imports, build) may hide the step's.",
    "cuda": "fresh subprocess per config; torch.cuda.max_memory_allocated during one step minus memory_allocated "
            "before it (model and inputs already resident), in MiB; bf16 autocast.",
}


def settings(quick: bool) -> dict:
    if quick:  # smoke test: tiny model, tiny crops
        return dict(arch="vit_tiny", depth=2, img=56, global_crop=56, local_crop=28, fwd_batch=2, images=1, reps=2, drop_path=0.4)
    # ViT-S/14; the DINOv2 crop set (2 global 224 + 8 local 98 per image) for 2 images.
    return dict(arch="vit_small", depth=12, img=224, global_crop=224, local_crop=98, fwd_batch=4, images=2, reps=5, drop_path=0.4)


def machine_description(device: torch.device) -> dict:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "load_average_at_start": os.getloadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Bench:
    """Models, inputs and one step function per configuration."""

    def __init__(self, *, cfg: dict, device: torch.device, names: tuple[str, ...] = CONFIGS) -> None:
        torch.manual_seed(0)
        self.device = device
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        common = dict(depth=cfg["depth"], img_size=cfg["img"])
        self.model = build_vit(cfg["arch"], **common).to(device)
        self.sd_model = build_vit(cfg["arch"], drop_path_rate=cfg["drop_path"], drop_path_uniform=True, **common).to(device)
        self.sd_model.load_state_dict(self.model.state_dict())
        self.timm = None
        if {"timm_forward"} & set(names):
            self.timm = timm_model_for(self.model.cpu().eval()).to(device)
            self.model.to(device)
        n = cfg["images"]
        self.fwd_input = torch.randn(cfg["fwd_batch"], 3, cfg["img"], cfg["img"], device=device)
        self.crops = [
            torch.randn(2 * n, 3, cfg["global_crop"], cfg["global_crop"], device=device),
            torch.randn(8 * n, 3, cfg["local_crop"], cfg["local_crop"], device=device),
        ]
        self.steps = {
            "ours_forward": self._ours_forward,
            "timm_forward": self._timm_forward,
            "packed_fwd_bwd": lambda: self._train_step(self.model, packed=True),
            "crop_by_crop_fwd_bwd": lambda: self._train_step(self.model, packed=False),
            "efficient_sd_fwd_bwd": lambda: self._train_step(self.sd_model, packed=True, mode="efficient"),
            "droppath_fwd_bwd": lambda: self._train_step(self.sd_model, packed=True, mode="droppath"),
        }

    def _ours_forward(self) -> None:
        self.model.eval()
        with torch.no_grad(), self.autocast:
            self.model.forward_features(self.fwd_input)

    def _timm_forward(self) -> None:
        with torch.no_grad(), self.autocast:
            self.timm.forward_features(self.fwd_input)

    def _train_step(self, model, *, packed: bool, mode: str | None = None) -> None:
        model.train()
        if mode is not None:
            model.set_stochastic_depth(mode)
        model.zero_grad(set_to_none=True)
        with self.autocast:
            # Crop-by-crop = one forward per crop size (the usual multi-crop loop); packed = one
            # forward over the list, all crops in one token sequence per block.
            outputs = model.forward_features(self.crops) if packed else [model.forward_features(c) for c in self.crops]
            loss = sum(o["x_norm_clstoken"].float().mean() + o["x_norm_patchtokens"].float().mean() for o in outputs)
        loss.backward()

    def run(self, name: str) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        self.steps[name]()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_high_water_mark() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so the peak we
    # read afterwards belongs to the step and not to imports or model construction.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory_probe(name: str, cfg: dict, device: torch.device) -> dict:
    """Run in a fresh subprocess: the peak memory of one step of ``name``."""
    bench = Bench(cfg=cfg, device=device, names=(name,))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        bench.steps[name]()
        torch.cuda.synchronize(device)
        return {"peak_mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20}
    reset = _reset_high_water_mark()
    rss_before = _proc_status_bytes("VmRSS")
    bench.steps[name]()
    if reset:
        peak = _proc_status_bytes("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"peak_mib": (peak - rss_before) / 2**20, "hwm_reset": reset}


def measure_memory(cfg: dict, device: torch.device, quick: bool) -> dict:
    results = {}
    for name in CONFIGS:
        command = [sys.executable, str(Path(__file__).resolve()), "--device", device.type, "--memory-probe", name,
                   "--threads", str(torch.get_num_threads())]
        if quick:
            command.append("--quick")
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe {name} failed ({done.returncode}): {done.stderr[-2000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def time_configs(bench: Bench, reps: int) -> dict[str, list[float]]:
    for name in CONFIGS:  # warm-up: first-call allocations, lazy inits
        bench.run(name)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for rep in range(reps):
        order = CONFIGS[rep % len(CONFIGS):] + CONFIGS[: rep % len(CONFIGS)]
        for name in order:
            times[name].append(bench.run(name))
    return times


def _paired_median(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    # Ratio within each repetition first: both configs ran back to back under the same load.
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def summarise(times: dict[str, list[float]], cfg: dict) -> dict:
    med = {name: statistics.median(values) for name, values in times.items()}
    pairs = {
        # > 1: ours faster (throughput ratio = inverse time ratio).
        "ours_over_timm_throughput": ("timm_forward", "ours_forward"),
        # < 1: packing faster.
        "packed_over_crop_by_crop_time": ("packed_fwd_bwd", "crop_by_crop_fwd_bwd"),
        "efficient_sd_over_droppath_time": ("efficient_sd_fwd_bwd", "droppath_fwd_bwd"),
    }
    ratios = {key: med[a] / med[b] for key, (a, b) in pairs.items()}
    paired = {key: _paired_median(times, a, b) for key, (a, b) in pairs.items()}
    return {
        "timings": {
            name: {"median_s": med[name], "times_s": times[name],
                   **({"images_per_s": cfg["fwd_batch"] / med[name]} if name.endswith("forward") else {})}
            for name in CONFIGS
        },
        "ratios": ratios,
        "ratios_paired_median": paired,
        "goals": {
            "ours_ge_timm_speed": ratios["ours_over_timm_throughput"] >= 1.0,
            "packed_le_crop_by_crop_time": ratios["packed_over_crop_by_crop_time"] <= 1.0,
            "efficient_sd_le_0.75x_droppath_time": ratios["efficient_sd_over_droppath_time"] <= 0.75,
        },
    }


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per config")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 is steadier on a shared machine")
    parser.add_argument("--skip-memory", action="store_true", help="no per-config memory subprocesses")
    parser.add_argument("--memory-probe", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = settings(args.quick)
    if args.reps is not None:
        cfg["reps"] = args.reps
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, cfg, device)))
        return None

    machine = machine_description(device)
    bench = Bench(cfg=cfg, device=device)
    started = time.perf_counter()
    times = time_configs(bench, cfg["reps"])
    payload = {
        "benchmark": "backbone",
        "machine": machine,
        "settings": {**cfg, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
                     "attention_backend": "auto", "drop_path_uniform": True,
                     "crop_by_crop": "one forward per crop size (globals, then locals), one backward",
                     "timing": "wall clock per step, interleaved repetitions with rotating order, 1 warm-up each"},
        **summarise(times, cfg),
        "timing_wall_s": time.perf_counter() - started,
    }
    if not args.skip_memory:
        payload["memory"] = {"method": MEMORY_METHOD[device.type], "configs": measure_memory(cfg, device, args.quick)}
    payload["machine"]["load_average_at_end"] = os.getloadavg()
    atomic_write_json(args.output_dir / f"backbone_{device.type}.json", payload, indent=2)
    print(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
