"""``coverage_ranked``: every region of each camera covered, the rest ranked by remembered attention.

A cheap early stage before layer 0, the final cut after layer 2, at an action-aware budget.

Per step, per camera:

1. **Budget from the executed motion** (SpecPrune-VLA's action-aware controller,
   :mod:`specprune_ros.pruning.action_controller`): slow, non-lifting motion (approaching, grasping, placing) is
   fine mode and keeps ``fine_keep_ratio`` (26%) of the camera's patches after layer ``refine_layer``, fast or
   lifting motion is coarse mode and keeps ``keep_ratio`` (20%). The default rule is the paper's stateless one
   (``controller.variant='paper'``): the public code's hysteresis enters fine mode on the first slow action and
   rarely leaves it on this policy.
2. **Spatial coverage** (ours, from measuring this policy: a uniform random subset touches 91% of the 3 x 3-patch
   cells of an image and keeps the policy's success, attention-ranked subsets touch 61-76% and lose it; see
   ``scripts/zone_coverage.py``): the camera's patch grid is split into a coarse ``cells`` grid and the best
   ``cell_quota`` patches of every cell are kept first (every cell's best before any cell's second), so that each
   region of the image keeps a patch. With no ranking yet (ties) a cell's patch is drawn at random (seeded):
   stratified random sampling.
3. **Semantic and action scores** (VLA-Pruner's dual-level importance): the instruction's attention to each patch
   at an early layer (``semantic_rows`` at ``refine_layer``: what the task names) and the action queries'
   attention at a deep layer (``action_layer``: where the motion goes), each turned into ranks within the patches
   that were scored and smoothed over steps by an exponential average (VLA-Pruner smooths the action score over a
   decayed window of w = 3 steps with gamma = 0.8; ``smoothing`` is the newest step's weight). The budget left
   after the coverage quota goes to the patches whose better score (the maximum of the two: a union of the two
   rankings, as VLA-Pruner's Combine step) is highest.
4. **Two stages, no extra attention pass** (ours, after SpecPrune's self-speculative layer-0/1 sets and
   VLA-Pruner's full-width early layers): before layer 0 the method keeps ``early_keep_ratio`` (50%) of each
   camera, chosen from the *previous* steps' attention of two probes of a few query rows (instruction rows at
   ``refine_layer``, action rows at one deep layer) over the tokens that ran; after ``refine_layer`` (2) it cuts to
   the final budget with the pass's own instruction ranks. The kept tokens gather the dropped half's content in
   layers 0-2, which a policy trained without token drops needs (``docs/own_method.md``); on a 32-layer decoder
   the three half-width layers are about 6% of the unpruned step's FLOPs. A patch that was pruned gets no new score; its
   remembered score relaxes towards ``prior`` (``forget`` per step), so patches not seen for a while come back
   into consideration.
5. **Warm-up** (VLA-Pruner's unpruned warm-up): the first ``warmup_steps`` (3) steps of an episode run every patch
   through every layer; their probes fill the history. A policy trained without token drops loses most of its
   success when the first steps of an episode are pruned.
6. **Exploration** (ours): seeded uniform noise of amplitude ``explore`` on the ranks varies the kept set from
   step to step. On the shipped pruning-aware checkpoint, which practised uniform random drops, noise as large as
   the ranks (1.0) does best; on a checkpoint that never practised drops it neither helps nor hurts once layers
   0-1 see the early set and the first steps are unpruned.

``early_keep_ratio`` <= ``keep_ratio`` prunes once, before layer 0; ``early_keep_ratio`` 1.0 runs every patch
through layers 0..refine_layer, as VLA-Pruner.

Selection runs on the device of the attention (sorts and scatters; counts are known on the host), so a step never
waits for the accelerator. The budget knob (``set_budget``) is the coarse-mode keep ratio; fine mode keeps
``fine_keep_ratio / keep_ratio`` times as much. The early stage keeps ``early_keep_ratio / keep_ratio`` times the
final fraction at budgets up to the configured one, and ``early_keep_ratio - keep_ratio`` (scaled as fine mode)
more than the final fraction above it: at 35% kept it runs 65% of each camera through layers 0-2 rather than 87.5%,
3% faster at about the same success on validation episodes (``docs/own_method.md``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from specprune_ros.core.constant_tensors import constant_tensors
from specprune_ros.core.dataclass_mapping import check_number
from specprune_ros.core.host_copies import to_device
from specprune_ros.core.step_types import LayerView, StepContext, StepPlan, StepRecord, VisualMask
from specprune_ros.core.token_layout import TokenLayout
from specprune_ros.pruning.action_controller import ActionController, ControllerConfig
from specprune_ros.pruning.base import BaseConfig, PruningMethodBase
from specprune_ros.pruning.budget_knob import BudgetKnob
from specprune_ros.pruning.methods.config_checks import FRACTION_OF_PATCHES, CheckedConfig, check_controller, fraction
from specprune_ros.pruning.scoring import budget_count, positions_mask
from specprune_ros.pruning.selection_graphs import SelectionGraphs

COVERED_BONUS = 100.0      # added to the score (rank in [0, 1] + noise <= explore) of the patches the quota keeps
TIE_BREAK = 1e-4           # amplitude of the seeded random tie-break (below the rank spacing of a 12 x 12 grid)


def _paper_controller() -> ControllerConfig:
    return ControllerConfig(variant='paper')


@dataclass
class CoverageRankedConfig(CheckedConfig, BaseConfig):
    """Knobs of ``coverage_ranked`` (what each idea is and where it comes from: the module docstring)."""

    keep_ratio: float = 0.2                # patches per camera from layer refine_layer + 1 on, coarse mode (the
    # budget knob)
    fine_keep_ratio: float = 0.26          # ... in fine mode (approaching, grasping, placing)
    early_keep_ratio: float = 0.5          # patches per camera through layers 0..refine_layer (coarse mode; fine
    # mode scales it as the final budget); <= keep_ratio: one stage, before layer 0
    refine_layer: int = 2                  # the early layer whose instruction attention refines the selection
    use_controller: bool = True            # False: always coarse mode
    controller: ControllerConfig = field(default_factory=_paper_controller)
    cells: tuple = (4, 4)                  # coarse grid per camera (rows, cols); 12 x 12 patches -> 3 x 3 per cell
    cell_quota: int = 2                    # patches of every cell kept before the rest is filled by score
    semantic_rows: Literal['text', 'prefill', 'last', 'text_action'] = 'text'   # rows of the refine-layer probe
    use_semantic: bool = True              # remembered semantic ranks take part in the selection before layer 0
    use_action: bool = True                # remembered action ranks take part (both stages)
    action_layer: int = -1                 # deep layer of the action-row probe
    smoothing: float = 0.5                 # weight of the newest step's ranks in the running score
    forget: float = 0.2                    # per step, a patch that was not scored relaxes this far towards prior
    prior: float = 0.5                     # score of a patch never scored (ranks run from 0 to 1)
    explore: float = 1.0                   # amplitude of seeded uniform noise added to the scores (0: ties only)
    warmup_steps: int = 3                  # the first steps of an episode run every patch through every layer
    # (their probes fill the history), as VLA-Pruner's unpruned warm-up

    def check(self) -> None:
        fraction('keep_ratio', self.keep_ratio, FRACTION_OF_PATCHES, open_low=True)
        fraction('fine_keep_ratio', self.fine_keep_ratio, FRACTION_OF_PATCHES, open_low=True)
        fraction('early_keep_ratio', self.early_keep_ratio, FRACTION_OF_PATCHES)
        check_number('refine_layer', self.refine_layer, integer=True)
        check_number('action_layer', self.action_layer, integer=True)
        if len(self.cells) != 2:
            raise ValueError(f'cells: {self.cells!r} is not (rows, cols)')
        for i, cells in enumerate(self.cells):
            check_number(f'cells[{i}]', cells, 1, integer=True)
        check_number('cell_quota', self.cell_quota, 0, integer=True, note='patches per cell')
        fraction('smoothing', self.smoothing, "the newest step's weight", open_low=True)
        fraction('forget', self.forget)
        fraction('prior', self.prior, 'ranks run from 0 to 1')
        check_number('explore', self.explore, 0.0, 10.0, note='scores are ranks in [0, 1]')
        check_number('warmup_steps', self.warmup_steps, 0, integer=True)
        check_controller(self.controller)


class CoverageRanked(BudgetKnob, PruningMethodBase):
    name = 'coverage_ranked'

    def __init__(self, config: CoverageRankedConfig | None = None, seed: int = 0) -> None:
        cfg = config or CoverageRankedConfig()
        super().__init__(cfg, seed)
        self.config: CoverageRankedConfig
        self.controller = ActionController(cfg.controller)
        self.generator = torch.Generator()
        self._graphs = SelectionGraphs()        # the cuts and rank updates as CUDA graphs, when switched on
        self._reset_method()

    # -------------------------------------------------------------------------------------------- state

    def _reset_method(self) -> None:
        self.controller.reset()
        self.generator.manual_seed(self.seed)
        self._semantic: Optional[torch.Tensor] = None     # (cameras, patches) running scores, on the device
        self._action: Optional[torch.Tensor] = None
        self._budget = 0
        self._refine = False
        self._refine_at = -1
        self._refined: Optional[torch.Tensor] = None     # this step's smoothed semantic score, if the refine made it

    def keep_fraction(self, mode: str, early: bool = False) -> float:
        """The fraction of each camera kept in controller mode ``mode`` (after the budget knob).

        ``early``: through layers 0..refine_layer (at least the final fraction).
        """
        cfg = self.config
        budget = 1.0 if self.budget_scale is None else self.budget_scale / cfg.keep_ratio
        mode_scale = cfg.fine_keep_ratio / cfg.keep_ratio if mode == 'fine' and cfg.use_controller else 1.0
        final = min(1.0, cfg.keep_ratio * budget * mode_scale)
        if not early:
            return final
        # proportional below the configured budget; above it the early stage grows by as much as the final cut
        # does (a proportional one would run nearly every patch through the early layers at a third kept)
        proportional = cfg.early_keep_ratio * budget * mode_scale
        additive = final + (cfg.early_keep_ratio - cfg.keep_ratio) * mode_scale
        return max(final, min(1.0, proportional, additive))

    def refine_layer(self) -> int:
        """The layer after which the final selection is made: resolved, then clipped to the last layer but one.

        The runner calls no hook after the last layer, so a refine there would never cut.
        """
        layer = self.config.refine_layer
        return max(0, min(self.layer(layer) if layer < 0 else layer, self.num_layers - 2))

    # ------------------------------------------------------------------------------------------- hooks

    def _begin(self, context: StepContext) -> StepPlan:
        cfg = self.config
        layout = context.layout
        patches = layout.patches_per_camera
        mode = self.controller.update(context.executed_actions).mode if cfg.use_controller else 'coarse'
        warming = self.state.steps < cfg.warmup_steps
        self._budget = patches if warming else budget_count(self.keep_fraction(mode), patches)
        history = self._semantic is not None or self._action is not None
        two_stages = self.num_layers >= 2     # one layer has no layer to refine after: the early cut is the final one
        early = budget_count(self.keep_fraction(mode, early=two_stages), patches) if history and not warming \
            else patches
        self._refine = self._budget < early
        self._refine_at = self.refine_layer()     # this step's refine layer (read at every layer)
        self._refined = None
        items = [(self._refine_at, cfg.semantic_rows, 'cr_semantic')]
        if cfg.use_action:
            items.append((self.layer(cfg.action_layer), 'action', 'cr_action'))
        self.last_info.update(mode=mode, budget=self._budget * layout.num_cameras,
                              budget_early=early * layout.num_cameras, warmup=warming,
                              source='history' if history else 'first step')
        plan = StepPlan(attention=self.requests(*items),
                        after_layers=frozenset((self._refine_at,) if self._refine else ()))
        if early < patches:
            remembered = self._remembered()
            noise = self._noise(layout, remembered.device)
            plan.keep_before = VisualMask(self._graphs.run(('early cut', layout, early),
                                                           functools.partial(self._early_cut, layout, early),
                                                           remembered, noise), early * layout.num_cameras)
        return plan

    def _after(self, view: LayerView) -> Optional[VisualMask]:
        if not self._refine or view.layer != self._refine_at:
            return None
        layout = self._layout
        dense = self.view_scores_on_device(view, 'cr_semantic', fill=float('-inf'))
        if dense is None:
            self.last_info['error'] = 'refine-layer attention missing'
            return None
        running = self._semantic if self._semantic is not None else self._prior(layout, dense.device)
        inputs = (dense, running, self._noise(layout, dense.device))
        if self._action is not None:
            inputs += (self._action,)
        # the end of the step reuses the smoothed semantic score
        self._refined, keep = self._graphs.run(('refine cut', layout, self._budget, len(inputs)),
                                               functools.partial(self._refine_cut, layout, self._budget), *inputs)
        return VisualMask(keep, self._budget * layout.num_cameras)

    def _end(self, record: StepRecord) -> None:
        cfg = self.config
        layout = record.layout
        # the refine scored this step's semantic probe already (the record holds the same probe)
        self._semantic = self._refined if self._refined is not None else \
            self._update(self._semantic, record, self._refine_at, 'cr_semantic', layout)
        self._refined = None
        if cfg.use_action:
            self._action = self._update(self._action, record, self.layer(cfg.action_layer), 'cr_action', layout)

    # ---------------------------------------------------------------------------------------- scoring
    # The functions of fixed-shape tensors below (cuts, rank updates) run through ``self._graphs``: replayed as one
    # CUDA graph each where selection graphs are on, called directly elsewhere.

    def _early_cut(self, layout: TokenLayout, budget: int, remembered: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
        """The cut before layer 0: the dense visual mask of ``budget`` patches per camera."""
        return self._select(remembered + noise, layout, budget, remembered.device)

    def _refine_cut(self, layout: TokenLayout, budget: int, dense: torch.Tensor, running: torch.Tensor,
                    noise: torch.Tensor, action: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cut after the refine layer: the smoothed semantic score and the dense visual mask of the kept."""
        ranks, seen = observed_ranks(dense, layout)
        semantic = self._smoothed(running, ranks, seen)
        score = semantic if action is None else torch.maximum(semantic, action)
        # patches that did not run through the layer cannot be kept: they rank below every present one
        score = torch.where(seen, score + noise, _rank_constants(*seen.shape, seen.device)[0])
        return semantic, self._select(score, layout, budget, dense.device)

    def _ranked_update(self, layout: TokenLayout, dense: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
        ranks, seen = observed_ranks(dense, layout)
        return self._smoothed(running, ranks, seen)

    def _update(self, running: Optional[torch.Tensor], record: StepRecord, layer: int, key: str,
                layout: TokenLayout) -> Optional[torch.Tensor]:
        """The running score after this step's probe."""
        dense = self.record_scores_on_device(record, layer, key, fill=float('-inf'))
        if dense is None:
            self.last_info.setdefault('missing', []).append(key)
            return running
        if running is None:
            running = self._prior(layout, dense.device)
        return self._graphs.run(('rank update', layout), functools.partial(self._ranked_update, layout), dense,
                                running)

    def _prior(self, layout: TokenLayout, device: torch.device) -> torch.Tensor:
        """The running score of patches never scored: ``prior`` everywhere, (cameras, patches) float32."""
        return torch.full((layout.num_cameras, layout.patches_per_camera), self.config.prior, device=device)

    def _smoothed(self, running: torch.Tensor, ranks: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Smoothed where scored this step, relaxed towards the prior elsewhere."""
        cfg = self.config
        # NaN where not scored: ``where`` takes ``relaxed`` there
        smoothed = (1.0 - cfg.smoothing) * running + cfg.smoothing * ranks
        relaxed = (1.0 - cfg.forget) * running + cfg.forget * cfg.prior
        return torch.where(seen, smoothed, relaxed)

    def _remembered(self) -> torch.Tensor:
        """The score before layer 0: the better of the remembered semantic and action ranks."""
        cfg = self.config
        parts = [s for s, on in ((self._semantic, cfg.use_semantic), (self._action, cfg.use_action))
                 if s is not None and on]
        if not parts:
            return torch.full_like(self._semantic, cfg.prior)
        return parts[0] if len(parts) == 1 else torch.maximum(parts[0], parts[1])

    def _noise(self, layout: TokenLayout, device: torch.device) -> torch.Tensor:
        """Seeded uniform noise: the tie-break (and, with ``explore``, exploration) of one selection."""
        amplitude = max(self.config.explore, TIE_BREAK)
        draw = torch.empty(layout.num_cameras, layout.patches_per_camera)
        return to_device(draw.uniform_(0.0, amplitude, generator=self.generator), device)

    def _select(self, score: torch.Tensor, layout: TokenLayout, budget: int, device: torch.device) -> torch.Tensor:
        """The dense visual mask of the coverage quota of every cell, then the best remaining scores, per camera."""
        cameras, patches = layout.num_cameras, layout.patches_per_camera
        cells, slots, tiers, offsets = camera_tables(layout.grid_shape, tuple(int(c) for c in self.config.cells),
                                                     self.config.cell_quota, device, cameras)
        key = score.reshape(cameras, patches)
        key = key if key.dtype == torch.float32 else key.to(torch.float32)
        best_first = torch.sort(key, dim=1, descending=True, stable=True).indices
        # cells in order, best patch first (take / index_select: the gathers of indexing, at half its cost)
        by_cell = torch.sort(torch.take(cells, best_first), dim=1, stable=True).indices
        grouped = best_first.gather(1, by_cell)
        covered = torch.zeros_like(key).scatter_(1, grouped.index_select(1, slots), tiers)
        chosen = torch.sort(key + covered, dim=1, descending=True, stable=True).indices[:, :budget]
        return positions_mask(chosen + offsets, layout.num_visual)


def observed_ranks(dense: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per camera, each scored patch's rank among the scored ones in [0, 1] (1 = most attended), NaN elsewhere.

    ``dense`` holds -inf where a patch was not scored. Ranks, not raw attention: a pass over fewer tokens spreads
    its softmax over fewer keys, so raw weights of differently pruned steps do not compare. Also returns the
    scored mask. Device ops only.
    """
    cameras, patches = layout.num_cameras, layout.patches_per_camera
    x = dense.reshape(cameras, patches)
    seen = torch.isfinite(x)
    minus_inf, nan, places = _rank_constants(cameras, patches, x.device)
    ascending = torch.sort(torch.where(seen, x, minus_inf), dim=1, stable=True).indices
    # float32 places and counts: whole numbers, exact below 2**24, so no integer round trips
    rank = torch.empty_like(places).scatter_(1, ascending, places)
    count = seen.sum(dim=1, keepdim=True, dtype=torch.float32)
    fraction = (rank + (count - patches)) / (count - 1).clamp_min_(1)
    return torch.where(seen, fraction, nan), seen


@constant_tensors          # never evicted: selection graphs read it by address
def _rank_constants(cameras: int, patches: int, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """0-d -inf and NaN and every row's places 0..patches-1, (cameras, patches), all float32, on ``device``.

    Built once per shape: :func:`observed_ranks` runs a few times per step (do not modify the tensors).
    """
    places = torch.arange(patches, dtype=torch.float32, device=device).expand(cameras, patches).contiguous()
    return (torch.full((), float('-inf'), device=device), torch.full((), float('nan'), device=device), places)


@constant_tensors          # never evicted: selection graphs read it by address
def cell_tables(grid: tuple[int, int], cells: tuple[int, int], quota: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cell of every patch of a row-major ``grid``, the quota's slots and their bonuses, on ``device``.

    A grid of ``rows x cols`` patches is split into ``cells`` (clipped to the grid) of near-equal size; the slots
    are the first ``quota`` positions of every cell's group when patches are sorted by cell. The j-th slot of a
    cell gets the bonus ``(quota - j) * COVERED_BONUS``, so a budget smaller than the quota covers as many cells
    as it can: every cell's best patch before any cell's second (do not modify the tensors).
    """
    rows, cols = grid
    cell_rows, cell_cols = min(cells[0], rows), min(cells[1], cols)
    r = torch.arange(rows) * cell_rows // rows
    c = torch.arange(cols) * cell_cols // cols
    cell = (r[:, None] * cell_cols + c[None, :]).flatten()
    sizes = torch.bincount(cell, minlength=cell_rows * cell_cols)
    starts = torch.cumsum(sizes, 0) - sizes
    pairs = [(int(s) + j, (quota - j) * COVERED_BONUS) for s, n in zip(starts, sizes)
             for j in range(min(quota, int(n)))]
    slots = torch.as_tensor([slot for slot, _ in pairs], dtype=torch.long)
    tiers = torch.as_tensor([bonus for _, bonus in pairs], dtype=torch.float32)
    return cell.to(device), slots.to(device), tiers.to(device)


@constant_tensors          # never evicted: selection graphs read it by address
def camera_tables(grid: tuple[int, int], cells: tuple[int, int], quota: int, device: torch.device, cameras: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cell_tables` for a selection over all cameras at once, and every camera's first visual position.

    The bonuses repeated for the ``cameras`` rows (cameras, slots); the offsets (cameras, 1). Do not modify them.
    """
    cell, slots, tiers = cell_tables(grid, cells, quota, device)
    offsets = torch.arange(cameras, device=device)[:, None] * (grid[0] * grid[1])
    return cell, slots, tiers.expand(cameras, -1).contiguous(), offsets
