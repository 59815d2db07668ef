"""Pretraining data: multi-crop augmentation, iBOT masks, collate, datasets, seeded sampler, loader."""
from .augmentations import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO
from .collate import collate_data_and_cast
from .datasets import GeoTiffDataset, ImageFolderDataset, ManifestDataset, build_dataset
from .loader import SeededTransformDataset, make_data_loader
from .masking import MaskingGenerator
from .samplers import InfiniteSampler

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataAugmentationDINO",
    "GeoTiffDataset",
    "ImageFolderDataset",
    "InfiniteSampler",
    "ManifestDataset",
    "MaskingGenerator",
    "SeededTransformDataset",
    "build_dataset",
    "collate_data_and_cast",
    "make_data_loader",
]
