"""Greedy max-min diversity selection (DivPrune; VLA-Pruner's min-redundancy filter).

Rule: start with the token whose nearest neighbour is farthest away, then repeatedly add the token whose
minimum distance to the chosen set is largest, until ``m`` are chosen. Distance = cosine distance
``1 - cos(x_i, x_j)``. Ties go to the lowest index, so the result is deterministic. Vectorised: one
(n, n) distance matrix, then ``m`` O(n) updates of the running minimum, all on the features' device.
"""
from __future__ import annotations

from typing import Optional

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


def greedy_max_min(features: Optional[torch.Tensor], m: int, distances: Optional[torch.Tensor] = None,
                   candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (in selection order) of ``m`` rows chosen by greedy max-min diversity.

    Pass either ``features`` (n, d) or a precomputed symmetric ``distances`` (n, n) matrix. ``candidates`` (n,
    bool) restricts the choice to those rows, as if only they were given, without reading the mask back to the
    host: it must hold at least ``m`` rows (the count is not checked).
    """
    dist = cosine_distance_matrix(features) if distances is None else torch.as_tensor(distances, dtype=torch.float32)
    n = dist.shape[0]
    m = max(0, min(int(m), n))
    if m == 0:
        return torch.empty(0, dtype=torch.long, device=dist.device)
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=dist.device)
    # m sequential device steps; nothing is read back to the host (argmax returns the first maximum: the lowest
    # index on ties). In ``d`` the diagonal (and the columns of non-candidates) hold -inf, so taking the minimum
    # with a chosen token's row sets its own entry to -inf: chosen tokens are never picked again.
    d = dist.detach().clone()
    nearest = d.clone()
    nearest.fill_diagonal_(float('inf'))
    d.fill_diagonal_(float('-inf'))
    if candidates is not None:
        outside = ~candidates.to(device=d.device, dtype=torch.bool).flatten()
        nearest.masked_fill_(outside[None, :], float('inf'))
        d.masked_fill_(outside[None, :], float('-inf'))
    nearest = nearest.min(dim=1).values
    if candidates is not None:
        nearest.masked_fill_(outside, float('-inf'))
    pick = nearest.argmax(dim=0, keepdim=True)               # the token whose nearest neighbour is farthest
    picks = [pick]
    min_dist = d.index_select(0, pick)                       # (1, n)
    for _ in range(1, m):
        pick = min_dist.argmax(dim=1)
        picks.append(pick)
        torch.minimum(min_dist, d.index_select(0, pick), out=min_dist)
    return torch.cat(picks)
