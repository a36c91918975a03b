"""Run a second stack of decoder layers (an action expert) against the cached keys/values of a pruned prefix.

Flow-matching VLAs such as pi0 split one transformer into two weight sets that share attention per layer: the
vision-language prefix runs through the large decoder (here :class:`~specprune_ros.core.executor.
PrunableDecoderRunner`, with pruning), and the action tokens run through a smaller "expert" whose layer ``l``
attends to the prefix's keys/values of layer ``l`` plus its own. The prefix does not attend to the action tokens, so
its keys/values are computed once (``return_cache=True``) and every denoising step of the expert reads them:
a visual token pruned before layer ``l`` has no key at layer ``l`` for any step, so the saving counts once per step.

:func:`run_expert` does one such expert pass and leaves the cache unchanged. :class:`ExpertActionRows` lets pruning
methods that ask for the attention of the 'action' query rows use the expert's action queries: the method sees a
layout that extends the prefix with the expert's tokens, the runner sees the prefix only; the expert's attention
over the prefix keys reaches the method's layer views during the pass (an :class:`ExpertProbe`: one expert pass
run alongside the prefix) and the step record before the method's ``end_step``.
"""
from __future__ import annotations

import dataclasses
import time
from collections import ChainMap
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from specprune_ros.core.executor import DecoderCache
from specprune_ros.core.step_types import (AttentionRequest, KVStore, LayerView, PruningMethod, StepContext, StepPlan,
                                           StepRecord)
from specprune_ros.core.token_layout import TokenLayout


@dataclass
class ExpertResult:
    """Output of :func:`run_expert`: final-normed hidden states of the expert's tokens and what they attended to."""

    hidden: torch.Tensor                                     # (B, t, d_expert)
    attention: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (prefix key positions, mean attention on them)
    key_counts: list[int]                                    # keys per layer (prefix keys + the expert's own)


