"""SpecPrune's self-speculation check: how well the first layers predict the last layer's important tokens.

Given a StepRecord holding task ('text' rows) attention at the early layers (0 and 1) and at a late layer (default
the last one), the hit rate is the fraction of the late layer's top-k visual tokens that are in the union of the
early layers' top-k (SpecPrune reports 85-95 % on OpenVLA-OFT). Use it on a step run unpruned (the ``none`` method
with ``self_speculation=True`` requests exactly these summaries), otherwise the late layer only ranks survivors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from specprune_ros.core.step_types import StepRecord
from specprune_ros.pruning.scoring import dense_visual_scores, topk_global, topk_per_camera


def _dense(record: StepRecord, layer: int, key: str) -> torch.Tensor:
    entry = (record.attention or {}).get(layer, {}).get(key)
    if entry is None:
        raise KeyError(f'record has no {key!r} attention at layer {layer} (layers: {sorted(record.attention)})')
    return dense_visual_scores(entry[0], entry[1], record.layout, fill=float('-inf'))


def self_speculation_hit_rate(record: StepRecord, k: int = 24, key: str = 'text',
                              early_layers: Sequence[int] = (0, 1), late_layer: Optional[int] = None,
                              per_camera: bool = True) -> float:
    """Fraction of the late layer's top-``k`` visual tokens found in the union of the early layers' top-``k``.

    ``k`` is per camera when ``per_camera`` (else over all visual tokens). ``late_layer`` defaults to the deepest
    layer in the record. Only tokens with a score (present as keys) are ranked. Returns NaN if the late layer ranks
    nothing.
    """
    layout = record.layout
    late = max(record.attention) if late_layer is None else late_layer
    if late < 0:
        late = max(record.attention) + 1 + late
    late_scores = _dense(record, late, key)

    def top(scores: torch.Tensor) -> torch.Tensor:
        cand = torch.isfinite(scores)
        return topk_per_camera(scores, k, layout, cand) if per_camera else topk_global(scores, k, cand)

    target = top(late_scores)
    hit = torch.zeros_like(target)
    for layer in early_layers:
        hit |= top(_dense(record, layer, key))
    n = int(target.sum())
    return float('nan') if n == 0 else float((target & hit).sum()) / n
