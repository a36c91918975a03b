"""OpenVLA-OFT (``moojink/openvla-7b-oft-finetuned-libero-*``) on the prunable executor.

Sequence of one step (bidirectional attention, one decoder pass, as OFT's ``predict_action``)::

    position 0                      BOS
    1 .. C*P                        camera 0 patches, camera 1 patches, ...   (one camera span each, prunable)
    C*P + 1                         proprio token (proprio_projector of the q01/q99-normalised robot state)
    Q + 1 .. Q + T                  prompt tokens after BOS, '▁' last          (Q = C*P [+ 1]; instruction = text span)
    Q + T + 1 .. Q + T + K*D        K*D action placeholders with **zero** embeddings
    Q + T + K*D + 1                 the stop token '</s>'

The action head reads the final hidden states of positions ``Q + T .. Q + T + K*D - 1``: the last prompt token and
the first K*D - 1 placeholders (OFT trains and infers with this next-token shift); those rows are the layout's action
span. The head regresses the K x D chunk of normalised actions (L1), un-normalised with q01/q99 (+1e-8).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from specprune_ros.adapters import actions as action_ops
from specprune_ros.adapters.base import PrismaticAdapter, resolve_device, resolve_dtype
from specprune_ros.adapters.published_checkpoint import (ACTION_HEAD, PROPRIO_PROJECTOR, PrismaticCheckpoint,
                                                         assert_materialised, assign_state, read_component)
from specprune_ros.adapters.prismatic import L1RegressionActionHead, PrismaticVLA, ProprioProjector
from specprune_ros.core.executor import RunResult
from specprune_ros.core.token_layout import TokenLayout
from specprune_ros.policy.backend import EncodedStep, camera_frames
from specprune_ros.policy.errors import CheckpointError, ObservationError
from specprune_ros.policy.interface import Observation

STOP_TOKEN_ID = 2          # '</s>' in the Llama tokenizer (OFT's STOP_INDEX)


def _build_head(state: dict[str, torch.Tensor], path: Path) -> L1RegressionActionHead:
    """An L1 regression head shaped after its own weights."""
    try:
        in_dim = state['model.layer_norm1.weight'].shape[0]
        hidden, _ = state['model.fc1.weight'].shape
        action_dim = state['model.fc2.weight'].shape[0]
    except KeyError as error:
        raise CheckpointError(f'checkpoint {path.parent}: {path.name} is not an L1 regression action head '
                              f'(no {error.args[0]})') from error
    blocks = len({k.split('.')[2] for k in state if k.startswith('model.mlp_resnet_blocks.')})
    if in_dim % action_dim:
        raise CheckpointError(f'checkpoint {path.parent}: {path.name}: input width {in_dim} is not a multiple of '
                              f'the action dimension {action_dim}')
    with torch.device('meta'):
        return L1RegressionActionHead(in_dim // action_dim, hidden, action_dim, num_blocks=blocks)


class OpenVLAOFTAdapter(PrismaticAdapter):
    kind = 'openvla-oft'
    action_eps = 1e-8

    def __init__(self, checkpoint: PrismaticCheckpoint, model: PrismaticVLA, tokenizer: Any,
                 device: torch.device, dtype: torch.dtype, action_head: L1RegressionActionHead,
                 proprio_projector: Optional[ProprioProjector] = None, chunk_size: int = 8,
                 stop_token_id: Optional[int] = None, **kwargs) -> None:
        super().__init__(checkpoint, model, tokenizer, device, dtype, **kwargs)
        self.action_head = action_head.eval()
        self.proprio_projector = None if proprio_projector is None else proprio_projector.eval()
        self.chunk_size = int(chunk_size)
        if self.action_head.action_dim != self.action_dim:
            raise CheckpointError(f'checkpoint {checkpoint.directory}: the action head predicts '
                                  f'{self.action_head.action_dim} dimensions, the {self.unnorm_key!r} statistics '
                                  f'have {self.action_dim}')
        if self.action_head.model.fc1.in_features != self.action_dim * self.runner.hidden_size:
            raise CheckpointError(f'checkpoint {checkpoint.directory}: action head width does not fit the LLM')
        eos = getattr(tokenizer, 'eos_token_id', None)
        self.stop_token_id = int(stop_token_id if stop_token_id is not None else eos if eos is not None
                                 else STOP_TOKEN_ID)
        self.proprio_stats = checkpoint.norm_stats[self.unnorm_key].get('proprio')
        if self.proprio_projector is not None and not isinstance(self.proprio_stats, dict):
            raise action_ops.NormStatsError(f'dataset statistics {self.unnorm_key!r} have no proprio entry')
        if self.proprio_projector is not None:
            action_ops.check_bounds(self.proprio_stats, self.normalization, self.stats_where('proprio'),
                                    dim=self.proprio_dim)

    @classmethod
    def load(cls, directory: str | Path, device: str = 'auto', dtype: str | torch.dtype = 'auto',
             unnorm_key: Optional[str] = None, num_images: int = 2, chunk_size: int = 8,
             attn_implementation: str = 'sdpa', center_crop: Optional[bool] = None,
             proprio: Optional[bool] = None, **kwargs) -> 'OpenVLAOFTAdapter':
        """Load from a checkpoint directory; ``proprio`` False declares a model trained without the robot state."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        checkpoint, model, tokenizer = cls.load_parts(directory, 'openvla-oft', dev, dt, attn_implementation,
                                                      center_crop, proprio)
        head_path = checkpoint.components[ACTION_HEAD]
        head_state = read_component(head_path, device=dev, dtype=dt)
        head = _build_head(head_state, head_path)
        assign_state(head, head_state, head_path.name, checkpoint.directory)
        assert_materialised(head, f'checkpoint {checkpoint.directory}: {head_path.name}')
        proprio = None
        if PROPRIO_PROJECTOR in checkpoint.components:
            path = checkpoint.components[PROPRIO_PROJECTOR]
            state = read_component(path, device=dev, dtype=dt)
            if 'fc1.weight' not in state:
                raise CheckpointError(f'checkpoint {checkpoint.directory}: {path.name} is not a proprio projector '
                                      '(no fc1.weight)')
            llm_dim, proprio_dim = state['fc1.weight'].shape
            with torch.device('meta'):
                proprio = ProprioProjector(llm_dim, proprio_dim)
            assign_state(proprio, state, path.name, checkpoint.directory)
        return cls(checkpoint, model, tokenizer, dev, dt, action_head=head, proprio_projector=proprio,
                   chunk_size=chunk_size, unnorm_key=unnorm_key, num_images=num_images, **kwargs)

    # -- sequence ----------------------------------------------------------------------------------------------

    @property
    def proprio_dim(self) -> int:
        return 0 if self.proprio_projector is None else self.proprio_projector.fc1.in_features

    @property
    def num_action_tokens(self) -> int:
        return self.chunk_size * self.action_dim

    def layout(self, num_ids: int, instruction: tuple[int, int]) -> TokenLayout:
        p, c = self.patches_per_image, self.num_images
        q = c * p + (1 if self.proprio_projector is not None else 0)     # OFT's NUM_PATCHES
        t = num_ids - 1                                                   # OFT's NUM_PROMPT_TOKENS
        k = self.num_action_tokens
        text = (instruction[0] + q, instruction[1] + q) if instruction[1] > instruction[0] else (0, 0)
        proprio = (c * p + 1, c * p + 2) if self.proprio_projector is not None else (0, 0)
        return TokenLayout(num_tokens=q + t + k + 2, camera_spans=tuple((1 + i * p, 1 + (i + 1) * p) for i in range(c)),
                           grid_shape=(self.grid, self.grid), text_span=text, proprio_span=proprio,
                           action_span=(q + t, q + t + k), causal=False)

    def normalized_proprio(self, proprio: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if self.proprio_projector is None:
            return None
        if proprio is None:
            raise ObservationError(f'this OpenVLA-OFT checkpoint needs a {self.proprio_dim}-D proprio vector')
        proprio = np.asarray(proprio, dtype=np.float64).reshape(-1)
        if proprio.shape != (self.proprio_dim,) or not np.isfinite(proprio).all():
            raise ObservationError(f'proprio must be {self.proprio_dim} finite values, got shape {proprio.shape}')
        return action_ops.normalize_proprio(proprio, self.proprio_stats, self.normalization)

    def sequence(self, images: Sequence[np.ndarray], instruction: str, proprio: Optional[np.ndarray]
                 ) -> tuple[torch.Tensor, TokenLayout, list[np.ndarray]]:
        normalized = self.normalized_proprio(proprio)              # refuse a missing / bad state up front
        frames = self.prepare_frames(images)
        prompt = self.encode_prompt(instruction)
        # what the host hands the device goes before the vision work: a copy from the host after it would wait for
        # the backbones on a GPU. The prompt and the stop token in one lookup.
        text = self.embed_ids([*prompt.ids, self.stop_token_id])
        state = None if normalized is None else \
            self.proprio_projector(torch.tensor(normalized, device=self.device, dtype=self.dtype).view(1, -1))
        parts = [text[:, :1], self.visual_tokens(frames)] + ([] if state is None else [state.unsqueeze(1)])
        parts += [text[:, 1:-1], text.new_zeros(1, self.num_action_tokens, text.shape[-1]), text[:, -1:]]
        return torch.cat(parts, dim=1), self.layout(len(prompt.ids), prompt.instruction), frames

    def action_chunk(self, action_states: torch.Tensor) -> np.ndarray:
        """(chunk, action_dim) normalised actions from the action rows' final hidden states."""
        chunk = self.action_head(action_states, self.chunk_size)
        return chunk[0].float().cpu().numpy()

    # -- the pruned path: one bidirectional pass through the executor, then the action head ---------------------

    def encode(self, observation: Observation) -> EncodedStep:
        frames = camera_frames(observation, self.camera_names)       # any size: the transform resizes
        return self.encoded(*self.sequence(frames, observation.instruction, observation.proprio))

    def head(self, step: EncodedStep, result: RunResult) -> np.ndarray:
        return self.action_chunk(result.select(torch.arange(*step.layout.action_span, device=result.kept.device)))

    # -- the adapter's own unpruned forward (transformers) -----------------------------------------------------

    @torch.inference_mode()
    def reference_step(self, images: Sequence[np.ndarray], instruction: str,
                       proprio: Optional[np.ndarray] = None) -> np.ndarray:
        """Unpruned forward through transformers' LlamaModel with an all-ones (bidirectional) mask, as OFT."""
        embeddings, layout, _ = self.sequence(images, instruction, proprio)
        n = layout.num_tokens
        mask = torch.ones(1, 1, n, n, dtype=torch.bool, device=self.device)
        hidden = self.model.decoder(inputs_embeds=embeddings, attention_mask=mask).last_hidden_state
        return self.action_chunk(hidden[:, layout.action_span[0]:layout.action_span[1]])
