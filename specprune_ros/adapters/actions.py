"""Action de-tokenisation (OpenVLA), un-normalisation and proprio normalisation (OpenVLA / OpenVLA-OFT).

OpenVLA's action tokens are the last ``n_action_bins`` ids of the Llama vocabulary: ``token = V - bin`` with
``bin = digitize(a, linspace(-1, 1, n_bins))`` in 1..n_bins and ``V`` the tokenizer's vocabulary size (the model's
embedding rows minus the ``pad_to_multiple_of`` padding). Decoding takes ``V - token - 1``, clipped to the
``n_bins - 1`` bin centres.

Un-normalisation (per dataset, from ``norm_stats[key]['action']``), where ``mask`` is False for dimensions that were
not normalised (the gripper)::

    bounds_q99:  a = 0.5 * (x + 1) * (q99 - q01 + eps) + q01
    bounds:      a = 0.5 * (x + 1) * (max - min + eps) + min

(OpenVLA: eps = 0; OpenVLA-OFT adds 1e-8.) OFT normalises the proprio vector the other way, clipped to [-1, 1].
"""
from __future__ import annotations

from numbers import Real
from typing import Any, Literal, Mapping, Optional

import numpy as np

from specprune_ros.policy.errors import CheckpointError

Normalization = Literal['bounds_q99', 'bounds']
BOUNDS = {'bounds_q99': ('q01', 'q99'), 'bounds': ('min', 'max')}


class NormStatsError(KeyError):
    """Missing or ambiguous dataset statistics (the message lists the available keys)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ''


def bin_centers(n_bins: int) -> np.ndarray:
    """The ``n_bins - 1`` centres of ``n_bins`` uniform bin edges over [-1, 1]."""
    edges = np.linspace(-1.0, 1.0, n_bins)
    return (edges[:-1] + edges[1:]) / 2.0


def tokens_to_normalized(token_ids: np.ndarray, vocab_size: int, n_bins: int) -> np.ndarray:
    """The OpenVLA action token ids -> normalised actions in [-1, 1] (ids outside the action range are clipped)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    centers = bin_centers(n_bins)
    index = np.clip(vocab_size - ids - 1, 0, len(centers) - 1)
    return centers[index]


def _bound_keys(kind: Normalization) -> tuple[str, str]:
    if kind not in BOUNDS:
        raise ValueError(f"unknown normalisation {kind!r}; use 'bounds_q99' or 'bounds'")
    return BOUNDS[kind]


def _numbers(values: Any, where: str, key: str) -> np.ndarray:
    """A JSON list of finite numbers as a float64 vector."""
    numeric = isinstance(values, (list, tuple)) and all(isinstance(v, Real) and not isinstance(v, bool)
                                                        for v in values)
    if not numeric:
        raise CheckpointError(f'{where}: {key!r} must be a list of numbers, got {str(values)[:80]}')
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise CheckpointError(f'{where}: {key!r} has non-finite values {array.tolist()}')
    return array


def check_bounds(stats: Any, kind: Normalization, where: str, dim: Optional[int] = None) -> int:
    """Check the statistics ``kind`` normalises with (and ``mask``); returns their dimension.

    ``where`` names the file and entry in the error (:class:`CheckpointError`); ``dim`` is the dimension the model
    expects (None: the statistics define it). The low and high bounds must be finite vectors of one length with
    high >= low; a ``mask``, when present, a list of booleans of that length.
    """
    low_key, high_key = _bound_keys(kind)
    if not isinstance(stats, Mapping):
        raise CheckpointError(f'{where}: not an object of statistics')
    for key in (low_key, high_key):
        if key not in stats:
            raise CheckpointError(f'{where}: no {key!r} (normalisation {kind!r} needs {low_key!r} and {high_key!r}; '
                                  f'have {sorted(stats)})')
    low, high = _numbers(stats[low_key], where, low_key), _numbers(stats[high_key], where, high_key)
    expected = len(low) if dim is None else dim
    for key, values in ((low_key, low), (high_key, high)):
        if len(values) != expected or expected == 0:
            raise CheckpointError(f'{where}: {key!r} has {len(values)} values, expected {expected}')
    below = np.flatnonzero(high < low)
    if below.size:
        raise CheckpointError(f'{where}: {high_key!r} < {low_key!r} in dimension(s) {below.tolist()} '
                              '(swapped bounds would mirror the output)')
    if 'mask' in stats:
        mask = stats['mask']
        if not isinstance(mask, (list, tuple)) or not all(isinstance(v, bool) for v in mask):
            raise CheckpointError(f"{where}: 'mask' must be a list of true/false, got {str(mask)[:80]}")
        if len(mask) != expected:
            raise CheckpointError(f"{where}: 'mask' has {len(mask)} values, expected {expected}")
    return expected


