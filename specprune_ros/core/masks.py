"""Attention masks for pruned sequences whose tokens keep their original (gapped) positions.

transformers' own mask helpers assume contiguous positions, so the project builds its masks here.
"""
from __future__ import annotations

from typing import Optional

import torch


def attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, causal: bool) -> Optional[torch.Tensor]:
    """Boolean SDPA mask (1, 1, n_q, n_k), True where a query may attend to a key; None when all may.

    Causal: a query at position p sees keys at positions <= p (gaps in the positions are fine).
    Bidirectional (OpenVLA-OFT style parallel decoding): every query sees every key, so no mask.
    """
    if not causal:
        return None
    allowed = key_positions.view(1, -1) <= query_positions.view(-1, 1)
    return allowed.view(1, 1, *allowed.shape)


def additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Turn a boolean mask into an additive one (0 where allowed, the dtype's minimum where not)."""
    if mask is None:
        return None
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, torch.finfo(dtype).min)
