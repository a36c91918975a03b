"""``random``: before layer 0 keep a uniformly random subset of the visual tokens at the budget (the sanity floor).

Deterministic under a seed: the generator is seeded with ``seed`` at construction and again on every reset, so each
episode draws the same sequence of subsets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specprune_ros.core.host_copies import to_device
from specprune_ros.core.step_types import StepContext, StepPlan, VisualMask
from specprune_ros.pruning.base import BaseConfig, PruningMethodBase
from specprune_ros.pruning.budget_knob import KeepRatioKnob
from specprune_ros.pruning.methods.config_checks import FRACTION_OF_TOKENS, CheckedConfig, fraction
from specprune_ros.pruning.scoring import budget_count, camera_slices, positions_to_keep


@dataclass
class RandomConfig(CheckedConfig, BaseConfig):
    keep_ratio: float = 0.5        # fraction of visual tokens kept
    per_camera: bool = True        # draw the budget in every camera (True) or over all visual tokens

    def check(self) -> None:
        fraction('keep_ratio', self.keep_ratio, FRACTION_OF_TOKENS)


class RandomPruning(KeepRatioKnob, PruningMethodBase):
    name = 'random'

    def __init__(self, config: RandomConfig | None = None, seed: int = 0) -> None:
        super().__init__(config or RandomConfig(), seed)
        self.config: RandomConfig
        self.generator = torch.Generator()
        self._reset_method()

    def _reset_method(self) -> None:
        self.generator.manual_seed(self.seed)

    def _begin(self, context: StepContext) -> StepPlan:
        # the draw runs on the CPU generator (host data only, identical under a seed on every device); the mask of
        # the chosen tokens goes to the device in one asynchronous copy, so nothing waits for the device
        layout = context.layout
        groups = camera_slices(layout) if self.config.per_camera else [slice(0, layout.num_visual)]
        parts = []
        for sl in groups:
            n = sl.stop - sl.start
            m = budget_count(self.effective_keep_ratio(), n)
            parts.append(sl.start + torch.randperm(n, generator=self.generator)[:m])
        keep = positions_to_keep(torch.cat(parts), layout)
        self.last_info['budget'] = keep.count
        embeddings = context.visual_embeddings
        if embeddings is not None:
            keep = VisualMask(to_device(keep.mask, embeddings.device), keep.count)
        return StepPlan(keep_before=keep)
