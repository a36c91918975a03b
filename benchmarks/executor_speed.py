"""Model-step latency of the prunable executor at several visual-token budgets, measured side by side.

Random-initialised Llama decoder with the OpenVLA-OFT token layout (2 cameras x 256 patches, ~20 prompt
tokens, 1 proprio token, 56 action queries). Budgets run interleaved (round-robin) in one process and the
medians are compared, so machine noise hits all budgets alike. Tokens are dropped before layer 0, evenly
per camera; the plain transformers forward of the same weights is timed alongside as a reference.
``--unfused`` also times every budget with the layers' own projections (``fuse_projections=False``), interleaved
with the fused ones; ``--compile`` likewise with compiled layers (``compile_layers=True``, kept counts padded to
``--bucket``; the compilations happen in the warm-up rounds); ``--input-major`` likewise with every layer weight held
input-major (``input_major_weights=True``); ``--packed`` likewise with oneDNN's prepacked weights
(``packed_weights=True``); ``--mkl-packed`` likewise with MKL's packed weights (``mkl_packed_weights=True``);
``--two-products`` likewise with the executor's attention rule (two products instead of fused SDPA at 96-191 tokens
on the CPU, ``attention_kernel=None``); ``--defaults`` likewise with every executor default. ``--probe-layer K``
prunes as VLA-Pruner does: every token through layers 0..K, the budget's tokens dropped after layer K, whose prefill
rows' attention every plan asks for; it times the defaults with and without reading that probe off the layer's own
probabilities (``share_probabilities``), interleaved. ``--products-only`` also times, interleaved, the decoder's
matrix products alone at each budget's token count (per layer query/key/value, output, gate/up and down projections,
plain BLAS, nothing else): their speedup over the token ratio is what the products' own efficiency at fewer rows
leaves of the FLOPs-ideal speedup, before any other operation's cost. The first runner uses
the plain BLAS product and fused SDPA in every layer (``packed_weights=False, mkl_packed_weights=False,
attention_kernel='sdpa'``); the others keep SDPA everywhere unless named otherwise. Wall-clock time by
default; ``--clock cpu`` measures the process's CPU time instead (steadier on a shared machine, but it hides how
well the threads are used).
``--head-dim 128 --mlp-ratio 2.6875`` gives the published Llama-2 proportions (OpenVLA / OpenVLA-OFT).

    python benchmarks/executor_speed.py --steps 20 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel

from specprune_ros.command_line import HelpFormatter
from specprune_ros.core.executor import PrunableDecoderRunner
from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.core.step_types import AttentionRequest
from specprune_ros.core.token_layout import TokenLayout


def oft_layout(patches: int = 256, cameras: int = 2, prompt: int = 20, actions: int = 56) -> TokenLayout:
    spans = tuple((i * patches, (i + 1) * patches) for i in range(cameras))
    text = cameras * patches
    side = int(patches ** 0.5)
    return TokenLayout(num_tokens=text + prompt + 1 + actions, camera_spans=spans, grid_shape=(side, side),
                       text_span=(text, text + prompt), proprio_span=(text + prompt, text + prompt + 1),
                       action_span=(text + prompt + 1, text + prompt + 1 + actions), causal=False)


def even_keep(layout: TokenLayout, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The same number of random patches from each camera."""
    per_camera = max(1, round(layout.patches_per_camera * fraction))
    chosen = [layout.visual_indices(c)[torch.randperm(layout.patches_per_camera, generator=generator)[:per_camera]]
              for c in range(layout.num_cameras)]
    return torch.cat(chosen).sort().values


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--hidden', type=int, default=512, help='decoder width')
    parser.add_argument('--layers', type=int, default=8, help='decoder layers')
    parser.add_argument('--steps', type=int, default=20, help='timed steps per budget (after warm-up)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads')
    parser.add_argument('--budgets', type=float, nargs='+', default=[1.0, 0.5, 0.25, 0.125],
                        help='kept-token fractions to time')
    parser.add_argument('--unfused', action='store_true', help='also time the unfused projections, interleaved')
    parser.add_argument('--compile', action='store_true', help='also time compiled layers, interleaved')
    parser.add_argument('--input-major', action='store_true',
                        help='also time the layers with input-major (transposed) weights, interleaved')
    parser.add_argument('--packed', action='store_true',
                        help="also time the layers with oneDNN's prepacked weights, interleaved")
    parser.add_argument('--mkl-packed', action='store_true',
                        help="also time the layers with MKL's packed weights, interleaved")
    parser.add_argument('--two-products', action='store_true',
                        help="also time the layers with the executor's attention rule (two products at 96-191 "
                             "tokens on the CPU), interleaved")
    parser.add_argument('--defaults', action='store_true',
                        help="also time the executor with every default (weight copies, attention rule), interleaved")
    parser.add_argument('--probe-layer', type=int, default=None,
                        help="drop the budget's tokens after this layer and probe its prefill rows (VLA-Pruner's "
                             'pattern); times the defaults with and without shared probabilities')
    parser.add_argument('--products-only', action='store_true',
                        help="also time the layers' matrix products alone at each budget's token count")
    parser.add_argument('--bucket', type=int, default=32, help='token-count bucket of the compiled layers')
    parser.add_argument('--head-dim', type=int, default=64, help='attention head dimension')
    parser.add_argument('--layout', choices=('oft', 'reference'), default='oft',
                        help="token layout: OpenVLA-OFT's (2 x 256 patches, 20 prompt, 1 proprio, 56 action queries) "
                             "or the reference VLA's (2 x 144 patches, 12 words, 1 proprio, 56 action queries)")
    parser.add_argument('--mlp-ratio', type=float, default=4.0, help='MLP width / decoder width')
    parser.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                        help="'wall' time, or the process's 'cpu' time (steadier on a loaded machine, 1 thread)")
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.clock == 'wall' else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=round(args.hidden * args.mlp_ratio),
                         num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // args.head_dim,
                         num_key_value_heads=args.hidden // args.head_dim, vocab_size=8,
                         max_position_embeddings=1024)
    config._attn_implementation = 'sdpa'
    decoder = LlamaModel(config).eval()
    sdpa = dict(attention_kernel='sdpa')
    runners = {'': PrunableDecoderRunner(decoder, packed_weights=False, mkl_packed_weights=False, **sdpa)}
    if args.unfused:
        runners[' unfused'] = PrunableDecoderRunner(decoder, fuse_projections=False, **sdpa)
    if args.compile:
        runners[' compiled'] = PrunableDecoderRunner(decoder, compile_layers=True, bucket=args.bucket, **sdpa)
    if args.input_major:
        runners[' input-major'] = PrunableDecoderRunner(decoder, input_major_weights=True, **sdpa)
    if args.packed:
        runners[' packed'] = PrunableDecoderRunner(decoder, packed_weights=True, **sdpa)
    if args.mkl_packed:
        runners[' mkl-packed'] = PrunableDecoderRunner(decoder, packed_weights=False, mkl_packed_weights=True, **sdpa)
    if args.two_products:
        runners[' two-products'] = PrunableDecoderRunner(decoder, packed_weights=False, mkl_packed_weights=False)
    if args.defaults or args.probe_layer is not None:
        runners[' defaults'] = PrunableDecoderRunner(decoder)
    if args.probe_layer is not None:
        runners[' separate probe'] = PrunableDecoderRunner(decoder, share_probabilities=False)
    layout = oft_layout() if args.layout == 'oft' else oft_layout(patches=144, prompt=12, actions=56)
    x = torch.randn(1, layout.num_tokens, args.hidden)
    generator = torch.Generator().manual_seed(0)
    keeps = {b: None if b >= 1.0 else even_keep(layout, b, generator) for b in args.budgets}
    if args.probe_layer is None:
        plans = {b: FixedKeepSchedule(keep_before=keep) for b, keep in keeps.items()}
    else:
        probe = [AttentionRequest(args.probe_layer, 'prefill')]
        plans = {b: FixedKeepSchedule(keep_after={} if keep is None else {args.probe_layer: keep}, attention=probe)
                 for b, keep in keeps.items()}
    bidirectional = torch.ones(1, 1, layout.num_tokens, layout.num_tokens, dtype=torch.bool)

    times: dict[str, list[float]] = {f'{b:g}{r}': [] for b in args.budgets for r in runners}
    times['transformers'] = []
    products = layer_products(decoder) if args.products_only else None
    token_counts = {b: layout.num_tokens - layout.num_visual + (layout.num_visual if keep is None else len(keep))
                    for b, keep in keeps.items()}
    inputs = {b: (torch.randn(1, n, args.hidden), torch.randn(1, n, config.intermediate_size))
              for b, n in token_counts.items()}
    flops: dict[str, float] = {}
    with torch.inference_mode():
        for step in range(args.steps + 3):  # 3 warm-up rounds
            for budget, plan in plans.items():
                for suffix, runner in runners.items():
                    t0 = clock()
                    record = runner(x, layout, plan).record
                    elapsed = clock() - t0
                    flops[f'{budget:g}'] = record.flops
                    if step >= 3:
                        times[f'{budget:g}{suffix}'].append(elapsed)
            t0 = clock()
            decoder(inputs_embeds=x, attention_mask=bidirectional)
            if step >= 3:
                times['transformers'].append(clock() - t0)
            if products is not None:
                for budget in args.budgets:
                    t0 = clock()
                    run_products(products, *inputs[budget])
                    if step >= 3:
                        times.setdefault(f'products {budget:g}', []).append(clock() - t0)

    print(f'decoder {args.hidden} wide x {args.layers} layers, {layout.num_tokens} tokens '
          f'({layout.num_visual} visual), {args.threads} threads, {args.steps} interleaved steps per budget, '
          f'{args.clock} clock')
    reference = statistics.median(times['transformers'])
    print(f'plain transformers forward (same weights): {reference * 1e3:.1f} ms median; executor keep-all: '
          + '; '.join(f'{name.strip() or "fused"} {statistics.median(times["1" + name]) * 1e3:.1f} ms '
                      f'({statistics.median(times["1" + name]) / reference:.2f}x its time)' for name in runners))
    for suffix in runners:
        base = statistics.median(times['1' + suffix])
        print(f'\nprojections: {suffix.strip() or "fused (plain BLAS product, SDPA)"}')
        print('| visual kept | tokens | median ms (p10-p90) | measured speedup | FLOPs-ideal speedup '
              '| measured / ideal | time / fused |')
        print('|---|---|---|---|---|---|---|')
        for budget in args.budgets:
            key = f'{budget:g}'
            samples = times[key + suffix]
            median = statistics.median(samples)
            deciles = statistics.quantiles(samples, n=10) if len(samples) > 1 else [median] * 9
            measured = base / median
            ideal = flops['1'] / flops[key]
            spread = f'{deciles[0] * 1e3:.0f}-{deciles[-1] * 1e3:.0f}'
            # against the first runner (fused projections, plain BLAS product, SDPA) at the same budget
            relative = median / statistics.median(times[key])
            print(f'| {budget * 100:.1f}% | {token_counts[budget]} | {median * 1e3:.1f} ({spread}) | {measured:.2f}x | '
                  f'{ideal:.2f}x | {measured / ideal:.2f} | {relative:.2f} |')
    if products is not None:
        print('\nmatrix products alone (plain BLAS, every layer, nothing else)')
        print('| visual kept | tokens | median ms (p10-p90) | speedup | token ratio | speedup / token ratio |')
        print('|---|---|---|---|---|---|')
        base = statistics.median(times[f'products {max(args.budgets):g}'])
        for budget in args.budgets:
            samples = times[f'products {budget:g}']
            median = statistics.median(samples)
            deciles = statistics.quantiles(samples, n=10) if len(samples) > 1 else [median] * 9
            ratio = token_counts[max(args.budgets)] / token_counts[budget]
            print(f'| {budget * 100:.1f}% | {token_counts[budget]} | {median * 1e3:.1f} ({deciles[0] * 1e3:.0f}-'
                  f'{deciles[-1] * 1e3:.0f}) | {base / median:.2f}x | {ratio:.2f}x | {base / median / ratio:.2f} |')


def layer_products(decoder: LlamaModel) -> list[tuple[torch.Tensor, ...]]:
    """Every layer's weights as the executor's fused products use them: (qkv, o, gate_up, down)."""
    out = []
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out.append((torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), attn.o_proj.weight,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight))
    return out


def run_products(products: list[tuple[torch.Tensor, ...]], x: torch.Tensor, x_mlp: torch.Tensor) -> None:
    """The decoder's matrix products, layer after layer, over ``x`` (1, n, d) and ``x_mlp`` (1, n, mlp width)."""
    for qkv, o, gate_up, down in products:
        F.linear(x, qkv)
        F.linear(x, o)
        F.linear(x, gate_up)
        F.linear(x_mlp, down)


if __name__ == '__main__':
    main()
