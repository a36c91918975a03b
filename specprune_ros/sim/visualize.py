"""Pictures of episodes: a PNG strip (cameras stacked, time left to right) and an animated GIF."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import cv2
import numpy as np

Frames = Union[Sequence, Mapping[str, np.ndarray]]


def _camera_frames(episode: Frames, cameras: Optional[Sequence[str]]) -> dict[str, np.ndarray]:
    """Camera -> (T, H, W, 3) from a list of observations (with ``.images``) or a dict of arrays."""
    if isinstance(episode, Mapping):
        frames = {k: np.asarray(v) for k, v in episode.items()}
    elif hasattr(episode, 'images') and isinstance(episode.images, Mapping):     # a dataset Episode
        frames = {k: np.asarray(v) for k, v in episode.images.items()}
    else:
        obs = [o for o in episode if getattr(o, 'images', None)]
        if not obs:
            raise ValueError('no rendered observations to draw')
        frames = {k: np.stack([o.images[k] for o in obs]) for k in obs[0].images}
    names = list(cameras) if cameras is not None else list(frames)
    return {k: frames[k] for k in names}


def _grid(frames: dict[str, np.ndarray], indices: Sequence[int], scale: int, pad: int) -> np.ndarray:
    columns = []
    for t in indices:
        col = [cv2.resize(frames[c][t], None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
               for c in frames]
        col = [np.pad(im, ((pad, pad), (pad, pad), (0, 0)), constant_values=255) for im in col]
        columns.append(np.concatenate(col, axis=0))
    return np.concatenate(columns, axis=1)


def save_strip(episode: Frames, path: Union[str, Path], num_frames: int = 8,
               cameras: Optional[Sequence[str]] = None, scale: int = 2, pad: int = 2,
               title: Optional[str] = None) -> Path:
    """PNG with `num_frames` evenly spaced steps as columns and one row per camera."""
    frames = _camera_frames(episode, cameras)
    length = len(next(iter(frames.values())))
    indices = np.unique(np.linspace(0, length - 1, min(num_frames, length)).round().astype(int))
    img = _grid(frames, indices, scale, pad)
    if title:
        bar = np.full((22, img.shape[1], 3), 255, np.uint8)
        cv2.putText(bar, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        img = np.concatenate([bar, img], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img[..., ::-1]):
        raise OSError(f'could not write {path}')
    return path


def save_gif(episode: Frames, path: Union[str, Path], fps: float = 10.0,
             cameras: Optional[Sequence[str]] = None, scale: int = 2) -> Path:
    """Animated GIF, cameras side by side (uses Pillow, which matplotlib already depends on)."""
    from PIL import Image

    frames = _camera_frames(episode, cameras)
    length = len(next(iter(frames.values())))
    images = []
    for t in range(length):
        row = np.concatenate([cv2.resize(frames[c][t], None, fx=scale, fy=scale,
                                         interpolation=cv2.INTER_NEAREST) for c in frames], axis=1)
        images.append(Image.fromarray(row))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
