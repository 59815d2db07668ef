"""Backbone export: our state dict <-> timm's DINOv2 key layout, and safetensors files.

The export file is a safetensors state dict in timm's layout (so ``timm`` can load it with
no conversion) plus a JSON-valued metadata header that is enough to rebuild our model.

Layout differences handled here (ours -> timm):
- ``register_tokens`` -> ``reg_token``. timm's register variants use ``no_embed_class``:
  the pos-embed has no CLS position, so the CLS position is folded into ``cls_token``
  (timm ``cls_token`` = our ``cls_token + pos_embed[:, 0]``). Going back, that sum becomes
  our ``cls_token`` and our CLS position is zero: same function, different split.
- SwiGLU: our ``mlp.w12`` / ``mlp.w3`` are timm's packed ``mlp.fc1`` / ``mlp.fc2`` (gate
  first in both), so only the names change.
- ``mask_token`` (iBOT) has no timm equivalent: dropped on export, zeros on import.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .io.files import atomic_output
from .models import DinoV3VisionTransformer, DinoVisionTransformer
from .models.layers.ffn import swiglu_hidden_dim
from .models.registry import _ARCHS, build_vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMAT_NAME = "dinov2_repro.backbone"
FORMAT_VERSION = 1
# Keys every export header must carry to rebuild the model without a config.
REQUIRED_METADATA = (
    "arch", "patch_size", "embed_dim", "depth", "num_heads", "num_register_tokens", "ffn", "img_size",
    "in_chans", "interpolate_offset", "interpolate_antialias", "mean", "std",
)

_TIMM_BASE = {"vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large", "vit_giant2": "vit_giant"}
_SWIGLU_NAMES = ("swiglu", "swiglufused")
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


# ---- names -----------------------------------------------------------------------------
def timm_model_name(arch: str, num_register_tokens: int) -> str:
    """timm's registered DINOv2 model for one of the released architectures (0 or 4 registers)."""
    if arch not in _TIMM_BASE:
        raise ValueError(f"arch {arch!r} has no timm DINOv2 model; timm has {', '.join(_TIMM_BASE)}")
    if num_register_tokens not in (0, 4):
        raise ValueError(f"timm ships DINOv2 models with 0 or 4 registers, not num_register_tokens={num_register_tokens}")
    registers = "_reg4" if num_register_tokens == 4 else ""
    return f"{_TIMM_BASE[arch]}_patch14{registers}_dinov2"


def infer_arch(model: DinoVisionTransformer) -> str:
    """Registry name of a model from its width (embed_dim, num_heads); 'custom' when none
    matches. Depth is left out on purpose: the header records it, and cut-down test models
    keep their family name."""
    for name, spec in _ARCHS.items():
        if spec["embed_dim"] == model.embed_dim and spec["num_heads"] == model.num_heads:
            return name
    return "custom"


# ---- state dict conversion ---------------------------------------------------------------
def _plain_state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else dict(model_or_state_dict)
    # torch.compile and DDP wrappers prefix every key; an export must not carry them.
    clean = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        clean[key] = value
    return clean


