"""Segmentation models as (frozen feature extractor, trainable head) pairs.

Splitting every model this way lets training cache the frozen features of each tile once
(the backbone never changes), which is what makes label-efficiency grids affordable on CPU.
Heads take the cached feature list plus the output size and return (B, K, H, W) logits.

The U-Net and UPerNet decoders are segmentation-models-pytorch's own modules fed by our
Feature2Pyramid neck; smp encoders are only built for the supervised baseline, always with
``encoder_weights=None`` (nothing is downloaded).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .necks import Feature2Pyramid, pyramid_block_indices

DECODERS = ("linear", "unet", "upernet", "dpt", "knn")


class FrozenViTFeatures(nn.Module):
    """Patch-token maps (B, D, H/p, W/p) of chosen blocks of a frozen backbone."""

    def __init__(self, backbone: nn.Module, *, blocks: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.blocks = list(blocks)
        self.patch_size = int(backbone.patch_size)

    trainable = False  # True once fine-tuning unfroze part of the backbone (finetune.py)

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        return self.trainable_forward(images)

    def trainable_forward(self, images: Tensor) -> list[Tensor]:
        """The same maps with gradients (fine-tuning modes)."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {height}x{width} px is not a multiple of the patch size {self.patch_size}")
        return list(self.backbone.get_intermediate_layers(images, n=self.blocks, reshape=True))


class PixelFeatures(nn.Module):
    """The image itself as the only feature map (spectral and supervised baselines)."""

    patch_size = 1

    def forward(self, images: Tensor) -> list[Tensor]:
        return [images]


class LinearHead(nn.Module):
    """The DINOv2 linear protocol: BatchNorm + 1x1 conv on the last map, bilinear upsampling."""

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        logits = self.classifier(self.norm(features[-1]))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class PyramidUnetHead(nn.Module):
    """Feature2Pyramid (strides p/4 .. 2p) -> smp UnetDecoder (up to full resolution) -> 3x3 conv."""

    def __init__(self, *, embed_dim: int, num_classes: int, decoder_channels: Sequence[int] = (64, 32, 16, 16)) -> None:
        super().__init__()
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

        self.neck = Feature2Pyramid(embed_dim=embed_dim)
        # smp drops the first (full-resolution) entry and uses it only for its size: 0 channels.
        self.decoder = UnetDecoder(encoder_channels=[0, *self.neck.out_channels], decoder_channels=list(decoder_channels),
                                   n_blocks=len(decoder_channels))
        self.classifier = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=3, padding=1)

    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        pyramid = self.neck(features)
        full = pyramid[0].new_empty(pyramid[0].shape[0], 0, *size)
        return self.classifier(self.decoder([full, *pyramid]))


class PyramidUperHead(nn.Module):
    """Feature2Pyramid -> smp UPerNetDecoder (PPM 1,2,3,6 + FPN, fused at stride p/4) -> 1x1 conv, upsampled."""

    def __init__(self, *, embed_dim: int, num_classes: int, channels: int = 128) -> None:
        super().__init__()
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        self.neck = Feature2Pyramid(embed_dim=embed_dim)
        # smp skips the stride-1 and stride-2 entries; they carry no channels here.
        self.decoder = UPerNetDecoder(encoder_channels=[0, 0, *self.neck.out_channels], encoder_depth=5,
                                      decoder_channels=channels)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        pyramid = self.neck(features)
        empty = pyramid[0].new_empty(pyramid[0].shape[0], 0, 1, 1)
        logits = self.classifier(self.decoder([empty, empty, *pyramid]))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SpectralHead(nn.Module):
    """Per-pixel spectral baseline: a two-layer MLP (1x1 convs) on the band values of each pixel
    plus the tile's mean colour, so it sees colour but no spatial context."""

    def __init__(self, *, in_channels: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(2 * in_channels, hidden, 1), nn.GELU(), nn.Conv2d(hidden, num_classes, 1))

    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        pixels = features[-1]
        mean_colour = pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels)
        return self.mlp(torch.cat([pixels, mean_colour], dim=1))


