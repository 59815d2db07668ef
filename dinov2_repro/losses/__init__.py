"""Losses of the DINOv2 recipe and the teacher centering they consume."""
from .centering import SoftmaxCentering, sinkhorn_knopp_center
from .dino import DINOLoss
from .ibot import iBOTPatchLoss
from .koleo import KoLeoLoss

__all__ = ["DINOLoss", "KoLeoLoss", "SoftmaxCentering", "iBOTPatchLoss", "sinkhorn_knopp_center"]
