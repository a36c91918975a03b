"""Analytical decoder FLOPs, the per-layer model both papers use.

Per layer with n_q query tokens attending to n_k keys, hidden size d and gated-MLP width m::

    4 * n_q * d^2  +  2 * n_q * n_k * d  +  3 * n_q * d * m

With n_q = n_k = n this is the papers' 4nd^2 + 2n^2d + 3ndm (VLA-Pruner's gated-MLP form). n_k > n_q
happens when keys/values of some tokens are reused from an earlier step instead of recomputed.
"""
from __future__ import annotations

from collections.abc import Sequence


def layer_flops(n_query: int, n_key: int, hidden: int, mlp: int) -> float:
    """The FLOPs of one decoder layer."""
    return 4.0 * n_query * hidden ** 2 + 2.0 * n_query * n_key * hidden + 3.0 * n_query * hidden * mlp


def decoder_flops(n_query_per_layer: Sequence[int], n_key_per_layer: Sequence[int], hidden: int, mlp: int) -> float:
    """The FLOPs of a whole decoder pass given the token counts that entered each layer."""
    if len(n_query_per_layer) != len(n_key_per_layer):
        raise ValueError('one query count and one key count per layer')
    return sum(layer_flops(q, k, hidden, mlp) for q, k in zip(n_query_per_layer, n_key_per_layer))
