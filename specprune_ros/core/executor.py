"""Run a Llama-family decoder layer by layer while a pruning method drops visual tokens.

The runner re-uses the transformers modules of each layer (norms, projections, rotary embedding, MLP) and
does the attention itself, so that it can

* keep every kept token at its original RoPE position (positions with gaps) and build the mask for the
  pruned sequence (causal or bidirectional) without transformers' mask helpers;
* compute attention probabilities only for the query rows a method asked for, at the layers it asked for
  (softmax in fp32, scored when first read: the probes of all layers that share a kept set run as one batched
  product), while every layer's output comes from fused SDPA (on the CPU, from two products at the token counts
  where those are faster: :mod:`specprune_ros.core.attention_kernels`); a layer whose probes read most of its
  rows runs as two products and answers them from its own probabilities (``share_probabilities``);
* build what a kept set implies (RoPE tables, mask, probe rows) once per kept set, not once per layer, and run
  the query/key/value and gate/up projections as two fused products when no gradient is needed;
* never wait for the device inside a step on an accelerator: sizes are known on the host and keep sets are
  checked by a device-side assert (``validate_on_host``); what needs host values (kept counts) is read from the
  record after the step;
* on CUDA, run SDPA without cuDNN's attention (it plans anew for every sequence length, and pruned lengths vary)
  and, with ``cuda_graph_layers``, replay the plain layers as CUDA graphs per padded token count, the layers
  between two points where a method reads or decides as one graph (:mod:`specprune_ros.core.cuda_graphs`), since
  an eager pruned step is bound by the host's kernel launches;
* serve some tokens' keys/values from an earlier step instead of recomputing them (VLA-Cache style);
* optionally hand back every layer's keys/values of the tokens that layer saw (``return_cache=True``), so an
  autoregressive model (OpenVLA) can decode further tokens with :meth:`PrunableDecoderRunner.decode` against the
  pruned prefill: a token pruned before layer l has no key at layer l or later.
"""
from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from specprune_ros.core.attention_kernels import (AttentionKernel, attention_with_summaries, share_probabilities,
                                                  two_product_attention, use_two_products)
from specprune_ros.core.attention_probes import LazyAttention, ProbeBatch, attention_summaries
from specprune_ros.core.constant_tensors import constant_tensors
from specprune_ros.core.cpu_info import available_memory_bytes
from specprune_ros.core.flops import attention_widths, decoder_flops
from specprune_ros.core.cuda_graphs import DecodeGraphs, DecodeState, LayerGraphs
from specprune_ros.core.kept_tokens import (KeptTokens, PaddedTokens, RopeTables, Rotary, all_visual_on,
                                            visual_slot_table)
from specprune_ros.core.layer_arithmetic import (activation, compilable, compiled_layer, layer_arithmetic,
                                                 layer_operands, rms_norm)
from specprune_ros.core.masks import attention_mask
from specprune_ros.core.step_types import (AttentionRequest, KVStore, LayerView, PlanError, PruningMethod,
                                           StepContext, StepPlan, StepRecord, VisualMask)
from specprune_ros.core.token_layout import TokenLayout, TokenRole, visual_order
from specprune_ros.core.weight_products import (COPY_MEMORY_SHARE, MKL_PACKED_EXACT_FROM_ROWS, PACKED_MIN_WIDTH,
                                                ExactCopyChoice, FusedProjections, cpu_vendor, input_major_product,
                                                linear_weight_bytes, mkl_packable, mkl_packed_product, packable)

__all__ = ['DecodeResult', 'DecoderCache', 'PlanError', 'PrunableDecoderRunner', 'RunResult']

_LOG = logging.getLogger(__name__)


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

    hidden: Optional[torch.Tensor]                        # (B, t, d); None from graphed greedy decoding
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
        """Hidden states (B, len(indices), d) of the given original indices (they must have survived).

        Checked on the host on the CPU (a ``PlanError``), by a device-side assert elsewhere (nothing read back: the
        action head is queued behind the pass without waiting for it).
        """
        where = torch.searchsorted(self.kept, indices).clamp_(max=len(self.kept) - 1)
        survived = self.kept.index_select(0, where).eq(indices).all()
        message = 'requested tokens were pruned; only visual tokens may be pruned'
        if self.kept.device.type == 'cpu':
            if not survived:
                raise PlanError(message)
        else:
            torch._assert_async(survived, message)
        return self.hidden.index_select(1, where)


# SDPA's kernels for the executor's passes on CUDA: cuDNN's attention is left out, since it builds an execution
# plan per new sequence length (measured on an H200: tens of ms a step for a method whose kept count changes every
# step, 5x its step time), while pruned sequences change length all the time
_SDPA_WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _without_cudnn_attention(run: Callable) -> Callable:
    """A runner method (first argument the embeddings) that, on CUDA, runs SDPA without cuDNN's attention."""
    @functools.wraps(run)
    def wrapped(self, embeddings: torch.Tensor, *args, **kwargs):
        if embeddings.device.type != 'cuda':
            return run(self, embeddings, *args, **kwargs)
        with sdpa_kernel(_SDPA_WITHOUT_CUDNN):
            return run(self, embeddings, *args, **kwargs)
    return wrapped


