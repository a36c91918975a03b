"""Attention probes: the softmax attention of the query rows a pruning method asked for, scored when first read.

A layer's probe is queued with its queries and keys (:class:`LazyAttention`); when a method reads one, every probe
queued since is scored, those over the same kept set stacked into one batched product, softmax (fp32) and mean
(:class:`ProbeBatch`).
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Optional

import torch


class ProbeBatch:
    """The attention probes of one step not yet scored: queued at their layer, scored together when one is read.

    Probes of the same shapes (layers between two changes of the kept set) are stacked into one batched product,
    softmax and mean, instead of a few small operations per layer.
    """

    def __init__(self) -> None:
        self.pending: list[tuple] = []
        self.seconds = 0.0

    def add(self, q_rows: torch.Tensor, keys: torch.Tensor, mask: Optional[torch.Tensor], rows: torch.Tensor,
            scaling: float, out: dict, key: str) -> None:
        self.pending.append((q_rows, keys, mask, rows, scaling, out, key))

    def resolve(self) -> None:
        if not self.pending:
            return
        started = time.perf_counter()
        if len(self.pending) == 1:          # one probe (a layer between two changes of the kept set): no grouping
            q_rows, keys, mask, rows, scaling, out, key = self.pending.pop()
            mask_rows = None if mask is None else mask[:, :, rows].unsqueeze(2)
            with torch.no_grad():
                out[key] = attention_summaries(q_rows, keys, mask_rows, scaling)
            self.seconds += time.perf_counter() - started
            return
        groups: dict[tuple, list] = {}
        for item in self.pending:
            q_rows, keys, mask, rows, scaling = item[:5]
            # one mask and one set of rows per kept set: the same objects for every layer that shares them
            same = (tuple(q_rows.shape), tuple(keys.shape), q_rows.dtype, keys.dtype, scaling,
                    None if mask is None else (id(mask), id(rows)))
            groups.setdefault(same, []).append(item)
        self.pending = []
        with torch.no_grad():
            for items in groups.values():
                q_rows = torch.stack([item[0] for item in items]) if len(items) > 1 else items[0][0].unsqueeze(0)
                keys = torch.stack([item[1] for item in items]) if len(items) > 1 else items[0][1].unsqueeze(0)
                mask, rows = items[0][2], items[0][3]
                mask_rows = None if mask is None else mask[:, :, rows].unsqueeze(2)
                weights = attention_summaries(q_rows, keys, mask_rows, items[0][4])
                for item, row in zip(items, weights):
                    item[5][item[6]] = row
        self.seconds += time.perf_counter() - started


class LazyAttention(Mapping):
    """A layer's attention summaries (request key -> (n_keys,) weights), scored when first read."""

    def __init__(self, probes: ProbeBatch) -> None:
        self._probes = probes
        self._keys: list[str] = []
        self._values: dict[str, torch.Tensor] = {}

    def add(self, key: str, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, mask: Optional[torch.Tensor],
            scaling: float) -> None:
        batch, heads, _, head_dim = q.shape
        kv_heads = k.shape[1]
        q_rows = q[:, :, rows].reshape(batch, kv_heads, (heads // kv_heads) * len(rows), head_dim)
        self._keys.append(key)
        self._probes.add(q_rows, k, mask, rows, scaling, self._values, key)

    def put(self, key: str, weights: torch.Tensor) -> None:
        """A summary already computed (from the layer's own attention probabilities)."""
        self._keys.append(key)
        self._values[key] = weights

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._values and key in self._keys:
            self._probes.resolve()
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def attention_summaries(q_rows: torch.Tensor, keys: torch.Tensor, mask_rows: Optional[torch.Tensor],
                        scaling: float) -> torch.Tensor:
    """Softmax attention (fp32) of query rows grouped by key head, averaged over batch, heads and rows: (L, n_k).

    Query rows (L, B, kv, g * r, d) against keys (L, B, kv, n_k, d); or one probe, (B, kv, g * r, d) against
    (B, kv, n_k, d), giving (n_k,). ``mask_rows``: (1, 1, 1, r, n_k) or None.
    """
    q_rows = q_rows if q_rows.dtype == torch.float32 else q_rows.float()
    keys = keys if keys.dtype == torch.float32 else keys.float()
    # scaled and masked in place on the fresh product: the same numbers as out-of-place steps, without a copy (a
    # masked score takes the dtype's minimum, as an additive mask gives it)
    scores = torch.matmul(q_rows, keys.transpose(-1, -2)).mul_(scaling)
    n_keys = scores.shape[-1]
    if mask_rows is not None:
        rows = mask_rows.shape[-2]
        scores.view(*scores.shape[:-2], scores.shape[-2] // rows, rows, n_keys).masked_fill_(
            ~mask_rows, torch.finfo(scores.dtype).min)
    scores = scores.softmax(dim=-1)
    if q_rows.dim() == 4:
        return scores.view(-1, n_keys).mean(dim=0)
    return scores.view(scores.shape[0], -1, n_keys).mean(dim=1)
