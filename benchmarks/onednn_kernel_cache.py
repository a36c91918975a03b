"""What oneDNN's per-shape kernels cost a decoder whose token count varies: build time and memory.

The executor's CPU products read oneDNN-prepacked weights (``PrunableDecoderRunner(packed_weights=...)``). oneDNN
builds a kernel (primitive) for every input shape the first time it meets it and caches it, so a pruning method
whose kept count changes from step to step pays that build inside its steps, and every cached kernel holds memory.
This script measures both for one decoder layer's four products (fused query/key/value, output, fused gate/up,
down) at a given width:

* per token count, the first product call (kernel built) against the second (kernel cached), MKL's product
  (``F.linear`` on the plain weight, no per-shape kernel) beside them;
* the process's resident memory before and after building the kernels of every count from 1 to ``--tokens``.

    python benchmarks/onednn_kernel_cache.py --width 256 --mlp 768 --tokens 357 --threads 2
    python benchmarks/onednn_kernel_cache.py --width 512 --mlp 1376 --tokens 592 --threads 2

Run it alone on the machine: timings are medians over the sampled counts, memory is the process's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

# the cache must hold every kernel built here (read when oneDNN builds its first kernel)
os.environ.setdefault('ONEDNN_PRIMITIVE_CACHE_CAPACITY', '16384')

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specprune_ros.command_line import HelpFormatter  # noqa: E402


def resident_mb() -> float:
    """The process's resident memory in MB."""
    return psutil.Process().memory_info().rss / 2 ** 20


def layer_weights(width: int, mlp: int, kv_width: int, seed: int = 0) -> list[torch.Tensor]:
    """(out, in) weights of one Llama layer's four products: q/k/v fused, output, gate/up fused, down."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(width + 2 * kv_width, width), (width, width), (2 * mlp, width), (width, mlp)]
    return [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]


def packed_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, 'none', [], '')


def timed_us(call) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1e6


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--width', type=int, default=256, help='decoder width')
    parser.add_argument('--mlp', type=int, default=768, help='MLP width')
    parser.add_argument('--kv-width', type=int, default=None, help='key / value width (default: the width)')
    parser.add_argument('--tokens', type=int, default=357, help='the longest sequence (counts 1..tokens)')
    parser.add_argument('--samples', type=int, default=24, help='token counts timed (spread over 1..tokens)')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0 = leave the default)')
    args = parser.parse_args(argv)
    if not torch.backends.mkldnn.is_available():
        print('this torch build has no oneDNN: nothing to measure')
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = layer_weights(args.width, args.mlp, args.kv_width or args.width)
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 128) for w in weights]
    counts = sorted(set(np.linspace(args.tokens // 4, args.tokens, args.samples).astype(int).tolist()))
    first, second, mkl = [], [], []
    with torch.inference_mode():
        for w in weights:                       # MKL's threads and buffers up before anything is timed
            F.linear(torch.randn(1, 8, w.shape[1]), w)
        packed_product(torch.randn(1, 7, weights[0].shape[1]), packed[0])
        for count in counts:
            for w, p in zip(weights, packed):
                x = torch.randn(1, count, w.shape[1])
                first.append(timed_us(lambda: packed_product(x, p)))
                second.append(timed_us(lambda: packed_product(x, p)))
                F.linear(x, w)
                mkl.append(timed_us(lambda: F.linear(x, w)))
        before = resident_mb()
        started = time.perf_counter()
        for w, p in zip(weights, packed):
            inputs = torch.zeros(1, args.tokens, w.shape[1])
            for count in range(1, args.tokens + 1):
                packed_product(inputs[:, :count], p)
        build_s = time.perf_counter() - started
        after = resident_mb()
    kernels = 4 * args.tokens
    report = {'width': args.width, 'mlp': args.mlp, 'tokens': args.tokens, 'threads': torch.get_num_threads(),
              'first_call_us_median': float(np.median(first)), 'cached_call_us_median': float(np.median(second)),
              'mkl_call_us_median': float(np.median(mkl)), 'kernels': kernels, 'build_all_s': build_s,
              'resident_mb_before': before, 'resident_mb_after': after}
    print(f"{args.width} wide (MLP {args.mlp}), {torch.get_num_threads()} threads, {len(counts)} token counts from "
          f"{counts[0]} to {counts[-1]}, 4 products each:")
    print(f"  packed product, kernel built at the call: median {report['first_call_us_median']:.0f} us; "
          f"kernel cached: {report['cached_call_us_median']:.0f} us; MKL (no kernel to build): "
          f"{report['mkl_call_us_median']:.0f} us")
    print(f"  kernels of every count 1-{args.tokens} ({kernels}): built in {build_s:.1f} s; resident memory "
          f"{before:.0f} -> {after:.0f} MB (+{after - before:.0f} MB, {(after - before) / kernels * 1024:.0f} KB "
          'per kernel)')
    return report


if __name__ == '__main__':
    main()
