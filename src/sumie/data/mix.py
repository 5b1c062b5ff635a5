"""An image folder with procedural ``shapes`` scenes mixed in, as one captioned dataset.

The bundled text-to-image model learns emoji artwork and compositional shapes prompts at
once: a fraction ``f`` of the combined index space is shapes scenes, the rest the folder.
The scenes drawn for a position change with the epoch (``set_epoch``), so the model sees
fresh compositions every pass while the folder's images repeat with new flips.
"""

from __future__ import annotations

import math

from torch.utils.data import Dataset

from .folder import ImageFolderDataset
from .shapes import ShapesDataset


class FolderWithShapes(Dataset):
    """Items ``0 .. len(folder)-1`` come from the folder, the rest are shapes scenes."""

    def __init__(self, folder: ImageFolderDataset, shapes: ShapesDataset, shapes_fraction: float) -> None:
        if not 0.0 < shapes_fraction < 1.0:
            raise ValueError(f"shapes_fraction must be in (0, 1), got {shapes_fraction}")
        self.folder, self.shapes = folder, shapes
        self.n_folder = len(folder)
        self.n_shapes = max(1, math.ceil(self.n_folder * shapes_fraction / (1.0 - shapes_fraction)))
        self.epoch = 0

    def __len__(self) -> int:
        return self.n_folder + self.n_shapes

    @property
    def captions(self) -> list[str]:
        """Every caption the model can meet: the folder's, and those of the first scenes of each epoch."""
        scenes = [self.shapes.spec(i).caption for i in range(min(len(self.shapes), max(self.n_shapes, 20000)))]
        return list(self.folder.captions) + scenes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.folder.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict:
        i = int(i) % len(self)
        if i < self.n_folder:
            item = self.folder[i]
        else:
            item = self.shapes[(i - self.n_folder + self.epoch * self.n_shapes) % len(self.shapes)]
        return {"x": item["x"], "label": -1, "caption": item["caption"]}
