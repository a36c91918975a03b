"""Greedy max-min diversity selection (DivPrune; VLA-Pruner's min-redundancy filter).

Rule: start with the token whose nearest neighbour is farthest away, then repeatedly add the token whose
minimum distance to the chosen set is largest, until ``m`` are chosen. Distance = cosine distance
``1 - cos(x_i, x_j)``. Ties go to the lowest index, so the result is deterministic. Vectorised: one
(n, n) distance matrix, then ``m`` O(n) updates of the running minimum, on an accelerator as device operations
(nothing read back; on CUDA with :mod:`~specprune_ros.pruning.selection_graphs` on, the ``m`` steps replay as
one CUDA graph per step count and size), on the CPU in NumPy (the same picks; NumPy's calls cost less than
torch's at these sizes); several independent groups (e.g. one per camera) run in the same ``m`` steps.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from specprune_ros.core.constant_tensors import constant_tensors
from specprune_ros.pruning.selection_graphs import SelectionGraphs


def cosine_distance_matrix(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(n, n) cosine distances in [0, 2] (float32). Zero vectors are at distance 1 from everything else.

    ``features`` (G, n, d) gives the (G, n, n) matrices of G groups, each equal to the matrix of that group alone.
    """
    x = torch.as_tensor(features).detach().to(torch.float32)
    if x.dim() not in (2, 3):
        raise ValueError(f'features must be (n, d) or (groups, n, d), got {tuple(x.shape)}')
    norm = x.norm(dim=-1, keepdim=True)
    xn = x / norm.clamp_min(eps)
    # one product per group: a batched product may round differently from the product of a group alone
    gram = xn @ xn.T if x.dim() == 2 else torch.stack([group @ group.T for group in xn])
    dist = (1.0 - gram).clamp_(0.0, 2.0)
    dist.diagonal(dim1=-2, dim2=-1).fill_(0.0)
    return dist


