"""Greedy max-min diversity selection (DivPrune; VLA-Pruner's min-redundancy filter).

Rule: start with the token whose nearest neighbour is farthest away, then repeatedly add the token whose
minimum distance to the chosen set is largest, until ``m`` are chosen. Distance = cosine distance
``1 - cos(x_i, x_j)``. Ties go to the lowest index, so the result is deterministic. Vectorised: one
(n, n) distance matrix, then ``m`` O(n) updates of the running minimum.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def cosine_distance_matrix(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(n, n) cosine distances in [0, 2] (float32). Zero vectors are at distance 1 from everything else."""
    x = torch.as_tensor(features).detach().to(torch.float32)
    if x.dim() != 2:
        raise ValueError(f'features must be (n, d), got {tuple(x.shape)}')
    norm = x.norm(dim=1, keepdim=True)
    xn = x / norm.clamp_min(eps)
    dist = (1.0 - xn @ xn.T).clamp_(0.0, 2.0)
    dist.fill_diagonal_(0.0)
    return dist


def greedy_max_min(features: Optional[torch.Tensor], m: int,
                   distances: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (in selection order) of ``m`` rows chosen by greedy max-min diversity.

    Pass either ``features`` (n, d) or a precomputed symmetric ``distances`` (n, n) matrix.
    """
    dist = cosine_distance_matrix(features) if distances is None else torch.as_tensor(distances, dtype=torch.float32)
    n = dist.shape[0]
    m = max(0, min(int(m), n))
    if m == 0:
        return torch.empty(0, dtype=torch.long)
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    # The m sequential steps run in NumPy on float64 (per-call overhead there is far lower than for small torch
    # ops). Chosen tokens get -inf in the running minimum so they are never picked again.
    d = dist.detach().cpu().numpy().astype(np.float64, copy=True)
    off = d.copy()
    np.fill_diagonal(off, np.inf)
    nearest = off.min(axis=1)                       # each token's nearest-neighbour distance
    first = int(np.argmax(nearest))                 # argmax returns the first maximum: lowest index on ties
    picks = [first]
    min_dist = d[first].copy()
    min_dist[first] = -np.inf
    for _ in range(1, m):
        nxt = int(np.argmax(min_dist))
        picks.append(nxt)
        np.minimum(min_dist, d[nxt], out=min_dist)
        min_dist[nxt] = -np.inf
    return torch.tensor(picks, dtype=torch.long)
