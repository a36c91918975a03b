"""Analytical decoder FLOPs, the per-layer model both papers use.

Per layer with n_q query tokens attending to n_k keys, hidden size d, gated-MLP width m, attention width a (query
heads x head size) and key/value width c (key/value heads x head size), in multiply-adds::

    n_q * d * (2a + 2c)  +  2 * n_q * n_k * a  +  3 * n_q * d * m

With a = c = d (multi-head attention as wide as the model, the papers' Llama shapes) and n_q = n_k = n this is the
papers' 4nd^2 + 2n^2d + 3ndm (VLA-Pruner's gated-MLP form). Gemma's (pi0) grouped-query attention has c < a and its
action expert a > d. n_k > n_q happens when keys/values of some tokens are reused from an earlier step instead of
recomputed.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional


def layer_flops(n_query: int, n_key: int, hidden: int, mlp: int, attention: Optional[int] = None,
                kv: Optional[int] = None) -> float:
    """The FLOPs of one decoder layer (``attention`` / ``kv`` widths default to ``hidden``)."""
    a = hidden if attention is None else attention
    c = hidden if kv is None else kv
    return (1.0 * n_query * hidden * (2 * a + 2 * c) + 2.0 * n_query * n_key * a
            + 3.0 * n_query * hidden * mlp)


def decoder_flops(n_query_per_layer: Sequence[int], n_key_per_layer: Sequence[int], hidden: int, mlp: int,
                  attention: Optional[int] = None, kv: Optional[int] = None) -> float:
    """The FLOPs of a whole decoder pass given the token counts that entered each layer."""
    if len(n_query_per_layer) != len(n_key_per_layer):
        raise ValueError('one query count and one key count per layer')
    return sum(layer_flops(q, k, hidden, mlp, attention, kv) for q, k in zip(n_query_per_layer, n_key_per_layer))


def attention_widths(config: Any) -> tuple[int, int]:
    """(query heads x head size, key/value heads x head size) of a transformers decoder config."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, 'head_dim', None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, 'num_key_value_heads', None) or heads)
    return heads * head_dim, kv_heads * head_dim
