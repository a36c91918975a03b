"""SpecPrune-VLA dynamic-token detection (and VLA-Cache's static-patch test) on raw pixels.

Each camera frame is cut into the model's patch grid; patch ``i`` of frame ``t`` is compared with patch ``i`` of a
reference frame by cosine similarity of the raw pixel vectors. A patch is *static* if the similarity is at least
``threshold`` (SpecPrune code: 0.986; VLA-Cache: 0.996), but at most ``max_static`` patches (the most similar
ones) count as static per frame (SpecPrune code: 200 of 256 in coarse mode, 220 of 256 in fine mode; we scale these
as fractions of the patches per camera, see :class:`ChangeDetectionConfig`). Every other patch is *changed*
(SpecPrune's V_dynamic).

Raw uint8 pixels are all non-negative, so their cosine similarity is close to 1 unless content really changes;
that is why the thresholds are so close to 1. We follow the public code and do not mean-centre the patches.

Reference frame: the slower the robot moved, the older the reference (small motions accumulate). From the speed
``v`` = |sum of the translation actions executed since the last inference| (normalised units):

* code:  ``T = int(-16/3 * v / 6 + 22/3) + 3``, capped at 6 (and here also floored at 2),
* paper: ``T = floor(-16/3 * v / 6 + 22/3) + 4`` (clipped to the same range here).

``T`` counts frames *including the current one*, as in the code's ``replay_images[-T]``: the reference is
``T - 1`` frames before the current frame (or the oldest frame held, if fewer are held).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from specprune_ros.pruning.scoring import budget_count


@dataclass
class ChangeDetectionConfig:
    """Defaults follow the SpecPrune public code, with counts scaled to fractions of a camera's patches."""

    threshold: float = 0.986                  # static if cosine similarity >= threshold
    max_static_fraction_coarse: float = 200 / 256   # cap on static patches per camera (144-patch grid: 113)
    max_static_fraction_fine: float = 220 / 256     # in fine mode (144-patch grid: 124)
    reference_variant: Literal['code', 'paper'] = 'code'
    min_reference_back: int = 2               # T range (frames, counting the current one)
    max_reference_back: int = 6
    max_changed_fraction: float = 1.0         # cap on changed patches per camera, the least similar ones first
    # (1 = no cap; e.g. 0.15 keeps a wrist view that moves with the hand
    # from flagging most of its patches)


def reference_back(speed: float, variant: str = 'code', t_min: int = 2, t_max: int = 6) -> int:
    """Frames ``T`` (including the current one) to look back for the reference frame at translation ``speed``."""
    x = -16.0 / 3.0 * float(speed) / 6.0 + 22.0 / 3.0
    if variant == 'code':
        t = int(x) + 3                         # int() truncates toward zero, as in the code
    elif variant == 'paper':
        t = int(math.floor(x)) + 4
    else:
        raise ValueError(f"unknown reference variant {variant!r} (use 'code' or 'paper')")
    return int(min(max(t, t_min), t_max))


