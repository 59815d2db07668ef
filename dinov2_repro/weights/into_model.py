"""A backbone file's weights shaped for a backbone the config built (``MODEL.WEIGHTS``, a
distillation teacher): the one loading function the training verbs call for a file.

Any backbone file is accepted (the project's export, a released DINOv2/DINOv3 ``.pth``, a timm
``.safetensors``). The architecture must be the configured one (family, width, depth, heads,
patch, registers, FFN, bands); a learned pos-embed is resampled to the configured grid (as
``MODEL.WEIGHTS`` does between run directories). What to do with the heads, freezing, lr ramps
is the caller's business.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..models.vision_transformer import resample_pos_embed
from ..models.vision_transformer_v3 import DinoV3VisionTransformer

BACKBONE_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


def is_backbone_file(path: str | os.PathLike) -> bool:
    """True for a file that load_backbone reads (as opposed to a run or checkpoint directory)."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() in BACKBONE_FILE_SUFFIXES


def _facts(model: nn.Module) -> dict[str, Any]:
    ffn = "swiglu" if getattr(model, "ffn_layer", "mlp") in ("swiglu", "swiglufused") else "mlp"
    return {"family": "dinov3" if isinstance(model, DinoV3VisionTransformer) else "dinov2",
            "embed_dim": model.embed_dim, "depth": model.depth, "num_heads": model.num_heads,
            "patch_size": model.patch_size, "num_register_tokens": model.num_register_tokens,
            "in_chans": model.in_chans, "ffn": ffn}


def backbone_state_for(target: nn.Module, path: str | os.PathLike, **released_options: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict that loads strictly into ``target``, the file's header). Raises one ValueError
    line naming the file and every architecture fact that differs from ``target``'s."""
    from ..backbone_file import load_backbone

    source, meta = load_backbone(path, **released_options)
    have, want = _facts(source), _facts(target)
    differs = [f"{key}={have[key]} (configured {want[key]})" for key in want if have[key] != want[key]]
    if differs:
        raise ValueError(f"{path}: the backbone does not fit the configured architecture: {', '.join(differs)}; "
                         f"the file holds {meta.get('arch_family', 'dinov2')} arch {meta.get('arch')!r}")
    state = source.state_dict()
    target_state = target.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != target_state["pos_embed"].shape:
        side = int(round((target_state["pos_embed"].shape[1] - 1) ** 0.5))
        state["pos_embed"] = resample_pos_embed(pos.float(), (side, side), antialias=target.interpolate_antialias,
                                                offset=0.0)
    # ViT-7B's pretraining-only local CLS norm: dropped when the target has none, initialised
    # from the shared norm when the target has one and the file does not (exports drop it).
    if "local_cls_norm.weight" in target_state and "local_cls_norm.weight" not in state:
        state["local_cls_norm.weight"], state["local_cls_norm.bias"] = state["norm.weight"].clone(), state["norm.bias"].clone()
    for key in [k for k in state if k.startswith("local_cls_norm.") and k not in target_state]:
        del state[key]
    return state, meta
