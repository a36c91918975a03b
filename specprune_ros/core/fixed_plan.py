"""A pruning 'method' that follows a fixed schedule: for tests, benchmarks and replaying a recorded plan."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from specprune_ros.core.step_types import AttentionRequest, LayerView, StepContext, StepPlan, StepRecord


@dataclass
class FixedKeepSchedule:
    """Keep ``keep_before`` from layer 0 on and ``keep_after[l]`` from layer l + 1 on (visual indices)."""

    keep_before: Optional[torch.Tensor] = None
    keep_after: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: list[AttentionRequest] = field(default_factory=list)
    name: str = 'fixed'
    last_record: Optional[StepRecord] = None

    def reset(self) -> None:
        self.last_record = None

    def begin_step(self, context: StepContext) -> StepPlan:
        return StepPlan(keep_before=self.keep_before, attention=list(self.attention),
                        after_layers=frozenset(self.keep_after))

    def after_layer(self, view: LayerView) -> Optional[torch.Tensor]:
        return self.keep_after.get(view.layer)

    def end_step(self, record: StepRecord) -> None:
        self.last_record = record