def patch_grid_size(image_shape: tuple[int, ...], grid_shape: tuple[int, int], patch_size: int = 0) -> tuple[int, int]:
    """Pixel size (ph, pw) of one patch.

    ``patch_size`` > 0 is used if the grid fits in the image, else the size is inferred as ``H // rows``, ``W // cols``
    (right/bottom remainders are ignored).
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    rows, cols = grid_shape
    if patch_size > 0 and patch_size * rows <= h and patch_size * cols <= w:
        return patch_size, patch_size
    ph, pw = h // rows, w // cols
    if ph < 1 or pw < 1:
        raise ValueError(f'image {h}x{w} is smaller than a {rows}x{cols} patch grid')
    return ph, pw


def _patch_blocks(image: np.ndarray, grid_shape: tuple[int, int], patch_size: int = 0) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    rows, cols = grid_shape
    ph, pw = patch_grid_size(img.shape, grid_shape, patch_size)
    img = img[:rows * ph, :cols * pw]
    c = img.shape[2]
    return img.reshape(rows, ph, cols, pw, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, ph * pw * c)


def patchify(image: np.ndarray, grid_shape: tuple[int, int], patch_size: int = 0) -> torch.Tensor:
    """(rows * cols, ph * pw * C) float32 pixel vectors of the row-major patch grid (top-left aligned)."""
    return torch.from_numpy(np.ascontiguousarray(_patch_blocks(image, grid_shape, patch_size), dtype=np.float32))


def patch_similarity(frame: np.ndarray, reference: np.ndarray, grid_shape: tuple[int, int],
                     patch_size: int = 0, eps: float = 1e-8) -> torch.Tensor:
    """(rows * cols,) cosine similarity of raw pixel patches between ``frame`` and ``reference``.

    Two all-black patches count as identical (similarity 1).
    """
    if np.shape(frame) != np.shape(reference):
        raise ValueError(f'frame {np.shape(frame)} and reference {np.shape(reference)} differ in shape')
    a = _patch_blocks(frame, grid_shape, patch_size).astype(np.float32)
    b = _patch_blocks(reference, grid_shape, patch_size).astype(np.float32)
    na = np.sqrt(np.einsum('ij,ij->i', a, a))
    nb = np.sqrt(np.einsum('ij,ij->i', b, b))
    sim = np.einsum('ij,ij->i', a, b) / (na * nb + eps)
    sim[(na <= eps) & (nb <= eps)] = 1.0
    return torch.from_numpy(sim.astype(np.float32))


def static_mask(similarity: torch.Tensor, threshold: float, max_static: Optional[int] = None) -> torch.Tensor:
    """Bool mask of static patches.

    Similarity >= threshold, at most ``max_static`` of them (the most similar; ties -> lower index).
    """
    sim = torch.as_tensor(similarity, dtype=torch.float32).flatten().numpy()
    ok = sim >= threshold
    if max_static is not None and int(ok.sum()) > max_static:
        idx = np.flatnonzero(ok)
        order = idx[np.argsort(-sim[idx], kind='stable')]
        ok = np.zeros_like(ok)
        ok[order[:max(0, int(max_static))]] = True
    return torch.from_numpy(ok)


def changed_mask(frame: np.ndarray, reference: Optional[np.ndarray], grid_shape: tuple[int, int],
                 patch_size: int = 0, threshold: float = 0.986, max_static: Optional[int] = None,
                 max_changed: Optional[int] = None) -> torch.Tensor:
    """Bool mask of changed patches (SpecPrune V_dynamic of one camera). No reference -> everything changed.

    ``max_changed``: at most this many changed patches, the least similar ones (ties -> lower index).
    """
    n = grid_shape[0] * grid_shape[1]
    if reference is None:
        return torch.ones(n, dtype=torch.bool)
    sim = patch_similarity(frame, reference, grid_shape, patch_size)
    changed = ~static_mask(sim, threshold, max_static)
    if max_changed is not None and int(changed.sum()) > max_changed:
        values = sim.numpy()
        idx = np.flatnonzero(changed.numpy())
        order = idx[np.argsort(values[idx], kind='stable')]
        capped = np.zeros(n, dtype=bool)
        capped[order[:max(0, int(max_changed))]] = True
        changed = torch.from_numpy(capped)
    return changed


def max_changed_count(config: ChangeDetectionConfig, patches: int) -> Optional[int]:
    """The changed-patch cap for one camera of ``patches`` patches (None: no cap)."""
    if config.max_changed_fraction >= 1.0:
        return None
    return budget_count(config.max_changed_fraction, patches, minimum=0)


def max_static_count(config: ChangeDetectionConfig, patches: int, fine: bool) -> int:
    """The static-patch cap for one camera of ``patches`` patches."""
    frac = config.max_static_fraction_fine if fine else config.max_static_fraction_coarse
    return budget_count(frac, patches, minimum=0)


def patch_vectors(images: Sequence[np.ndarray], grid_shape: tuple[int, int],
                  patch_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixel patch vectors of every camera's frame, (C * P, D) float32, and their norms (C * P,).

    Computed once per frame: a frame is the current one at one step and the reference at later ones. Cameras whose
    patches hold fewer pixels (a smaller frame, ``patch_size`` 0) are zero-padded to the longest: a patch is only
    ever compared with the same camera's patch, and zeros change neither dot products nor norms.
    """
    parts = [_patch_blocks(image, grid_shape, patch_size) for image in images]
    width = max(part.shape[1] for part in parts)
    rows = sum(len(part) for part in parts)
    same = all(part.shape[1] == width for part in parts)
    # one pass per camera: cut into patches and converted to float32 in the same copy
    blocks = np.empty((rows, width), dtype=np.float32) if same else np.zeros((rows, width), dtype=np.float32)
    start = 0
    for part in parts:
        blocks[start:start + len(part), :part.shape[1]] = part
        start += len(part)
    return blocks, np.sqrt(np.einsum('ij,ij->i', blocks, blocks))


