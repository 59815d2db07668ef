"""What every ONNX export shares: tracing mode for our ViTs, the export call, the atomic write,
and the onnxruntime check against the torch module.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import types
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..models import DinoV3VisionTransformer, DinoVisionTransformer
from .bicubic import resample_pos_embed_traceable

DEFAULT_OPSET = 18
# A check whose worst difference passes this is reported on stderr too (fp32 agreement is ~1e-5).
WARN_ABOVE = 1e-3
# Above this many bytes of weights the file keeps them beside it (protobuf caps one file at 2 GiB).
EXTERNAL_DATA_BYTES = 1_800_000_000


def _traceable_pos_encoding(self: DinoVisionTransformer, height: int, width: int, dtype: torch.dtype) -> Tensor:
    grid_h, grid_w = height // self.patch_size, width // self.patch_size
    return resample_pos_embed_traceable(self.pos_embed.float(), grid_h, grid_w, antialias=self.interpolate_antialias,
                                        offset=self.interpolate_offset).to(dtype)


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` ready to trace, restored afterwards: eval mode; every ViT inside it on the plain
    ``sdpa`` attention (one dense call per image batch: no xformers or flex kernel, which have
    no ONNX form); DINOv2 ViTs resample their pos-embed with onnx_export/bicubic.py (no Python
    branch on the image size, so a dynamic-size export stays right at every size)."""
    was_training = model.training
    vits = [m for m in model.modules() if isinstance(m, DinoVisionTransformer)]
    backends = [[block.attn.backend for block in vit.blocks] for vit in vits]
    model.eval()
    for vit in vits:
        vit.set_attention_backend("sdpa")
        if not isinstance(vit, DinoV3VisionTransformer):  # DINOv3: RoPE, computed from the grid with tensor ops
            vit.interpolate_pos_encoding = types.MethodType(_traceable_pos_encoding, vit)
    try:
        yield model
    finally:
        for vit, saved in zip(vits, backends):
            for block, backend in zip(vit.blocks, saved):
                block.attn.backend = backend
            vit.__dict__.pop("interpolate_pos_encoding", None)
        model.train(was_training)


def export_module(module: nn.Module, example: Tensor, out: str | os.PathLike, *, input_name: str,
                  output_names: Sequence[str], dynamic_dims: Mapping[int, Any], metadata: Mapping[str, str],
                  opset: int = DEFAULT_OPSET) -> Path:
    """Export ``module(example)`` to ``out`` with torch.onnx's torch.export path; ``dynamic_dims``
    maps input axes to torch.export.Dim objects. Written atomically: the file (and its ``.data``
    weights file when the weights pass 1.8 GB) appears only once complete."""
    out = Path(out)
    with export_mode(module), torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[input_name],
                                    output_names=list(output_names), dynamic_shapes={input_name: dict(dynamic_dims)},
                                    opset_version=opset, optimize=True, verbose=False)
    program.model.metadata_props.update({str(k): str(v) for k, v in metadata.items()})
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        staged = Path(staging) / out.name
        program.save(str(staged), external_data=external)
        # Weights file first, model last: a reader that sees the model finds its weights.
        for path in sorted(Path(staging).iterdir(), key=lambda p: p == staged):
            os.replace(path, out.parent / path.name)
    return out


def onnxruntime_session(path: str | os.PathLike, *, threads: int | None = None):
    """A CPU onnxruntime session of ``path`` (the reference runtime of the checks); ``threads``
    sets its intra-op threads (default: onnxruntime's, one per core)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def compare_with_torch(path: str | os.PathLike, module: nn.Module, shapes: Sequence[Sequence[int]], *,
                       output_names: Sequence[str], seed: int = 0, low: float | None = None,
                       high: float | None = None) -> list[dict[str, Any]]:
    """Run the ONNX file and ``module`` on the same random inputs of each shape; per shape, the
    max abs difference of each output. Inputs are N(0, 1), or uniform in [low, high].

    ``module`` runs as users run it (eval mode, its own attention backend and pos-embed
    resampling), not in export_mode: the check covers the export's replacements too."""
    session = onnxruntime_session(path)
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    checks = []
    was_training = module.training
    module.eval()
    try:
        for shape in shapes:
            if low is None:
                images = torch.randn(*shape, generator=generator)
            else:
                images = low + (high - low) * torch.rand(*shape, generator=generator)
            expected = module(images)
            expected = expected if isinstance(expected, (tuple, list)) else (expected,)
            got = session.run(list(output_names), {input_name: images.numpy()})
            diffs = {}
            for name, want, have in zip(output_names, expected, got):
                if tuple(want.shape) != tuple(have.shape):
                    raise RuntimeError(f"ONNX output {name} has shape {tuple(have.shape)}, torch {tuple(want.shape)}")
                diffs[name] = float(np.abs(want.numpy() - have).max())
            checks.append({"input_shape": list(shape), "max_abs_diff": diffs})
    finally:
        module.train(was_training)
    return checks


def worst_difference(checks: Sequence[Mapping[str, Any]]) -> float:
    """The largest max-abs difference over every check and output."""
    return max(value for check in checks for value in check["max_abs_diff"].values())


def warn_if_far(result: Mapping[str, Any], *, prefix: str) -> None:
    """One stderr line when an export's check found a difference above WARN_ABOVE."""
    import sys

    worst = result.get("max_abs_diff")
    if worst is not None and worst > WARN_ABOVE:
        print(f"{prefix}: warning: onnxruntime and torch differ by up to {worst:.3g} (see checks)", file=sys.stderr)