def to_timm_state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our backbone state dict -> timm DINOv2 VisionTransformer keys (register and SwiGLU aware)."""
    state = _plain_state_dict(model_or_state_dict)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise KeyError(f"backbone state dict has no {key!r}; is this a DinoVisionTransformer state dict?")
    state.pop("mask_token", None)
    out: dict[str, Tensor] = {}
    registers = state.pop("register_tokens", None)
    cls_token, pos_embed = state.pop("cls_token"), state.pop("pos_embed")
    if registers is not None:
        out["reg_token"] = registers
        out["cls_token"] = cls_token + pos_embed[:, :1]
        out["pos_embed"] = pos_embed[:, 1:]
    else:
        out["cls_token"], out["pos_embed"] = cls_token, pos_embed
    for key, value in state.items():
        out[re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key))] = value
    return out


def _is_swiglu_timm(state: Mapping[str, Tensor]) -> bool:
    # Packed SwiGLU: fc1 produces gate and value, so fc2 takes half of fc1's width.
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def from_timm_state_dict(state_dict: Mapping[str, Tensor], *, ffn: str | None = None) -> dict[str, Tensor]:
    """timm DINOv2 keys -> our backbone state dict. ``ffn`` ('mlp'/'swiglu') is inferred from
    the fc1/fc2 shapes when not given."""
    state = _plain_state_dict(state_dict)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise KeyError(f"timm state dict has no {key!r}; is this a timm VisionTransformer state dict?")
    head_keys = [k for k in state if k.startswith(("head.", "fc_norm.", "attn_pool.", "norm_pre."))]
    if head_keys:
        raise ValueError(f"timm state dict has keys our backbone cannot hold: {head_keys[:5]}")
    swiglu = _is_swiglu_timm(state) if ffn is None else ffn in _SWIGLU_NAMES
    out: dict[str, Tensor] = {}
    cls_token, pos_embed = state.pop("cls_token"), state.pop("pos_embed")
    registers = state.pop("reg_token", None)
    if registers is not None:
        out["register_tokens"] = registers
        out["cls_token"] = cls_token
        out["pos_embed"] = torch.cat([torch.zeros_like(pos_embed[:, :1]), pos_embed], dim=1)
    else:
        out["cls_token"], out["pos_embed"] = cls_token, pos_embed
    out["mask_token"] = torch.zeros(1, cls_token.shape[-1], dtype=cls_token.dtype, device=cls_token.device)
    for key, value in state.items():
        if swiglu:
            key = re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", key))
        out[key] = value
    return out


# ---- metadata ------------------------------------------------------------------------------
def backbone_metadata(
    model: DinoVisionTransformer,
    *,
    arch: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` (plain Python values, not yet JSON-encoded)."""
    mean = tuple(IMAGENET_MEAN if mean is None and model.in_chans == 3 else mean or ())
    std = tuple(IMAGENET_STD if std is None and model.in_chans == 3 else std or ())
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != model.in_chans:
            raise ValueError(f"{name} has {len(values)} values but the model has in_chans={model.in_chans}; pass {name}= explicitly")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {std}")
    block = model.blocks[0]
    hidden = block.mlp.w3.in_features if model.ffn_layer in _SWIGLU_NAMES else block.mlp.fc1.out_features
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "key_layout": "timm",
        "arch": arch or infer_arch(model),
        "patch_size": model.patch_size,
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "num_heads": model.num_heads,
        "num_register_tokens": model.num_register_tokens,
        "ffn": "swiglu" if model.ffn_layer in _SWIGLU_NAMES else model.ffn_layer,
        "ffn_hidden_dim": hidden,
        "mlp_ratio": _mlp_ratio_of(model),
        "qkv_bias": block.attn.qkv.bias is not None,
        "proj_bias": block.attn.proj.bias is not None,
        "ffn_bias": (block.mlp.w12 if model.ffn_layer in _SWIGLU_NAMES else block.mlp.fc1).bias is not None,
        "layerscale": hasattr(block.ls1, "gamma"),
        # The LayerScale value the model was built with (the training config's student.layerscale):
        # a random-init baseline rebuilt from this header starts where training started.
        "layerscale_init": getattr(model, "init_values", None) if hasattr(block.ls1, "gamma") else None,
        "img_size": model.img_size,
        "in_chans": model.in_chans,
        "interpolate_offset": model.interpolate_offset,
        "interpolate_antialias": model.interpolate_antialias,
        "mean": list(mean),
        "std": list(std),
    }


def _mlp_ratio_of(model: DinoVisionTransformer) -> float:
    block = model.blocks[0]
    if model.ffn_layer in _SWIGLU_NAMES:
        # Our SwiGLU rounds the hidden size from mlp_ratio; find the ratio that reproduces it.
        hidden = block.mlp.w3.in_features
        for ratio in (4.0, hidden * 3 / (2 * model.embed_dim)):
            if swiglu_hidden_dim(model.embed_dim, ratio) == hidden:
                return ratio
        raise ValueError(f"cannot express SwiGLU hidden size {hidden} for dim {model.embed_dim} as an mlp_ratio")
    return block.mlp.fc1.out_features / model.embed_dim


def _encode_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    # safetensors metadata is str -> str: JSON-encode every value.
    return {key: json.dumps(value) for key, value in meta.items()}


def _decode_metadata(raw: Mapping[str, str] | None, path: Path) -> dict[str, Any]:
    if not raw:
        raise ValueError(f"{path}: safetensors file has no metadata header; not a dinov2_repro backbone export")
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: metadata key {key!r} is not JSON ({value!r}): {error}") from None
    missing = [key for key in REQUIRED_METADATA if key not in meta]
    if missing:
        raise ValueError(f"{path}: metadata header lacks {missing}; not a dinov2_repro backbone export")
    return meta


LEGACY_LAYERSCALE_INIT = 1e-5  # what headers written before layerscale_init was recorded are rebuilt with


