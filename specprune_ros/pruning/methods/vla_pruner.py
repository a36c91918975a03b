"""``vla_pruner``: VLA-Pruner's dual-level importance with Combine-then-Filter, pruning once before layer K.

Per step:

1. semantic score ``S_vl``: head-averaged attention of the ``semantic_rows`` query rows ('prefill' = every non-action
   token, the paper's default; 'last' = FastV; 'text' = task text rows) to each visual token, at layer K-1;
2. action score ``S_hat = sum_{i=1..w} gamma^i S_act(t-i)`` normalised, from earlier steps' attention of the action
   query rows at ``action_layer`` (default the last layer; the paper's code uses layer 15 of 32). The newest step is
   weighted most (paper; the public code applies the weights in reverse order). Tokens pruned before
   ``action_layer`` in an earlier step got no attention there and count as 0;
3. Combine-then-Filter per camera: ``C = TopM(S_vl) u TopM(S_hat)``; if ``|C| > M`` greedy max-min diversity on
   the layer-0 visual embeddings picks ``M`` of ``C``;
4. warm-up: the first ``w`` steps of an episode run unpruned (the window must be full), as in the public code.

K follows the depth: the paper prunes before layer K = 3 of 32 (layers 0-2 full); ``prune_layer=None`` (default)
scales that, ``round(3 * L / 32)``, but never below 2: on the 6- and 8-layer decoders scaling gives K <= 1, which
leaves no layer to score on (K = 0) or scores on the first layer, whose attention is known to be diffuse (K = 1).
So the 6-layer reference VLA gets **K = 2** (score on layer 1, layers 2-5 run pruned) and a 32-layer one K = 3.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from specprune_ros.core.constant_tensors import constant_tensors
from specprune_ros.core.dataclass_mapping import check_number
from specprune_ros.core.step_types import LayerView, StepContext, StepPlan, StepRecord, VisualMask
from specprune_ros.pruning.base import BaseConfig, PruningMethodBase
from specprune_ros.pruning.budget_knob import KeepRatioKnob
from specprune_ros.pruning.diversity import greedy_max_min, greedy_max_min_groups
from specprune_ros.pruning.methods.config_checks import FRACTION_OF_TOKENS, CheckedConfig, fraction
from specprune_ros.pruning.scoring import (budget_count, camera_slices, decay_weights_cached,
                                           divide_rows_by_positive_sum, mask_to_sequence, normalise,
                                           positions_mask, stable_topk, stable_topk_rows_on_device)
from specprune_ros.pruning.selection_graphs import SelectionGraphs


PAPER_PRUNE_LAYER, PAPER_DEPTH = 3, 32   # the paper prunes before layer 3 of Llama-2 7B's 32
PAPER_PRUNE_LAYER_MIN = 2                # scaled K never below this (see the module docstring)


@dataclass
class VLAPrunerConfig(CheckedConfig, BaseConfig):
    """VLA-Pruner knobs.

    Paper vs public code: the temporal weights favour the newest step (paper; the code's are reversed); K = the paper's
    3 of 32 scaled to the depth, at least 2; the action layer defaults to the last layer (code: 15 of 32); warm-up and
    per-camera selection as in the paper.
    """

    keep_ratio: float = 0.5                 # retention budget per camera (paper: 0.5, 0.25, 0.125)
    prune_layer: Optional[int] = None       # K: layers < K see all tokens; semantic score from layer K-1;
    # None = the paper's 3 of 32 scaled to the depth, at least 2
    semantic_rows: Literal['prefill', 'last', 'text'] = 'prefill'
    action_layer: int = -1                  # layer whose action-row attention feeds the temporal score
    window: int = 3                         # w
    gamma: float = 0.8                      # decay
    warmup: bool = True                     # no pruning until w earlier steps are held
    use_semantic: bool = True               # ablation: False = action-only
    use_action: bool = True                 # ablation: False = prefill-only (no warm-up needed then)
    combine: Literal['union', 'sum'] = 'union'   # 'union' = Combine-then-Filter; 'sum' = the score-fusion ablation
    fusion_weight: float = 0.5              # 'sum': weight of the semantic score (normalised scores)
    use_diversity: bool = True              # ablation: False = fill |C| > M by the (normalised) score sum instead
    per_camera: bool = True                 # select per camera (paper, for OpenVLA-OFT)

    def check(self) -> None:
        fraction('keep_ratio', self.keep_ratio, FRACTION_OF_TOKENS)
        if self.prune_layer is not None:
            check_number('prune_layer', self.prune_layer, 1, integer=True, note='layer K - 1 scores the tokens')
        check_number('action_layer', self.action_layer, integer=True)
        check_number('window', self.window, 1 if self.use_action else 0, integer=True,
                     note='earlier steps; use_action needs one' if self.use_action else 'earlier steps')
        if not (self.use_semantic or self.use_action):
            raise ValueError('use_semantic, use_action: both false; vla_pruner needs one of them')
        fraction('gamma', self.gamma, 'a decay: the newest step weighs most', open_low=True)
        fraction('fusion_weight', self.fusion_weight, 'the weight of the semantic score')


class VLAPruner(KeepRatioKnob, PruningMethodBase):
    name = 'vla_pruner'

    def __init__(self, config: VLAPrunerConfig | None = None, seed: int = 0) -> None:
        cfg = config or VLAPrunerConfig()
        super().__init__(cfg, seed, frame_history=1, attention_window=cfg.window)
        self.config: VLAPrunerConfig
        self._prune_now = False
        self._score_at = -1                  # the layer after which this step selects (-1: none)
        self._graphs = SelectionGraphs()     # the device selection as CUDA graphs, when switched on

    def prune_layer(self) -> int:
        """K for the current decoder depth (the configured one, or the paper's scaled)."""
        if self.config.prune_layer is not None:
            return self.config.prune_layer
        return max(PAPER_PRUNE_LAYER_MIN, round(PAPER_PRUNE_LAYER * self.num_layers / PAPER_DEPTH))

    def _score_layer(self) -> int:
        return self.layer(max(self.prune_layer(), 1) - 1)

    def _begin(self, context: StepContext) -> StepPlan:
        cfg = self.config
        if self.prune_layer() >= self.num_layers:
            raise ValueError(f'prune_layer {self.prune_layer()} >= {self.num_layers} layers')
        warming = cfg.use_action and cfg.warmup and not self.state.window_full
        self._prune_now = not warming
        self._score_at = self._score_layer() if self._prune_now else -1
        items = []
        if cfg.use_semantic and self._prune_now:
            items.append((self._score_layer(), cfg.semantic_rows, 'vlap_semantic'))
        if cfg.use_action:
            items.append((self.layer(cfg.action_layer), 'action', 'vlap_action'))
        self.last_info.update(warmup=warming, window=len(self.state.action_attention),
                              prune_layer=self.prune_layer(), action_layer=self.layer(cfg.action_layer))
        return StepPlan(attention=self.requests(*items),
                        after_layers=frozenset((self._score_at,) if self._score_at >= 0 else ()))

    def _after(self, view: LayerView) -> Optional[torch.Tensor | VisualMask]:
        cfg = self.config
        if view.layer != self._score_at:
            return None
        layout = self._layout
        if view.kept.numel() == layout.num_tokens:
            return self._select_on_device(view)
        present = self.kept_visual(view)
        sem = self.view_scores(view, 'vlap_semantic', fill=0.0) if cfg.use_semantic else None
        if cfg.use_semantic and sem is None:
            self.last_info['error'] = 'semantic attention missing'
            return None
        act = self._action_score(None)
        emb = self._context.visual_embeddings.detach().reshape(layout.num_visual, -1)
        mask = torch.zeros(layout.num_visual, dtype=torch.bool)
        sizes = []
        groups = camera_slices(layout) if cfg.per_camera else [slice(0, layout.num_visual)]
        for sl in groups:
            m = budget_count(self.effective_keep_ratio(), sl.stop - sl.start)
            ok = present[sl]
            s_sem = None if sem is None else normalise(sem[sl])
            s_act = None if act is None else normalise(act[sl])
            if s_act is not None and not bool(s_act.any()):
                s_act = None                  # no action history yet (warm-up off): TopM of zeros would be arbitrary
            if s_sem is None and s_act is None:
                s_sem = torch.zeros(sl.stop - sl.start)
            if cfg.combine == 'sum' and s_sem is not None and s_act is not None:
                fused = cfg.fusion_weight * s_sem + (1 - cfg.fusion_weight) * s_act
                chosen = stable_topk(fused, m, ok)
                sizes.append(int(chosen.numel()))
            else:
                cand = torch.zeros(sl.stop - sl.start, dtype=torch.bool)
                for s in (s_sem, s_act):
                    if s is not None:
                        cand[stable_topk(s, m, ok)] = True
                sizes.append(int(cand.sum()))
                cidx = torch.nonzero(cand).flatten()
                if cidx.numel() <= m:
                    chosen = cidx
                elif cfg.use_diversity:
                    chosen = cidx[greedy_max_min(emb[sl][cidx], m)]
                else:
                    total = sum(s for s in (s_sem, s_act) if s is not None)
                    chosen = stable_topk(total, m, cand)
            mask[sl.start + chosen] = True
        self.last_info.update(candidates=sizes, budget=int(mask.sum()))
        return mask_to_sequence(mask, layout)

    def _action_score(self, device: Optional[torch.device]) -> Optional[torch.Tensor]:
        """The decayed action score as a dense visual vector (zeros without history; None if not used)."""
        if not self.config.use_action:
            return None
        return self._decayed_action(*self._action_history(), device=device)

    def _action_history(self) -> list[torch.Tensor]:
        """The window's action attention, every camera's part of every step, oldest step first."""
        history = list(self.state.action_attention)[-self.config.window:]
        return [part for entry in history for part in entry]

    def _decayed_action(self, *parts: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
        """:meth:`_action_score` of the history ``parts`` (zeros without any).

        Every camera's score in one pass: each camera's part equals ``decayed_action_score`` of that camera.
        """
        layout = self._layout
        if not parts:
            return torch.zeros(layout.num_visual, device=device)
        # every entry's cameras in one concatenation: the rows of the stacked per-step scores
        steps = len(parts) // layout.num_cameras
        stacked = torch.cat(parts).view(steps, -1).to(torch.float32).clamp_min_(0.0)
        weights = decay_weights_cached(steps, self.config.gamma, stacked.device)
        total = (weights[:, None] * stacked).sum(0)
        return divide_rows_by_positive_sum(total.view(layout.num_cameras, -1)).view(-1)

    def _select_on_device(self, view: LayerView) -> Optional[VisualMask]:
        """Combine-then-Filter when every visual token ran through the scoring layer: nothing is read back.

        Every candidate set then holds at least the budget, so each camera keeps exactly its budget and the kept
        tokens equal the host selection's; the candidate counts in ``last_info`` stay a device tensor. Every camera
        is selected in the same operations, as rows of a (cameras, patches) view, as one CUDA graph per budget and
        history length where selection graphs are on.
        """
        cfg = self.config
        layout = self._layout
        sem = self.view_scores_on_device(view, 'vlap_semantic', fill=0.0) if cfg.use_semantic else None
        if cfg.use_semantic and sem is None:
            self.last_info['error'] = 'semantic attention missing'
            return None
        emb = self._context.visual_embeddings.detach().reshape(layout.num_visual, -1)
        groups = layout.num_cameras if cfg.per_camera else 1
        m = budget_count(self.effective_keep_ratio(), layout.num_visual // groups)
        history = self._action_history() if cfg.use_action else []
        inputs = (emb,) + ((sem,) if sem is not None else ()) + tuple(history)
        key = ('combine then filter', layout, m, sem is not None, len(history))
        sizes, kept = self._graphs.run(key, functools.partial(self._combine_then_filter, m, sem is not None),
                                       *inputs)
        self.last_info.update(candidates=sizes, budget=groups * m)
        return VisualMask(kept, groups * m)

    def _combine_then_filter(self, m: int, semantic: bool, emb: torch.Tensor,
                             *scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each camera's ``m`` tokens: the candidate counts and the dense visual mask of the kept tokens.

        From the layer-0 embeddings ``emb``, the semantic score (the first of ``scores`` if ``semantic``) and the
        action history (the rest of ``scores``).
        """
        cfg = self.config
        layout = self._layout
        device = emb.device
        groups = layout.num_cameras if cfg.per_camera else 1
        n = layout.num_visual // groups
        sem = scores[0] if semantic else None
        act = self._decayed_action(*scores[1 if semantic else 0:], device=device) if cfg.use_action else None
        s_sem = None if sem is None else divide_rows_by_positive_sum(sem.view(groups, n).clamp_min(0.0))
        s_act = None if act is None else divide_rows_by_positive_sum(act.view(groups, n).clamp_min(0.0))
        # without action history (all zeros) the action score takes no part, as in the host selection
        has_act = None if s_act is None else s_act.any(dim=1, keepdim=True)
        by_sem = stable_topk_rows_on_device(torch.zeros(groups, n, device=device) if s_sem is None else s_sem, m)
        if cfg.combine == 'sum' and s_sem is not None and s_act is not None:
            fused = cfg.fusion_weight * s_sem + (1 - cfg.fusion_weight) * s_act
            chosen = torch.where(has_act, stable_topk_rows_on_device(fused, m), by_sem)
            sizes = torch.full((groups,), m, device=device)
        else:
            by_act = by_sem if s_act is None else torch.where(has_act, stable_topk_rows_on_device(s_act, m), by_sem)
            cand = torch.zeros(groups, n, dtype=torch.bool, device=device)
            if s_sem is not None:
                cand.scatter_(1, by_sem, True)
            cand.scatter_(1, by_act, True)
            sizes = cand.sum(dim=1)
            if cfg.use_diversity:
                chosen = greedy_max_min_groups(emb.view(groups, n, -1), m, candidates=cand)
            else:
                parts = [s for s in (s_sem, s_act) if s is not None]
                total = parts[0] if len(parts) == 1 else torch.where(has_act, parts[0] + parts[1], parts[0])
                chosen = stable_topk_rows_on_device(total, m, cand)
        return sizes, positions_mask(chosen + _group_starts(groups, n, device), layout.num_visual)

    def _end(self, record: StepRecord) -> None:
        if not self.config.use_action:
            return
        layer = self.layer(self.config.action_layer)
        act = self.record_scores_on_device(record, layer, 'vlap_action', fill=0.0)
        if act is None:
            self.last_info['action_attention'] = 'missing'
            return
        # the state keeps its own copy of every camera's part
        self.state.push_action_attention(act.view(record.layout.num_cameras, -1).unbind(0))


@constant_tensors          # never evicted: selection graphs read it by address
def _group_starts(groups: int, n: int, device: torch.device) -> torch.Tensor:
    """(groups, 1) dense visual position of every group's first token."""
    return torch.arange(0, groups * n, n, device=device).view(groups, 1)
