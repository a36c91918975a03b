"""The contract between the prunable decoder runner and a pruning method.

One inference step of a VLA goes like this::

    plan = method.begin_step(context)               # keep set before layer 0, attention requests, K/V reuse
    for layer in range(num_layers):
        run layer on the kept tokens (SDPA; attention rows only where requested)
        new_keep = method.after_layer(layer, view)  # may drop more visual tokens before layer + 1
    method.end_step(record)                         # store what the next step needs (temporal state)

All token indices are positions in the *full, unpruned* sequence (see ``TokenLayout``); kept tokens keep
those positions as RoPE position ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Literal, Optional, Protocol

import numpy as np
import torch

from specprune_ros.core.token_layout import TokenLayout


class PlanError(ValueError):
    """A pruning plan that the runner refuses (it would drop non-visual tokens, name unknown tokens, ...)."""


# Which query rows an attention summary averages over:
#   'text'    - the task-instruction tokens (SpecPrune task attention, VLA-Pruner text-rows variant)
#   'action'  - the action query tokens (VLA-Pruner action score)
#   'text_action' - the instruction and the action query tokens together (SpecPrune's task_rows option)
#   'prefill' - every non-action token (VLA-Pruner semantic score)
#   'last'    - the last token of the sequence (FastV)
#   'all'     - every query row
QueryRows = Literal['text', 'action', 'text_action', 'prefill', 'last', 'all']


@dataclass(frozen=True)
class AttentionRequest:
    """Ask the runner for the head-averaged attention of some query rows at one layer."""

    layer: int
    rows: QueryRows
    name: str = ''  # key of the summary in LayerView.attention / StepRecord.attention; defaults to rows

    @property
    def key(self) -> str:
        return self.name or self.rows


@dataclass(frozen=True)
class VisualMask:
    """A keep set as a dense mask over the layout's visual tokens (camera order), ``count`` of them set.

    What a method that selects on the device may return from ``after_layer`` (or plan as ``keep_before``) instead
    of sequence indices: the runner checks it on the device (a subset of the visual tokens still kept, exactly
    ``count`` set) and takes the kept tokens from it without sorting. ``count`` is a host integer, so no size waits
    for the device. The runner reads ``mask`` for the rest of the pass: do not modify it in place.
    """

    mask: torch.Tensor                               # (num_visual,) bool, cameras in order (TokenLayout.visual_indices)
    count: int


@dataclass
class StepContext:
    """What a method may look at before the forward pass of one step."""

    layout: TokenLayout
    step_index: Optional[int]                        # steps since the last reset (None: not known)
    visual_embeddings: torch.Tensor                  # (num_visual, d) decoder inputs of the visual tokens
    images: Optional[list[np.ndarray]] = None        # raw camera frames (H, W, 3) uint8, in camera order
    patch_size: int = 0                              # pixels per patch side in ``images`` (0 = unknown)
    executed_actions: Optional[np.ndarray] = None    # (k, action_dim) recently executed actions, oldest first
    instruction: str = ''
    num_layers: int = 0                              # decoder depth (the runner fills it in before begin_step)
    timestamp: Optional[float] = None                # the observation's time, seconds (None: unknown)

    def __post_init__(self) -> None:
        """Executed actions with a NaN or Inf are not a motion a method can read: those rows are left out."""
        actions = self.executed_actions
        if actions is None:
            return
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim == 2 and actions.size and not np.isfinite(actions).all():
            finite = actions[np.isfinite(actions).all(axis=1)]
            self.executed_actions = finite if len(finite) else None


@dataclass
class KVStore:
    """Per-layer keys/values of every token of the full sequence from earlier steps (VLA-Cache style reuse).

    ``keys[layer]`` / ``values[layer]``: (num_kv_heads, num_tokens, head_dim), RoPE already applied with the
    token's original position; ``valid[layer]``: (num_tokens,) bool, True where a cached entry exists.
    """

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    valid: dict[int, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.keys.clear()
        self.values.clear()
        self.valid.clear()


@dataclass
class StepPlan:
    """A method's instructions for one step."""

    keep_before: Optional[torch.Tensor | VisualMask] = None   # visual indices (or a mask) kept from layer 0 on
    # (None = all)
    attention: list[AttentionRequest] = field(default_factory=list)
    reuse_kv: Optional[torch.Tensor | VisualMask] = None   # visual tokens whose K/V come from ``kv_store`` (not
    # recomputed): indices (those kept and cached at every layer are served), or a mask that names such tokens only
    kv_store: Optional[KVStore] = None               # where K/V are read from, and written to for computed tokens
    after_layers: Optional[frozenset[int]] = None    # the layers whose ``after_layer`` hook this step needs (None:
    # every layer); the runner calls no hook elsewhere (a deep decoder's hooks are most of a method's fixed cost)