def layerscale_init_of(meta: Mapping[str, Any]) -> float | None:
    """LayerScale init value of an export: the header's ``layerscale_init`` (the training config's),
    LEGACY_LAYERSCALE_INIT for older headers that lack it, None without LayerScale."""
    if not meta.get("layerscale", True):
        return None
    value = meta.get("layerscale_init")
    return LEGACY_LAYERSCALE_INIT if value is None else float(value)


def build_model_from_metadata(meta: Mapping[str, Any]) -> DinoVisionTransformer:
    """A randomly initialised backbone of the header's architecture, either family (the
    random-init baselines of the evaluations)."""
    if meta.get("arch_family") == "dinov3":
        from .weights.dinov3_export import build_from_metadata

        return build_from_metadata(meta)
    return DinoVisionTransformer(**model_kwargs_from_metadata(meta))


def model_kwargs_from_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """DinoVisionTransformer keyword arguments from a DINOv2 export header."""
    return dict(
        img_size=int(meta["img_size"]),
        patch_size=int(meta["patch_size"]),
        in_chans=int(meta["in_chans"]),
        embed_dim=int(meta["embed_dim"]),
        depth=int(meta["depth"]),
        num_heads=int(meta["num_heads"]),
        mlp_ratio=float(meta.get("mlp_ratio", 4.0)),
        qkv_bias=bool(meta.get("qkv_bias", True)),
        proj_bias=bool(meta.get("proj_bias", True)),
        ffn_bias=bool(meta.get("ffn_bias", True)),
        ffn_layer=str(meta["ffn"]),
        init_values=layerscale_init_of(meta),
        num_register_tokens=int(meta["num_register_tokens"]),
        interpolate_offset=float(meta["interpolate_offset"]),
        interpolate_antialias=bool(meta["interpolate_antialias"]),
    )


