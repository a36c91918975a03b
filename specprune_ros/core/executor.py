"""Run a Llama-family decoder layer by layer while a pruning method drops visual tokens.

The runner re-uses the transformers modules of each layer (norms, projections, rotary embedding, MLP) and
does the attention itself, so that it can

* keep every kept token at its original RoPE position (positions with gaps) and build the mask for the
  pruned sequence (causal or bidirectional) without transformers' mask helpers;
* compute attention probabilities only for the query rows a method asked for, at the layers it asked for,
  while every layer's output comes from fused SDPA;
* serve some tokens' keys/values from an earlier step instead of recomputing them (VLA-Cache style);
* optionally hand back every layer's keys/values of the tokens that layer saw (``return_cache=True``), so an
  autoregressive model (OpenVLA) can decode further tokens with :meth:`PrunableDecoderRunner.decode` against the
  pruned prefill: a token pruned before layer l has no key at layer l or later.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from specprune_ros.core.flops import decoder_flops
from specprune_ros.core.masks import additive_mask, attention_mask
from specprune_ros.core.step_types import (AttentionRequest, KVStore, LayerView, PruningMethod, StepContext,
                                           StepPlan, StepRecord)
from specprune_ros.core.token_layout import TokenLayout, TokenRole


class PlanError(ValueError):
    """A pruning plan that the runner refuses (it would drop non-visual tokens, name unknown tokens, ...)."""


@dataclass
class DecoderCache:
    """Per-layer keys/values of a (pruned) pass, for autoregressive decoding after it.

    ``keys[l]`` / ``values[l]``: (B, num_kv_heads, n_l, head_dim), RoPE applied at the tokens' original positions;
    ``positions[l]``: (n_l,) those positions. Layers may hold different tokens (pruning inside the decoder).
    ``last_position``: the largest position held; decoded tokens must come after it.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)
    last_position: int = -1

    def __len__(self) -> int:
        return len(self.keys)

    def key_counts(self) -> list[int]:
        """Number of keys held per layer."""
        return [int(p.numel()) for p in self.positions]


@dataclass
class DecodeResult:
    """Output of :meth:`PrunableDecoderRunner.decode`: final-normed hidden states of the new tokens."""

    hidden: torch.Tensor                                  # (B, t, d)
    attention: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (key positions, mean attention of the t rows)
    key_counts: list[int]                                 # keys per layer the new tokens attended to (incl. themselves)


