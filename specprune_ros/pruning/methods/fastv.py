"""``fastv``.

Layers 0..K-1 see every token; after layer K-1 the visual tokens are ranked by the attention they get from the last
query row (head-averaged, at layer K-1) and only the budget runs through layers K and up.

``prune_layer`` is FastV's K (first layer with pruned input), as in the VLA-Pruner code's FastV baseline
(``fastv_k``); the FastV paper uses K = 2 on 32-layer models, and we keep K = 2 for the 6-layer reference decoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from specprune_ros.core.dataclass_mapping import check_number
from specprune_ros.core.step_types import LayerView, QueryRows, StepContext, StepPlan, VisualMask
from specprune_ros.pruning.base import BaseConfig, PruningMethodBase
from specprune_ros.pruning.budget_knob import KeepRatioKnob
from specprune_ros.pruning.methods.config_checks import FRACTION_OF_TOKENS, CheckedConfig, fraction
from specprune_ros.pruning.scoring import (budget_count, camera_slices, mask_to_sequence, positions_to_keep,
                                           stable_topk, stable_topk_on_device)


@dataclass
class FastVConfig(CheckedConfig, BaseConfig):
    keep_ratio: float = 0.5        # fraction of visual tokens kept from layer prune_layer on (FastV: 1 - R)
    prune_layer: int = 2           # K: attention of layer K-1 decides, layers >= K run pruned
    rows: QueryRows = 'last'       # query rows ranking the visual tokens ('last' = FastV)
    per_camera: bool = False       # FastV ranks over all visual tokens; True = the budget in every camera

    def check(self) -> None:
        fraction('keep_ratio', self.keep_ratio, FRACTION_OF_TOKENS)
        check_number('prune_layer', self.prune_layer, 1, integer=True, note='layer K - 1 ranks the tokens')


class FastV(KeepRatioKnob, PruningMethodBase):
    name = 'fastv'

    def __init__(self, config: FastVConfig | None = None, seed: int = 0) -> None:
        super().__init__(config or FastVConfig(), seed)
        self.config: FastVConfig

    def _score_layer(self) -> int:
        return self.layer(max(self.config.prune_layer, 1) - 1)

    def _begin(self, context: StepContext) -> StepPlan:
        if self.config.prune_layer >= self.num_layers:
            raise ValueError(f'prune_layer {self.config.prune_layer} >= {self.num_layers} layers')
        layer = self._score_layer()
        self.last_info.update(prune_layer=self.config.prune_layer, score_layer=layer)
        return StepPlan(attention=self.requests((layer, self.config.rows, 'fastv')), after_layers=frozenset((layer,)))

    def _after(self, view: LayerView) -> Optional[torch.Tensor | VisualMask]:
        if view.layer != self._score_layer():
            return None
        layout = self._layout
        scores = self.view_scores_on_device(view, 'fastv', fill=float('-inf'))
        if scores is None:
            self.last_info['error'] = 'attention summary missing'
            return None
        groups = camera_slices(layout) if self.config.per_camera else [slice(0, layout.num_visual)]
        budgets = [budget_count(self.effective_keep_ratio(), sl.stop - sl.start) for sl in groups]
        self.last_info['budget'] = sum(budgets)
        if view.kept.numel() == layout.num_tokens:
            # every visual token is present (the kept count is known on the host): the selection stays on the
            # device, with the same order as the host top-k (descending, ties to the lower position)
            parts = [sl.start + stable_topk_on_device(scores[sl], m) for sl, m in zip(groups, budgets)]
            return positions_to_keep(torch.cat(parts), layout)
        present = self.kept_visual(view)
        mask = torch.zeros(layout.num_visual, dtype=torch.bool)
        for sl, m in zip(groups, budgets):
            mask[sl.start + stable_topk(scores[sl], m, present[sl])] = True
        self.last_info['budget'] = int(mask.sum())
        return mask_to_sequence(mask, layout)
