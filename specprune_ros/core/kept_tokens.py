"""Kept sets: what the layers between two changes of the kept set share (:class:`KeptTokens`), and their RoPE.

Kept tokens keep their original positions as RoPE positions (:class:`Rotary`, gathered from every position's
:class:`RopeTables`); graphed and compiled layers run over the kept set padded to a bucket (:class:`PaddedTokens`).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from specprune_ros.core.constant_tensors import constant_tensors
from specprune_ros.core.masks import attention_mask
from specprune_ros.core.step_types import PlanError
from specprune_ros.core.token_layout import TokenLayout, visual_order


@constant_tensors(maxsize=32)
def visual_slot_table(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    """(num_tokens,) long: each token's place among the visual tokens in camera order, ``num_visual`` elsewhere.

    Shared: do not modify it.
    """
    return visual_order(layout)[1].to(device)


@constant_tensors(maxsize=32)
def all_visual_on(num_visual: int, device: torch.device) -> torch.Tensor:
    """(num_visual,) True on ``device`` (shared: do not modify it)."""
    return torch.ones(num_visual, dtype=torch.bool, device=device)


class KeptTokens:
    """What every layer over one kept set shares: key indices, RoPE tables, the mask and the probe rows.

    Built when the kept set changes, so a deep decoder that prunes at a few layers computes these a few times per
    step instead of at every layer.
    """

    def __init__(self, rotary_emb: nn.Module, kept: torch.Tensor, reused: Optional[torch.Tensor],
                 layout: TokenLayout, roles: torch.Tensor, like: torch.Tensor, bucket: Optional[int] = None,
                 tables: Optional[RopeTables] = None) -> None:
        self.kept = kept
        self.reused = reused
        self.layout = layout
        self.roles = roles
        self.key_indices = kept if reused is None else torch.cat([kept, reused])
        self.num_keys = len(self.key_indices)
        # what the RoPE tables need, not ``like`` itself (a graphed pass would keep that hidden state alive for nothing)
        self._rope_inputs = (rotary_emb, kept, tables, like.dtype, like.device, like.shape[-1])
        self.mask = attention_mask(kept, self.key_indices, layout.causal)
        # queries and keys are the same sorted tokens: the mask is lower-triangular, which SDPA applies itself
        self.causal = layout.causal and reused is None
        # compiled layers: the kept set padded to a multiple of ``bucket`` tokens (no reused keys then)
        self.padded = None if bucket is None else PaddedTokens(rotary_emb, kept, layout.causal, like, bucket, tables)
        self._rows: dict[str, torch.Tensor] = {}
        self.kernels: dict[tuple, bool] = {}     # attention as two products, per kind of layer (the runner decides)

    @functools.cached_property
    def visual_slots(self) -> torch.Tensor:
        """(n,) long: each kept token's place among the layout's visual tokens (``num_visual``: not visual)."""
        table = visual_slot_table(self.layout, self.kept.device)
        return table if len(self.kept) == self.layout.num_tokens else table.index_select(0, self.kept)

    @functools.cached_property
    def visual_present(self) -> torch.Tensor:
        """(num_visual,) bool: the visual tokens that run over this kept set (shared: do not modify it)."""
        layout, device = self.layout, self.kept.device
        if len(self.kept) == layout.num_tokens:
            return all_visual_on(layout.num_visual, device)
        present = torch.zeros(layout.num_visual + 1, dtype=torch.bool, device=device)
        return present.index_fill_(0, self.visual_slots, True)[:layout.num_visual]

    @functools.cached_property
    def rope(self) -> Rotary:
        """The kept tokens' RoPE tables, built when a layer first runs eagerly over them.

        Graphed layers read the padded set's tables instead.
        """
        rotary_emb, kept, tables, dtype, device, width = self._rope_inputs
        return Rotary(rotary_emb, torch.empty(1, 1, width, dtype=dtype, device=device), kept, tables)

    def query_rows(self, rows: str) -> torch.Tensor:
        """Positions (within the kept sequence) of the query rows named by ``rows`` (cached per kept set)."""
        found = self._rows.get(rows)
        if found is None:
            found = self._rows[rows] = self._find_rows(rows)
        return found

    def _find_rows(self, rows: str) -> torch.Tensor:
        # Non-visual tokens are never dropped: a span's rows follow from the layout and the kept count on the host
        # where every visual token lies on one side of it, else from a search in the sorted kept indices. No
        # data-dependent sizes (nothing waits for the device).
        layout, kept = self.layout, self.kept
        device = kept.device
        if rows == 'all':
            return span_positions(((0, len(kept)),), device)
        if rows == 'last':
            return span_positions(((len(kept) - 1, len(kept)),), device)
        spans = {'text': (layout.text_span,), 'action': (layout.action_span,),
                 'text_action': (layout.text_span, layout.action_span)}
        if rows in spans:
            found = sorted((start, end) for start, end in spans[rows] if end > start)
            if not found:
                raise PlanError(f'attention over {rows!r} rows requested, but the sequence has no such tokens')
            shifted = [self._kept_span(start, end) for start, end in found]
            if all(span is not None for span in shifted):
                return span_positions(tuple(shifted), device)
            parts = [torch.arange(start, end, device=device) for start, end in found]
            return torch.searchsorted(kept, torch.cat(parts) if len(parts) > 1 else parts[0])
        if rows == 'prefill':
            start, end = layout.action_span
            count = len(kept) - max(end - start, 0)
            if count <= 0:
                raise PlanError("attention over 'prefill' rows requested, but the sequence has no such tokens")
            index = torch.arange(count, device=device)
            if end <= start:
                return index
            first_action = torch.searchsorted(kept, torch.arange(start, start + 1, device=device))
            return index + (end - start) * (index >= first_action)
        raise PlanError(f"unknown query rows {rows!r}; use 'text', 'action', 'text_action', 'prefill', 'last' "
                        "or 'all'")

    def _kept_span(self, start: int, end: int) -> Optional[tuple[int, int]]:
        """Where the never-dropped tokens ``start`` .. ``end`` - 1 sit in the kept sequence, or None if unknown here.

        Only visual tokens leave the sequence (pruned, or served from the K/V store), so a span that every camera
        span precedes moves up by the number of tokens gone, and one that every camera span follows stays.
        """
        cameras = self.layout.camera_spans
        if all(camera_end <= start for _, camera_end in cameras):
            gone = self.layout.num_tokens - len(self.kept)
            return start - gone, end - gone
        if all(camera_start >= end for camera_start, _ in cameras):
            return start, end
        return None


def span_positions(spans: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """The integers of the half-open ``spans`` (ascending, disjoint) as one long tensor (shared: do not modify it).

    One span is a slice of a cached ``arange``: a kept count that changes every step (a method that drops a few
    tokens per layer) then adds nothing to any cache. Several spans are built once per spans and device.
    """
    if len(spans) == 1:
        start, end = spans[0]
        return _arange_on(1 << max(int(end) - 1, 0).bit_length(), device)[start:end]
    return _joined_spans(spans, device)


@constant_tensors          # never evicted (a few lengths, powers of two): a graph may read a slice by address
def _arange_on(length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(length, device=device)


@constant_tensors(maxsize=64)
def _joined_spans(spans: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(start, end, device=device) for start, end in spans])


class Rotary:
    """RoPE tables of one set of positions, and RoPE applied with them.

    ``cos`` / ``sin``: the rotary embedding's (1, n, head_dim) tables. :meth:`apply` rotates queries and keys in
    one pass with the sine's first half negated in advance, so rotating needs no negation: the same numbers as
    transformers' ``apply_rotary_pos_emb`` (a sign flip is exact), with fewer operations. With ``tables`` (every
    position's tables, built once) the rows of ``positions`` are gathered from them instead of computed: the
    cosine and the signed sine in one gather, the plain sine only if asked for (layers without fused projections).
    """

    def __init__(self, rotary_emb: nn.Module, like: torch.Tensor, positions: torch.Tensor,
                 tables: Optional[RopeTables] = None) -> None:
        self._tables, self._positions = tables, positions
        if tables is not None:
            self.stacked = tables.cos_and_signed_sin.index_select(2, positions)
            self._cos, self._sin = self.stacked[:1], self.stacked[1:]
            self.cos = self.stacked[0]
            return
        self.cos, self.sin = rotary_emb(like, positions.view(1, -1))
        half = self.sin.shape[-1] // 2
        self._cos = self.cos.unsqueeze(1)
        self._sin = torch.cat([-self.sin[..., :half], self.sin[..., half:]], dim=-1).unsqueeze(1)

    @functools.cached_property
    def stacked(self) -> torch.Tensor:
        """(2, 1, n, head_dim): the cosine and the signed sine in one tensor (what a graphed layer reads)."""
        return torch.cat([self._cos, self._sin])

    @functools.cached_property
    def sin(self) -> torch.Tensor:
        """The plain sine (1, n, head_dim), gathered from the tables when first asked for (else set at creation)."""
        return self._tables.sin.index_select(1, self._positions)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, heads, n, head_dim) rotated to its positions (no autograd: written into a fresh tensor).

        The swapped halves are multiplied by the sine straight from ``x`` (no concatenated copy of ``x``).
        """
        half = x.shape[-1] // 2
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, self._sin.dtype), device=x.device)
        torch.mul(x[..., half:], self._sin[..., :half], out=out[..., :half])
        torch.mul(x[..., :half], self._sin[..., half:], out=out[..., half:])
        return out.add_(x * self._cos)