@dataclass
class LayerView:
    """What a method sees after one decoder layer ran."""

    layer: int
    kept: torch.Tensor                               # (n,) original indices of the tokens that ran through this layer
    key_indices: torch.Tensor                        # (n_k,) original indices of the keys (kept + reused)
    hidden: torch.Tensor                             # (n, d) this layer's output for the kept tokens (batch 0)
    attention: Mapping[str, torch.Tensor]            # request key -> (n_k,) mean over heads and rows (the
    # runner scores it when first read)


@dataclass
class StepRecord:
    """What one step did: the audit trail every benchmark and diagnostic reads."""

    layout: TokenLayout
    kept_per_layer: list[torch.Tensor]               # original indices that entered each layer
    attention: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # layer -> key -> (key_indices, weights)
    reused: Optional[torch.Tensor]                   # visual indices served from the K/V store
    model_seconds: float                             # decoder compute (layers, masks, gathers)
    selection_seconds: float                         # time spent inside the method's hooks (scoring, top-k)
    flops: float                                     # analytical decoder FLOPs of this step
    flops_full: float                                # the same for the unpruned sequence
    probe_seconds: float = 0.0                       # computing the requested attention rows (method overhead)
    attention_kernels: list[str] = field(default_factory=list)   # per layer: 'sdpa', 'products', 'shared' or
    # 'compiled' ('shared': two products whose probabilities also answered the layer's probes)
    info: dict = field(default_factory=dict)         # method-specific facts (controller mode, set sizes, ...)

    @property
    def visual_kept_per_layer(self) -> list[int]:
        if not self.kept_per_layer:
            return []
        visual = self.layout.visual_indices().to(self.kept_per_layer[0].device)
        return torch.stack([torch.isin(k, visual).sum() for k in self.kept_per_layer]).tolist()

    @property
    def mean_visual_kept(self) -> float:
        counts = self.visual_kept_per_layer
        return float(sum(counts) / max(len(counts), 1))

    def add_stage(self, first: str, stage: str, flops: float, flops_full: float, seconds: float) -> None:
        """Count a stage that runs after the recorded pass (a decode, an action expert) into the step's totals.

        The recorded pass's own figures stay in ``info`` as ``<first>_flops``, ``<first>_flops_full`` and
        ``<first>_model_seconds``; the stage's as ``<stage>_flops`` and ``<stage>_flops_full``.
        """
        self.info.update({f'{first}_flops': self.flops, f'{first}_flops_full': self.flops_full,
                          f'{stage}_flops': flops, f'{stage}_flops_full': flops_full,
                          f'{first}_model_seconds': self.model_seconds})
        self.flops += flops
        self.flops_full += flops_full
        self.model_seconds += seconds


class PruningMethod(Protocol):
    """Interface every pruning method implements (see ``specprune_ros.pruning``)."""

    name: str

    def reset(self) -> None:
        """Forget all temporal state (new episode, new instruction, long input gap)."""

    def begin_step(self, context: StepContext) -> StepPlan:
        ...

    def after_layer(self, view: LayerView) -> Optional[torch.Tensor | VisualMask]:
        """Return the visual indices to keep from the next layer on (a subset of the kept ones), or None.

        A :class:`VisualMask` of the visual tokens to keep says the same.

        Called after the layers the step's plan names in ``after_layers`` (every layer but the last if None).
        """

    def end_step(self, record: StepRecord) -> None:
        ...
