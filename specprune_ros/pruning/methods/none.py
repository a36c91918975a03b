"""``none``: keep every token (the unpruned baseline); optionally request attention summaries for analysis."""
from __future__ import annotations

from dataclasses import dataclass, field

from specprune_ros.core.dataclass_mapping import check_number
from specprune_ros.core.step_types import StepContext, StepPlan
from specprune_ros.pruning.base import BaseConfig, PruningMethodBase
from specprune_ros.pruning.methods.config_checks import CheckedConfig, check_rows


@dataclass
class NoneConfig(CheckedConfig, BaseConfig):
    """``attention``.

    Extra (layer, rows) pairs to request, e.g. ``((0, 'text'), (-1, 'action'))``; each summary is named ``rows`` in the
    record. ``self_speculation``: also request 'text' rows at layers 0, 1 and the last layer, as
    :func:`specprune_ros.pruning.self_speculation.self_speculation_hit_rate` needs.
    """

    attention: tuple = field(default_factory=tuple)
    self_speculation: bool = False

    def check(self) -> None:
        for i, pair in enumerate(self.attention):
            parts = pair.split(':') if isinstance(pair, str) else pair
            if not isinstance(parts, (list, tuple)) or len(parts) != 2:
                raise ValueError(f"attention[{i}]: {pair!r} is not (layer, rows) or 'layer:rows'")
            layer, rows = parts
            if isinstance(layer, str) and layer.strip().removeprefix('-').isdigit():
                layer = int(layer)                 # 'layer:rows' gives the layer as text
            check_number(f'attention[{i}] layer', layer, integer=True)
            check_rows(f'attention[{i}] rows', rows)


class NoPruning(PruningMethodBase):
    name = 'none'

    def __init__(self, config: NoneConfig | None = None, seed: int = 0) -> None:
        super().__init__(config or NoneConfig(), seed)
        self.config: NoneConfig

    def _begin(self, context: StepContext) -> StepPlan:
        items = []
        for pair in self.config.attention:
            layer, rows = (pair.split(':') if isinstance(pair, str) else pair)
            items.append((self.layer(int(layer)), str(rows), str(rows)))
        if self.config.self_speculation:
            items += [(self.layer(0), 'text', 'text'), (self.layer(min(1, self.num_layers - 1)), 'text', 'text'),
                      (self.layer(-1), 'text', 'text')]
        return StepPlan(attention=self.requests(*items))
