"""The run-time token-budget knob a pruning method offers to a latency budget (``specprune_ros.control``).

``set_budget(scale)`` overrides the method's configured budget from the next step on; ``set_budget(None)`` gives
the configured one back. What the scale means is the method's: the keep ratio for the keep-ratio methods
(``KeepRatioKnob``), the scale of K for SpecPrune. Without a call, nothing changes.
"""
from __future__ import annotations

from typing import Optional


class BudgetKnob:
    """Mixin: an optional run-time override of the method's token budget."""

    budget_scale: Optional[float] = None

    def set_budget(self, scale: Optional[float]) -> None:
        if scale is not None and not 0.0 <= scale < float('inf'):
            raise ValueError(f'budget scale must be finite and >= 0, got {scale}')
        self.budget_scale = None if scale is None else float(scale)


class KeepRatioKnob(BudgetKnob):
    """Mixin for methods with ``config.keep_ratio``: the budget scale is the keep ratio (clipped to [0, 1])."""

    def effective_keep_ratio(self) -> float:
        if self.budget_scale is None:
            return self.config.keep_ratio
        return min(1.0, self.budget_scale)
