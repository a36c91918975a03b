"""One pi0 / pi0.5 inference with visual-token pruning.

The prefix on the prunable executor, the action expert's denoising steps against the pruned prefix's keys/values.

Prefix layout (bidirectional attention; the layout's token indices are the RoPE positions)::

    camera 0 patches | camera 1 patches | ... | BOS  prompt tokens
                                                      text span  = the task's tokens
                                                      pi0.5: proprio span = the discrete state's tokens

The expert's tokens (pi0: the state token, then the 50 action tokens; pi0.5: the action tokens) follow at
positions N, N + 1, ...; they are not part of the runner's sequence. A pruning method sees the prefix layout
extended by them (``core.expert_attention.extended_layout``), so its 'action' rows are the expert's action queries:
their attention over the prefix keys of the requested layer, averaged over heads, the 50 rows and the denoising
steps chosen by ``action_rows`` ('mean' of all steps, 'first' or 'last'), is merged into the step record before the
method's ``end_step``; the layer views of the prefix pass carry the first denoising step's action rows (computed
alongside the pass, see ``core.expert_attention.ExpertProbe``) where the method asked for them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from specprune_ros.adapters.base import resolve_device, resolve_dtype
from specprune_ros.adapters.pi0.checkpoint import Pi0Checkpoint, load_checkpoint
from specprune_ros.adapters.pi0.processing import (EncodedPrompt, discretise_state, encode_prompt, pad_vector,
                                                   pi05_prompt, resize_with_pad)
from specprune_ros.core.executor import PrunableDecoderRunner, RunResult
from specprune_ros.core.expert_attention import ExpertActionRows, ExpertProbe, extended_layout, run_expert
from specprune_ros.core.flops import layer_flops
from specprune_ros.core.host_copies import to_device
from specprune_ros.core.step_types import PruningMethod, StepContext
from specprune_ros.core.token_layout import TokenLayout, visual_indices_on

ACTION_ROWS = ('mean', 'first', 'last')


@dataclass
class Pi0Input:
    """One observation as model input."""

    embeddings: torch.Tensor              # (1, N, d) prefix embeddings
    layout: TokenLayout
    frames: list[np.ndarray]              # the (res, res, 3) uint8 frames SigLIP saw, in camera order
    state: Optional[torch.Tensor]         # pi0: (1, max_state_dim) normalised, padded state; pi0.5: None (in prompt)
    info: dict = field(default_factory=dict)


class Pi0Inference:
    """A loaded pi0 / pi0.5 checkpoint and its executor."""

    def __init__(self, checkpoint: Pi0Checkpoint, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 action_rows: str = 'mean') -> None:
        if action_rows not in ACTION_ROWS:
            raise ValueError(f'action_rows must be one of {ACTION_ROWS}, got {action_rows!r}')
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.model = checkpoint.model
        self.normalization = checkpoint.normalization
        self.tokenizer = checkpoint.tokenizer
        self.device, self.dtype = device, dtype
        self.runner = PrunableDecoderRunner(self.model.vlm)
        self.action_rows = action_rows
        self.seed = seed
        self.generator = torch.Generator(device='cpu').manual_seed(seed)

    @property
    def num_cameras(self) -> int:
        return len(self.config.camera_names)

    def frames_in_order(self, images: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Frames of the checkpoint's cameras in its order.

        A sequence holds all of them; a mapping (camera name -> frame, names as in ``config.camera_names``) may leave
        some out, which the model then does not see (LeRobot masks an absent camera out, e.g. pi0_base's right wrist on
        a one-arm robot); at least one must be there.
        """
        cfg = self.config
        if not isinstance(images, Mapping):
            if len(images) != self.num_cameras:
                raise ValueError(f'{cfg.policy_type} takes {self.num_cameras} camera(s) {cfg.camera_names}, '
                                 f'got {len(images)}')
            return list(images)
        unknown = sorted(set(images) - set(cfg.camera_names))
        if unknown:
            raise ValueError(f'unknown camera(s) {unknown}; the checkpoint has {cfg.camera_names}')
        frames = [images[name] for name in cfg.camera_names if name in images]
        if not frames:
            raise ValueError(f'no camera frame given; the checkpoint has {cfg.camera_names}')
        return frames

    @property
    def suffix_length(self) -> int:
        return self.model.suffix_state_tokens + self.config.chunk_size

    # -- observation -> prefix ---------------------------------------------------------------------------------

    def normalized_state(self, proprio: Optional[np.ndarray]) -> np.ndarray:
        """The robot state normalised and zero-padded to ``max_state_dim``; refuses a missing or bad one."""
        dim = self.config.state_dim
        if proprio is None:
            raise ValueError(f'{self.config.policy_type} needs the robot state ({dim} values); none was given')
        state = np.asarray(proprio, dtype=np.float32).reshape(-1)
        if state.shape != (dim,):
            raise ValueError(f'robot state has {state.size} values, the checkpoint expects {dim}')
        if not np.isfinite(state).all():
            raise ValueError('robot state contains NaN or infinite values')
        return pad_vector(self.normalization.state.normalize(state), self.config.max_state_dim)

    def prompt(self, instruction: str, state: np.ndarray) -> EncodedPrompt:
        """The tokenised prompt; pi0.5 writes the robot's own state values (not the zero padding) into it."""
        cfg = self.config
        if cfg.is_pi05:
            text, task_chars, state_chars = pi05_prompt(instruction, discretise_state(state[:cfg.state_dim]))
        else:
            text = instruction if instruction.endswith('\n') else instruction + '\n'
            task_chars, state_chars = (0, len(instruction.rstrip('\n'))), (0, 0)
        return encode_prompt(self.tokenizer, text, cfg.tokenizer_max_length, task_chars, state_chars)

    def encode(self, images: Sequence[np.ndarray] | Mapping[str, np.ndarray], instruction: str,
               proprio: Optional[np.ndarray]) -> Pi0Input:
        """Prefix embeddings and layout for camera frames (see :meth:`frames_in_order`), task and robot state."""
        cfg = self.config
        images = self.frames_in_order(images)
        state = self.normalized_state(proprio)
        pixels, frames = zip(*(resize_with_pad(frame, cfg.image_resolution) for frame in images))
        # everything the host hands the device before the vision work is queued: a copy from the host after it would
        # wait for the vision backbone on a GPU
        pixels = torch.stack(pixels).to(self.device, self.dtype)
        prompt = self.prompt(instruction, state)
        ids = torch.tensor([prompt.ids], device=self.device)
        state_tensor = None if cfg.is_pi05 else torch.from_numpy(state)[None].to(self.device, self.dtype)
        text = self.model.embed_text(ids)
        visual = self.model.embed_images(pixels)                             # (cams, P, d)
        embeddings = torch.cat([visual.reshape(1, -1, visual.shape[-1]), text.to(visual.dtype)], dim=1)
        p = cfg.tokens_per_image
        cameras = len(images)
        start = cameras * p

        def shifted(span: tuple[int, int]) -> tuple[int, int]:
            return (span[0] + start, span[1] + start) if span[1] > span[0] else (0, 0)
        layout = TokenLayout(num_tokens=embeddings.shape[1],
                             camera_spans=tuple((c * p, (c + 1) * p) for c in range(cameras)),
                             grid_shape=(cfg.patches_per_side, cfg.patches_per_side), text_span=shifted(prompt.text),
                             proprio_span=shifted(prompt.state), causal=False)
        info = {'prompt_tokens': len(prompt.ids), 'prompt_truncated': prompt.truncated}
        return Pi0Input(embeddings=embeddings, layout=layout, frames=list(frames), state=state_tensor, info=info)

    def context(self, inp: Pi0Input, step_index: int = 0, instruction: str = '',
                executed_actions: Optional[np.ndarray] = None) -> StepContext:
        return StepContext(layout=inp.layout, step_index=step_index,
                           visual_embeddings=inp.embeddings[0, visual_indices_on(inp.layout, self.device)].detach(),
                           images=inp.frames, patch_size=self.config.vision.patch_size,
                           executed_actions=executed_actions, instruction=instruction,
                           num_layers=self.runner.num_layers)

    # -- denoising ---------------------------------------------------------------------------------------------

    def sample_noise(self) -> torch.Tensor:
        cfg = self.config
        noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=self.generator)
        return to_device(noise, self.device).to(self.dtype)     # drawn on the host: the same noise on every device

    def method_layout(self, layout: TokenLayout) -> TokenLayout:
        return extended_layout(layout, self.model.suffix_state_tokens, self.config.chunk_size)

    @torch.inference_mode()
    def run(self, inp: Pi0Input, method: Optional[PruningMethod] = None, context: Optional[StepContext] = None,
            noise: Optional[torch.Tensor] = None) -> tuple[np.ndarray, RunResult, dict]:
        """Pruned prefix pass, then the flow: (normalised chunk (chunk, action_dim), the prefix pass, info)."""
        cfg, model = self.config, self.model
        expert = model.expert
        n = inp.layout.num_tokens
        positions = torch.arange(n, n + self.suffix_length, device=self.device)
        self_mask = model.suffix_mask(self.device)
        rows = torch.arange(model.suffix_state_tokens, self.suffix_length, device=self.device)
        noise = noise if noise is not None else self.sample_noise()
        wrapper = None
        if method is not None:
            suffix, cond = model.embed_suffix(inp.state, noise, 1.0)        # the first denoising step's input
            probe = ExpertProbe(decoder=model.vlm, embeddings=inp.embeddings, expert_layers=expert.layers,
                                expert_rotary_emb=expert.rotary_emb, suffix=suffix, positions=positions,
                                self_mask=self_mask, rows=rows, cond=cond)
            wrapper = ExpertActionRows(method, self.method_layout(inp.layout), probe)
        result = self.runner(inp.embeddings, inp.layout, wrapper, context, return_cache=True)
        record, cache = result.record, result.cache
        layers = wrapper.action_layers if wrapper is not None else []
        steps = cfg.num_inference_steps
        wanted = {'first': {0}, 'last': {steps - 1}, 'mean': set(range(steps))}[self.action_rows]
        collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        key_counts: list[list[int]] = []
        started = time.perf_counter()

        def velocity_at(x: torch.Tensor, t: float) -> torch.Tensor:
            step = len(key_counts)
            suffix, cond = model.embed_suffix(inp.state, x, t)
            out = run_expert(expert.layers, expert.norm, expert.rotary_emb, suffix, positions, cache, self_mask,
                             cond, attention_layers=layers if step in wanted else (), attention_rows=rows)
            key_counts.append(out.key_counts)
            for layer, (_, weights) in out.attention.items():
                collected[layer].append(weights.float())
            return model.velocity(out.hidden)

        x = model.integrate(noise, velocity_at)
        expert_seconds = time.perf_counter() - started
        self._account(record, inp.layout, key_counts, expert_seconds)
        if wrapper is not None:
            attention = {layer: (cache.positions[layer], torch.stack(ws).mean(0)) for layer, ws in collected.items()
                         if ws}
            record.selection_seconds += wrapper.finish(
                attention, f'the expert\'s {cfg.chunk_size} action queries, {self.action_rows} of {steps} '
                           'denoising steps')
        normalized = x[0, :, :cfg.action_dim].float().cpu().numpy()
        info = {'expert_seconds': expert_seconds, 'denoising_steps': steps}
        return normalized, result, info

    def _account(self, record, layout: TokenLayout, key_counts: list[list[int]], seconds: float) -> None:
        """Add the expert's denoising steps to the record's FLOPs and model time (prefix figures kept in info)."""
        expert = self.config.expert
        s = self.suffix_length
        heads = expert.num_heads * expert.head_dim, expert.num_kv_heads * expert.head_dim
        shape = (expert.width, expert.mlp_dim, *heads)
        pruned = sum(layer_flops(s, k, *shape) for counts in key_counts for k in counts)
        full = len(key_counts) * expert.depth * layer_flops(s, layout.num_tokens + s, *shape)
        record.add_stage('prefix', 'expert', pruned, full, seconds)

    @torch.inference_mode()
    def reference(self, inp: Pi0Input, noise: torch.Tensor) -> np.ndarray:
        """The model's own unpruned forward (joint prefix + suffix attention every step, no cache)."""
        x = self.model.reference_sample(inp.embeddings, inp.state, noise)
        return x[0, :, :self.config.action_dim].float().cpu().numpy()

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        return self.normalization.action.unnormalize(normalized)


def load_inference(directory: str | Path, device: str = 'auto', dtype: str | torch.dtype = 'auto',
                   tokenizer: Optional[str | Path] = None, seed: int = 0, action_rows: str = 'mean') -> Pi0Inference:
    """A pi0 / pi0.5 checkpoint directory ready to run.

    ``device``: 'auto' (CUDA if present), 'cpu', 'cuda:N'; ``dtype``: 'auto' (bfloat16 on CUDA, float32 on the CPU),
    'float32', 'bfloat16', 'float16'; ``tokenizer``: the PaliGemma tokenizer's directory when the checkpoint has none;
    ``seed``: of the flow's noise.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    return Pi0Inference(load_checkpoint(directory, dev, dt, tokenizer), dev, dt, seed=seed, action_rows=action_rows)
