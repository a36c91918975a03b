"""CPU attention at the token counts pruning leaves: SDPA's fused kernel against two matrix products.

The executor computes probabilities only for the rows a method reads; every layer's output comes from fused SDPA
or, where this script measured them faster on the CPU, from two products (the rule in
``specprune_ros/core/attention_kernels.py``). It times, per token count (queries = keys, bidirectional, no mask),
SDPA's fused CPU kernel against attention as two products with a softmax between them
(``softmax(q k^T * scale) v``), interleaved, medians over rounds, and the largest difference of their outputs:

    python benchmarks/attention_kernels.py --heads 4 --head-dim 64 --threads 2
    python benchmarks/attention_kernels.py --heads 4 --head-dim 128 --tokens 100 141 205 333 589 --threads 2

Run it alone on the machine: the times are per call, in microseconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specprune_ros.command_line import HelpFormatter  # noqa: E402
from specprune_ros.core.attention_kernels import two_product_attention as two_products  # noqa: E402

KERNELS = ('sdpa', 'products')


def per_call_us(call: Callable[[], torch.Tensor], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e6


def measure(tokens: list[int], heads: int, head_dim: int, rounds: int, calls: int, seed: int = 0) -> list[dict]:
    """Per token count: median microseconds per call of each kernel and the largest output difference."""
    generator = torch.Generator().manual_seed(seed)
    scale = head_dim ** -0.5
    inputs = {n: torch.randn(3, 1, heads, n, head_dim, generator=generator).unbind(0) for n in tokens}
    calls_of = {n: {'sdpa': (lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=scale)),
                    'products': (lambda q=q, k=k, v=v: two_products(q, k, v, scale))}
                for n, (q, k, v) in inputs.items()}
    samples: dict[tuple[int, str], list[float]] = {(n, kernel): [] for n in tokens for kernel in KERNELS}
    with torch.inference_mode():
        for n in tokens:                      # warm-up: one call each
            for kernel in KERNELS:
                calls_of[n][kernel]()
        for round_index in range(rounds):     # interleaved, the kernel order alternating
            for n in tokens:
                for kernel in (KERNELS if round_index % 2 == 0 else KERNELS[::-1]):
                    samples[(n, kernel)].append(per_call_us(calls_of[n][kernel], calls))
        rows = []
        for n in tokens:
            difference = (calls_of[n]['sdpa']() - calls_of[n]['products']()).abs().max().item()
            sdpa, products = (statistics.median(samples[(n, kernel)]) for kernel in KERNELS)
            rows.append({'tokens': n, 'sdpa_us': sdpa, 'products_us': products, 'sdpa_over_products': sdpa / products,
                         'max_abs_difference': difference})
    return rows


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--heads', type=int, default=4, help='attention heads')
    parser.add_argument('--head-dim', type=int, default=64, help='head dimension')
    parser.add_argument('--tokens', type=int, nargs='+', default=[72, 105, 141, 180, 213, 260, 357],
                        help='token counts (queries = keys)')
    parser.add_argument('--rounds', type=int, default=9, help='interleaved rounds (median over them)')
    parser.add_argument('--calls', type=int, default=30, help='calls per kernel, count and round')
    parser.add_argument('--threads', type=int, default=2, help='torch threads')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.tokens, args.heads, args.head_dim, args.rounds, args.calls)
    print(f'{args.heads} heads x {args.head_dim}, {args.threads} threads, torch {torch.__version__}; medians of '
          f'{args.rounds} interleaved rounds of {args.calls} calls, us per call')
    print('| tokens | SDPA (fused) | two products | SDPA / products | max abs difference |')
    print('|---|---|---|---|---|')
    for row in rows:
        print(f"| {row['tokens']} | {row['sdpa_us']:.0f} | {row['products_us']:.0f} | "
              f"{row['sdpa_over_products']:.2f} | {row['max_abs_difference']:.1e} |")
    return {'heads': args.heads, 'head_dim': args.head_dim, 'threads': args.threads, 'rows': rows}


if __name__ == '__main__':
    main()