class RopeTables:
    """The RoPE tables of positions 0 .. n - 1 for one rotary embedding, dtype and device.

    A kept set's tables are rows of these (the same numbers: each row depends on its position only), so a step
    gathers them instead of computing cosines and sines again. Not for rotary embeddings that rescale their
    frequencies with the longest position asked for (dynamic and LongRoPE scaling).
    """

    def __init__(self, rotary_emb: nn.Module, like: torch.Tensor, num_tokens: int, signature: tuple) -> None:
        full = Rotary(rotary_emb, like, torch.arange(num_tokens, device=like.device))
        self.cos, self.sin, self.signed_sin = full.cos, full.sin, full._sin
        self.cos_and_signed_sin = full.stacked      # gathered in one operation for a kept set
        self.signature = signature

    @staticmethod
    def key(rotary_emb: nn.Module, like: torch.Tensor, num_tokens: int) -> Optional[tuple]:
        """What the tables depend on, or None where they cannot be shared between position sets."""
        rope_type = getattr(rotary_emb, 'rope_type', None)
        inv_freq = getattr(rotary_emb, 'inv_freq', None)
        if not isinstance(rope_type, str) or not isinstance(inv_freq, torch.Tensor) or 'dynamic' in rope_type \
                or 'longrope' in rope_type:
            return None
        return (id(rotary_emb), num_tokens, like.dtype, like.device, inv_freq.data_ptr(), inv_freq._version,
                getattr(rotary_emb, 'attention_scaling', None))


class PaddedTokens:
    """A kept set padded at its end to a multiple of ``bucket`` tokens, for the compiled layers.

    Padding tokens sit after every kept token at the last kept position; the mask hides them as keys (with a causal
    layout, the lower-triangular mask already does).
    """

    def __init__(self, rotary_emb: nn.Module, kept: torch.Tensor, causal: bool, like: torch.Tensor,
                 bucket: int, tables: Optional[RopeTables] = None) -> None:
        n = len(kept)
        self.size = -(-n // bucket) * bucket
        positions = torch.cat([kept, kept[-1:].expand(self.size - n)]) if self.size > n else kept
        self.rope = Rotary(rotary_emb, like, positions, tables)
        self.causal = causal
        self.mask = None
        if not causal and self.size > n:
            self.mask = padding_mask(n, self.size, kept.device)


@constant_tensors(maxsize=256)
def padding_mask(count: int, size: int, device: torch.device) -> torch.Tensor:
    """(1, 1, 1, ``size``) bool key mask: the first ``count`` keys (shared: do not modify it)."""
    return (torch.arange(size, device=device) < count).view(1, 1, 1, -1)