def static_masks(frame: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray],
                 num_cameras: int, threshold: float, max_static: Optional[int] = None,
                 eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """:func:`static_mask` of :func:`patch_similarity` for every camera in one pass, from :func:`patch_vectors`.

    Returns the static mask and the similarity, both (C, P).
    """
    (a, na), (b, nb) = frame, reference
    if a.shape != b.shape:
        raise ValueError(f'frame patches {a.shape} and reference patches {b.shape} differ in shape')
    sim = np.einsum('ij,ij->i', a, b) / (na * nb + eps)
    sim[(na <= eps) & (nb <= eps)] = 1.0
    sim = sim.astype(np.float32).reshape(num_cameras, -1)
    static = sim >= threshold
    if max_static is not None:
        static &= _smallest(np.where(static, -sim, np.inf), max_static)
    return static, sim


def changed_masks(frame: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray],
                  num_cameras: int, threshold: float = 0.986, max_static: Optional[int] = None,
                  max_changed: Optional[int] = None, eps: float = 1e-8) -> np.ndarray:
    """:func:`changed_mask` of every camera in one pass, from :func:`patch_vectors` of the frame and reference.

    Returns the dense visual bool mask (C * P,); each camera's part equals :func:`changed_mask` of that camera.
    """
    static, sim = static_masks(frame, reference, num_cameras, threshold, max_static, eps)
    changed = ~static
    if max_changed is not None:
        changed &= _smallest(np.where(changed, sim, np.inf), max_changed)
    return changed.reshape(-1)


def _smallest(key: np.ndarray, count: int) -> np.ndarray:
    """Per row, True at the ``count`` entries of smallest key (stable: ties -> lower index)."""
    order = np.argsort(key, axis=1, kind='stable')[:, :max(0, int(count))]
    chosen = np.zeros(key.shape, dtype=bool)
    chosen[np.arange(key.shape[0])[:, None], order] = True
    return chosen


def same_frame_sizes(frames: Sequence[np.ndarray], reference: Sequence[np.ndarray], num_cameras: int) -> bool:
    """Whether every camera's frame has its reference frame's size (patches of other sizes are not comparable)."""
    return all(np.shape(a)[:2] == np.shape(b)[:2] for a, b in zip(frames[:num_cameras], reference[:num_cameras]))


class PatchVectorCache:
    """:func:`patch_vectors` of the frames a :class:`TemporalTokenState` holds, cut once per frame.

    A frame is the current one at one step and the reference at later ones; entries are dropped with the frame.
    """

    def __init__(self) -> None:
        self._held: dict[int, tuple] = {}          # id(frame entry) -> (entry, vectors, norms)

    def clear(self) -> None:
        self._held.clear()

    def get(self, entry: tuple, held: Sequence[tuple], num_cameras: int, grid_shape: tuple[int, int],
            patch_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of ``entry`` (a tuple of per-camera frames); ``held``: every entry still held."""
        cached = self._held.get(id(entry))
        if cached is None or cached[0] is not entry:
            alive = {id(e) for e in held}
            for key in [key for key in self._held if key not in alive]:
                del self._held[key]
            cached = (entry, *patch_vectors(entry[:num_cameras], grid_shape, patch_size))
            self._held[id(entry)] = cached
        return cached[1], cached[2]
