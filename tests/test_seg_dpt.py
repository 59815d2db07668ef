"""The DPT decoder (smp's DPTDecoder on 4 ViT blocks): the shape path for any multiple of the patch."""
from __future__ import annotations

import pytest
import torch

from test_seg import _tiny_vit


def test_dpt_output_matches_any_input_multiple_of_the_patch(one_torch_thread):
    from dinov2_repro.eval.segmentation.decoders import DptHead, build_segmenter

    features, head = build_segmenter(kind="vit", num_classes=5, in_channels=4, decoder="dpt", backbone=_tiny_vit(4))
    assert isinstance(head, DptHead) and len(features.blocks) == 4
    for size in [(14, 14), (28, 42), (42, 28), (70, 70)]:  # odd and even patch grids
        logits = head(features(torch.randn(2, 4, *size)), size)
        assert logits.shape == (2, 5, *size)
    logits.sum().backward()  # the head trains
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="4 feature maps"):
        head(features(torch.randn(1, 4, 28, 28))[:2], (28, 28))
