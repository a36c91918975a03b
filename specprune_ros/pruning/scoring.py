"""Score helpers shared by the pruning methods.

Per-camera top-k, budgets, rank weights, SpecPrune's layer importance and VLA-Pruner's decayed action score.

Conventions
-----------
* A *dense visual vector* has one entry per visual token in ``layout.visual_indices()`` order
  (camera 0's row-major patch grid, then camera 1's, ...), shape ``(layout.num_visual,)``.
* Attention summaries from the runner come as ``(key_indices, weights)`` in original sequence indices;
  :func:`dense_visual_scores` scatters them into a dense visual vector (tokens that were not keys get ``fill``).
* Ties are always broken towards the lower index (stable sorts), so every selection is deterministic.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

from specprune_ros.core.constant_tensors import constant_tensors
from specprune_ros.core.step_types import VisualMask
from specprune_ros.core.token_layout import TokenLayout, visual_order


# --------------------------------------------------------------------------------------------- budgets

def budget_count(fraction: float, total: int, minimum: int = 1) -> int:
    """``round(fraction * total)`` (half up), clipped to ``[min(minimum, total), total]``."""
    if total <= 0:
        return 0
    if not 0.0 <= fraction:
        raise ValueError(f'fraction must be >= 0, got {fraction}')
    count = int(math.floor(fraction * total + 0.5))
    return max(min(minimum, total), min(count, total))


# ------------------------------------------------------------------------------------- index plumbing

@constant_tensors(maxsize=16)
def _visual_tables(layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    vis, slots = visual_order(layout)
    return vis, torch.where(slots < layout.num_visual, slots, -1)


@functools.lru_cache(maxsize=16)
def _visual_tables_np(layout: TokenLayout) -> tuple[np.ndarray, np.ndarray]:
    vis, pos = _visual_tables(layout)
    return vis.numpy(), pos.numpy()


def visual_table_np(layout: TokenLayout) -> np.ndarray:
    """(num_tokens,) NumPy map from sequence index to dense visual position (-1 for non-visual).

    Cached per layout (do not modify the returned array).
    """
    return _visual_tables_np(layout)[1]


def visual_indices(layout: TokenLayout) -> torch.Tensor:
    """The layout's visual indices, cached per layout (do not modify the returned tensor)."""
    return _visual_tables(layout)[0]


def visual_position(layout: TokenLayout) -> torch.Tensor:
    """(num_tokens,) map from sequence index to position in the dense visual vector (-1 for non-visual).

    Cached per layout (do not modify the returned tensor).
    """
    return _visual_tables(layout)[1]


