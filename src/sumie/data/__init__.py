"""Datasets: procedural shapes and image folders, both yielding ``{"x", "label", "caption"}``."""

from __future__ import annotations

from torch.utils.data import Dataset

from .folder import IMAGE_EXTENSIONS, ImageFolderDataset
from .shapes import (COLORS, NUM_CLASSES, PLAIN_BACKGROUNDS, POSITIONS, SHAPES, SIZES, TEXTURED_BACKGROUNDS, Scene,
                     ShapeObject, ShapesConfig, ShapesDataset, caption, class_label, label_names, parse_caption,
                     parse_scene, render, sample_scene)

DATASET_KINDS: tuple[str, ...] = ("shapes", "folder")


def build_dataset(kind: str, **kwargs) -> Dataset:
    """``shapes``: keyword arguments of :class:`ShapesConfig`; ``folder``: those of :class:`ImageFolderDataset`."""
    if kind == "shapes":
        return ShapesDataset(ShapesConfig(**kwargs))
    if kind == "folder":
        return ImageFolderDataset(**kwargs)
    raise ValueError(f"unknown dataset kind {kind!r}; valid: {', '.join(DATASET_KINDS)}")


__all__ = [
    "COLORS", "DATASET_KINDS", "IMAGE_EXTENSIONS", "NUM_CLASSES", "PLAIN_BACKGROUNDS", "POSITIONS", "SHAPES", "SIZES",
    "TEXTURED_BACKGROUNDS", "ImageFolderDataset", "Scene", "ShapeObject", "ShapesConfig", "ShapesDataset",
    "build_dataset", "caption", "class_label", "label_names", "parse_caption", "parse_scene", "render",
    "sample_scene",
]
