"""Which kernel computes a layer's attention output: SDPA's fused kernel, or two matrix products on the CPU.

SDPA's fused CPU kernel (torch 2.13) cuts the queries into blocks of 32 rows below 192 queries and of 64 rows from
192 on. With two or more threads and head dimensions of 64 or more, its 32-row blocks run 1.3-2x slower than
attention as two products with a softmax between them (``softmax(q k^T * scale) v``) at 96-191 queries, the
token counts a pruned 256- or 512-wide decoder runs; at 192 queries and more, at head dimension 32, or on one
thread, the fused kernel is as fast or faster (``benchmarks/attention_kernels.py``, docs/benchmarks.md). The two
products give the fused kernel's output up to rounding in the last bits (about 1e-6).

A layer whose attention a method reads for most of its query rows (VLA-Pruner's prefill rows) would compute the
same probabilities twice: once inside the fused kernel, once for the probe. There the layer runs as two products
and the probe is read off the same probabilities (:func:`attention_with_summaries`, rule :func:`share_probabilities`).

:func:`use_two_products` is the executor's rule; ``PrunableDecoderRunner(attention_kernel=...)`` forces either.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch

AttentionKernel = Literal['sdpa', 'products']

# the query counts at which the fused CPU kernel works in 32-row blocks and the two products measured faster
PRODUCTS_MIN_QUERIES = 96
PRODUCTS_MAX_QUERIES = 191
PRODUCTS_MIN_HEAD_DIM = 64
PRODUCTS_MIN_THREADS = 2
# the share of a layer's query rows a probe must read for the layer's own probabilities to answer it: the probe
# alone then costs most of a materialised attention, which the fused kernel's time saved no longer pays for
SHARED_PROBE_MIN_ROWS = 0.75


def use_two_products(num_queries: int, num_keys: int, head_dim: int, like: torch.Tensor, masked: bool,
                     grouped: bool, choice: Optional[AttentionKernel] = None) -> bool:
    """Whether a layer's attention output comes from :func:`two_product_attention` rather than fused SDPA.

    ``choice`` 'sdpa' / 'products' forces the kernel (products only where they apply: no mask, every query head
    with its own key head); None applies the rule above: on the CPU, in fp32, with at least two threads, at least
    64-dimensional heads and 96-191 queries attending to as many keys.
    """
    if masked or grouped or choice == 'sdpa':
        return False
    if choice == 'products':
        return True
    return (like.device.type == 'cpu' and like.dtype == torch.float32
            and torch.get_num_threads() >= PRODUCTS_MIN_THREADS and head_dim >= PRODUCTS_MIN_HEAD_DIM
            and num_keys == num_queries and PRODUCTS_MIN_QUERIES <= num_queries <= PRODUCTS_MAX_QUERIES)


def two_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Unmasked attention as a product, a softmax and a product: (..., n_q, d) queries -> (..., n_q, d_v).

    The softmax runs in fp32 for half-precision inputs (as SDPA's kernels accumulate it).
    """
    scores = torch.matmul(q, k.transpose(-1, -2))
    if scores.dtype in (torch.float16, torch.bfloat16):
        return torch.matmul(scores.float().mul_(scale).softmax(dim=-1).to(v.dtype), v)
    return torch.matmul(scores.mul_(scale).softmax(dim=-1), v)


def share_probabilities(probe_rows: int, num_queries: int, grouped: bool,
                        choice: Optional[AttentionKernel] = None) -> bool:
    """Whether a layer computes its attention as two products whose probabilities also answer its probes.

    Where the probes read at least :data:`SHARED_PROBE_MIN_ROWS` of the query rows and every query head has its own
    key head; never when ``choice`` forces 'sdpa'.
    """
    return (choice != 'sdpa' and not grouped and num_queries > 0
            and probe_rows >= SHARED_PROBE_MIN_ROWS * num_queries)


def attention_with_summaries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             mask: Optional[torch.Tensor], rows: Sequence[torch.Tensor]
                             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Attention as two products (softmax in fp32), and the probabilities of each set of query ``rows``.

    ``q`` (B, H, n_q, d), ``k`` / ``v`` (B, H, n_k, d); ``mask``: boolean (True: may attend), broadcastable to
    (B, H, n_q, n_k), or None. Returns the attention output and, per entry of ``rows`` (positions among the
    queries), the probabilities averaged over batch, heads and those rows: (n_k,), as the executor's probes give
    them (up to the order of the sums).
    """
    scores = torch.matmul(q.float() if q.dtype != torch.float32 else q,
                          (k.float() if k.dtype != torch.float32 else k).transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    out = torch.matmul(probs if v.dtype == torch.float32 else probs.to(v.dtype), v)
    n_q, n_k = probs.shape[-2:]
    summed = probs.view(-1, n_q, n_k).sum(dim=0)                 # over batch and heads: one pass
    per_head = 1.0 / (probs.numel() // (n_q * n_k))
    summaries = []
    for positions in rows:
        weights = torch.zeros(n_q, dtype=summed.dtype, device=summed.device)
        weights.index_fill_(0, positions, per_head / len(positions))
        summaries.append(weights @ summed)
    return out, summaries