@constant_tensors          # never evicted: selection graphs read it by address
def _visual_tables_on(layout: TokenLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    vis, spare = visual_order(layout)    # non-visual tokens go to num_visual: a spare slot that callers drop
    return vis.to(device), spare.to(device)


def positions_mask(positions: torch.Tensor, num_visual: int) -> torch.Tensor:
    """Dense-visual positions (no repeats) -> the (num_visual,) bool mask they set, on the positions' device."""
    mask = torch.zeros(num_visual, dtype=torch.bool, device=positions.device)
    return mask.index_fill_(0, positions.reshape(-1), True)


def positions_to_keep(positions: torch.Tensor, layout: TokenLayout) -> VisualMask:
    """Dense-visual positions (no repeats) -> the :class:`VisualMask` that keeps them (nothing read back)."""
    return VisualMask(positions_mask(positions, layout.num_visual), positions.numel())


def positions_to_sequence(positions: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Dense-visual positions (no repeats) -> sorted original sequence indices, on the positions' device.

    Equal to :func:`mask_to_sequence` of the mask the positions set, without reading anything back to the host.
    """
    vis = _visual_tables_on(layout, positions.device)[0]
    return vis.index_select(0, positions.sort().values)


def dense_visual_scores_on_device(key_indices: torch.Tensor, weights: torch.Tensor, layout: TokenLayout,
                                  fill: float = 0.0) -> torch.Tensor:
    """:func:`dense_visual_scores` on the weights' device (float32), without reading anything back to the host."""
    spare = _visual_tables_on(layout, weights.device)[1]
    keys = _flat(_long_on(key_indices, weights.device))
    w = _flat(weights)
    if keys.numel() != w.numel():
        raise ValueError(f'{keys.numel()} key indices but {w.numel()} weights')
    out = torch.full((layout.num_visual + 1,), float(fill), dtype=torch.float32, device=weights.device)
    # index_select, not advanced indexing: the same gather at half the per-call cost
    out.index_copy_(0, spare.index_select(0, keys), w if w.dtype == torch.float32 else w.to(torch.float32))
    return out[:layout.num_visual]


def _long_on(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``indices`` as int64 on ``device`` (itself when it already is: no operation)."""
    return indices if indices.dtype == torch.long and indices.device == device else \
        indices.to(device=device, dtype=torch.long)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 1 else x.flatten()


def stable_topk_on_device(scores: torch.Tensor, k: int, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`stable_topk` on the scores' device (ties -> lower position first, NaN last), always ``k`` long.

    With ``candidates`` the candidates come first in the host order and the others after them: equal to
    :func:`stable_topk` whenever at least ``k`` positions are candidates (the count is not read back to the host).
    """
    return stable_topk_rows_on_device(scores.reshape(1, -1), k,
                                      None if candidates is None else candidates.reshape(1, -1))[0]


def stable_topk_rows_on_device(scores: torch.Tensor, k: int, candidates: Optional[torch.Tensor] = None
                               ) -> torch.Tensor:
    """:func:`stable_topk_on_device` of every row of ``scores`` (rows, n) at once: (rows, k) positions."""
    # NaN ranks last (as -inf); a stable descending sort keeps ties in position order, as the ascending sort of the
    # negated scores does (-0.0 and 0.0 compare equal either way)
    s = torch.nan_to_num(scores.to(torch.float32), nan=float('-inf'), posinf=float('inf'), neginf=float('-inf'))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    if candidates is not None:
        outside = (~candidates.gather(-1, order)).to(torch.uint8)
        order = order.gather(-1, torch.sort(outside, dim=-1, stable=True).indices)
    return order[:, :max(0, min(int(k), order.shape[-1]))]


def dense_visual_scores(key_indices: torch.Tensor, weights: torch.Tensor, layout: TokenLayout,
                        fill: float = 0.0) -> torch.Tensor:
    """Scatter an attention summary over ``key_indices`` into a dense visual vector (float32)."""
    keys = _np(key_indices).astype(np.int64)
    w = _np(weights).astype(np.float32)
    if keys.size != w.size:
        raise ValueError(f'{keys.size} key indices but {w.size} weights')
    out = np.full(layout.num_visual, float(fill), dtype=np.float32)
    pos = _visual_tables_np(layout)[1][keys]
    ok = pos >= 0
    out[pos[ok]] = w[ok]
    return torch.from_numpy(out)


def present_mask(indices: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Dense visual bool vector: True for the visual tokens among ``indices``."""
    mask = np.zeros(layout.num_visual, dtype=bool)
    pos = _visual_tables_np(layout)[1][_np(indices).astype(np.int64)]
    mask[pos[pos >= 0]] = True
    return torch.from_numpy(mask)


def camera_slices(layout: TokenLayout) -> list[slice]:
    """Slices of the dense visual vector belonging to each camera."""
    p = layout.patches_per_camera
    return [slice(c * p, (c + 1) * p) for c in range(layout.num_cameras)]


def dense_to_sequence(positions: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Dense-visual positions -> sorted original sequence indices."""
    vis = _visual_tables_np(layout)[0]
    return torch.from_numpy(np.sort(vis[_np(positions).astype(np.int64)]))


def mask_to_sequence(mask: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Dense visual bool mask -> sorted original sequence indices."""
    return torch.from_numpy(_visual_tables_np(layout)[0][_np(mask).astype(bool)])


# ------------------------------------------------------------------------------------------------ top-k

def stable_topk(scores: torch.Tensor, k: int, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Positions of the ``k`` largest scores (descending; ties -> lower position first).

    ``candidates`` (bool, same shape) restricts the choice; fewer than ``k`` are returned if fewer qualify.
    NaN scores rank last. (NumPy inside: these vectors are small and torch's per-op overhead dominates.)
    """
    s = _np(scores).astype(np.float64, copy=True)
    s[np.isnan(s)] = -np.inf
    if candidates is not None:
        cand = _np(candidates).astype(bool)
        idx = np.flatnonzero(cand)
        order = idx[np.argsort(-s[idx], kind='stable')]
    else:
        order = np.argsort(-s, kind='stable')
    k = max(0, min(int(k), order.size))
    return torch.from_numpy(order[:k].astype(np.int64))


def to_numpy(x, flat: bool = True) -> np.ndarray:
    """A tensor or array-like as a NumPy array (flattened unless ``flat`` is False)."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return array.reshape(-1) if flat else array


_np = to_numpy


KPerCamera = Union[int, Sequence[int]]


def _per_camera(k: KPerCamera, num_cameras: int) -> list[int]:
    if isinstance(k, int):
        return [k] * num_cameras
    ks = [int(v) for v in k]
    if len(ks) != num_cameras:
        raise ValueError(f'{len(ks)} per-camera counts for {num_cameras} cameras')
    return ks


def topk_per_camera(dense: torch.Tensor, k: KPerCamera, layout: TokenLayout,
                    candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense visual bool mask selecting the top ``k`` (an int, or one per camera) of each camera."""
    d = _np(dense)
    c = None if candidates is None else _np(candidates).astype(bool)
    mask = np.zeros(layout.num_visual, dtype=bool)
    for sl, kc in zip(camera_slices(layout), _per_camera(k, layout.num_cameras)):
        idx = stable_topk(d[sl], kc, None if c is None else c[sl]).numpy()
        mask[sl.start + idx] = True
    return torch.from_numpy(mask)


def topk_global(dense: torch.Tensor, k: int, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense visual bool mask selecting the top ``k`` over all cameras."""
    mask = np.zeros(_np(dense).size, dtype=bool)
    mask[stable_topk(dense, k, candidates).numpy()] = True
    return torch.from_numpy(mask)


# ---------------------------------------------------------------------- SpecPrune layer-level importance

def rank_weights(scores: torch.Tensor, k: float = 5.0, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The SpecPrune rank weight ``w_rank,i = sigmoid(-k * r_i) / sum_j sigmoid(-k * r_j)``.

    ``r_i`` is token i's rank by descending score *as a fraction* ``rank / (n - 1)`` in ``[0, 1]`` (the paper's
    integer rank would make every weight past the first few vanish; the fraction keeps ``k`` meaningful for any
    token count). Ties get consecutive ranks (stable, lower index first). Invalid tokens (``valid`` False)
    get weight 0; the valid weights sum to 1 (all zeros if nothing is valid).
    """
    s = _np(scores)
    out = np.zeros(s.size, dtype=np.float64)
    order = stable_topk(s, s.size, valid).numpy()          # valid positions, best first
    n = order.size
    if n:
        frac = np.arange(n, dtype=np.float64) / max(n - 1, 1)
        w = 1.0 / (1.0 + np.exp(float(k) * frac))           # sigmoid(-k * frac)
        out[order] = w / w.sum()
    return torch.from_numpy(out.astype(np.float32))


def layer_confidence(attention: torch.Tensor, eps: float = 1e-12, cap: float = 100.0) -> float:
    """The SpecPrune layer confidence ``w_conf = mean / std`` of a layer's attention over the scored tokens.

    Clipped to ``[0, cap]`` so that a degenerate (constant) attention row cannot swamp the EMA.
    """
    a = _np(attention).astype(np.float64)
    n = a.size
    if n < 2:
        return 1.0
    mean = float(a.sum()) / n
    dev = a - mean
    std = math.sqrt(float(dev @ dev) / n)                 # population std (np.mean/np.std are slow on tiny arrays)
    return float(min(max(mean / (std + eps), 0.0), cap))


def ema_update(state: torch.Tensor, sample: torch.Tensor, beta: float = 0.2,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``S = (1 - beta) * S + beta * s`` (only where ``mask``); returns a new tensor."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f'beta must be in [0, 1], got {beta}')
    new = (1.0 - beta) * state + beta * sample
    if mask is None:
        return new
    return torch.where(mask, new, state)


def layer_importance(scores: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray, layout: TokenLayout,
                     k: float = 5.0, per_camera: bool = True) -> torch.Tensor:
    """One layer's importance sample ``s_i = w_rank,i * w_conf`` (dense visual vector; 0 where not valid).

    Equal to :func:`rank_weights` times :func:`layer_confidence` per camera (or over all cameras), computed for
    every camera at once: this runs after every decoder layer, where per-camera calls cost more than the layer.
    ``scores`` / ``valid`` may also be stacked, (layers, num_visual): every layer's sample in one call.
    """
    s = _np(scores, flat=False).astype(np.float64)
    v = _np(valid, flat=False).astype(bool)
    shape = s.shape
    groups = layout.num_cameras if per_camera else 1
    s, v = s.reshape(-1, s.shape[-1] // groups), v.reshape(-1, v.shape[-1] // groups)
    # sort key: valid scores descending (NaN ranks last among the valid), invalid tokens after every valid one
    key = np.where(v, np.where(np.isnan(s), np.inf, -s), np.nan)
    order = np.argsort(key, axis=1, kind='stable')
    n = v.sum(axis=1)
    position = np.arange(s.shape[1])[None, :]
    frac = position / np.maximum(n - 1, 1)[:, None]
    w = np.where(position < n[:, None], 1.0 / (1.0 + np.exp(float(k) * frac)), 0.0)
    w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
    # confidence mean / std over the valid scores of each group (population std), clipped as layer_confidence
    values = np.where(v, s, 0.0)
    mean = values.sum(axis=1) / np.maximum(n, 1)
    std = np.sqrt((np.where(v, s - mean[:, None], 0.0) ** 2).sum(axis=1) / np.maximum(n, 1))
    conf = np.where(n >= 2, np.clip(mean / (std + 1e-12), 0.0, 100.0), 1.0)
    out = np.zeros_like(s)
    np.put_along_axis(out, order, w * conf[:, None], axis=1)
    return torch.from_numpy(out.reshape(shape).astype(np.float32))


# ------------------------------------------------------------------------- VLA-Pruner temporal action score

def decay_weights(n: int, gamma: float = 0.8, device: Optional[torch.device] = None) -> torch.Tensor:
    """Weights ``gamma^i`` for ``i = n..1``, i.e. aligned with a history stored oldest first (newest last)."""
    exponents = torch.arange(n, 0, -1, dtype=torch.float64, device=device)
    return torch.pow(float(gamma), exponents).to(torch.float32)


@constant_tensors          # never evicted: selection graphs read it by address
def decay_weights_cached(n: int, gamma: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """:func:`decay_weights`, built once per (n, gamma, device) (do not modify the result)."""
    return decay_weights(n, gamma, device)


def decayed_action_score(history: Sequence[torch.Tensor], gamma: float = 0.8,
                         window: Optional[int] = None) -> Optional[torch.Tensor]:
    """VLA-Pruner ``S_hat = sum_{i=1..w} gamma^i * S_act(t-i)``, normalised to sum 1.

    ``history`` holds earlier steps' action scores, oldest first (``history[-1]`` is ``S_act(t-1)``, weighted
    ``gamma``: the newest step counts most, as in the paper; the public code reverses the weights). Only the
    last ``window`` entries are used. Returns None for an empty history, zeros if every score is zero.
    """
    hist = list(history)
    if window is not None:
        hist = hist[-window:] if window > 0 else []
    if not hist:
        return None
    stacked = torch.stack([torch.as_tensor(h, dtype=torch.float32).flatten().clamp_min(0.0) for h in hist])
    total = (decay_weights(len(hist), gamma, stacked.device)[:, None] * stacked).sum(0)
    return _divide_by_positive_sum(total)


def _divide_by_positive_sum(values: torch.Tensor) -> torch.Tensor:
    """``values / values.sum()`` where the sum is positive, else ``values``: decided on the device."""
    total = values.sum()
    return torch.where(total > 0, values / total, values)


def divide_rows_by_positive_sum(values: torch.Tensor) -> torch.Tensor:
    """Every row of ``values`` (rows, n) divided by its sum where that is positive, else left as it is.

    Each row equals ``_divide_by_positive_sum`` of that row alone.
    """
    total = values.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, values / total, values)


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Non-negative scores divided by their sum (zeros stay zeros)."""
    return _divide_by_positive_sum(torch.as_tensor(scores, dtype=torch.float32).clamp_min(0.0))


# ------------------------------------------------------------------ device-side selection over the visual order
#
# Dense visual vectors stay on the device; per-camera work runs batched over a (cameras, patches) view, with as few
# operations as possible (each costs a few microseconds on the CPU and a kernel launch on a GPU). Only
# ``host_counts`` reads anything back: a keep set whose size depends on the scores needs its size on the host to
# shape the next layer's tensors.

@constant_tensors(maxsize=32)
def _aranges_on(length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(length, device=device)


def present_mask_on_device(indices: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """:func:`present_mask` on the indices' device: True for the visual tokens among ``indices``."""
    spare = _visual_tables_on(layout, indices.device)[1]
    mask = torch.zeros(layout.num_visual + 1, dtype=torch.bool, device=indices.device)
    mask.index_fill_(0, spare.index_select(0, indices.reshape(-1)), True)
    return mask[:layout.num_visual]


def dense_visual_rows_on_device(key_indices: torch.Tensor, weights: torch.Tensor,
                                layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked attention summaries (rows, n_k) over the same keys as dense visual rows, one scatter for all rows.

    Returns (rows, num_visual) float32 scores (0 where a visual token is not a key) and the (num_visual,) mask of the
    visual keys.
    """
    spare = _visual_tables_on(layout, weights.device)[1]
    position = spare.index_select(0, _long_on(key_indices, weights.device))
    out = torch.zeros(weights.shape[0], layout.num_visual + 1, dtype=torch.float32, device=weights.device)
    out.index_copy_(1, position, weights if weights.dtype == torch.float32 else weights.to(torch.float32))
    valid = torch.zeros(layout.num_visual + 1, dtype=torch.bool, device=weights.device).index_fill_(0, position, True)
    return out[:, :layout.num_visual], valid[:layout.num_visual]


def camera_ranks(scores: torch.Tensor, candidates: torch.Tensor, num_cameras: int) -> torch.Tensor:
    """Rank of every position within its camera.

    Candidates by descending score first (ties -> lower position), then the rest. ``scores`` (finite where
    ``candidates``) / ``candidates``: (..., num_visual); returns (..., C, P).

    ``rank < k`` and ``candidates`` select what :func:`stable_topk` of the camera selects, for any ``k``.
    """
    key = torch.where(candidates, scores, _negative_infinity_on(scores.device))
    key = key.view(*key.shape[:-1], num_cameras, -1)
    # a stable sort keeps equal keys in position order, descending too
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    positions = _aranges_on(order.shape[-1], order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


_LIMITS: dict[tuple, torch.Tensor] = {}


def camera_limits(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """(C, 1) long tensor of per-camera counts on ``device``, cached (built without a host-to-device copy)."""
    key = (tuple(int(c) for c in counts), device)
    cached = _LIMITS.get(key)
    if cached is None:
        if len(_LIMITS) > 256:
            _LIMITS.clear()
        cached = torch.cat([torch.full((1, 1), c, dtype=torch.long, device=device) for c in key[0]])
        _LIMITS[key] = cached
    return cached


def topk_masks_per_camera(ranks: torch.Tensor, counts: Sequence[int], candidates: torch.Tensor) -> torch.Tensor:
    """Dense visual mask of the top ``counts[c]`` candidates of every camera, from :func:`camera_ranks`."""
    return (ranks < camera_limits(counts, ranks.device)).reshape(candidates.shape) & candidates


@constant_tensors          # never evicted: selection graphs read it by address
def _leading_table(patches: int, device: torch.device) -> torch.Tensor:
    """(patches + 1, patches) bool: row c is True at the first c positions (do not modify the result)."""
    places = _aranges_on(patches, device)
    return places.view(1, -1) < _aranges_on(patches + 1, device).view(-1, 1)


def _table_rows(table: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Rows ``counts`` of a per-count ``table``, stacked.

    One operation and no host-to-device copy (which would wait for the device), whatever the counts: they change
    from step to step, so a cache per counts would mostly miss.
    """
    return torch.stack([table[int(c)] for c in counts])


def _rows_of(table: torch.Tensor, counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Rows ``counts`` of a per-count ``table``: host integers by :func:`_table_rows`, a device tensor by a gather."""
    return table.index_select(0, counts) if isinstance(counts, torch.Tensor) else _table_rows(table, counts)


def top_counts_per_camera(scores: torch.Tensor, candidates: torch.Tensor, counts: Sequence[int],
                          num_cameras: int) -> torch.Tensor:
    """``topk_masks_per_camera(camera_ranks(scores, candidates, C), counts, candidates)`` in fewer operations.

    The first ``counts[c]`` places of camera c's sorted order are set by one scatter, without the ranks.
    """
    key = torch.where(candidates, scores, _negative_infinity_on(scores.device)).view(num_cameras, -1)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    flags = _table_rows(_leading_table(order.shape[-1], order.device), counts)
    return torch.empty_like(flags).scatter_(-1, order, flags).reshape(candidates.shape) & candidates


def topk_per_camera_on_device(dense: torch.Tensor, k: KPerCamera, layout: TokenLayout,
                              candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`topk_per_camera` on the scores' device: equal masks for finite candidate scores, nothing read back."""
    cand = torch.isfinite(dense) if candidates is None else candidates
    return top_counts_per_camera(dense, cand, _per_camera(k, layout.num_cameras), layout.num_cameras)


def host_counts(mask: torch.Tensor, num_cameras: int) -> list[int]:
    """Per-camera True counts of a dense visual mask, read back to the host (a synchronisation on CUDA).

    The one host read of a device-side selection whose kept count depends on the scores.
    """
    return mask.reshape(num_cameras, -1).sum(dim=1).tolist()


def mask_to_sequence_on_device(mask: torch.Tensor, count: int, layout: TokenLayout) -> torch.Tensor:
    """Dense visual mask with ``count`` True entries -> their sequence indices (dense order), on the device."""
    vis = _visual_tables_on(layout, mask.device)[0]
    # a nonzero of the given size: nothing read back (the count is known), and cheaper than sorting the mask
    return vis.index_select(0, torch.nonzero_static(mask, size=count).view(-1))


@functools.lru_cache(maxsize=16)
def _rank_weight_table(patches: int, k: float) -> np.ndarray:
    """``table[n, r]``: the normalised rank weight of rank ``r`` among ``n`` valid tokens (0 for ``r >= n``).

    Computed as :func:`layer_importance` computes it (float64).
    """
    n = np.arange(patches + 1)[:, None]
    position = np.arange(patches)[None, :]
    frac = position / np.maximum(n - 1, 1)
    with np.errstate(over='ignore'):             # past the valid count (weight 0) exp may overflow
        w = np.where(position < n, 1.0 / (1.0 + np.exp(float(k) * frac)), 0.0)
    w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
    return w


@constant_tensors(maxsize=16)
def _rank_weight_table_on(patches: int, k: float, device: torch.device) -> torch.Tensor:
    """:func:`_rank_weight_table` (patches + 1, patches) on ``device``."""
    return torch.from_numpy(_rank_weight_table(patches, k)).to(device)


@constant_tensors          # never evicted: selection graphs read it by address
def _negative_infinity_on(device: torch.device) -> torch.Tensor:
    """A 0-d -inf on ``device`` (a fill value that costs no conversion per call; do not modify it)."""
    return torch.full((), float('-inf'), device=device)


@constant_tensors          # never evicted: selection graphs read it by address
def _rank_count_table_on(patches: int, k: float, device: torch.device) -> torch.Tensor:
    """(patches + 1, patches + 1) float64: row c is :func:`_rank_weight_table`'s row c, then c itself.

    One row per camera gives both the rank weights and the valid count (do not modify the result).
    """
    counts = np.arange(patches + 1, dtype=np.float64)[:, None]
    return torch.from_numpy(np.concatenate([_rank_weight_table(patches, k), counts], axis=1)).to(device)


def layer_importance_known_on_device(scores: torch.Tensor, valid: torch.Tensor, counts: Sequence[int] | torch.Tensor,
                                     k: float = 5.0) -> torch.Tensor:
    """:func:`layer_importance_on_device` of one layer per camera, with every camera's valid count known on the host.

    ``scores`` / ``valid``: (num_visual,), ``scores`` 0 where not valid; ``counts``: the valid tokens of every
    camera, each at least 2 (host integers, or a long tensor on the device). The same numbers in about half the
    operations (one table row per camera for the rank weights and the count, in place where the operand is
    fresh): this runs at every layer drop.
    """
    groups = len(counts)
    s = scores.view(groups, -1)
    v = valid.view(groups, -1)
    patches = s.shape[1]
    rows = _rows_of(_rank_count_table_on(patches, float(k), scores.device), counts)
    by_rank, count = rows[:, :patches], rows[:, patches:]
    order = torch.sort(torch.where(v, s, _negative_infinity_on(scores.device)), dim=-1, descending=True,
                       stable=True).indices
    w = torch.empty_like(by_rank).scatter_(-1, order, by_rank)
    s = s.to(torch.float64)
    mean = s.sum(dim=-1, keepdim=True).div_(count)
    std = (s - mean).mul_(v).square_().sum(dim=-1, keepdim=True).div_(count).sqrt_()
    conf = mean.div_(std.add_(1e-12)).clamp_(0.0, 100.0)
    return w.mul_(conf).to(torch.float32).view(-1)


def layer_drop_on_device(scores: torch.Tensor, present: torch.Tensor, importance: torch.Tensor,
                         sizes: torch.Tensor, k: float = 5.0, beta: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer drop of SpecPrune from one layer's attention: the importance EMA updated, each camera's top kept.

    ``scores``: (num_visual,) the layer's task attention, 0 where not ``present`` (the visual tokens that ran
    through it); ``importance``: the EMA so far (float64; its values outside ``present`` are never read);
    ``sizes``: (2, cameras) long, on the scores' device: row 0 every camera's present count (each at least 2), row
    1 how many it keeps (at most that). Returns the new EMA (``(1 - beta) * S + beta * s`` on ``present``) and the
    dense mask of exactly ``sizes[1, c]`` present tokens of every camera c, by EMA (ties -> lower position): equal
    to :func:`layer_importance_known_on_device`, the masked EMA update and :func:`top_counts_per_camera`, in fewer
    operations. Every shape is fixed by the layout: a CUDA graph can replay it.
    """
    counts, kept = sizes[0], sizes[1]
    sample = layer_importance_known_on_device(scores, present, counts, k=k)
    importance = importance.mul(1.0 - beta).add_(sample.to(torch.float64).mul_(beta))
    key = torch.where(present, importance, _negative_infinity_on(scores.device)).view(len(counts), -1)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    # the first kept[c] places of camera c's order are present tokens: kept[c] <= counts[c]
    flags = _rows_of(_leading_table(order.shape[-1], order.device), kept)
    return importance, torch.empty_like(flags).scatter_(-1, order, flags).view(-1)


def layer_importance_on_device(scores: torch.Tensor, valid: torch.Tensor, layout: TokenLayout, k: float = 5.0,
                               per_camera: bool = True, counts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """:func:`layer_importance` of stacked layers (layers, num_visual) on the device, float32 as it.

    ``scores`` must be 0 where not ``valid``. Rank weights come from a table per (patch count, k), placed at each
    token's rank by one scatter; the confidence is computed in float64 as the host version computes it.
    ``counts``: the valid tokens of every group (camera, or all), known on the host, for a single layer: saves
    counting them on the device (the same numbers).
    """
    groups = layout.num_cameras if per_camera else 1
    rows = scores.shape[0]
    patches = scores.shape[-1] // groups
    v = valid.reshape(rows, groups, patches)
    # candidates by descending score (ties -> lower position), then the rest: as camera_ranks orders them
    key = torch.where(valid, scores, _negative_infinity_on(scores.device)).reshape(rows, groups, patches)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    known = counts is not None and rows == 1 and len(counts) == groups and min(counts) >= 2
    if known:
        table = _table_rows(_rank_count_table_on(patches, float(k), scores.device), counts)
        by_rank, count = table[:, :patches], table[:, patches:]
    else:
        n = v.sum(dim=-1, keepdim=True)
        by_rank = _rank_weight_table_on(patches, float(k), scores.device).index_select(0, n.flatten())
        by_rank, count = by_rank.view(rows, groups, patches), n.clamp(min=1)
    w = torch.empty_like(order, dtype=by_rank.dtype).scatter_(-1, order, by_rank.expand_as(order))
    s = scores.reshape(rows, groups, patches).to(torch.float64)
    mean = s.sum(dim=-1, keepdim=True) / count
    std = ((s - mean) * v).square_().sum(dim=-1, keepdim=True).div_(count).sqrt_()
    conf = (mean / (std + 1e-12)).clamp_(0.0, 100.0)
    if not known:                       # fewer than 2 valid tokens: confidence 1
        conf = torch.where(n >= 2, conf, 1.0)
    return (w * conf).to(torch.float32).reshape(scores.shape)
