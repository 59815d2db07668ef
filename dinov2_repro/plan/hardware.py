"""GPU models the planner knows, and the paper's anchor for model-FLOPs utilisation (MFU)."""
from __future__ import annotations

import dataclasses

from ..config import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPU:
    name: str
    peak_tflops: float   # dense bf16/fp16 tensor-core peak (no sparsity)
    memory_gb: float     # GB = 1e9 bytes, as vendors state it

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)


# Vendor datasheet figures (SXM parts, dense bf16).
GPUS = {
    "a100-40gb": GPU(name="a100-40gb", peak_tflops=312.0, memory_gb=40.0),
    "a100-80gb": GPU(name="a100-80gb", peak_tflops=312.0, memory_gb=80.0),
    "h100-80gb": GPU(name="h100-80gb", peak_tflops=989.0, memory_gb=80.0),
    "h200": GPU(name="h200", peak_tflops=989.0, memory_gb=141.0),
}

# Share of GPU memory the planner allows tensors to take: the rest is for the CUDA context,
# NCCL buffers and caching-allocator fragmentation, which a trace of live tensors cannot see.
USABLE_MEMORY_FRACTION = 0.9


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaperAnchor:
    """DINOv2 paper: ViT-g/14 took 22,016 A100-hours for 625k iterations at batch 3,072."""
    gpu_hours: float = 22_016.0
    iterations: int = 625_000
    global_batch: int = 3_072
    gpus: int = 256
    gpu: str = "a100-80gb"
    config: str = "train/vitg14.yaml"

    def mfu(self, flops_per_gpu_step: float) -> float:
        """The MFU that makes ``flops_per_gpu_step`` (per GPU at batch global_batch / gpus) take gpu_hours."""
        total_flops = flops_per_gpu_step * self.gpus * self.iterations
        return total_flops / (self.gpu_hours * 3600.0 * GPUS[self.gpu].peak_tflops * 1e12)


PAPER = PaperAnchor()


def parse_gpu(text: str) -> GPU:
    """``a100-80gb`` etc., or ``custom:TFLOPS,GB`` (e.g. ``custom:400,96``)."""
    if text in GPUS:
        return GPUS[text]
    if text.startswith("custom:"):
        try:
            tflops, memory = (float(part) for part in text[len("custom:"):].split(","))
        except ValueError:
            raise ConfigError(f"--gpu {text!r}: expected custom:TFLOPS,GB, e.g. custom:400,96") from None
        if tflops <= 0 or memory <= 0:
            raise ConfigError(f"--gpu {text!r}: TFLOPS and GB must be positive")
        return GPU(name=text, peak_tflops=tflops, memory_gb=memory)
    raise ConfigError(f"--gpu {text!r} unknown; choose one of {', '.join(GPUS)} or custom:TFLOPS,GB")