def apply_norm(norm: nn.Module, hidden: torch.Tensor, cond: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A plain RMSNorm (``cond`` None) returns its output; a conditioned one (adaRMS) returns (output, gate)."""
    if cond is None:
        return norm(hidden), None
    return norm(hidden, cond)


def gated(residual: torch.Tensor, update: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    return residual + update if gate is None else residual + update * gate


def expert_mask(self_mask: torch.Tensor, num_prefix_keys: int) -> torch.Tensor:
    """SDPA mask (1, 1, t, n + t): every expert token sees every prefix key, and its own tokens as ``self_mask``."""
    t = self_mask.shape[0]
    prefix = torch.ones(t, num_prefix_keys, dtype=torch.bool, device=self_mask.device)
    return torch.cat([prefix, self_mask.to(torch.bool)], dim=1).view(1, 1, t, -1)


def expert_layer(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 prefix_keys: torch.Tensor, prefix_values: torch.Tensor, self_mask: torch.Tensor,
                 cond: Optional[torch.Tensor], rows: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One expert layer over (B, t, d_e) ``hidden`` against prefix keys/values (B or 1, kv_heads, n, head_dim).

    (new hidden, the mean attention of ``rows`` over the n prefix keys, or None when ``rows`` is None).
    """
    attn = layer.self_attn
    batch, t, _ = hidden.shape
    x, gate = apply_norm(layer.input_layernorm, hidden, cond)
    q = attn.q_proj(x).view(batch, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, t, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch, t, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    n = prefix_keys.shape[2]
    keys = torch.cat([prefix_keys.to(k.dtype).expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix_values.to(v.dtype).expand(batch, -1, -1, -1), v], dim=2)
    mask = expert_mask(self_mask, n)
    groups = q.shape[1] // keys.shape[1]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=groups > 1)
    hidden = gated(hidden, attn.o_proj(out.transpose(1, 2).reshape(batch, t, -1)), gate)
    x, gate = apply_norm(layer.post_attention_layernorm, hidden, cond)
    hidden = gated(hidden, layer.mlp(x), gate)
    if rows is None:
        return hidden, None
    scores = torch.matmul(q[:, :, rows].float(), keys.float().repeat_interleave(groups, dim=1).transpose(-1, -2))
    scores = (scores * attn.scaling).masked_fill(~mask[:, :, rows], torch.finfo(torch.float32).min)
    return hidden, scores.softmax(dim=-1).mean(dim=(0, 1, 2))[:n]


@torch.no_grad()
def run_expert(layers: Sequence[nn.Module], norm: nn.Module, rotary_emb: nn.Module, embeddings: torch.Tensor,
               positions: torch.Tensor, cache: DecoderCache, self_mask: torch.Tensor,
               cond: Optional[torch.Tensor] = None, attention_layers: Sequence[int] = (),
               attention_rows: Optional[torch.Tensor] = None) -> ExpertResult:
    """Run ``embeddings`` (B, t, d_expert) at RoPE ``positions`` through the expert ``layers`` against ``cache``.

    ``layers``: transformers decoder-layer modules (input/post-attention norms, ``self_attn`` projections, ``mlp``).

    ``self_mask``: (t, t) bool, which expert tokens see which. ``cond``: the adaRMS condition (B, c) for
    conditioned norms, None for plain ones. ``attention_layers`` / ``attention_rows``: layers at which to return
    the head- and row-averaged attention of those rows (default all) over the prefix keys.
    """
    if len(layers) != len(cache):
        raise ValueError(f'the cache holds {len(cache)} layers; the expert has {len(layers)}')
    t = embeddings.shape[1]
    positions = torch.as_tensor(positions, dtype=torch.long, device=embeddings.device).view(1, -1)
    rows = torch.arange(t, device=embeddings.device) if attention_rows is None else attention_rows
    wanted = set(int(layer) for layer in attention_layers)
    hidden = embeddings
    cos, sin = rotary_emb(hidden, positions)
    summaries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    counts: list[int] = []
    for index, layer in enumerate(layers):
        hidden, weights = expert_layer(layer, hidden, cos, sin, cache.keys[index], cache.values[index], self_mask,
                                       cond, rows if index in wanted else None)
        counts.append(int(cache.keys[index].shape[2]) + t)
        if weights is not None:
            summaries[index] = (cache.positions[index], weights)
    hidden, _ = apply_norm(norm, hidden, cond)
    return ExpertResult(hidden=hidden, attention=summaries, key_counts=counts)


@dataclass
class ExpertProbe:
    """What :class:`ExpertActionRows` needs to give a method the expert's action rows during the prefix pass.

    The prefix decoder (its layers recompute the keys/values of the kept tokens at the probed layers), the prefix
    embeddings, and one expert pass's inputs (e.g. the first denoising step's).
    """

    decoder: nn.Module                               # the runner's decoder (``layers``, ``rotary_emb``)
    embeddings: torch.Tensor                         # (1, N, d) the runner's input
    expert_layers: Sequence[nn.Module]
    expert_rotary_emb: nn.Module
    suffix: torch.Tensor                             # (1, t, d_e) expert input
    positions: torch.Tensor                          # (t,) its RoPE positions
    self_mask: torch.Tensor                          # (t, t)
    rows: torch.Tensor                               # expert rows that are action queries
    cond: Optional[torch.Tensor] = None


def extended_layout(prefix: TokenLayout, proprio_tokens: int, action_tokens: int) -> TokenLayout:
    """The prefix's layout followed by the expert's tokens (``proprio_tokens`` state tokens, then the actions).

    The layout a pruning method sees, so that 'action' rows name the expert's action queries.
    """
    n = prefix.num_tokens
    proprio = (n, n + proprio_tokens) if proprio_tokens else prefix.proprio_span
    return dataclasses.replace(prefix, num_tokens=n + proprio_tokens + action_tokens, proprio_span=proprio,
                               action_span=(n + proprio_tokens, n + proprio_tokens + action_tokens))


class ExpertActionRows:
    """Wraps a pruning method for a model whose action queries run in an expert after the prefix pass.

    * ``begin_step``: the method sees ``method_layout`` (see :func:`extended_layout`); its requests for 'action'
      rows are held back from the runner, 'text_action' rows are asked of the runner as 'text' rows.
    * a K/V store the method hands the runner (VLA-Cache style reuse) holds prefix tokens only; its validity masks
      are extended with False for the expert's tokens after each pass, so they match the layout the method sees.
    * ``after_layer``: with a :class:`ExpertProbe`, the views of the layers before the last one at which the method
      asked for action rows carry them: the probe's expert pass runs alongside the prefix pass, one layer per
      view, against the keys/values of the tokens that layer kept (recomputed from the layer's input: the K/V
      projections of the kept tokens, a small part of a layer). Without a probe they are absent from the views.
    * ``end_step``: deferred; :meth:`finish` merges the expert's attention over the prefix keys into the record
      ('action' rows: the expert's; 'text_action': the row-count-weighted mean of text and action rows), then
      calls the method's ``end_step``.
    """

    def __init__(self, method: PruningMethod, method_layout: TokenLayout, probe: Optional[ExpertProbe] = None
                 ) -> None:
        self.method = method
        self.method_layout = method_layout
        self.probe = probe
        self.probe_until = -1
        self._hidden: Optional[torch.Tensor] = None
        self._previous: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.held: list[AttentionRequest] = []
        self.record: Optional[StepRecord] = None
        self.store: Optional[KVStore] = None

    @property
    def name(self) -> str:
        return getattr(self.method, 'name', 'method')

    def reset(self) -> None:
        self.method.reset()

    @property
    def action_layers(self) -> list[int]:
        """Layers at which the expert's action-row attention is needed."""
        return sorted({request.layer for request in self.held})

    def begin_step(self, context: StepContext) -> StepPlan:
        self.record = None
        plan = self.method.begin_step(dataclasses.replace(context, layout=self.method_layout))
        self.store = plan.kv_store
        self.held = [r for r in plan.attention if r.rows in ('action', 'text_action')]
        passed = [r for r in plan.attention if r.rows != 'action']
        passed = [AttentionRequest(layer=r.layer, rows='text', name=r.key) if r.rows == 'text_action' else r
                  for r in passed]
        depth = context.num_layers or (len(self.probe.decoder.layers) if self.probe is not None else 0)
        in_pass = [r.layer for r in self.held if r.layer < depth - 1]   # the last layer has no view
        self.probe_until = max(in_pass) if in_pass and self.probe is not None else -1
        if self.probe_until >= 0:
            probe = self.probe
            self._hidden, self._previous = probe.suffix, None
            self._rope = probe.expert_rotary_emb(probe.suffix, probe.positions.view(1, -1))
        hooked = plan.after_layers
        if hooked is not None and self.probe_until >= 0:    # the probe's pass advances at every layer up to there
            hooked = hooked | frozenset(range(self.probe_until + 1))
        return dataclasses.replace(plan, attention=passed, after_layers=hooked)

    def _extend_store(self) -> None:
        if self.store is None:
            return
        n = self.method_layout.num_tokens
        for layer, valid in self.store.valid.items():
            if valid.numel() < n:
                self.store.valid[layer] = torch.cat([valid, valid.new_zeros(n - valid.numel())])

    def after_layer(self, view: LayerView) -> Optional[torch.Tensor]:
        if view.layer <= self.probe_until:
            rows = self._probe_layer(view)
            if rows:   # laid over the runner's summaries, which are not changed (they may be scored lazily)
                view = dataclasses.replace(view, attention=ChainMap(rows, view.attention))
        return self.method.after_layer(view)

    @torch.no_grad()
    def _probe_layer(self, view: LayerView) -> dict[str, torch.Tensor]:
        """Advance the probe's expert pass by layer ``view.layer``; the action rows the method asked for there."""
        probe, index = self.probe, view.layer
        layer = probe.decoder.layers[index]
        if self._previous is None:
            inputs = probe.embeddings[:, view.kept]
        else:
            kept, hidden = self._previous
            inputs = hidden[torch.searchsorted(kept, view.kept)].unsqueeze(0)
        self._previous = (view.kept, view.hidden)
        attn = layer.self_attn
        x = layer.input_layernorm(inputs)
        k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        cos, sin = probe.decoder.rotary_emb(x, view.kept.view(1, -1))
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        reused = view.key_indices[len(view.kept):]
        if len(reused) and self.store is not None:
            k = torch.cat([k, self.store.keys[index][:, reused].unsqueeze(0).to(k.dtype)], dim=2)
            v = torch.cat([v, self.store.values[index][:, reused].unsqueeze(0).to(v.dtype)], dim=2)
        requests = [r for r in self.held if r.layer == index]
        cos_e, sin_e = self._rope
        self._hidden, weights = expert_layer(probe.expert_layers[index], self._hidden, cos_e, sin_e, k, v,
                                             probe.self_mask, probe.cond, probe.rows if requests else None)
        return {request.key: self._mixed(request, view.attention.get(request.key), weights) for request in requests}

    def _mixed(self, request: AttentionRequest, text: Optional[torch.Tensor], action: torch.Tensor) -> torch.Tensor:
        """'action' rows: the expert's; 'text_action': the row-count-weighted mean with the runner's text rows."""
        if request.rows != 'text_action' or text is None:
            return action
        layout = self.method_layout
        n_action = layout.action_span[1] - layout.action_span[0]
        n_text = layout.text_span[1] - layout.text_span[0]
        return (n_text * text.float() + n_action * action.float()) / max(n_text + n_action, 1)

    def end_step(self, record: StepRecord) -> None:
        self.record = record

    def finish(self, attention: dict[int, tuple[torch.Tensor, torch.Tensor]], description: str = '') -> float:
        """Merge the expert's ``attention`` and run the method's ``end_step``; returns the seconds it took.

        ``attention``: layer -> (prefix key positions, weights).
        """
        record = self.record
        if record is None:
            return 0.0
        for request in self.held:
            expert = attention.get(request.layer)
            if expert is None:
                continue
            keys, weights = expert
            entry = record.attention.setdefault(request.layer, {})
            text = entry.get(request.key)
            same_keys = text is not None and torch.equal(text[0].to(keys.device), keys)
            entry[request.key] = (keys, self._mixed(request, text[1] if same_keys else None, weights))
        if self.held and description:
            record.info['action_rows'] = description
        self._extend_store()
        t0 = time.perf_counter()
        self.method.end_step(record)
        return time.perf_counter() - t0