def greedy_max_min(features: Optional[torch.Tensor], m: int, distances: Optional[torch.Tensor] = None,
                   candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (in selection order) of ``m`` rows chosen by greedy max-min diversity.

    Pass either ``features`` (n, d) or a precomputed symmetric ``distances`` (n, n) matrix. ``candidates`` (n,
    bool) restricts the choice to those rows, as if only they were given, without reading the mask back to the
    host: it must hold at least ``m`` rows (the count is not checked).
    """
    if distances is None:
        dist = cosine_distance_matrix(features)
    else:
        dist = torch.as_tensor(distances, dtype=torch.float32).detach().clone()
    n = dist.shape[0]
    m = max(0, min(int(m), n))
    if m == 0:
        return torch.empty(0, dtype=torch.long, device=dist.device)
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=dist.device)
    return _greedy(dist.unsqueeze(0), m, None if candidates is None else candidates.reshape(1, n))[0]


def greedy_max_min_groups(features: torch.Tensor, m: int, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`greedy_max_min` of every group of ``features`` (G, n, d) at once: (G, m) indices within each group.

    Row g equals ``greedy_max_min(features[g], m, candidates=candidates[g])``; ``candidates``: (G, n) bool or None
    (each row must hold at least ``m`` candidates, not checked).
    """
    groups, n = features.shape[0], features.shape[1]
    device = features.device
    m = max(0, min(int(m), n))
    if m == 0 or n == 1:
        return torch.zeros(groups, m, dtype=torch.long, device=device)
    return _greedy(cosine_distance_matrix(features), m, candidates)


# the greedy steps of tensors on the CPU run in NumPy (an accelerator's run as device operations)
CPU_STEPS_IN_NUMPY = True


@constant_tensors          # never evicted: selection graphs read it by address
def _row_offsets(groups: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, groups * n, n, device=device)


def _greedy(d: torch.Tensor, m: int, candidates: Optional[torch.Tensor]) -> torch.Tensor:
    """The greedy rule on (G, n, n) distance matrices (overwritten), 1 <= m <= n, n >= 2: (G, m) picks."""
    groups, n = d.shape[0], d.shape[-1]
    # m sequential steps: on the CPU in NumPy, elsewhere as device operations that read nothing back to the host
    # (argmax returns the first maximum in both: the lowest index on ties). In ``d`` the diagonal (and the columns
    # of non-candidates) hold -inf, so taking the minimum with a chosen token's row sets its own entry to -inf:
    # chosen tokens are never picked again.
    nearest = d.clone()
    nearest.diagonal(dim1=-2, dim2=-1).fill_(float('inf'))
    d.diagonal(dim1=-2, dim2=-1).fill_(float('-inf'))
    if candidates is not None:
        outside = ~candidates.to(device=d.device, dtype=torch.bool).reshape(groups, 1, n)
        nearest.masked_fill_(outside, float('inf'))
        d.masked_fill_(outside, float('-inf'))
    nearest = nearest.min(dim=-1).values                     # (G, n)
    if candidates is not None:
        nearest.masked_fill_(outside.view(groups, n), float('-inf'))
    rows = d.view(groups * n, n)
    if CPU_STEPS_IN_NUMPY and d.device.type == 'cpu':
        return _greedy_on_host(rows.numpy(), nearest.numpy(), m, groups, n)
    return _greedy_on_device(rows, nearest, m, groups, n)


# on CUDA the m steps replay as one graph per (m, groups, n) when selection graphs are on: three launches a step
# become one launch in all
_STEP_GRAPHS = SelectionGraphs(max_entries=16)


def _greedy_on_device(rows: torch.Tensor, nearest: torch.Tensor, m: int, groups: int, n: int) -> torch.Tensor:
    """The steps of :func:`_greedy` as device operations, nothing read back to the host: (G, m) picks.

    ``rows``: the (G * n, n) prepared distances; ``nearest``: (G, n) every token's prepared nearest distance.
    """
    return _STEP_GRAPHS.run(('greedy steps', m, groups, n),
                            lambda r, near: _greedy_steps(r, near, m, groups, n), rows, nearest)


def _greedy_steps(rows: torch.Tensor, nearest: torch.Tensor, m: int, groups: int, n: int) -> torch.Tensor:
    """The ``m`` steps of :func:`_greedy_on_device` (``rows`` is read, not written)."""
    device = rows.device
    offsets = None if groups == 1 else _row_offsets(groups, n, device)
    # every step writes into buffers made once (the picks, the gathered rows, their row numbers): at a few hundred
    # numbers per operation, allocating the outputs is a good part of each step's cost
    picks = torch.empty(m, groups, dtype=torch.long, device=device)
    slots = picks.unbind(0)                                   # one view per step, made in one operation
    torch.argmax(nearest, dim=1, out=slots[0])                # the token whose nearest neighbour is farthest
    gathered = torch.empty(groups, n, dtype=rows.dtype, device=device)
    where = None if offsets is None else torch.empty(groups, dtype=torch.long, device=device)
    min_dist = rows.index_select(0, slots[0] if offsets is None else torch.add(slots[0], offsets, out=where))
    for pick in slots[1:]:
        torch.argmax(min_dist, dim=1, out=pick)
        torch.index_select(rows, 0, pick if offsets is None else torch.add(pick, offsets, out=where), out=gathered)
        torch.minimum(min_dist, gathered, out=min_dist)
    return picks.T


def _greedy_on_host(rows: np.ndarray, nearest: np.ndarray, m: int, groups: int, n: int) -> torch.Tensor:
    """The loop of :func:`_greedy` in NumPy, for tensors on the CPU: the same picks (comparisons only, no rounding).

    Each of the ``m`` steps is three small operations, each cheaper as a NumPy call than as a torch one; one group
    (DivPrune over all cameras) reads its picked row as a view instead of gathering it.
    """
    if groups == 1:
        picks = np.empty(m, dtype=np.int64)
        pick = int(nearest[0].argmax())
        picks[0] = pick
        min_dist = rows[pick].copy()
        for step in range(1, m):
            pick = int(min_dist.argmax())
            picks[step] = pick
            np.minimum(min_dist, rows[pick], out=min_dist)
        return torch.from_numpy(picks.reshape(1, m))
    offsets = np.arange(0, groups * n, n)
    picks = np.empty((m, groups), dtype=np.int64)
    picks[0] = nearest.argmax(axis=1)
    min_dist = rows[picks[0] + offsets]
    for step in range(1, m):
        pick = min_dist.argmax(axis=1)
        picks[step] = pick
        np.minimum(min_dist, rows[pick + offsets], out=min_dist)
    return torch.from_numpy(np.ascontiguousarray(picks.T))
