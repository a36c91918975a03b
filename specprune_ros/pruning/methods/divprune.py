"""``divprune``.

Before layer 0 keep the budget chosen by greedy max-min diversity on the visual embeddings (cosine distance on
``StepContext.visual_embeddings``, the decoder inputs); no attention needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specprune_ros.core.step_types import StepContext, StepPlan
from specprune_ros.pruning.base import BaseConfig, PruningMethodBase
from specprune_ros.pruning.budget_knob import KeepRatioKnob
from specprune_ros.pruning.diversity import greedy_max_min
from specprune_ros.pruning.methods.config_checks import FRACTION_OF_TOKENS, CheckedConfig, fraction
from specprune_ros.pruning.scoring import budget_count, camera_slices, positions_to_keep


@dataclass
class DivPruneConfig(CheckedConfig, BaseConfig):
    keep_ratio: float = 0.5        # fraction of visual tokens kept
    per_camera: bool = False       # DivPrune selects over all visual tokens; True = the budget in every camera

    def check(self) -> None:
        fraction('keep_ratio', self.keep_ratio, FRACTION_OF_TOKENS)


class DivPrune(KeepRatioKnob, PruningMethodBase):
    name = 'divprune'

    def __init__(self, config: DivPruneConfig | None = None, seed: int = 0) -> None:
        super().__init__(config or DivPruneConfig(), seed)
        self.config: DivPruneConfig

    def _begin(self, context: StepContext) -> StepPlan:
        layout = context.layout
        emb = context.visual_embeddings.detach().reshape(layout.num_visual, -1)
        groups = camera_slices(layout) if self.config.per_camera else [slice(0, layout.num_visual)]
        parts = []
        for sl in groups:
            m = budget_count(self.effective_keep_ratio(), sl.stop - sl.start)
            parts.append(sl.start + greedy_max_min(emb[sl], m))
        keep = positions_to_keep(torch.cat(parts), layout)
        self.last_info['budget'] = keep.count
        return StepPlan(keep_before=keep)
