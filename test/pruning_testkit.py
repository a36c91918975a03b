"""Shared helpers of the test_pruning_* files: a tiny random Llama decoder, a VLA-like layout, synthetic frames."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from transformers import LlamaConfig, LlamaModel

from specprune_ros.core.executor import PrunableDecoderRunner
from specprune_ros.core.step_types import StepContext
from specprune_ros.core.token_layout import TokenLayout

HIDDEN, MLP, LAYERS = 64, 128, 6
GRID = (6, 6)              # patches per camera: 36 (kept small for speed; production grids are 12 x 12)
P = GRID[0] * GRID[1]
SLOW = np.tile(np.array([0.05, 0.0, -0.05, 0.0, 0.0, 0.0, 1.0]), (8, 1))    # an action chunk in fine mode (paper rule)
FAST = np.tile(np.array([0.6, 0.3, 0.3, 0.0, 0.0, 0.0, -1.0]), (8, 1))      # an action chunk in coarse mode
PATCH = 8                  # pixels per patch side -> 48 x 48 frames
CAMERAS = 2


def make_layout(grid: tuple[int, int] = GRID, cameras: int = CAMERAS, text: int = 6, action: int = 8,
                causal: bool = False) -> TokenLayout:
    """[cam 0 patches][cam 1 patches]...[text][proprio][action]."""
    p = grid[0] * grid[1]
    spans = tuple((c * p, (c + 1) * p) for c in range(cameras))
    v = cameras * p
    return TokenLayout(num_tokens=v + text + 1 + action, camera_spans=spans, grid_shape=grid,
                       text_span=(v, v + text), proprio_span=(v + text, v + text + 1),
                       action_span=(v + text + 1, v + text + 1 + action), causal=causal)


def make_runner(layers: int = LAYERS, seed: int = 0) -> PrunableDecoderRunner:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=8, max_position_embeddings=512)
    config._attn_implementation = 'sdpa'
    return PrunableDecoderRunner(LlamaModel(config).eval())


def make_frames(step: int, grid: tuple[int, int] = GRID, cameras: int = CAMERAS, patch: int = PATCH,
                seed: int = 0, moving: bool = True) -> list[np.ndarray]:
    """Textured static background plus a bright square that moves one patch per step (if ``moving``)."""
    rng = np.random.default_rng(seed)
    h, w = grid[0] * patch, grid[1] * patch
    frames = []
    for c in range(cameras):
        img = rng.integers(40, 200, size=(h, w, 3), dtype=np.uint8)
        col = (step % grid[1]) if moving else 0
        y0, x0 = (c % grid[0]) * patch, col * patch
        img[y0:y0 + patch, x0:x0 + patch] = np.array([255, 0, 0], dtype=np.uint8)
        frames.append(img)
    return frames


def make_context(layout: TokenLayout, step: int, embeddings: torch.Tensor, images: Optional[list] = None,
                 actions: Optional[np.ndarray] = None, instruction: str = 'pick up the block',
                 num_layers: int = 0) -> StepContext:
    return StepContext(layout=layout, step_index=step, visual_embeddings=embeddings[0, layout.visual_indices()],
                       images=images, patch_size=PATCH, executed_actions=actions, instruction=instruction,
                       num_layers=num_layers)


def make_embeddings(layout: TokenLayout, step: int = 0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randn(1, layout.num_tokens, HIDDEN, generator=g)


def run_episode(method, steps: int = 5, layout: Optional[TokenLayout] = None, runner=None, seed: int = 0,
                actions: Optional[np.ndarray] = None, images: bool = True, start_step: int = 0,
                tell_depth: bool = True):
    """Run ``steps`` steps; returns the list of RunResults. ``tell_depth``: put the decoder depth in the context."""
    layout = layout or make_layout()
    runner = runner or make_runner()
    results = []
    for i in range(steps):
        step = start_step + i
        x = make_embeddings(layout, step, seed)
        frames = make_frames(step, layout.grid_shape, layout.num_cameras) if images else None
        ctx = make_context(layout, step, x, frames, actions, num_layers=runner.num_layers if tell_depth else 0)
        with torch.no_grad():
            results.append(runner(x, layout, method, ctx))
    return results