class PrunableDecoderRunner(nn.Module):
    """Layer-by-layer execution of a transformers Llama-family decoder with visual-token pruning."""

    def __init__(self, decoder: nn.Module, fuse_projections: Optional[bool] = None,
                 validate_on_host: Optional[bool] = None, compile_layers: bool = False, bucket: int = 32,
                 input_major_weights: bool = False, packed_weights: Optional[bool] = None,
                 mkl_packed_weights: Optional[bool] = None, attention_kernel: Optional[AttentionKernel] = None,
                 share_probabilities: bool = True, cuda_graph_layers: bool = False,
                 cuda_graph_spans: bool = True) -> None:
        """``decoder``: a transformers ``LlamaModel``-like module with ``layers``, ``rotary_emb`` and ``norm``.

        ``fuse_projections``: without autograd, run each layer's query/key/value projections as one matrix
        product and the MLP's gate/up projections as another (the same numbers, fewer and larger products: they
        matter most at the small token counts pruning leaves). Costs a fused copy of those weights (built at the
        first use, rebuilt when the weights change); False keeps the layers' own projections; None (default) fuses
        where the weights live on the CPU (on a GPU the copy would cost most of the decoder's weight memory again
        for a smaller gain).

        ``validate_on_host``: check each keep set on the host, with a message per fault (the default on the CPU), or
        on the device with one asynchronous assert that never waits for it (False; the default on accelerators,
        where a host check would stall the step).

        ``compile_layers``: run each layer's arithmetic as one ``torch.compile`` (inductor) graph, with the number
        of tokens rounded up to a multiple of ``bucket`` (the padding tokens are masked out of attention and dropped
        after the layer) so that the few shapes a method produces repeat. Every new shape compiles once per process
        (tens of seconds on a CPU); the numbers differ from the eager layers in the last bits (fused reductions).
        Applies to plain Llama layers without autograd in passes that neither store, reuse nor return keys/values;
        other passes run eagerly. Off by default: on the CPU it took 5-12% off the layers at exact token counts,
        but padding to 32-token buckets gave that back at pruned counts (``docs/benchmarks.md``).

        ``input_major_weights``: with fused projections, also hold every product's weight (query/key/value,
        output, gate/up, down) input-major, i.e. transposed in memory, which the CPU's matrix product reads faster
        at the small token counts pruning leaves. A product reads that copy only where it gives the default
        product's numbers bit for bit, checked once per token count and weight shape on a random input (MKL sums
        in another order for some shapes: inner sizes above ~1000, under 16 tokens); a pass at a token count not
        seen before pays that check (two extra products per product shape). Costs one more copy of all the
        decoder's linear weights, beside the fused ones. Off by default (``docs/benchmarks.md``).

        ``packed_weights``: with fused projections on the CPU in fp32, hold every product's weight prepacked in
        oneDNN's blocked layout and multiply with oneDNN instead of the default BLAS product (no repacking of the
        weight at every product). On a 2-core AMD EPYC it took 7% off the unpruned pass of a 256-wide decoder and
        11-16% off pruned ones (10% and up to 34% at 512 wide), and nothing at 128 wide (``docs/benchmarks.md``).
        On a 2-core Intel Xeon the default product was as fast or faster (within 5%), and oneDNN builds and keeps a
        kernel for every token count a product meets (about 1 ms and 0.5-1 MB each), which a method whose kept
        count varies pays inside its steps. The numbers differ from the default product in the last bits (about
        1e-6 relative). Costs one more copy of the decoder's linear weights. None (default): on where the decoder
        is at least 256 wide, ``input_major_weights`` is off, the processor is not an Intel one (:func:`cpu_vendor`)
        and the copy takes at most a quarter of the memory available when the runner first decides; True / False
        force it (True is exclusive with ``input_major_weights``).

        ``mkl_packed_weights``: with fused projections on the CPU in fp32, hold every product's weight in MKL's
        packed layout (``torch.ops.mkl``) and multiply with MKL's packed product, which skips the repacking of the
        weight that the plain product does at every call and needs no kernel per token count. A product reads the
        packed copy only where it gives the plain product's numbers bit for bit, checked on a random input per
        token count below 64 tokens and once per weight shape for all larger counts (MKL sums the down
        projection of a 1376-wide MLP in another order, so that one keeps the plain product). On a 2-core Intel
        Xeon it took 3-8% off pruned passes of a 256-wide decoder and 3-11% off those of a 512-wide one, nothing
        at 128 wide (``docs/benchmarks.md``). Costs one more copy of the decoder's linear weights in resident
        memory (MKL reserves about 8 MB more address space per weight, left untouched). None (default): on where
        the decoder is at least 256 wide, this torch build has MKL's packed product, no other copy
        (``input_major_weights``, ``packed_weights``) is chosen and the copy takes at most a quarter of the memory
        available when the runner first decides; True / False force it on or off (the other copies take
        precedence).

        ``attention_kernel``: what computes each layer's attention output where no mask applies (bidirectional
        layers) and every query head has its own key head. None (default): fused SDPA, except on the CPU in fp32
        with at least two threads, at least 64-dimensional heads and 96-191 tokens, where attention as two products
        is 1.3-2x faster than SDPA's fused kernel (:mod:`specprune_ros.core.attention_kernels`; on a 2-core Intel
        Xeon it took 2-6% off passes at those token counts, ``docs/benchmarks.md``). The two give the same outputs up to
        rounding in the last bits. 'sdpa' / 'products' force one. Masked (causal) layers always run SDPA.

        ``cuda_graph_layers``: on CUDA, replay the layers as CUDA graphs captured once per span of layers and
        padded token count (:mod:`specprune_ros.core.cuda_graphs`), for steps the host cannot issue as fast as the
        device runs them. With ``cuda_graph_spans`` a span runs from one point where the method reads attention or
        decides (a probed or hooked layer) to the next, so an unpruned pass is one launch and SpecPrune's about
        seven (a span CUDA will not capture is logged, and every layer runs as a graph of its own from then on);
        without it every layer is a graph of its own (one launch per layer instead of about 25). The tokens
        are padded to ``bucket`` as for ``compile_layers``, with the same limits (plain Llama layers, no autograd,
        no stored or reused keys/values); a probed layer's graph also keeps its queries and keys, and a pass that
        returns its keys and values for decoding keeps every layer's. The graphs read the fused projections
        where their copy takes at most half the free device memory (``fuse_projections`` None), else the layers'
        own weights. Each new padded size costs a capture per span (a few ms per layer) and holds each span's
        output at that size in device memory. Ignored off CUDA. Off by default (``docs/benchmarks.md``).

        ``share_probabilities``: where a method's attention probes read at least three quarters of a layer's query
        rows (VLA-Pruner's prefill rows), that layer's attention runs as two products (masked where the layout is
        causal) and the probes are read off its probabilities instead of computing most of them a second time
        (the same probes and outputs up to rounding in the last bits; not with grouped key heads, nor when
        ``attention_kernel`` is 'sdpa'). False: every probe computed apart from the layer's attention.
        """
        if input_major_weights and packed_weights:
            raise ValueError('input_major_weights and packed_weights are alternatives: choose one')
        if attention_kernel not in (None, 'sdpa', 'products'):
            raise ValueError(f"attention_kernel must be None, 'sdpa' or 'products', not {attention_kernel!r}")
        super().__init__()
        self.decoder = decoder
        config = decoder.config
        self.hidden_size = int(config.hidden_size)
        self.mlp_size = int(config.intermediate_size)
        self.attention_width, self.kv_width = attention_widths(config)     # for the FLOPs count
        self.num_layers = len(decoder.layers)
        self.fuse_projections = fuse_projections
        self.validate_on_host = validate_on_host
        self._fused: dict[int, FusedProjections] = {}
        self._pass_fusions: Optional[tuple[tuple, list[Optional[FusedProjections]]]] = None
        self.compile_layers = compile_layers
        self.cuda_graph_layers = cuda_graph_layers
        self.cuda_graph_spans = cuda_graph_spans
        self._graphs = LayerGraphs()
        self._decode_graphs = DecodeGraphs()
        self.share_probabilities = share_probabilities
        self.bucket = max(1, int(bucket))
        self.input_major_weights = input_major_weights
        self._input_major = ExactCopyChoice(input_major_product)
        self.packed_weights = packed_weights
        self.mkl_packed_weights = mkl_packed_weights
        self._mkl_packed = ExactCopyChoice(mkl_packed_product, MKL_PACKED_EXACT_FROM_ROWS)
        self.attention_kernel = attention_kernel
        self._copies_fit: Optional[bool] = None
        self._device_copies_fit: Optional[bool] = None
        self._rope_tables: Optional[RopeTables] = None

    @_without_cudnn_attention
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
        roles, is_visual, non_visual, visual = _role_tables(layout, device)
        on_host = device.type == 'cpu' if self.validate_on_host is None else self.validate_on_host

        plan = StepPlan()
        if method is not None:
            if context is None:       # no step index: the method keeps its episode (a 0 would restart it)
                context = StepContext(layout=layout, step_index=None,
                                      visual_embeddings=embeddings[0, visual])
            context.num_layers = self.num_layers
            t0 = time.perf_counter()
            plan = method.begin_step(context)
            selection += time.perf_counter() - t0

        if (plan.kv_store is not None or plan.reuse_kv is not None) and embeddings.shape[0] != 1:
            raise PlanError(f'K/V reuse runs on a batch of one observation, not {embeddings.shape[0]}: the store '
                            'holds one sequence')
        kept = torch.arange(layout.num_tokens, device=device)
        keep, present = _keep_as_checked(plan.keep_before, layout, device, on_host, 'before layer 0'), None
        if isinstance(keep, VisualMask):                          # checked on the device, nothing sorted
            rows = self._rows_kept_by_mask(kept, visual_slot_table(layout, device),
                                           all_visual_on(layout.num_visual, device), layout, keep, 'before layer 0')
            if rows is not None:
                kept, present = rows, keep.mask     # rows of the full sequence: the kept indices themselves
        elif keep is not None:
            kept = self._apply_keep(kept, keep, is_visual, roles, 'before layer 0', None if on_host else non_visual)
        reused = self._reusable(plan, kept, is_visual, layout, on_host)
        if reused is not None:          # every reused token is kept: the count is known on the host
            rest = torch.nonzero_static(~torch.isin(kept, reused), size=len(kept) - len(reused)).view(-1)
            kept, present = kept.index_select(0, rest), None
        requests = self._requests_by_layer(plan.attention)
        hooked = self._hook_layers(plan.after_layers)
        cache = DecoderCache(last_position=layout.num_tokens - 1) if return_cache else None

        hidden = embeddings.index_select(1, kept)
        bucket = self.bucket if self._compiles(plan, reused, return_cache, device) else None
        graphed = bucket is not None and self._graphs_on(device)
        tables = self._tables(embeddings, layout.num_tokens)
        kept_per_layer: list[torch.Tensor] = []
        n_keys: list[int] = []
        kernels: list[str] = []
        lazy: dict[int, tuple[torch.Tensor, LazyAttention]] = {}
        probes = ProbeBatch()
        fusions = self._fusions()
        tokens = KeptTokens(self.decoder.rotary_emb, kept, reused, layout, roles, hidden, bucket, tables)
        if present is not None:
            tokens.visual_present = present
        index = 0
        while index < self.num_layers:
            first, layer = index, self.decoder.layers[index]
            # graphed: the layers up to the next one whose attention is read or after which the method runs, as
            # one graph (the kept set holds over them)
            index = self._span_end(index, requests, hooked, method is not None) if graphed and \
                self.cuda_graph_spans else index
            span = index - first + 1
            kept_per_layer.extend([tokens.kept] * span)
            n_keys.extend([tokens.num_keys] * span)
            asked = requests.get(index, ())
            shared = tokens.padded is None and self._shares_probabilities(layer, tokens, asked)
            products = tokens.padded is None and not shared and self._two_products(layer, tokens, hidden)
            kernels.extend(['cuda graph' if graphed else 'compiled' if tokens.padded is not None
                            else 'shared' if shared else 'products' if products else 'sdpa'] * span)
            hidden, summaries = self._run_layer(layer, first, hidden, tokens, asked, plan.kv_store, cache, probes,
                                                fusions[first], products, shared, graphed,
                                                fusions[first:index + 1] if span > 1 else None)
            if summaries:
                lazy[index] = (tokens.key_indices, summaries)
            if method is not None and index < self.num_layers - 1 and (hooked is None or index in hooked):
                t0, probed = time.perf_counter(), probes.seconds
                keep = method.after_layer(LayerView(layer=index, kept=tokens.kept, key_indices=tokens.key_indices,
                                                    hidden=hidden[0], attention=summaries))
                selection += time.perf_counter() - t0 - (probes.seconds - probed)
                if keep is not None:
                    stage = f'after layer {index}'
                    keep, slots, present = _keep_as_checked(keep, layout, device, on_host, stage), None, None
                    if isinstance(keep, VisualMask):                     # checked on the device, nothing sorted
                        rows = self._rows_kept_by_mask(tokens.kept, tokens.visual_slots, tokens.visual_present,
                                                       layout, keep, stage)
                        if rows is not None:
                            new_kept = tokens.kept.index_select(0, rows)
                            slots, present = tokens.visual_slots.index_select(0, rows), keep.mask
                    else:
                        new_kept = self._apply_keep(tokens.kept, keep, is_visual, roles, stage,
                                                    None if on_host else non_visual)
                        rows = None if len(new_kept) == len(tokens.kept) else \
                            torch.searchsorted(tokens.kept, new_kept)
                    if rows is not None:
                        hidden = hidden.index_select(1, rows)
                        tokens = KeptTokens(self.decoder.rotary_emb, new_kept, reused, layout, roles, hidden,
                                            bucket, tables)
                        if slots is not None:            # known from the mask: not computed again
                            tokens.visual_slots, tokens.visual_present = slots, present
            index += 1
        probes.resolve()
        attention = {index: {name: (key_indices, summaries[name]) for name in summaries}
                     for index, (key_indices, summaries) in lazy.items()}
        probe_seconds = probes.seconds
        kept = tokens.kept
        hidden = rms_norm(self.decoder.norm, hidden)

        record = StepRecord(
            layout=layout, kept_per_layer=kept_per_layer, attention=attention, reused=reused,
            model_seconds=0.0, selection_seconds=0.0,
            flops=decoder_flops([len(k) for k in kept_per_layer], n_keys, *self.flops_shape),
            flops_full=decoder_flops([layout.num_tokens] * self.num_layers, [layout.num_tokens] * self.num_layers,
                                     *self.flops_shape),
            probe_seconds=probe_seconds, attention_kernels=kernels)
        if method is not None:
            t0 = time.perf_counter()
            method.end_step(record)
            selection += time.perf_counter() - t0
        record.selection_seconds = selection
        record.model_seconds = time.perf_counter() - started - selection - probe_seconds
        return RunResult(hidden=hidden, kept=kept, record=record, cache=cache)

    @torch.no_grad()
    @_without_cudnn_attention
    def decode(self, embeddings: torch.Tensor, positions: torch.Tensor | Sequence[int], cache: DecoderCache,
               attention_layers: Sequence[int] = ()) -> DecodeResult:
        """Run new tokens (B, t, d) at ``positions`` through every layer against ``cache`` (causal).

        Their keys/values are appended to ``cache``. Positions must come after ``cache.last_position`` (gaps are fine).

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
        return self._decode(embeddings, positions, last, cache, self._wanted_layers(attention_layers))

    def _wanted_layers(self, attention_layers: Sequence[int]) -> set[int]:
        wanted = set(int(layer) for layer in attention_layers)
        bad = [layer for layer in wanted if not 0 <= layer < self.num_layers]
        if bad:
            raise PlanError(f'attention requested at layer {bad[0]}; the decoder has {self.num_layers}')
        return wanted

    def _decode(self, embeddings: torch.Tensor, positions: torch.Tensor, last: int, cache: DecoderCache,
                wanted: set[int]) -> DecodeResult:
        """:meth:`decode` with checked positions (``last``: the largest, on the host): nothing read back."""
        hidden = embeddings
        batch, t, _ = hidden.shape
        summaries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        counts: list[int] = []
        rope = Rotary(self.decoder.rotary_emb, hidden, positions)
        # every cached key precedes the new tokens; only the new tokens among themselves need a causal mask
        new_mask = attention_mask(positions, positions, causal=True) if t > 1 else None
        fusions = self._fusions()
        for index, layer in enumerate(self.decoder.layers):
            def extend(k: torch.Tensor, v: torch.Tensor, index: int = index) -> tuple[torch.Tensor, torch.Tensor]:
                keys = torch.cat([cache.keys[index].to(k.dtype).expand(batch, -1, -1, -1), k], dim=2)
                values = torch.cat([cache.values[index].to(v.dtype).expand(batch, -1, -1, -1), v], dim=2)
                cache.keys[index], cache.values[index] = keys, values
                cache.positions[index] = torch.cat([cache.positions[index], positions])
                return keys, values

            mask = None
            if new_mask is not None:
                held = cache.keys[index].shape[2]
                mask = torch.cat([new_mask.new_ones(1, 1, t, held), new_mask], dim=-1)
            hidden, q, keys = self._block(layer, hidden, rope, mask, False, extend, fusions[index])
            counts.append(keys.shape[2])
            if index in wanted:
                rows = torch.arange(t, device=hidden.device)
                probe = LazyAttention(ProbeBatch())
                probe.add('rows', q, keys, rows, mask, layer.self_attn.scaling)
                summaries[index] = (cache.positions[index], probe['rows'])
        cache.last_position = last
        return DecodeResult(hidden=rms_norm(self.decoder.norm, hidden), attention=summaries, key_counts=counts)

    @torch.no_grad()
    @_without_cudnn_attention
    def decode_greedy(self, first_ids: torch.Tensor, steps: int, cache: DecoderCache,
                      embed: Callable[[torch.Tensor], torch.Tensor], logits: Callable[[torch.Tensor], torch.Tensor],
                      attention_layers: Sequence[int] = ()) -> tuple[torch.Tensor, list[DecodeResult]]:
        """Greedy decoding of ``steps`` tokens after a prefill, without reading anything back.

        ``first_ids`` (a (1,) token id on the device, at position ``cache.last_position + 1``) is fed first, each
        picked token next.
        ``embed``: token ids (1, t) -> embeddings (1, t, d); ``logits``: final-normed hidden states (1, d) ->
        logits (1, vocab). Returns every token id ((steps + 1,) on the device: ``first_ids`` and the picked ones)
        and per fed token its attention at ``attention_layers`` and key counts (``hidden`` None where graphed).
        With ``cuda_graph_layers`` on CUDA each token is one replay of a graph of the whole decoder
        (:class:`~specprune_ros.core.cuda_graphs.DecodeGraphs`); the cache then keeps the prefill's keys only.
        """
        if len(cache) != self.num_layers:
            raise PlanError(f'the cache holds {len(cache)} layers; the decoder has {self.num_layers}')
        wanted = self._wanted_layers(attention_layers)
        device = first_ids.device
        start = cache.last_position + 1
        if steps > 0 and self._graphs_on(device) and cache.keys[0].shape[0] == 1 and \
                all(compilable(layer) for layer in self.decoder.layers):
            graphed = self._decode_greedy_graphed(first_ids, steps, cache, embed, logits, wanted)
            if graphed is not None:
                return graphed
        positions = torch.arange(start, start + steps, device=device)
        ids, results = [first_ids.reshape(1)], []
        for i in range(steps):
            result = self._decode(embed(ids[-1].view(1, 1)), positions[i:i + 1], start + i, cache, wanted)
            ids.append(logits(result.hidden[:, -1]).argmax(-1).reshape(1))
            results.append(result)
        return torch.cat(ids), results

    def _decode_greedy_graphed(self, first_ids: torch.Tensor, steps: int, cache: DecoderCache,
                               embed: Callable[[torch.Tensor], torch.Tensor],
                               logits: Callable[[torch.Tensor], torch.Tensor],
                               wanted: set[int]) -> Optional[tuple[torch.Tensor, list[DecodeResult]]]:
        """:meth:`decode_greedy` as graph replays, or None where the RoPE tables cannot be shared."""
        start = cache.last_position + 1
        like = cache.keys[0]
        position_capacity = -(-(start + steps) // 256) * 256
        if RopeTables.key(self.decoder.rotary_emb, like, position_capacity) is None:
            return None
        held = [k.shape[2] for k in cache.keys]
        capacity = -(-(max(held) + steps) // 64) * 64
        fusions = self._fusions()
        key = (capacity, position_capacity, steps, tuple(sorted(wanted)), like.dtype, like.device,
               tuple(tuple(k.shape[:2]) + (k.shape[3],) for k in cache.keys))

        def build() -> DecodeState:
            tables = RopeTables(self.decoder.rotary_emb, like, position_capacity, ())
            zeros = [k.new_zeros(1, k.shape[1], capacity, k.shape[3]) for k in cache.keys]
            return DecodeState(
                ids=first_ids.new_zeros(1, 1), position=first_ids.new_zeros(1), count=first_ids.new_zeros(1),
                keys=zeros, values=[z.clone() for z in zeros],
                valid=[torch.zeros(1, 1, 1, capacity, dtype=torch.bool, device=like.device) for _ in held],
                history=first_ids.new_zeros(steps),
                attention={layer: torch.zeros(steps, capacity, device=like.device) for layer in sorted(wanted)},
                cos=tables.cos, signed_sin=tables.signed_sin)

        def body(state: DecodeState) -> torch.Tensor:
            hidden = embed(state.ids)
            cos = state.cos.index_select(1, state.position).unsqueeze(1)
            sin = state.signed_sin.index_select(2, state.position)
            for index, layer in enumerate(self.decoder.layers):
                valid = state.valid[index]
                slot = valid.sum(dim=-1).view(1)
                hidden, q, keys, _ = layer_arithmetic(hidden, cos, sin, valid, False,
                                                      *layer_operands(layer, fusions[index]),
                                                      kv_slots=(state.keys[index], state.values[index], slot))
                if index in state.attention:
                    rows = q.reshape(1, keys.shape[1], -1, q.shape[-1])
                    summary = attention_summaries(rows, keys, valid.view(1, 1, 1, 1, -1), layer.self_attn.scaling)
                    state.attention[index].index_copy_(0, state.count, summary.view(1, -1))
            picked = logits(rms_norm(self.decoder.norm, hidden)[:, -1]).argmax(-1).reshape(1)
            state.history.index_copy_(0, state.count, picked)
            state.ids.copy_(picked.view(1, 1))
            state.position.add_(1)
            state.count.add_(1)
            return state.history

        state = self._decode_graphs.state(key, build)
        self._decode_graphs.decode(state, body, steps, cache.keys, cache.values, first_ids, start)
        fed = torch.arange(start, start + steps, device=like.device)
        results = []
        for i in range(steps):
            attention = {layer: (torch.cat([cache.positions[layer], fed[:i + 1]]),
                                 state.attention[layer][i, :held[layer] + i + 1].clone()) for layer in sorted(wanted)}
            results.append(DecodeResult(hidden=None, attention=attention, key_counts=[n + i + 1 for n in held]))
        return torch.cat([first_ids.reshape(1), state.history.clone()]), results

    def _tables(self, like: torch.Tensor, num_tokens: int) -> Optional[RopeTables]:
        """The RoPE tables of positions 0 .. ``num_tokens`` - 1, or None where they depend on the positions asked.

        Built once; rebuilt when the rotary embedding, the length, the dtype or the device changes.
        """
        key = RopeTables.key(self.decoder.rotary_emb, like, num_tokens)
        if key is None:
            return None
        if self._rope_tables is None or self._rope_tables.signature != key:
            self._rope_tables = RopeTables(self.decoder.rotary_emb, like, num_tokens, key)
        return self._rope_tables

    # -- plan checks -------------------------------------------------------------------------------------------

    @staticmethod
    def _apply_keep(kept: torch.Tensor, keep_visual: torch.Tensor, is_visual: torch.Tensor, roles: torch.Tensor,
                    stage: str, non_visual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """New kept set = the kept non-visual tokens + ``keep_visual``; refuse anything else.

        With ``non_visual`` (every non-visual index, on the device) the plan is checked on the device (an
        asynchronous assert, no wait for the device); without it every fault gets its own message.
        """
        if non_visual is not None:
            keep_visual = torch.as_tensor(keep_visual, dtype=torch.long, device=kept.device).flatten()
            return PrunableDecoderRunner._apply_keep_on_device(kept, keep_visual, is_visual, non_visual, stage)
        # on the host in NumPy: the same checks in a quarter of the time of torch's small operations
        if isinstance(keep_visual, torch.Tensor):
            keep_visual = keep_visual.detach().cpu().numpy()
        keep = np.asarray(keep_visual).astype(np.int64, copy=False).reshape(-1)
        visual = is_visual.cpu().numpy()
        num_tokens = len(visual)
        if keep.size and (keep.min() < 0 or keep.max() >= num_tokens):
            bad = keep[(keep < 0) | (keep >= num_tokens)][0]
            raise PlanError(f'{stage}: token index {bad} is out of range for a sequence of {num_tokens} tokens')
        not_visual = keep[~visual[keep]]
        if not_visual.size:
            role = TokenRole(int(roles[int(not_visual[0])])).name
            raise PlanError(f'{stage}: token {int(not_visual[0])} is a {role} token; a keep set names visual tokens '
                            f'only, and text, proprio and action tokens are never dropped')
        present = np.zeros(num_tokens, dtype=bool)
        present[kept.cpu().numpy()] = True
        missing = keep[~present[keep]]
        if missing.size:
            raise PlanError(f'{stage}: visual token {int(missing[0])} was already pruned and cannot come back')
        if visual.any() and keep.size == 0:
            raise PlanError(f'{stage}: the keep set is empty; keep at least one visual token')
        selected = present & ~visual
        selected[keep] = True
        return torch.from_numpy(np.flatnonzero(selected).astype(np.int64, copy=False)).to(kept.device)

    @staticmethod
    def _apply_keep_on_device(kept: torch.Tensor, keep_visual: torch.Tensor, is_visual: torch.Tensor,
                              non_visual: torch.Tensor, stage: str) -> torch.Tensor:
        """``_apply_keep`` without host synchronisation.

        Every size is known on the host (the kept non-visual tokens are all the non-visual ones, which are never
        dropped); the checks run as one device-side assert. ``keep_visual`` must not repeat an index here.
        """
        num_tokens = len(is_visual)
        if len(keep_visual) == 0:
            raise PlanError(f'{stage}: the keep set is empty; keep at least one visual token')
        keep_visual = keep_visual.sort().values
        where = keep_visual.clamp(0, num_tokens - 1)
        # the kept visual tokens (index_fill_ takes the value as a kernel argument: ``allowed[kept] = True`` would
        # copy it from host memory)
        allowed = torch.zeros_like(is_visual).index_fill_(0, kept, True).logical_and_(is_visual)
        # each entry: in range (clamping left it alone), a kept visual token, and not the one before it again
        ok = allowed.index_select(0, where).logical_and_(where == keep_visual)
        ok[1:].logical_and_(keep_visual[1:] != keep_visual[:-1])
        torch._assert_async(ok.all(), f'{stage}: the keep set names tokens that are not kept visual tokens of the '
                            'sequence, or repeats one')
        return torch.cat([non_visual, keep_visual]).sort().values

    def _reusable(self, plan: StepPlan, kept: torch.Tensor, is_visual: torch.Tensor, layout: TokenLayout,
                  on_host: bool) -> Optional[torch.Tensor]:
        """Visual tokens served from the K/V store (ascending), or None; one kept visual token is always computed.

        Indices: those named that are kept and cached at every layer. A :class:`VisualMask` must name such tokens
        only, exactly ``count`` of them, once the store holds anything: checked on the host with a message, or on
        the device by one assert that never waits for it (its count sizes everything after it).
        """
        reuse, store = plan.reuse_kv, plan.kv_store
        if reuse is None or store is None:
            return None
        if isinstance(reuse, VisualMask):
            found = self._reused_by_mask(reuse, store, kept, is_visual, layout, on_host)
        else:
            found = _cached_and_kept(torch.as_tensor(reuse, dtype=torch.long, device=kept.device), store, kept,
                                     is_visual)
        if found is None or len(found) == 0:
            return None
        visual = len(kept) - (layout.num_tokens - layout.num_visual)
        if len(found) == visual:        # keep one visual token computed, so queries exist for it
            found = found[1:]
        return found if len(found) else None

    def _reused_by_mask(self, reuse: VisualMask, store: KVStore, kept: torch.Tensor, is_visual: torch.Tensor,
                        layout: TokenLayout, on_host: bool) -> Optional[torch.Tensor]:
        """The sequence indices a reuse mask names (ascending), checked against what is kept and cached."""
        stage, device = 'reuse_kv', kept.device
        reuse = _keep_as_checked(reuse, layout, device, False, stage)       # on the device, its count a host int
        if reuse.count == 0:
            return None
        layers = sorted(store.valid)
        if not layers:                  # nothing stored yet (an episode's first step): everything is computed
            return None
        if layers != list(range(self.num_layers)):
            raise PlanError(f'{stage}: the mask names cached tokens, but the K/V store holds {len(layers)} of '
                            f'{self.num_layers} layers')
        message = f'{stage}: the mask names tokens that are not kept or have no cached K/V at every layer'
        if on_host:
            named = torch.as_tensor(_mask_indices(reuse, layout, stage), device=device)
            found = _cached_and_kept(named, store, kept, is_visual)
            if len(found) != reuse.count:
                raise PlanError(message)
            return found
        mask = reuse.mask
        _check_mask_shape(mask, layout, stage)
        # the mask in sequence order (non-visual tokens: a spare slot that is never set)
        named = torch.cat([mask, _false_on(device)]).index_select(0, visual_slot_table(layout, device))
        # a store may also hold tokens past the runner's layout (pi0's action expert): only the layout's are named
        allowed = torch.stack([store.valid[layer][:layout.num_tokens] for layer in layers]).all(dim=0)
        if len(kept) < layout.num_tokens:
            allowed = allowed.logical_and_(torch.zeros_like(allowed).index_fill_(0, kept, True))
        ok = mask.sum().eq(reuse.count).logical_and_(named.le(allowed).all())
        torch._assert_async(ok, f'{message}, or does not hold exactly {reuse.count}')
        return torch.nonzero_static(named, size=reuse.count).view(-1)

    @property
    def flops_shape(self) -> tuple[int, int, int, int]:
        """(hidden, MLP, attention and key/value widths) of a layer, as ``core.flops.layer_flops`` takes them."""
        return self.hidden_size, self.mlp_size, self.attention_width, self.kv_width

    def _hook_layers(self, layers: Optional[frozenset[int]]) -> Optional[frozenset[int]]:
        """A plan's ``after_layers``, checked: layer indices of this decoder (None: every layer)."""
        if layers is not None:
            bad = sorted(layer for layer in layers if not _is_layer(layer) or not 0 <= layer < self.num_layers)
            if bad:
                raise PlanError(f'after_layer hook asked after layer {bad[0]}; the decoder has {self.num_layers} '
                                '(integer layer indices)')
        return layers

    def _requests_by_layer(self, requests: list[AttentionRequest]) -> dict[int, list[AttentionRequest]]:
        by_layer: dict[int, list[AttentionRequest]] = {}
        for request in requests:
            if not _is_layer(request.layer) or not 0 <= request.layer < self.num_layers:
                raise PlanError(f'attention requested at layer {request.layer}; the decoder has {self.num_layers} '
                                '(integer layer indices)')
            by_layer.setdefault(request.layer, []).append(request)
        return by_layer

    # -- one layer ---------------------------------------------------------------------------------------------

    @staticmethod
    def _rows_kept_by_mask(kept: torch.Tensor, slots: torch.Tensor, present: torch.Tensor, layout: TokenLayout,
                           keep: VisualMask, stage: str) -> Optional[torch.Tensor]:
        """Rows of ``kept`` that a :class:`VisualMask` keeps (None: all of them), checked on the device.

        ``slots``: each kept token's place among the visual tokens (``num_visual`` elsewhere); ``present``: the
        kept visual tokens as a dense mask. The mask must name kept visual tokens only, exactly ``keep.count`` of
        them (one device-side assert, no wait); the rows come out in order, so the kept set needs no sort.
        """
        mask = keep.mask
        _check_mask_shape(mask, layout, stage)
        visual = len(kept) - (layout.num_tokens - layout.num_visual)     # kept visual tokens (host)
        if keep.count <= 0:
            raise PlanError(f'{stage}: the keep set is empty; keep at least one visual token')
        if keep.count > visual:
            raise PlanError(f'{stage}: the mask keeps {keep.count} visual tokens, but only {visual} run now')
        ok = mask.sum().eq(keep.count)
        if visual < layout.num_visual:      # every visual token still runs: any mask names kept ones
            ok = mask.le(present).all().logical_and_(ok)
        torch._assert_async(ok, f'{stage}: the visual mask names tokens that are no longer kept, or does not hold '
                            f'exactly {keep.count}')
        if keep.count == visual:
            return None
        # each kept token's place in the mask (non-visual tokens: a spare slot that is always set)
        chosen = torch.cat([mask, _true_on(mask.device)]).index_select(0, slots)
        return torch.nonzero_static(chosen, size=len(kept) - visual + keep.count).view(-1)

    def _span_end(self, first: int, requests: Mapping[int, list], hooked: Optional[frozenset[int]],
                  hooks: bool) -> int:
        """The last layer of the graphed span that starts at ``first``.

        The next layer whose attention a probe reads, after which the method's hook runs (``hooks``; ``hooked``
        None: after every layer), or the decoder's last.
        """
        last = first
        while last < self.num_layers - 1 and last not in requests and not (
                hooks and (hooked is None or last in hooked)):
            last += 1
        return last

    def _two_products(self, layer: nn.Module, tokens: KeptTokens, like: torch.Tensor) -> bool:
        """Whether ``layer``'s attention output comes from two products (``attention_kernel``) rather than SDPA.

        Decided once per kept set and kind of attention layer (every layer of a decoder is usually the same kind).
        """
        attn = layer.self_attn
        key = (attn.head_dim, getattr(attn, 'num_key_value_groups', 1) > 1)   # a kept set lives within one pass
        choice = tokens.kernels.get(key)
        if choice is None:
            choice = tokens.kernels[key] = use_two_products(
                len(tokens.kept), tokens.num_keys, attn.head_dim, like, tokens.mask is not None or tokens.causal,
                key[1], self.attention_kernel)
        return choice

    def _shares_probabilities(self, layer: nn.Module, tokens: KeptTokens,
                              requests: list[AttentionRequest] | tuple) -> bool:
        """Whether ``layer``'s probes read most of its query rows, so that its own probabilities answer them."""
        if not requests or not self.share_probabilities:
            return False
        rows = sum(len(tokens.query_rows(request.rows)) for request in requests)
        grouped = getattr(layer.self_attn, 'num_key_value_groups', 1) > 1
        return share_probabilities(min(rows, len(tokens.kept)), len(tokens.kept), grouped, self.attention_kernel)

    def _run_layer(self, layer: nn.Module, index: int, hidden: torch.Tensor, tokens: KeptTokens,
                   requests: list[AttentionRequest] | tuple, store: Optional[KVStore],
                   cache: Optional[DecoderCache], probes: ProbeBatch, fused: Optional[FusedProjections],
                   products: bool = False, shared: bool = False, graph: bool = False,
                   span: Optional[Sequence[Optional[FusedProjections]]] = None
                   ) -> tuple[torch.Tensor, LazyAttention]:
        """One decoder layer over the kept tokens (plus reused keys/values), with its ``fused`` projections.

        ``products``: the attention output from two products instead of fused SDPA (no mask applies then);
        ``graph``: the layer replayed as its CUDA graph at the padded size (a probed layer's graph keeps its
        queries and keys for the probes); with ``span`` (the fused projections of layers ``index`` onwards) those
        layers replayed as one graph, ``requests`` then asked of the last of them.

        The requested attention rows are queued in ``probes`` and scored when first read (every queued probe of the same
        shape in one batch); with ``shared``, the layer's attention runs as two products and its probabilities answer
        the requests at once.
        """
        def extend(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if store is not None and k.shape[0] == 1:
                self._store_kv(store, index, tokens.kept, k[0], v[0], tokens.layout.num_tokens)
            if tokens.reused is not None:
                batch = k.shape[0]
                old_k = store.keys[index][:, tokens.reused].unsqueeze(0).to(k.dtype).expand(batch, -1, -1, -1)
                old_v = store.values[index][:, tokens.reused].unsqueeze(0).to(v.dtype).expand(batch, -1, -1, -1)
                k, v = torch.cat([k, old_k], dim=2), torch.cat([v, old_v], dim=2)
            if cache is not None:
                cache.keys.append(k)
                cache.values.append(v)
                cache.positions.append(tokens.key_indices)
            return k, v

        rows = [tokens.query_rows(request.rows) for request in requests] if shared else None
        probed: list[torch.Tensor] = []
        if graph:
            hidden, q, k, v, layers_kv = self._graphed_block(index, hidden, tokens.padded, span or [fused],
                                                             bool(requests), cache is not None)
            for layer_k, layer_v in layers_kv or ():    # copies: the graph's buffers change at its next replay
                cache.keys.append(layer_k.clone())
                cache.values.append(layer_v.clone())
                cache.positions.append(tokens.key_indices)
        elif tokens.padded is not None:
            hidden, q, k = self._compiled_block(layer, hidden, tokens.padded, fused, self.compile_layers)
        else:
            hidden, q, k = self._block(layer, hidden, tokens.rope, tokens.mask, tokens.causal, extend, fused,
                                       products, rows, probed)
        summaries = LazyAttention(probes)
        for request, found in itertools.zip_longest(requests, probed):
            if found is not None:
                summaries.put(request.key, found)
            else:
                summaries.add(request.key, q, k, tokens.query_rows(request.rows), tokens.mask,
                              layer.self_attn.scaling)
        return hidden, summaries

    def _graphs_on(self, device: torch.device) -> bool:
        return self.cuda_graph_layers and device.type == 'cuda'

    def _compiles(self, plan: StepPlan, reused: Optional[torch.Tensor], return_cache: bool,
                  device: torch.device) -> bool:
        """Whether this pass runs its layers over padded tokens, compiled or as CUDA graphs (nothing they leave out)."""
        wanted = self.compile_layers or self._graphs_on(device)
        if not wanted or torch.is_grad_enabled() or reused is not None:
            return False
        if return_cache and not self._graphs_on(device):   # a graphed layer also hands its keys and values out
            return False
        if plan.kv_store is not None:
            return False
        fused_needed = self.compile_layers          # the compiled graph reads fused weights; CUDA graphs run either
        return all((not fused_needed or self._fusion(i) is not None) and compilable(layer)
                   for i, layer in enumerate(self.decoder.layers))

    @staticmethod
    def _compiled_block(layer: nn.Module, hidden: torch.Tensor, padded: PaddedTokens,
                        fused: Optional[FusedProjections], compiled: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_block` over the tokens padded to their bucket, compiled (else eager); padding dropped after it."""
        n = hidden.shape[1]
        x = F.pad(hidden, (0, 0, 0, padded.size - n)) if padded.size > n else hidden
        arithmetic = compiled_layer() if compiled else layer_arithmetic
        out, q, k, _ = arithmetic(x, padded.rope._cos, padded.rope._sin, padded.mask, padded.causal,
                                  *layer_operands(layer, fused))
        return out[:, :n], q[:, :, :n], k[:, :, :n]

    def _graphed_block(self, index: int, hidden: torch.Tensor, padded: PaddedTokens,
                       fusions: Sequence[Optional[FusedProjections]], probed: bool = False,
                       keys_values: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
                                                           Optional[torch.Tensor], Optional[list[tuple]]]:
        """:meth:`_block` of layers ``index`` onwards as one CUDA graph at the padded size (``cuda_graph_layers``).

        One layer per entry of ``fusions`` (its fused projections). Returns the output, and with ``probed`` the last
        layer's queries, keys and values, with ``keys_values`` every layer's keys and values (for a decode cache),
        all over the kept tokens and valid until the graph replays again (the pass's probes read them before that;
        a decode cache copies them); None for what was not asked.
        """
        layers = [(self.decoder.layers[index + i], fused) for i, fused in enumerate(fusions)]
        last = index + len(layers) - 1

        def body(x, rope, mask):
            cos, sin = rope[:1], rope[1:]
            earlier = []
            for layer, fused in layers[:-1]:
                x, _, k, v = layer_arithmetic(x, cos, sin, mask, padded.causal, *layer_operands(layer, fused))
                earlier += [k, v] if keys_values else []
            out = layer_arithmetic(x, cos, sin, mask, padded.causal, *layer_operands(*layers[-1]))
            return (*out, *earlier) if probed or keys_values else out[0]
        # a span that hands out every layer's keys and values is a graph of its own
        key = (index, last) + (('keys and values',) if keys_values and last > index else ())
        try:
            got = self._graphs.run(key, hidden, padded.size, padded.rope.stacked, padded.mask, padded, body,
                                   probed or keys_values)
        except RuntimeError as error:
            if last == index:
                raise
            # a span CUDA would not capture: one graph per layer from now on (this span's layers included)
            _LOG.warning('layers %d-%d could not run as one CUDA graph (%s); each layer runs as a graph of its '
                         'own from now on', index, last, error)
            self.cuda_graph_spans = False
            layers_kv = [] if keys_values else None
            for i, fused in enumerate(fusions):
                hidden, q, k, v, kv = self._graphed_block(index + i, hidden, padded, [fused],
                                                          probed and index + i == last, keys_values)
                layers_kv = layers_kv + kv if keys_values else None
            return hidden, q, k, v, layers_kv
        if not (probed or keys_values):
            return got, None, None, None, None
        n = hidden.shape[1]
        out, q, k, v, *earlier = (part[:, :n] if i == 0 else part[:, :, :n] for i, part in enumerate(got))
        layers_kv = list(zip(earlier[::2], earlier[1::2])) + [(k, v)] if keys_values else None
        return out, q, k, v, layers_kv

    def _fusions(self) -> list[Optional[FusedProjections]]:
        """Every layer's fused projections for one pass (see :meth:`_fusion`).

        Checked once per pass: while the settings and every copied weight (storage and in-place version) are those
        of the last pass, its list is reused (one sweep over the weights instead of a lookup per layer).
        """
        if self.fuse_projections is False or torch.is_grad_enabled():
            return [None] * self.num_layers
        first = next(self.decoder.layers.parameters())
        settings = (self.fuse_projections, self._copy_kind(first), first.device, first.dtype, len(self.decoder.layers))
        last = self._pass_fusions
        if last is not None and last[0] == settings and all(
                fused is None or fused.current() for fused in last[1]):
            return last[1]
        fusions = [self._fusion(index) for index in range(self.num_layers)]
        self._pass_fusions = (settings, fusions)
        return fusions

    def _fusion(self, index: int) -> Optional[FusedProjections]:
        """Layer ``index``'s fused projections, or None where the layer's own modules must run.

        None under autograd, or for modules that are not plain linear layers.
        """
        if self.fuse_projections is False or torch.is_grad_enabled():
            return None
        fused = self._fused.get(index)
        layer = self.decoder.layers[index]
        kind = self._copy_kind(next(layer.parameters()))
        if fused is None or not fused.current() or fused.copy_kind != kind:
            weight = next(layer.parameters())
            if self.fuse_projections is None and weight.device.type != 'cpu' and not (
                    self.compile_layers or (self.cuda_graph_layers and self._device_copy_fits(weight.device))):
                return None
            exact = self._mkl_packed if kind == 'mkl_packed' else self._input_major
            fused = FusedProjections.build(layer, kind, exact)
            if fused is None:
                self.fuse_projections = False
                return None
            self._fused[index] = fused
        return fused

    def _device_copy_fits(self, device: torch.device) -> bool:
        """Whether the fused query/key/value and gate/up copies take at most half the accelerator's free memory.

        Decided once per runner. Inside a CUDA graph the fused products save launches no longer: they are kept only
        where the copy (about 9 GB for a 7B decoder) leaves room.
        """
        if self._device_copies_fit is None:
            needed = linear_weight_bytes(getattr(part, name, None) for layer in self.decoder.layers
                                         for part, names in ((layer.self_attn, ('q_proj', 'k_proj', 'v_proj')),
                                                             (layer.mlp, ('gate_proj', 'up_proj')))
                                         for name in names)
            free = torch.cuda.mem_get_info(device)[0] if device.type == 'cuda' else 0
            self._device_copies_fit = needed <= free / 2
        return self._device_copies_fit

    def weight_copy_kind(self) -> Optional[str]:
        """The weight copies the layers' products read: 'packed' (oneDNN), 'mkl_packed', 'input_major' or None."""
        if self.fuse_projections is False:
            return None
        return self._copy_kind(next(self.decoder.parameters()))

    def _copy_kind(self, weight: torch.Tensor) -> Optional[str]:
        """Which extra weight copies the fused projections hold: 'packed', 'mkl_packed', 'input_major' or None."""
        # the defaults are weighed (processor, free memory) only for weights a copy applies to
        if packable(weight):
            packed = self.packed_weights
            if packed is None:
                packed = (not self.input_major_weights and self.hidden_size >= PACKED_MIN_WIDTH
                          and cpu_vendor() != 'GenuineIntel' and self._copies_fit_memory())
            if packed:
                return 'packed'
        if self.input_major_weights:
            return 'input_major'
        if mkl_packable(weight):
            mkl_packed = self.mkl_packed_weights
            if mkl_packed is None:
                mkl_packed = self.hidden_size >= PACKED_MIN_WIDTH and self._copies_fit_memory()
            if mkl_packed:
                return 'mkl_packed'
        return None

    def _copies_fit_memory(self) -> bool:
        """Whether one more copy of the decoder's linear weights fits the memory share the default copies may take.

        Decided once per runner (the copies are not rebuilt as free memory changes); True where memory is unknown.
        """
        if self._copies_fit is None:
            available = available_memory_bytes()
            needed = linear_weight_bytes(self.decoder.layers.modules())
            self._copies_fit = available is None or needed <= COPY_MEMORY_SHARE * available
        return self._copies_fit

    @staticmethod
    def _block(layer: nn.Module, hidden: torch.Tensor, rope: Rotary, mask: Optional[torch.Tensor], causal: bool,
               extend_kv, fused: Optional[FusedProjections] = None, products: bool = False,
               probe_rows: Optional[list[torch.Tensor]] = None, probed: Optional[list[torch.Tensor]] = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoder layer itself: norm, projections, RoPE, fused SDPA attention, output projection, MLP.

        ``products``: attention as two products instead (unmasked; see ``attention_kernel``). ``probe_rows``:
        attention as two products (masked where ``mask`` says), and the probabilities of each set of query rows,
        averaged, appended to ``probed``.

        ``mask``: boolean SDPA mask or None; ``causal``: let SDPA apply a plain lower-triangular mask itself (queries
        and keys are the same tokens in the same order; ``mask`` is then ignored). ``extend_kv(k, v) -> (keys,
        values)`` turns this pass's keys/values into the ones attended to (stores them, adds reused or cached ones).
        Returns the layer output, the queries and the keys (for attention probes).

        With ``fused`` projections (no autograd) the layer runs with fewer, larger operations that give the same
        numbers: one product for query/key/value and RoPE over the queries and keys at once, one product for
        gate/up, RMS norms in one call and the residual sums written into the products' outputs.
        """
        attn = layer.self_attn
        batch, n, _ = hidden.shape
        head_dim = attn.head_dim
        if fused is None:
            x = layer.input_layernorm(hidden)
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(batch, n, -1, head_dim).transpose(1, 2)
            k = k.view(batch, n, -1, head_dim).transpose(1, 2)
            v = v.view(batch, n, -1, head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, rope.cos, rope.sin)
        else:
            x = rms_norm(layer.input_layernorm, hidden)
            qkv = fused.product(x, fused.qkv_weight, fused.qkv_copy, fused.qkv_bias).view(batch, n, -1, head_dim)
            heads, kv_heads = fused.qkv_sizes[0] // head_dim, fused.qkv_sizes[1] // head_dim
            qk = rope.apply(qkv[:, :, :heads + kv_heads].transpose(1, 2))
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, :, heads + kv_heads:].transpose(1, 2)
        k, v = extend_kv(k, v)
        groups = q.shape[1] // k.shape[1]
        if probe_rows is not None and groups == 1:
            out, found = attention_with_summaries(q, k, v, attn.scaling, mask, probe_rows)
            probed.extend(found)
        elif products and groups == 1 and mask is None and not causal:
            out = two_product_attention(q, k, v, attn.scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                                 scale=attn.scaling, enable_gqa=groups > 1)
        out = out.transpose(1, 2).reshape(batch, n, -1)
        if fused is None:
            hidden = hidden + attn.o_proj(out)
            return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), q, k
        hidden = fused.linear(attn.o_proj, out, fused.o_copy).add_(hidden)
        mlp = layer.mlp
        gate, up = fused.product(rms_norm(layer.post_attention_layernorm, hidden), fused.gate_up_weight,
                                 fused.gate_up_copy, fused.gate_up_bias).chunk(2, dim=-1)
        down = fused.linear(mlp.down_proj, activation(mlp.act_fn, gate).mul_(up), fused.down_copy)
        return down.add_(hidden), q, k

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
        store.valid[index].index_fill_(0, kept, True)


@constant_tensors(maxsize=32)
def _role_tables(layout: TokenLayout, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Role of every token, the visual mask, the non-visual and the visual indices, once per (layout, device).

    The results are shared: do not modify them.
    """
    roles = layout.roles()
    is_visual = roles == int(TokenRole.VISUAL)
    tables = (roles, is_visual, torch.nonzero(~is_visual).flatten(), torch.nonzero(is_visual).flatten())
    return tuple(t.to(device) for t in tables)


@constant_tensors          # never evicted, like every constant a graph may read by address
def _true_on(device: torch.device) -> torch.Tensor:
    """A (1,) True on ``device`` (shared: do not modify it)."""
    return torch.ones(1, dtype=torch.bool, device=device)


@constant_tensors
def _false_on(device: torch.device) -> torch.Tensor:
    """A (1,) False on ``device`` (shared: do not modify it)."""
    return torch.zeros(1, dtype=torch.bool, device=device)


def _cached_and_kept(named: torch.Tensor, store: KVStore, kept: torch.Tensor,
                     is_visual: torch.Tensor) -> Optional[torch.Tensor]:
    """The visual tokens ``named`` (ascending, once each) that are kept and cached at every layer of ``store``.

    Reads the tokens back to the host (their number depends on the store): the indices path of K/V reuse.
    """
    named = named.unique()
    if len(named) and (named.min() < 0 or named.max() >= len(is_visual) or not is_visual[named].all()):
        raise PlanError('reuse_kv may only name visual tokens of the sequence')
    named = named[torch.isin(named, kept)]
    if len(store.valid) == 0:
        return None
    for valid in store.valid.values():
        named = named[valid[named]]
    return named


KeepSet = Optional[torch.Tensor | np.ndarray | VisualMask]     # what a plan or a hook may name as kept


def _is_layer(layer: object) -> bool:
    """An integer layer index (a float such as 1.5 would never match a layer)."""
    return isinstance(layer, (int, np.integer)) and not isinstance(layer, bool)


def _keep_as_checked(keep: KeepSet, layout: TokenLayout, device: torch.device, on_host: bool, stage: str) -> KeepSet:
    """A method's keep set as the runner checks it; indices and None as they are.

    A :class:`VisualMask` on ``device`` with a host count (a method may hand either elsewhere), or, where keep sets
    are checked on the host, the indices it names.
    """
    if not isinstance(keep, VisualMask):
        if keep is not None:
            if isinstance(keep, torch.Tensor):
                kind = keep.dtype
                indices = not (kind == torch.bool or kind.is_floating_point or kind.is_complex)
            else:
                array = np.asarray(keep)
                kind = array.dtype
                indices = kind.kind in 'iu' or array.size == 0      # an empty list: refused as empty below
            if not indices:
                raise PlanError(f'{stage}: a keep set is integer sequence indices or a VisualMask, not {kind} '
                                'values (a bool mask over the visual tokens goes in VisualMask(mask, count))')
        return keep
    if keep.mask.device != device or type(keep.count) is not int:
        keep = VisualMask(keep.mask.to(device), int(keep.count))
    return _mask_indices(keep, layout, stage) if on_host else keep


def _check_mask_shape(mask: torch.Tensor, layout: TokenLayout, stage: str) -> None:
    """Refuse a visual mask that is not one bool per visual token of ``layout``."""
    if mask.shape != (layout.num_visual,) or mask.dtype != torch.bool:
        raise PlanError(f'{stage}: a visual mask must be a ({layout.num_visual},) bool tensor, not '
                        f'{tuple(mask.shape)} {mask.dtype}')


def _mask_indices(keep: VisualMask, layout: TokenLayout, stage: str) -> np.ndarray:
    """The sequence indices a :class:`VisualMask` names, on the host, after checking its shape and count."""
    _check_mask_shape(keep.mask, layout, stage)
    mask = keep.mask.detach().cpu().numpy()
    if int(mask.sum()) != keep.count:
        raise PlanError(f'{stage}: the visual mask holds {int(mask.sum())} tokens, not the {keep.count} it says')
    return visual_order(layout)[0].numpy()[mask]