# ---- files ---------------------------------------------------------------------------------
def save_backbone(
    model: DinoVisionTransformer,
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as safetensors in timm's layout with a rebuild header; atomic."""
    from safetensors.torch import save_file

    path = Path(path)
    if isinstance(model, DinoV3VisionTransformer):
        # DINOv3: timm eva keys and the extended header (weights/dinov3_export.py).
        from .weights.dinov3_export import dinov3_metadata, export_tensors

        meta = dinov3_metadata(model, arch=arch, mean=mean, std=std,
                               dataset=(extra_metadata or {}).get("dataset"))
        extra_metadata = {k: v for k, v in (extra_metadata or {}).items() if k != "dataset"}
        state = export_tensors(model)
    else:
        meta = backbone_metadata(model, arch=arch, mean=mean, std=std)
        state = to_timm_state_dict(model)
    clash = set(extra_metadata or {}) & set(meta)
    if clash:
        raise ValueError(f"extra_metadata may not override header keys {sorted(clash)}")
    meta.update(extra_metadata or {})
    # safetensors refuses shared or strided storage: give it contiguous CPU copies.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=_encode_metadata(meta))
    return path


def read_backbone_file(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(timm-layout tensors, decoded header) of an export, with errors that name the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone export {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            raw_meta = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for corrupt headers/data
        raise ValueError(f"{path}: cannot read the safetensors file (corrupt or truncated?): {error}") from error
    return tensors, _decode_metadata(raw_meta, path)


def is_project_header(raw: Mapping[str, str] | None) -> bool:
    """A safetensors header written by save_backbone (or a damaged one: it has some of its keys)."""
    return bool(raw) and (raw.get("format") == json.dumps(FORMAT_NAME) or any(k in raw for k in REQUIRED_METADATA))


def load_backbone(path: str | os.PathLike, *, device: str | torch.device = "cpu", in_chans: int | None = None,
                  rgb_bands: Sequence[int] | None = None,
                  **released_options: Any) -> tuple[DinoVisionTransformer, dict[str, Any]]:
    """Our backbone and its header from any backbone file: the project's export (DINOv2 or
    DINOv3, rebuilt from the header alone, weights loaded strictly), or a released file (the
    reference DINOv2/DINOv3 ``.pth`` or a timm ``.safetensors``, read without running code;
    ``released_options`` go to weights.read_released: dataset, num_heads, mean, std).

    ``in_chans`` other than the file's expands an RGB patch embedding to that many bands;
    ``rgb_bands`` (0-based) names the input bands that are red, green and blue (rules in
    :mod:`dinov2_repro.band_expansion`). The returned header then describes the expanded model.
    Band expansion works on the project's export: a released file is imported first
    (``dinov2-repro import-weights``)."""
    from .weights import read_released, read_tensor_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file {path} does not exist")
    expand = in_chans is not None or rgb_bands is not None
    if path.suffix.lower() != ".safetensors":
        if expand:
            raise ValueError(f"{path}: band expansion needs a backbone export; run `dinov2-repro import-weights {path} --out X.safetensors` first")
        return read_released(path, device=device, **released_options)
    tensors, raw_meta = read_tensor_file(path)
    if not is_project_header(raw_meta):
        if expand:
            raise ValueError(f"{path}: band expansion needs a backbone export; run `dinov2-repro import-weights {path} --out X.safetensors` first")
        return read_released(path, device=device, tensors=tensors, **released_options)
    meta = _decode_metadata(raw_meta, path)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    if expand:
        from .band_expansion import expand_backbone_bands

        tensors, meta = expand_backbone_bands(tensors, meta, in_chans=in_chans, rgb_bands=rgb_bands, source=str(path))
    if meta.get("arch_family") == "dinov3":
        from .weights.dinov3_export import load_export

        return load_export(tensors, meta, path, device=device), meta
    kwargs = model_kwargs_from_metadata(meta)
    arch = meta["arch"]
    model = build_vit(arch, **kwargs) if arch in _ARCHS else DinoVisionTransformer(**kwargs)
    try:
        model.load_state_dict(from_timm_state_dict(tensors, ffn=kwargs["ffn_layer"]), strict=True)
    except (RuntimeError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: weights do not match the header {kwargs}: {error}") from error
    return model.to(device).eval(), meta


def timm_kwargs_from_metadata(meta: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(timm model name, create_model keyword arguments) matching an export header exactly."""
    arch, registers = meta["arch"], int(meta["num_register_tokens"])
    swiglu = meta["ffn"] in _SWIGLU_NAMES
    # Non-released shapes (vit_tiny, other register counts) reuse the closest timm template;
    # every shape argument is passed explicitly below, so the template only picks the class.
    template_arch = arch if arch in _TIMM_BASE else ("vit_giant2" if swiglu else "vit_small")
    name = timm_model_name(template_arch, 4 if registers else 0)
    dim = int(meta["embed_dim"])
    if swiglu:
        hidden = int(meta.get("ffn_hidden_dim") or swiglu_hidden_dim(dim, float(meta.get("mlp_ratio", 4.0))))
        # timm's packed SwiGLU takes fc1's width (2 * hidden) as int(dim * mlp_ratio): add half
        # a unit so float rounding cannot truncate it.
        mlp_ratio = (2 * hidden + 0.5) / dim
    else:
        mlp_ratio = float(meta.get("mlp_ratio", 4.0))
    kwargs = dict(
        img_size=int(meta["img_size"]),
        patch_size=int(meta["patch_size"]),
        in_chans=int(meta["in_chans"]),
        embed_dim=dim,
        depth=int(meta["depth"]),
        num_heads=int(meta["num_heads"]),
        mlp_ratio=mlp_ratio,
        qkv_bias=bool(meta.get("qkv_bias", True)),
        init_values=layerscale_init_of(meta),
        reg_tokens=registers,
        no_embed_class=bool(registers),
        num_classes=0,
        dynamic_img_size=True,
        pretrained_cfg_overlay=dict(
            mean=tuple(meta["mean"]), std=tuple(meta["std"]),
            input_size=(int(meta["in_chans"]), int(meta["img_size"]), int(meta["img_size"])),
        ),
    )
    if not meta.get("proj_bias", True) or not meta.get("ffn_bias", True):
        raise ValueError("timm's DINOv2 models need proj and FFN biases; this export has none")
    return name, kwargs


def timm_model_for(model: DinoVisionTransformer, **overrides: Any) -> nn.Module:
    """A timm VisionTransformer carrying ``model``'s weights (eval mode, no download)."""
    import timm

    name, kwargs = timm_kwargs_from_metadata(backbone_metadata(model, mean=[0.0] * model.in_chans, std=[1.0] * model.in_chans))
    timm_model = timm.create_model(name, pretrained=False, **{**kwargs, **overrides})
    timm_model.load_state_dict(to_timm_state_dict(model), strict=True)
    return timm_model.eval()


def load_backbone_into_timm(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """timm.create_model(pretrained=False) shaped by the export header, weights loaded strictly.

    Note: with ``dynamic_img_size`` timm resizes the pos-embed with antialiased bicubic and no
    offset; our models match that at non-native sizes only when exported with
    interpolate_offset=0 and interpolate_antialias=True (the register models' setting).
    """
    import timm

    tensors, meta = read_backbone_file(path)
    name, kwargs = timm_kwargs_from_metadata(meta)
    model = timm.create_model(name, pretrained=False, **{**kwargs, **overrides})
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit timm model {name} {kwargs}: {error}") from error
    return model.eval()
