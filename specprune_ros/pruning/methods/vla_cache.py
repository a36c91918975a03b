"""``vla_cache``: VLA-Cache-style K/V reuse for static, task-irrelevant visual tokens (no token is dropped).

Per step and camera (defaults from the public VLA-Cache code for OpenVLA-OFT, scaled to fractions of the patches):

1. static patches: raw-pixel cosine similarity with the previous step's frame >= 0.996, at most the
   ``max_static_fraction`` (150/256) most similar ones;
2. minus the task-relevant ones: the top ``task_relevant_fraction`` (100/256) of the previous step's text-row
   attention at ``attention_layer`` (VLA-Cache: layer 15 of 32; default here ``round(15 * L / 32)``, 3 for L = 6);
3. minus tokens without a cached K/V at every layer, and (if ``max_consecutive_reuse`` > 0) tokens already served
   from the cache that many steps in a row (a freshness bound; VLA-Cache has none, so the default 0 = unlimited).

The rest go to ``plan.reuse_kv``: the runner does not recompute them and reads their K/V from ``self.kv_store``
(it writes the computed tokens' K/V there every step). The store lives in the method and is cleared on reset.
Not implemented: VLA-Cache's layer-adaptive reuse ratio (attention-entropy schedule over layers).

Selection runs on the device of the decoder (the task-relevant top-k, the cache validity, the reuse streaks); the
static-patch test compares raw pixels on the host, where the frames are, every camera at once and each frame cut
into patches once. Everything but the static test depends on earlier steps only: the tokens the cache may serve
(cached at every layer, not task-relevant, under the streak bound) are worked out at the end of a step and copied
back while the device finishes it, so that the next step intersects them with its static patches on the host and
knows the reused count without waiting for the device.

Info keys: ``static``, ``task_relevant``, ``reused`` (counts; ``task_relevant`` a device tensor, read it after the
step), ``cache_valid`` (whether a usable cache existed; a device flag once the store holds every layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from specprune_ros.core.dataclass_mapping import check_number
from specprune_ros.core.host_copies import to_device
from specprune_ros.core.step_types import KVStore, StepContext, StepPlan, StepRecord, VisualMask
from specprune_ros.core.token_layout import TokenLayout, visual_indices_on
from specprune_ros.pruning.base import BaseConfig, PruningMethodBase, split_per_camera
from specprune_ros.pruning.change_detection import PatchVectorCache, same_frame_sizes, static_masks
from specprune_ros.pruning.deferred_counts import DeferredCounts
from specprune_ros.pruning.methods.config_checks import FRACTION_OF_PATCHES, CheckedConfig, fraction
from specprune_ros.pruning.scoring import budget_count, topk_per_camera_on_device


@dataclass
class VLACacheConfig(CheckedConfig, BaseConfig):
    similarity_threshold: float = 0.996
    max_static_fraction: float = 150 / 256      # cap on static patches per camera
    task_relevant_fraction: float = 100 / 256   # top text-attention patches per camera never reused
    attention_layer: Optional[int] = None       # None = round(15 * num_layers / 32)
    max_consecutive_reuse: int = 0              # > 0: recompute a token after this many reuses in a row

    def check(self) -> None:
        check_number('similarity_threshold', self.similarity_threshold, -1.0, 1.0, note='a cosine similarity')
        fraction('max_static_fraction', self.max_static_fraction, FRACTION_OF_PATCHES)
        fraction('task_relevant_fraction', self.task_relevant_fraction, FRACTION_OF_PATCHES)
        if self.attention_layer is not None:
            check_number('attention_layer', self.attention_layer, integer=True)
        check_number('max_consecutive_reuse', self.max_consecutive_reuse, 0, integer=True, note='0 = unlimited')


class VLACache(PruningMethodBase):
    name = 'vla_cache'

    def __init__(self, config: VLACacheConfig | None = None, seed: int = 0) -> None:
        super().__init__(config or VLACacheConfig(), seed, frame_history=2)
        self.config: VLACacheConfig
        self.kv_store = KVStore()
        self._streak: Optional[torch.Tensor] = None
        self._patches = PatchVectorCache()
        self._servable = DeferredCounts()          # the tokens the cache may serve at the next step (see _end)
        self._carried: Optional[_Carried] = None    # what else the next step takes over from this one

    def _reset_method(self) -> None:
        self.kv_store.clear()
        self._streak = None
        self._patches.clear()
        self._servable.clear()
        self._carried = None

    def _attention_layer(self) -> int:
        if self.config.attention_layer is not None:
            return self.layer(self.config.attention_layer)
        return min(int(math.floor(15 * self.num_layers / 32 + 0.5)), self.num_layers - 1)

    def _cache_valid(self, layout: TokenLayout, device: torch.device) -> Optional[torch.Tensor]:
        """Dense visual mask of tokens with a cached K/V at every layer (None: no usable cache at all)."""
        store = self.kv_store
        if len(store.valid) < self.num_layers:
            return None
        valid = [store.valid.get(layer) for layer in range(self.num_layers)]
        if any(v is None or v.numel() != layout.num_tokens for v in valid):
            return None
        every = torch.stack(valid).to(device=device, dtype=torch.bool).all(dim=0)
        return every[visual_indices_on(layout, device)]

    def _begin(self, context: StepContext) -> StepPlan:
        cfg = self.config
        layout = context.layout
        device = context.visual_embeddings.device
        if self._streak is None or self._streak.numel() != layout.num_visual or self._streak.device != device:
            self._streak = torch.zeros(layout.num_visual, dtype=torch.long, device=device)
        self.state.push_frames(context.images)
        requests = self.requests((self._attention_layer(), 'text', 'text'))
        have_images = context.images is not None and self.state.num_frames >= 2 and same_frame_sizes(
            self.state.frame_entry(0), self.state.frame_entry(1), layout.num_cameras)   # else: no reuse this step
        carried, self._carried = self._carried, None
        if carried is not None and (carried.layout, carried.device) != (layout, device):
            carried = None                  # a new layout: its tokens were never cached
        servable = self._servable.get('servable') if carried is not None else None
        self.last_info.update(cache_valid=False if carried is None else carried.cache_valid,
                              attention_layer=self._attention_layer())
        reuse_kv, reused = None, 0
        if have_images and servable is not None:
            p = layout.patches_per_camera
            cap = budget_count(cfg.max_static_fraction, p, minimum=0)
            vectors = [self._patches.get(self.state.frame_entry(back), self.state.frames, layout.num_cameras,
                                         layout.grid_shape, context.patch_size) for back in (0, 1)]
            static_np, _ = static_masks(vectors[0], vectors[1], layout.num_cameras, cfg.similarity_threshold, cap)
            reuse_np = static_np.reshape(-1) & np.asarray(servable, dtype=bool)
            reused = int(reuse_np.sum())
            reuse = to_device(torch.from_numpy(reuse_np), device)
            self.last_info.update(static=int(static_np.sum()), task_relevant=carried.task_relevant)
            self._streak = torch.where(reuse, self._streak + 1, 0)
            if reused:                  # every one cached at every layer: the runner serves them all
                reuse_kv = VisualMask(reuse, reused)
        else:
            self._streak = torch.zeros_like(self._streak)
        self.last_info['reused'] = reused
        return StepPlan(attention=requests, reuse_kv=reuse_kv, kv_store=self.kv_store)

    def _end(self, record: StepRecord) -> None:
        dense = self.record_scores_on_device(record, self._attention_layer(), 'text', fill=float('-inf'))
        if dense is not None:
            # Reused tokens are still keys (key_indices = kept + reused), so every visual token gets a score.
            self.state.set_task_attention(split_per_camera(dense, record.layout))
        if self._streak is not None and self._layout is not None:
            self._carry(self._layout, self._streak.device)      # the layout the next step's hooks will see

    def _carry(self, layout: TokenLayout, device: torch.device) -> None:
        """The tokens the cache may serve at the next step, copied back while the device finishes this one.

        Cached at every layer (this step's store), not among the top ``task_relevant_fraction`` of this step's task
        attention, and under the streak bound: exactly what the next step would work out on the device itself.
        """
        cfg = self.config
        cache_ok = self._cache_valid(layout, device)
        if cache_ok is None:
            return
        servable, relevant_count = cache_ok, 0
        attention = self.state.task_attention
        if attention is not None and len(attention) == layout.num_cameras:
            dense = torch.cat(attention).to(device)
            k = budget_count(cfg.task_relevant_fraction, layout.patches_per_camera, minimum=0)
            relevant = topk_per_camera_on_device(dense, k, layout, candidates=torch.isfinite(dense))
            servable = servable & ~relevant
            relevant_count = relevant.sum()
        if cfg.max_consecutive_reuse > 0:
            servable = servable & (self._streak < cfg.max_consecutive_reuse)
        self._servable.put('servable', servable)
        self._carried = _Carried(layout, device, cache_ok.any(), relevant_count)


@dataclass
class _Carried:
    """What a step of VLA-Cache hands the next besides the servable tokens (device flags and counts: read later)."""

    layout: TokenLayout
    device: torch.device
    cache_valid: torch.Tensor
    task_relevant: torch.Tensor | int