def _bounds(stats: Mapping[str, Any], kind: Normalization) -> tuple[np.ndarray, np.ndarray]:
    low_key, high_key = _bound_keys(kind)
    if low_key not in stats or high_key not in stats:
        raise NormStatsError(f'statistics lack {low_key!r}/{high_key!r} (have {sorted(stats)})')
    return np.asarray(stats[low_key], dtype=np.float64), np.asarray(stats[high_key], dtype=np.float64)


def unnormalize(actions: np.ndarray, stats: Mapping[str, Any], kind: Normalization = 'bounds_q99',
                eps: float = 0.0) -> np.ndarray:
    """Normalised actions (..., D) -> dataset units with ``stats`` = ``norm_stats[key]['action']``."""
    low, high = _bounds(stats, kind)
    actions = np.asarray(actions, dtype=np.float64)
    if actions.shape[-1] != len(low):
        raise ValueError(f'actions have {actions.shape[-1]} dimensions, the statistics {len(low)}')
    mask = np.asarray(stats.get('mask', np.ones_like(low, dtype=bool)), dtype=bool)
    return np.where(mask, 0.5 * (actions + 1.0) * (high - low + eps) + low, actions)


def normalize_proprio(proprio: np.ndarray, stats: Mapping[str, Any], kind: Normalization = 'bounds_q99',
                      eps: float = 1e-8) -> np.ndarray:
    """OpenVLA-OFT's proprio normalisation: dataset units -> [-1, 1] (clipped), ``stats`` = ``[key]['proprio']``."""
    low, high = _bounds(stats, kind)
    proprio = np.asarray(proprio, dtype=np.float64)
    if proprio.shape[-1] != len(low):
        raise ValueError(f'proprio has {proprio.shape[-1]} values, the statistics {len(low)}')
    mask = np.asarray(stats.get('mask', np.ones_like(low, dtype=bool)), dtype=bool)
    return np.clip(np.where(mask, 2.0 * (proprio - low) / (high - low + eps) - 1.0, proprio), -1.0, 1.0)


def resolve_unnorm_key(norm_stats: Mapping[str, Any], key: Optional[str]) -> str:
    """The dataset key to un-normalise with.

    ``key`` (or ``key + '_no_noops'``, as the OFT LIBERO evaluation), or the only key when there is one.
    """
    if not norm_stats:
        raise NormStatsError('the checkpoint has no dataset statistics (norm_stats / dataset_statistics.json)')
    if not key:
        if len(norm_stats) == 1:
            return next(iter(norm_stats))
        raise NormStatsError(f'the checkpoint holds statistics of {len(norm_stats)} datasets; choose unnorm_key '
                             f'from {sorted(norm_stats)}')
    for candidate in (key, f'{key}_no_noops'):
        if candidate in norm_stats:
            return candidate
    raise NormStatsError(f'unnorm_key {key!r} not in the dataset statistics; available: {sorted(norm_stats)}')


def libero_gripper(actions: np.ndarray) -> np.ndarray:
    """The OpenVLA / OFT LIBERO evaluation convention: gripper [0, 1] (1 = open) -> binarised -1 = open, +1 = close."""
    out = np.array(actions, dtype=np.float64, copy=True)
    g = 2.0 * out[..., -1] - 1.0
    out[..., -1] = -np.sign(g)
    return out