@dataclass
class RunResult:
    """Output of one pass: the final-normed hidden states of the tokens that survived, and the record."""

    hidden: torch.Tensor          # (B, n_final, d)
    kept: torch.Tensor            # (n_final,) original indices of those tokens, ascending
    record: StepRecord
    cache: Optional[DecoderCache] = None   # per-layer K/V of the pass (``return_cache=True``)

    def select(self, indices: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, len(indices), d) of the given original indices (they must have survived)."""
        where = torch.searchsorted(self.kept, indices)
        if (where >= len(self.kept)).any() or not torch.equal(self.kept[where.clamp(max=len(self.kept) - 1)], indices):
            raise PlanError('requested tokens were pruned; only visual tokens may be pruned')
        return self.hidden[:, where]


class PrunableDecoderRunner(nn.Module):
    """Layer-by-layer execution of a transformers Llama-family decoder with visual-token pruning."""

    def __init__(self, decoder: nn.Module) -> None:
        """``decoder``: a transformers ``LlamaModel``-like module with ``layers``, ``rotary_emb`` and ``norm``."""
        super().__init__()
        self.decoder = decoder
        config = decoder.config
        self.hidden_size = int(config.hidden_size)
        self.mlp_size = int(config.intermediate_size)
        self.num_layers = len(decoder.layers)

    def forward(self, embeddings: torch.Tensor, layout: TokenLayout, method: Optional[PruningMethod] = None,
                context: Optional[StepContext] = None, return_cache: bool = False) -> RunResult:
        """Run all layers on ``embeddings`` (B, N, d) laid out as ``layout``; prune as ``method`` says.

        ``return_cache``: also return every layer's keys/values (``RunResult.cache``) for :meth:`decode`.
        """
        if embeddings.dim() != 3 or embeddings.shape[1] != layout.num_tokens:
            raise PlanError(f'embeddings {tuple(embeddings.shape)} do not match a layout of {layout.num_tokens} tokens')
        started = time.perf_counter()
        selection = 0.0
        device = embeddings.device
        roles = layout.roles().to(device)
        is_visual = roles == int(TokenRole.VISUAL)

        plan = StepPlan()
        if method is not None:
            if context is None:
                context = StepContext(layout=layout, step_index=0,
                                      visual_embeddings=embeddings[0, layout.visual_indices()])
            context.num_layers = self.num_layers
            t0 = time.perf_counter()
            plan = method.begin_step(context)
            selection += time.perf_counter() - t0

        kept = torch.arange(layout.num_tokens, device=device)
        if plan.keep_before is not None:
            kept = self._apply_keep(kept, plan.keep_before, is_visual, roles, stage='before layer 0')
        reused = self._reusable(plan, kept, is_visual)
        if reused is not None:
            kept = kept[~torch.isin(kept, reused)]
        requests = self._requests_by_layer(plan.attention)
        cache = DecoderCache(last_position=layout.num_tokens - 1) if return_cache else None

        hidden = embeddings[:, kept]
        kept_per_layer: list[torch.Tensor] = []
        n_keys: list[int] = []
        attention: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        probe_seconds = 0.0
        for index, layer in enumerate(self.decoder.layers):
            kept_per_layer.append(kept)
            key_indices = kept if reused is None else torch.cat([kept, reused])
            n_keys.append(len(key_indices))
            hidden, summaries, probe_time = self._run_layer(
                layer, index, hidden, kept, key_indices, reused, layout, roles, requests.get(index, ()), plan.kv_store,
                cache)
            probe_seconds += probe_time
            if summaries:
                attention[index] = {name: (key_indices, weights) for name, weights in summaries.items()}
            if method is not None and index < self.num_layers - 1:
                t0 = time.perf_counter()
                keep = method.after_layer(LayerView(layer=index, kept=kept, key_indices=key_indices,
                                                    hidden=hidden[0], attention=summaries))
                selection += time.perf_counter() - t0
                if keep is not None:
                    new_kept = self._apply_keep(kept, keep, is_visual, roles, stage=f'after layer {index}')
                    if len(new_kept) != len(kept):
                        hidden = hidden[:, torch.searchsorted(kept, new_kept)]
                        kept = new_kept
        hidden = self.decoder.norm(hidden)

        record = StepRecord(
            layout=layout, kept_per_layer=kept_per_layer, attention=attention, reused=reused,
            model_seconds=0.0, selection_seconds=0.0,
            flops=decoder_flops([len(k) for k in kept_per_layer], n_keys, self.hidden_size, self.mlp_size),
            flops_full=decoder_flops([layout.num_tokens] * self.num_layers, [layout.num_tokens] * self.num_layers,
                                     self.hidden_size, self.mlp_size),
            probe_seconds=probe_seconds)
        if method is not None:
            t0 = time.perf_counter()
            method.end_step(record)
            selection += time.perf_counter() - t0
        record.selection_seconds = selection
        record.model_seconds = time.perf_counter() - started - selection - probe_seconds
        return RunResult(hidden=hidden, kept=kept, record=record, cache=cache)

    @torch.no_grad()
    def decode(self, embeddings: torch.Tensor, positions: torch.Tensor | Sequence[int], cache: DecoderCache,
               attention_layers: Sequence[int] = ()) -> DecodeResult:
        """Run new tokens (B, t, d) at ``positions`` through every layer against ``cache`` (causal), and append
        their keys/values to it. Positions must come after ``cache.last_position`` (gaps are fine).

        ``attention_layers``: layers at which to return the head-, batch- and row-averaged attention of the new
        tokens over the keys (cache + new tokens), e.g. the attention of generated action tokens to visual tokens.
        """
        if len(cache) != self.num_layers:
            raise PlanError(f'the cache holds {len(cache)} layers; the decoder has {self.num_layers}')
        positions = torch.as_tensor(positions, dtype=torch.long, device=embeddings.device).flatten()
        if embeddings.dim() != 3 or embeddings.shape[1] != len(positions):
            raise PlanError(f'embeddings {tuple(embeddings.shape)} do not match {len(positions)} positions')
        first, last = int(positions.min()), int(positions.max())
        if first <= cache.last_position or not bool((positions[1:] > positions[:-1]).all()):
            raise PlanError(f'decode positions must increase and follow position {cache.last_position}')
        wanted = set(int(layer) for layer in attention_layers)
        bad = [layer for layer in wanted if not 0 <= layer < self.num_layers]
        if bad:
            raise PlanError(f'attention requested at layer {bad[0]}; the decoder has {self.num_layers}')
        hidden = embeddings
        batch, t, _ = hidden.shape
        summaries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        counts: list[int] = []
        for index, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, t, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, t, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, t, -1, attn.head_dim).transpose(1, 2)
            cos, sin = self.decoder.rotary_emb(x, positions.view(1, -1))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys = torch.cat([cache.keys[index].to(k.dtype).expand(batch, -1, -1, -1), k], dim=2)
            values = torch.cat([cache.values[index].to(v.dtype).expand(batch, -1, -1, -1), v], dim=2)
            key_positions = torch.cat([cache.positions[index], positions])
            cache.keys[index], cache.values[index], cache.positions[index] = keys, values, key_positions
            counts.append(len(key_positions))
            # every cached key precedes the new tokens; only the new tokens among themselves need a causal mask
            mask = attention_mask(positions, key_positions, causal=True) if t > 1 else None
            groups = q.shape[1] // keys.shape[1]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                                 enable_gqa=groups > 1)
            hidden = residual + attn.o_proj(out.transpose(1, 2).reshape(batch, t, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if index in wanted:
                rows = torch.arange(t, device=hidden.device)
                summaries[index] = (key_positions, self._attention_summary(q, keys, rows, mask, attn.scaling, groups))
        cache.last_position = last
        return DecodeResult(hidden=self.decoder.norm(hidden), attention=summaries, key_counts=counts)

    # -- plan checks -------------------------------------------------------------------------------------------

    @staticmethod
    def _apply_keep(kept: torch.Tensor, keep_visual: torch.Tensor, is_visual: torch.Tensor, roles: torch.Tensor,
                    stage: str) -> torch.Tensor:
        """New kept set = the kept non-visual tokens + ``keep_visual``; refuse anything else."""
        keep_visual = torch.as_tensor(keep_visual, dtype=torch.long, device=kept.device).flatten()
        num_tokens = len(is_visual)
        if len(keep_visual) and (keep_visual.min() < 0 or keep_visual.max() >= num_tokens):
            bad = keep_visual[(keep_visual < 0) | (keep_visual >= num_tokens)][0].item()
            raise PlanError(f'{stage}: token index {bad} is out of range for a sequence of {num_tokens} tokens')
        not_visual = keep_visual[~is_visual[keep_visual]]
        if len(not_visual):
            role = TokenRole(int(roles[not_visual[0]])).name
            raise PlanError(f'{stage}: token {int(not_visual[0])} is a {role} token; a keep set names visual tokens '
                            f'only, and text, proprio and action tokens are never dropped')
        present = torch.zeros(num_tokens, dtype=torch.bool, device=kept.device)
        present[kept] = True
        missing = keep_visual[~present[keep_visual]]
        if len(missing):
            raise PlanError(f'{stage}: visual token {int(missing[0])} was already pruned and cannot come back')
        if is_visual.any() and len(keep_visual) == 0:
            raise PlanError(f'{stage}: the keep set is empty; keep at least one visual token')
        selected = present & ~is_visual
        selected[keep_visual] = True
        return torch.nonzero(selected).flatten()

    @staticmethod
    def _reusable(plan: StepPlan, kept: torch.Tensor, is_visual: torch.Tensor) -> Optional[torch.Tensor]:
        """Visual tokens served from the K/V store: requested, kept, and cached at every layer."""
        if plan.reuse_kv is None or plan.kv_store is None or len(plan.reuse_kv) == 0:
            return None
        reuse = torch.as_tensor(plan.reuse_kv, dtype=torch.long, device=kept.device).unique()
        if len(reuse) and (reuse.min() < 0 or reuse.max() >= len(is_visual) or not is_visual[reuse].all()):
            raise PlanError('reuse_kv may only name visual tokens of the sequence')
        reuse = reuse[torch.isin(reuse, kept)]
        store = plan.kv_store
        for valid in store.valid.values():
            reuse = reuse[valid[reuse]]
        if len(store.valid) == 0 or len(reuse) == 0:
            return None
        if len(reuse) == int(is_visual[kept].sum()):  # keep one visual token computed, so queries exist for it
            reuse = reuse[1:]
        return reuse if len(reuse) else None

    def _requests_by_layer(self, requests: list[AttentionRequest]) -> dict[int, list[AttentionRequest]]:
        by_layer: dict[int, list[AttentionRequest]] = {}
        for request in requests:
            if not 0 <= request.layer < self.num_layers:
                raise PlanError(f'attention requested at layer {request.layer}; the decoder has {self.num_layers}')
            by_layer.setdefault(request.layer, []).append(request)
        return by_layer

    # -- one layer ---------------------------------------------------------------------------------------------

    def _run_layer(self, layer: nn.Module, index: int, hidden: torch.Tensor, kept: torch.Tensor,
                   key_indices: torch.Tensor, reused: Optional[torch.Tensor], layout: TokenLayout,
                   roles: torch.Tensor, requests: list[AttentionRequest] | tuple,
                   store: Optional[KVStore], cache: Optional[DecoderCache] = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        attn = layer.self_attn
        batch, n, _ = hidden.shape
        head_dim = attn.head_dim
        residual = hidden
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(batch, n, -1, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, n, -1, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, n, -1, head_dim).transpose(1, 2)
        cos, sin = self.decoder.rotary_emb(x, kept.view(1, -1))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)

        if store is not None and batch == 1:
            self._store_kv(store, index, kept, k[0], v[0], layout.num_tokens)
        if reused is not None:
            k = torch.cat([k, store.keys[index][:, reused].unsqueeze(0).to(k.dtype).expand(batch, -1, -1, -1)], dim=2)
            v = torch.cat([v, store.values[index][:, reused].unsqueeze(0).to(v.dtype).expand(batch, -1, -1, -1)], dim=2)
        if cache is not None:
            cache.keys.append(k)
            cache.values.append(v)
            cache.positions.append(key_indices)

        mask = attention_mask(kept, key_indices, layout.causal)
        groups = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=groups > 1)
        hidden = residual + attn.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

        summaries: dict[str, torch.Tensor] = {}
        probe_time = 0.0
        if requests:
            t0 = time.perf_counter()
            with torch.no_grad():
                for request in requests:
                    rows = self._query_rows(request.rows, kept, roles)
                    summaries[request.key] = self._attention_summary(q, k, rows, mask, attn.scaling, groups)
            probe_time = time.perf_counter() - t0
        return hidden, summaries, probe_time

    @staticmethod
    def _query_rows(rows: str, kept: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
        """Positions (within the kept sequence) of the query rows named by ``rows``."""
        kept_roles = roles[kept]
        if rows == 'text':
            selected = kept_roles == int(TokenRole.TEXT)
        elif rows == 'action':
            selected = kept_roles == int(TokenRole.ACTION)
        elif rows == 'text_action':
            selected = (kept_roles == int(TokenRole.TEXT)) | (kept_roles == int(TokenRole.ACTION))
        elif rows == 'prefill':
            selected = kept_roles != int(TokenRole.ACTION)
        elif rows == 'all':
            selected = torch.ones_like(kept_roles, dtype=torch.bool)
        elif rows == 'last':
            return torch.tensor([len(kept) - 1], device=kept.device)
        else:
            raise PlanError(f"unknown query rows {rows!r}; use 'text', 'action', 'text_action', 'prefill', 'last' "
                            "or 'all'")
        where = torch.nonzero(selected).flatten()
        if len(where) == 0:
            raise PlanError(f'attention over {rows!r} rows requested, but the sequence has no such tokens')
        return where

    @staticmethod
    def _attention_summary(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, mask: Optional[torch.Tensor],
                           scaling: float, groups: int) -> torch.Tensor:
        """Softmax attention of the chosen query rows, averaged over batch, heads and rows: (n_keys,)."""
        q_rows = q[:, :, rows].float()
        keys = k.float().repeat_interleave(groups, dim=1) if groups > 1 else k.float()
        scores = torch.matmul(q_rows, keys.transpose(-1, -2)) * scaling
        if mask is not None:
            scores = scores + additive_mask(mask[:, :, rows], scores.dtype)
        return scores.softmax(dim=-1).mean(dim=(0, 1, 2))

    @staticmethod
    def _store_kv(store: KVStore, index: int, kept: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  num_tokens: int) -> None:
        """Write this step's keys/values of the computed tokens into the store (batch 1 only)."""
        if index not in store.keys or store.keys[index].shape[1] != num_tokens:
            store.keys[index] = keys.new_zeros(keys.shape[0], num_tokens, keys.shape[-1])
            store.values[index] = values.new_zeros(values.shape[0], num_tokens, values.shape[-1])
            store.valid[index] = torch.zeros(num_tokens, dtype=torch.bool, device=keys.device)
        store.keys[index][:, kept] = keys.detach()
        store.values[index][:, kept] = values.detach()
        store.valid[index][kept] = True
