"""Camera frame -> the fused backbones' pixel tensor, as Prismatic's image processor does it.

Per frame (``uint8`` RGB, any size):

1. ``resize-naive`` (OpenVLA): resize to ``size`` x ``size`` (PIL, the processor's interpolation, bicubic);
   ``letterbox``: pad to a square with the mean colour first; ``resize-crop``: resize the short side, centre crop;
2. optional centre crop (OpenVLA / OFT models fine-tuned with random-crop augmentation): keep the central 90 % of
   the area and resize back to ``size`` (bilinear, corner-aligned), as the public evaluation scripts'
   ``tf.image.crop_and_resize`` does (:func:`center_crop`);
3. per backbone: ``/255``, subtract the mean, divide by the std (DINOv2: ImageNet statistics, SigLIP: 0.5), and
   stack the backbones on the channel axis -> (3 * num_backbones, size, size).

Step 3 runs on the model's device. The uint8 frame after steps 1-2 is also what pruning methods that compare raw
patches (SpecPrune's changed patches, VLA-Cache) receive, with the ViT's patch size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from specprune_ros.core.constant_tensors import constant_tensors

_PIL_MODES = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST,
              'lanczos': Image.LANCZOS, 'box': Image.BOX, 'hamming': Image.HAMMING}
RESIZE_STRATEGIES = ('resize-naive', 'letterbox', 'resize-crop')


@dataclass(frozen=True)
class ImageTransform:
    """Preprocessing of one checkpoint (from ``preprocessor_config.json`` when present)."""

    size: int = 224
    means: tuple[tuple[float, float, float], ...] = ((0.485, 0.456, 0.406), (0.5, 0.5, 0.5))
    stds: tuple[tuple[float, float, float], ...] = ((0.229, 0.224, 0.225), (0.5, 0.5, 0.5))
    resize_strategy: str = 'resize-naive'
    interpolation: str = 'bicubic'
    center_crop: bool = False
    crop_scale: float = 0.9                    # area fraction kept by the centre crop

    def __post_init__(self) -> None:
        if self.resize_strategy not in RESIZE_STRATEGIES:
            raise ValueError(f'image_resize_strategy {self.resize_strategy!r} not in {RESIZE_STRATEGIES}')
        if self.interpolation not in _PIL_MODES:
            raise ValueError(f'interpolation {self.interpolation!r} not in {sorted(_PIL_MODES)}')
        if len(self.means) != len(self.stds) or not self.means:
            raise ValueError('one mean and one std per vision backbone')

    @property
    def num_backbones(self) -> int:
        return len(self.means)

    def frame(self, image: np.ndarray) -> np.ndarray:
        """Steps 1-2: (H, W, 3) uint8 -> (size, size, 3) uint8."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f'expected an (H, W, 3) uint8 RGB frame, got {image.shape} {image.dtype}')
        pil = Image.fromarray(image)
        mode = _PIL_MODES[self.interpolation]
        if self.resize_strategy == 'letterbox':       # the processor fills with its last backbone's mean
            pil = _letterbox(pil, tuple(int(255 * m) for m in self.means[-1]))
        if self.resize_strategy == 'resize-crop':     # torchvision's Resize(int): the long side truncated
            w, h = pil.size
            short, long = min(w, h), max(w, h)
            long = max(self.size, int(self.size * long / short))
            pil = pil.resize((self.size, long) if w < h else (long, self.size), mode)
            pil = _center(pil, self.size, self.size)
        elif pil.size != (self.size, self.size):
            pil = pil.resize((self.size, self.size), mode)
        frame = np.asarray(pil, dtype=np.uint8)
        return center_crop(frame, self.crop_scale, self.size) if self.center_crop else frame

    def pixels(self, frames: Sequence[np.ndarray], device: torch.device | str = 'cpu',
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Step 3: prepared uint8 frames (n, size, size, 3) -> (n, 3 * num_backbones, size, size)."""
        x = torch.from_numpy(np.stack([np.ascontiguousarray(f) for f in frames])).to(device)
        x = x.permute(0, 3, 1, 2).float() / 255.0
        parts = []
        for mean, std in zip(self.means, self.stds):
            m, s = _channel_constants(mean, std, x.device)
            parts.append((x - m) / s)
        return torch.cat(parts, dim=1).to(dtype)


@constant_tensors(maxsize=16)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One backbone's (1, 3, 1, 1) mean and std on ``device``, copied there once (shared: do not modify them).

    Normal tensors even when first asked for in inference mode (usable with autograd on too).
    """
    return torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1)


def center_crop(frame: np.ndarray, area: float, size: int) -> np.ndarray:
    """The central ``area`` of a (H, W, 3) uint8 frame resized to ``size`` x ``size``, as the evaluation scripts do it.

    Their ``tf.image.crop_and_resize`` samples the box corner-aligned: output row ``i`` reads source row
    ``y1 * (H - 1) + i * (y2 - y1) * (H - 1) / (size - 1)``, bilinear, on the frame scaled to [0, 1] in float32; the
    result goes back to uint8 as ``convert_image_dtype(saturate=True)`` does, truncating ``x * 255.5``. (A pixel-centre
    crop and resize lands half a pixel off and keeps 90.4 % instead of 90 % of the area.)
    """
    pixels = frame.astype(np.float32) * np.float32(1.0 / 255)
    side = np.float32(min(max(math.sqrt(area), 0.0), 1.0))
    low = (np.float32(1) - side) / np.float32(2)

    def samples(extent: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        step = side * np.float32(extent - 1) / np.float32(size - 1)
        where = low * np.float32(extent - 1) + np.arange(size, dtype=np.float32) * step
        first = np.floor(where).astype(np.int64)
        return first, np.minimum(np.ceil(where).astype(np.int64), extent - 1), (where - first).astype(np.float32)

    (top, bottom, dy), (left, right, dx) = samples(frame.shape[0]), samples(frame.shape[1])
    dx = dx[None, :, None]
    upper = pixels[top][:, left] + (pixels[top][:, right] - pixels[top][:, left]) * dx
    lower = pixels[bottom][:, left] + (pixels[bottom][:, right] - pixels[bottom][:, left]) * dx
    mixed = np.clip(upper + (lower - upper) * dy[:, None, None], 0.0, 1.0)
    return (mixed * np.float32(255.5)).astype(np.uint8)


def _letterbox(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    w, h = image.size
    side = max(w, h)
    canvas = Image.new('RGB', (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _center(image: Image.Image, width: int, height: int) -> Image.Image:
    w, h = image.size
    left, top = int(round((w - width) / 2.0)), int(round((h - height) / 2.0))     # torchvision's CenterCrop
    return image.crop((left, top, left + width, top + height))
