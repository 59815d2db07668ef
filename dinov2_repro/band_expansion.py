"""Expand an RGB backbone's patch embedding to N input bands (multispectral imagery).

Two rules, both acting only on ``patch_embed.proj.weight`` (shape ``(D, 3, p, p)``; the bias and
every other tensor are unchanged). Write the RGB filters as ``w_c`` and their mean as
``m = (w_R + w_G + w_B) / 3``.

``mean`` (the default, the DINOv3 authors' rule): input channels 0, 1, 2 keep ``w_R, w_G, w_B``,
every new band (3 .. N-1) gets ``m``, and the whole weight is multiplied by 3/N. The sum of the
filters over the bands stays ``3 m``, so an image whose N bands are all the same picture ``x``
embeds exactly as the RGB model embeds that grey picture: the activation scale the rest of the
network was trained on is kept. It assumes channels 0, 1, 2 are red, green and blue.

``rgb`` (``rgb_bands=(r, g, b)`` names the input channels that are red, green and blue): channel
``r`` gets ``w_R - (1 - 3/N) m`` (likewise g, b) and every other channel gets ``(3/N) m``. Each
RGB filter splits into a colour part ``w_c - m`` (the three sum to zero) and a brightness part
``m``: the brightness part is shared by all N bands at 3/N, exactly as in ``mean``, while the
colour part stays at full strength on the named bands instead of being shrunk by 3/N. Hence two
exact properties (tests/test_band_expansion.py):
  - a grey N-band image (all bands equal) embeds as in the RGB model, as with ``mean``;
  - an N-band image whose extra bands equal the mean of its R, G, B bands embeds exactly as the
    RGB model embeds its R, G, B bands: the expanded model *is* the RGB model until the extra
    bands carry something beyond brightness, and then it responds to their deviation from it.
With N = 3 it is a pure reordering of the RGB filters (BGR data: ``rgb_bands=(2, 1, 0)``).

The input normalisation is expanded alongside (:func:`expand_normalisation`): the named bands
keep the export's R, G, B mean/std, every other band gets the mean of the three.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor

PATCH_EMBED_KEY = "patch_embed.proj.weight"
RGB = 3


def check_rgb_bands(rgb_bands: Sequence[int], in_chans: int) -> tuple[int, int, int]:
    """``rgb_bands`` as a tuple of three distinct 0-based channel indices below ``in_chans``,
    or a ValueError in one line."""
    try:
        bands = tuple(int(b) for b in rgb_bands)
    except (TypeError, ValueError):
        raise ValueError(f"rgb_bands={rgb_bands!r}: expected three integer band indices (red, green, blue)") from None
    if len(bands) != RGB:
        raise ValueError(f"rgb_bands={list(bands)}: expected exactly three band indices (red, green, blue), got {len(bands)}")
    outside = [b for b in bands if not 0 <= b < in_chans]
    if outside:
        raise ValueError(f"rgb_bands={list(bands)}: index {outside[0]} is outside the {in_chans} input bands "
                         f"(0-based indices 0..{in_chans - 1})")
    if len(set(bands)) != RGB:
        raise ValueError(f"rgb_bands={list(bands)}: red, green and blue must be three different bands")
    return bands  # type: ignore[return-value]


def expand_patch_embed_weight(weight: Tensor, in_chans: int, *, rgb_bands: Sequence[int] | None = None) -> Tensor:
    """A ``(D, in_chans, p, p)`` patch-embedding weight from an RGB ``(D, 3, p, p)`` one (rules in
    the module docstring: ``mean`` without ``rgb_bands``, ``rgb`` with them)."""
    if weight.ndim != 4 or weight.shape[1] != RGB:
        raise ValueError(f"band expansion starts from an RGB patch embedding (D, 3, p, p); got shape {tuple(weight.shape)}")
    if in_chans < RGB:
        raise ValueError(f"in_chans={in_chans}: band expansion needs at least 3 input bands (it adds bands to RGB)")
    # Computed in float64 and cast back: the scaled sums then round once, in the file's dtype.
    rgb = weight.double()
    mean = rgb.mean(dim=1, keepdim=True)
    scale = RGB / in_chans
    out = (scale * mean).repeat(1, in_chans, 1, 1)
    if rgb_bands is None:
        out[:, :RGB] = scale * rgb
    else:
        for colour, band in enumerate(check_rgb_bands(rgb_bands, in_chans)):
            out[:, band] = rgb[:, colour] - (1.0 - scale) * mean[:, 0]
    return out.to(weight.dtype)


def expand_normalisation(values: Sequence[float], in_chans: int, *, rgb_bands: Sequence[int] | None = None) -> list[float]:
    """Per-band mean (or std) for the expanded input: R, G, B values on their bands (0, 1, 2 or
    ``rgb_bands``), the mean of the three on every other band."""
    values = [float(v) for v in values]
    if len(values) != RGB:
        raise ValueError(f"band expansion needs the RGB normalisation (3 values), got {values}")
    out = [sum(values) / RGB] * in_chans
    for colour, band in enumerate(range(RGB) if rgb_bands is None else check_rgb_bands(rgb_bands, in_chans)):
        out[band] = values[colour]
    return out


def expand_backbone_bands(tensors: Mapping[str, Tensor], meta: Mapping[str, Any], *, in_chans: int | None,
                          rgb_bands: Sequence[int] | None = None, source: str = "backbone") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, header) of a backbone export with its patch embedding expanded to ``in_chans``
    bands; the header records ``in_chans``, the expanded mean/std and ``band_expansion``.

    ``in_chans=None`` keeps the file's band count (then ``rgb_bands`` only reorders RGB).
    ``source`` names the file in error messages."""
    file_chans = int(meta["in_chans"])
    target = file_chans if in_chans is None else int(in_chans)
    if target == file_chans and rgb_bands is None:
        return dict(tensors), dict(meta)
    if file_chans != RGB:
        raise ValueError(f"{source}: band expansion starts from an RGB backbone, but this one has in_chans={file_chans} "
                         f"(asked for in_chans={target})")
    if PATCH_EMBED_KEY not in tensors:
        raise ValueError(f"{source}: no {PATCH_EMBED_KEY!r} tensor to expand")
    try:
        weight = expand_patch_embed_weight(tensors[PATCH_EMBED_KEY], target, rgb_bands=rgb_bands)
        mean = expand_normalisation(meta["mean"], target, rgb_bands=rgb_bands)
        std = expand_normalisation(meta["std"], target, rgb_bands=rgb_bands)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    out_tensors = {**tensors, PATCH_EMBED_KEY: weight}
    out_meta = {**meta, "in_chans": target, "mean": mean, "std": std,
                "band_expansion": {"rule": "mean" if rgb_bands is None else "rgb", "from_in_chans": file_chans,
                                   "rgb_bands": list(range(RGB)) if rgb_bands is None else list(check_rgb_bands(rgb_bands, target))}}
    return out_tensors, out_meta


def parse_band_expansion(text: str | None, *, option: str = "--expand-bands") -> tuple[int, int, int] | str | None:
    """CLI form: ``mean`` -> 'mean'; ``R,G,B`` (1-based band numbers, as ``--bands``) -> 0-based
    tuple; empty -> None. Range checks happen once the band count is known."""
    if not text:
        return None
    if text.strip().lower() == "mean":
        return "mean"
    try:
        numbers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} {text}: expected 'mean' or three 1-based band numbers R,G,B (e.g. 3,2,1)") from None
    if len(numbers) != RGB or min(numbers) < 1:
        raise ValueError(f"{option} {text}: expected 'mean' or three 1-based band numbers R,G,B (e.g. 3,2,1)")
    return tuple(n - 1 for n in numbers)  # type: ignore[return-value]