class SupervisedUnet(nn.Module):
    """smp U-Net with a ResNet-18 encoder trained end to end from scratch (no pretrained weights).
    Inputs are reflect-padded to a multiple of 32 (its encoder's total stride) and cropped back."""

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        self.net = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=in_channels, classes=num_classes)

    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        images = features[-1]
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % 32, -width % 32
        padded = F.pad(images, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else images
        return self.net(padded)[..., :height, :width]


class DptHead(nn.Module):
    """segmentation-models-pytorch's DPT decoder on 4 intermediate blocks of a plain ViT.

    smp sizes DPT's reassemble stage from the encoder's strides (factor stride / 4, / 8, / 16, / 32);
    with p = 14 those are fractional and the maps would not line up, so the blocks are declared at
    stride 16: the maps are rescaled x4, x2, x1, x0.5 relative to the patch grid, the same relative
    pyramid (p/4 .. 2p) as Feature2Pyramid. DPT's fusion halves and doubles sizes, so an odd patch
    grid is padded (replicate) by one row / column and the padding cut off afterwards; the fused map
    (8x the grid) goes through a 3x3 conv and bilinear upsampling to the tile size.
    Channel widths are kept small (CPU); smp's defaults are (256, 512, 1024, 1024) / 256.
    """

    def __init__(self, *, embed_dim: int, num_classes: int, intermediate_channels: Sequence[int] = (64, 128, 256, 256),
                 fusion_channels: int = 64) -> None:
        super().__init__()
        from segmentation_models_pytorch.decoders.dpt.decoder import DPTDecoder

        self.decoder = DPTDecoder(encoder_out_channels=[embed_dim] * 4, encoder_output_strides=[16] * 4,
                                  encoder_has_prefix_tokens=False, readout="ignore",
                                  intermediate_channels=list(intermediate_channels), fusion_channels=fusion_channels)
        self.classifier = nn.Conv2d(fusion_channels, num_classes, kernel_size=3, padding=1)

    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        if len(features) != 4:
            raise ValueError(f"the DPT head takes 4 feature maps, got {len(features)}")
        height, width = features[0].shape[-2:]
        padded = [F.pad(f, (0, width % 2, 0, height % 2), mode="replicate") for f in features]
        fused = self.decoder(padded, [None] * 4)[..., : 8 * height, : 8 * width]
        return F.interpolate(self.classifier(fused), size=size, mode="bilinear", align_corners=False)


def build_head(*, decoder: str, embed_dim: int, num_classes: int, knn_k: int = 20, guided_filter: int = 0) -> nn.Module:
    """A head for a frozen ViT of width ``embed_dim`` (``knn``: the training-free kNN decoder)."""
    if decoder == "knn":
        from .knn_decoder import KnnHead

        return KnnHead(num_classes=num_classes, k=knn_k, guided_filter_radius=guided_filter)
    if decoder == "linear":
        return LinearHead(in_channels=embed_dim, num_classes=num_classes)
    if decoder == "unet":
        return PyramidUnetHead(embed_dim=embed_dim, num_classes=num_classes)
    if decoder == "upernet":
        return PyramidUperHead(embed_dim=embed_dim, num_classes=num_classes)
    if decoder == "dpt":
        return DptHead(embed_dim=embed_dim, num_classes=num_classes)
    raise ValueError(f"decoder {decoder!r}: choose one of {', '.join(DECODERS)}")


def vit_blocks_for(decoder: str, depth: int) -> list[int]:
    """Blocks a decoder reads: the last one for ``linear`` and ``knn``, four spread ones for the pyramid decoders."""
    return [depth - 1] if decoder in ("linear", "knn") else pyramid_block_indices(depth)


def build_segmenter(*, kind: str, num_classes: int, in_channels: int, decoder: str = "unet",
                    backbone: nn.Module | None = None, **head_options) -> tuple[nn.Module, nn.Module]:
    """(frozen feature extractor, trainable head) for ``kind`` in vit | spectral | supervised."""
    if kind == "vit":
        if backbone is None:
            raise ValueError("kind 'vit' needs a backbone")
        features = FrozenViTFeatures(backbone, blocks=vit_blocks_for(decoder, int(backbone.depth)))
        return features, build_head(decoder=decoder, embed_dim=int(backbone.embed_dim), num_classes=num_classes, **head_options)
    if kind == "spectral":
        return PixelFeatures(), SpectralHead(in_channels=in_channels, num_classes=num_classes)
    if kind == "supervised":
        return PixelFeatures(), SupervisedUnet(in_channels=in_channels, num_classes=num_classes)
    raise ValueError(f"segmentation model kind {kind!r}: choose vit, spectral or supervised")
