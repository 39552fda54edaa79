"""Datasets, splits and batched augmentations."""

from pupil.data.datasets import DATASETS, ImageDataset, load, stratified_split
from pupil.data.transforms import AugmentConfig, BatchAugment

__all__ = ["DATASETS", "AugmentConfig", "BatchAugment", "ImageDataset", "load", "stratified_split"]
