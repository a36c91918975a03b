"""Debug picture: which visual patches the pruning kept, drawn over the model's input images."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch


def kept_patch_masks(record: object, layer: int = -1) -> list[np.ndarray]:
    """Per camera, a (rows, cols) bool grid of the patches that entered decoder ``layer`` (default: the last)."""
    layout = record.layout
    kept = torch.as_tensor(record.kept_per_layer[layer]).cpu()
    cameras = layout.camera_of(kept)
    patches = layout.patch_of(kept)
    rows, cols = layout.grid_shape
    masks = []
    for camera in range(layout.num_cameras):
        mask = np.zeros(rows * cols, dtype=bool)
        mask[patches[cameras == camera].numpy()] = True
        masks.append(mask.reshape(rows, cols))
    return masks


def draw_kept_patches(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], scale: int = 1) -> np.ndarray:
    """Cameras side by side, pruned patches darkened, kept ones outlined; (H*scale, sum W*scale, 3) uint8 RGB."""
    panels = []
    for image, mask in zip(images, masks):
        height, width = image.shape[:2]
        rows, cols = mask.shape
        cell = np.kron(mask, np.ones((height // rows, width // cols), dtype=bool))
        cell = cv2.resize(cell.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
        panel = image.astype(np.float32)
        panel[~cell] *= 0.25
        panel = cv2.resize(panel.astype(np.uint8), (width * scale, height * scale), interpolation=cv2.INTER_NEAREST)
        step_y, step_x = height * scale / rows, width * scale / cols
        for r, c in zip(*np.nonzero(mask)):
            top_left = (int(c * step_x), int(r * step_y))
            bottom_right = (int((c + 1) * step_x) - 1, int((r + 1) * step_y) - 1)
            cv2.rectangle(panel, top_left, bottom_right, (0, 255, 0), 1)
        panels.append(panel)
    return np.concatenate(panels, axis=1) if panels else np.zeros((1, 1, 3), dtype=np.uint8)
