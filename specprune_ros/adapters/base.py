r"""What OpenVLA and OpenVLA-OFT share as model backends.

Loading, device/dtype, prompt, images -> visual tokens, robot-side units, method plumbing.

Both models build their decoder input the Prismatic way: the prompt's BOS embedding, then the projected patch
tokens of every camera (and OFT's proprio token), then the rest of the prompt::

    prompt = "In: What action should the robot take to {instruction}?\nOut:"   (+ the empty token '▁', id 29871)

The decoder (transformers ``LlamaModel``) runs through :class:`~specprune_ros.core.executor.PrunableDecoderRunner`,
so every pruning method works unchanged; each adapter also keeps its own unpruned forward through transformers
(``reference_step``), the ground truth the executor path is tested against.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from specprune_ros.adapters import actions as action_ops
from specprune_ros.adapters.published_checkpoint import (PrismaticCheckpoint, assert_materialised, assign_state,
                                                         load_tokenizer, read_checkpoint, read_state, restore_rotary)
from specprune_ros.adapters.prismatic import PrismaticVLA
from specprune_ros.core.cuda_graphs import ShapeGraphs
from specprune_ros.core.executor import PrunableDecoderRunner
from specprune_ros.core.step_types import LayerView, PruningMethod, StepContext, StepPlan, StepRecord
from specprune_ros.core.token_layout import TokenLayout
from specprune_ros.policy.backend import EncodedStep, ModelBackend, ModelOutput, run_step
from specprune_ros.policy.errors import CheckpointError
from specprune_ros.policy.interface import ActionSpec, Observation
from specprune_ros.pruning import selection_graphs

PROMPT_TEMPLATE = 'In: What action should the robot take to {instruction}?\nOut:'
EMPTY_TOKEN = '\u2581'          # SentencePiece's word-boundary piece alone: Llama-2 id 29871
DTYPES = {'float32': torch.float32, 'fp32': torch.float32, 'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16,
          'float16': torch.float16, 'fp16': torch.float16}


def resolve_device(device: str | torch.device = 'auto') -> torch.device:
    """'auto' = the first CUDA device if there is one, else the CPU."""
    if str(device) == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device} requested but CUDA is not available')
    return device


def resolve_dtype(dtype: str | torch.dtype = 'auto', device: torch.device = torch.device('cpu')) -> torch.dtype:
    """'auto' = bfloat16 on CUDA (the checkpoints' own dtype), float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == 'auto':
        return torch.bfloat16 if device.type == 'cuda' else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def check_tokenizer_fits(tokenizer: Any, checkpoint: PrismaticCheckpoint) -> None:
    """The tokenizer's vocabulary must be the one ``config.json`` implies (embedding rows minus the padding).

    OpenVLA's action tokens are the last ids of that vocabulary: another model's tokenizer would shift them.
    """
    pieces = getattr(tokenizer, 'vocab_size', None)
    rows = int(checkpoint.text_config.vocab_size)
    if pieces is None:
        return
    if int(pieces) != checkpoint.action_vocab_size or len(tokenizer) > rows:
        raise CheckpointError(f'checkpoint {checkpoint.directory}: the tokenizer has {pieces} pieces '
                              f'({len(tokenizer)} with added tokens) but config.json implies '
                              f'{checkpoint.action_vocab_size} (vocab_size {rows} - pad_to_multiple_of '
                              f'{checkpoint.pad_to_multiple_of}): tokenizer.json is from another model')


@dataclass
class EncodedPrompt:
    ids: list[int]                       # BOS first, the empty token last
    instruction: tuple[int, int]         # [start, end) of the instruction's tokens in ``ids`` ((0, 0) if none)


class DeferredEndStep:
    """Wraps a pruning method so that ``end_step`` runs after the adapter finished the step.

    OpenVLA: after the autoregressive decode, once the generated action tokens' attention has been merged into the
    record.
    """

    def __init__(self, method: PruningMethod) -> None:
        self.method = method
        self.plan: Optional[StepPlan] = None
        self.record: Optional[StepRecord] = None

    @property
    def name(self) -> str:
        return getattr(self.method, 'name', 'method')

    def reset(self) -> None:
        self.method.reset()

    def begin_step(self, context: StepContext) -> StepPlan:
        self.plan = self.method.begin_step(context)
        return self.plan

    def after_layer(self, view: LayerView) -> Optional[torch.Tensor]:
        return self.method.after_layer(view)

    def end_step(self, record: StepRecord) -> None:
        self.record = record

    def finish(self) -> float:
        """Run the wrapped method's ``end_step``; returns the seconds it took."""
        if self.record is None:
            return 0.0
        t0 = time.perf_counter()
        self.method.end_step(self.record)
        return time.perf_counter() - t0


class PrismaticAdapter(ModelBackend):
    """Shared machinery of :class:`~specprune_ros.adapters.openvla.OpenVLAAdapter` and its OFT variant.

    See also :class:`~specprune_ros.adapters.openvla_oft.OpenVLAOFTAdapter`.

    Robot-side settings: ``camera_names`` (default ['agentview'] for one image, ['agentview', 'wrist'] for two),
    ``gripper`` ('none' or 'libero': the LIBERO evaluation's convention, binarised, -1 = open, +1 = close) and
    ``action_units`` (the scales and control period of the actions; chunk size and action dimension come from the
    model). Actions are **un-normalised** with the dataset statistics.
    """

    kind = 'prismatic'
    action_eps = 0.0                     # added to the statistics' range when un-normalising (OFT: 1e-8)
    chunk_size = 1                       # actions per inference
    proprio_dim = 0

    def __init__(self, checkpoint: PrismaticCheckpoint, model: PrismaticVLA, tokenizer: Any, device: torch.device,
                 dtype: torch.dtype, unnorm_key: Optional[str] = None, num_images: int = 1,
                 prompt_template: str = PROMPT_TEMPLATE, lowercase_instruction: bool = True,
                 normalization: str = 'bounds_q99', camera_names: Optional[Sequence[str]] = None,
                 gripper: str = 'none', action_units: ActionSpec = ActionSpec()) -> None:
        self.checkpoint = checkpoint
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.runner = PrunableDecoderRunner(model.decoder)
        self._vision_graphs = ShapeGraphs(model.patch_embeddings)
        self.cuda_graph_vision = False
        self.transform = checkpoint.transform
        self.num_images = int(num_images)
        if '{instruction}' not in prompt_template:
            raise ValueError('prompt_template must contain {instruction}')
        try:                # any other field would fail every step
            prompt_template.format(instruction='')
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f'prompt_template {prompt_template!r}: only {{instruction}} can be filled in ({error!r}); '
                             'write a literal brace twice') from None
        self.prompt_template = prompt_template
        self.lowercase_instruction = lowercase_instruction
        self.normalization = normalization
        self.unnorm_key = action_ops.resolve_unnorm_key(checkpoint.norm_stats, unnorm_key)
        self.action_stats = checkpoint.norm_stats[self.unnorm_key].get('action')
        if not isinstance(self.action_stats, dict):
            raise action_ops.NormStatsError(f'dataset statistics {self.unnorm_key!r} have no action entry')
        action_ops.check_bounds(self.action_stats, normalization, self.stats_where('action'))
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 1
        empty = tokenizer.convert_tokens_to_ids(EMPTY_TOKEN)
        self.empty_id = None if empty is None or empty == tokenizer.unk_token_id else int(empty)
        self.patches_per_image = model.vision_backbone.num_patches
        self.grid = model.vision_backbone.grid
        self.patch_size = checkpoint.vision_specs[0].patch_size
        self.image_size = (self.transform.size, self.transform.size)
        default = ['agentview'] if self.num_images == 1 else ['agentview', 'wrist'][:self.num_images]
        names = list(camera_names or default)
        if len(names) != self.num_images:
            raise ValueError(f'{len(names)} camera names for a model with {self.num_images} image input(s)')
        if len(set(names)) != len(names):
            raise ValueError(f'camera_names: duplicates in {names}')
        if gripper not in ('none', 'libero'):
            raise ValueError(f"gripper must be 'none' or 'libero', got {gripper!r}")
        self.camera_names = tuple(names)
        self.gripper = gripper
        self.action_units = action_units

    def stats_where(self, entry: str) -> str:
        """Names the file and entry of the statistics in use (for errors)."""
        return f'checkpoint {self.checkpoint.directory}: {self.checkpoint.stats_source}: {self.unnorm_key}.{entry}'

    @property
    def name(self) -> str:
        return self.kind

    @property
    def action_spec(self) -> ActionSpec:
        return dataclasses.replace(self.action_units, chunk_size=self.chunk_size, action_dim=self.action_dim,
                                   action_names=())

    # -- loading -----------------------------------------------------------------------------------------------

    @staticmethod
    def load_parts(directory: str | Path, kind: Optional[str], device: torch.device, dtype: torch.dtype,
                   attn_implementation: str = 'sdpa', center_crop: Optional[bool] = None,
                   proprio: Optional[bool] = None) -> tuple[PrismaticCheckpoint, PrismaticVLA, Any]:
        """Read the checkpoint and build the Prismatic model on ``device`` in ``dtype`` (no random init)."""
        checkpoint = read_checkpoint(directory, kind=kind, attn_implementation=attn_implementation,
                                     center_crop=center_crop, proprio=proprio)
        tokenizer = load_tokenizer(checkpoint.directory)
        check_tokenizer_fits(tokenizer, checkpoint)
        with torch.device('meta'):
            model = PrismaticVLA(checkpoint.vision_specs, checkpoint.text_config)
        state = read_state(checkpoint.weight_map, device=device, dtype=dtype, directory=checkpoint.directory)
        files = sorted({p.name for p in checkpoint.weight_map.values()})
        source = files[0] if len(files) == 1 else f'the weights ({", ".join(files)})'
        assign_state(model, state, source, checkpoint.directory, checkpoint.weight_map)
        restore_rotary(model.decoder, checkpoint.text_config, device)
        assert_materialised(model, f'checkpoint {checkpoint.directory}')
        return checkpoint, model.eval(), tokenizer

    # -- prompt ------------------------------------------------------------------------------------------------

    def encode_prompt(self, instruction: str) -> EncodedPrompt:
        """Token ids of the prompt and where the instruction's tokens are.

        BOS first, the empty token '▁' appended as OpenVLA's ``predict_action`` does.
        """
        text = instruction.strip()
        if self.lowercase_instruction:
            text = text.lower()
        head = self.prompt_template.split('{instruction}')[0]
        prompt = self.prompt_template.format(instruction=text)
        start, end = len(head), len(head) + len(text)
        try:
            encoded = self.tokenizer(prompt, return_offsets_mapping=True)
            ids, offsets = list(encoded['input_ids']), list(encoded['offset_mapping'])
        except (NotImplementedError, TypeError, KeyError):
            ids, offsets = list(self.tokenizer(prompt)['input_ids']), None
        if not ids or ids[0] != self.bos_id:
            ids = [self.bos_id] + ids
            offsets = None if offsets is None else [(0, 0)] + offsets
        if offsets is not None:
            inside = [i for i, (a, b) in enumerate(offsets) if i > 0 and b > a and b > start and a < end]
            span = (inside[0], inside[-1] + 1) if inside and text else (0, 0)
        else:  # slow tokenizer: count the tokens of the prompt's head and of head + instruction
            n_head = len(self.tokenizer(head.rstrip())['input_ids'])
            n_text = len(self.tokenizer((head + text).rstrip())['input_ids'])
            span = (n_head, n_text) if n_text > n_head else (0, 0)
        if self.empty_id is not None and ids[-1] != self.empty_id:
            ids.append(self.empty_id)
        return EncodedPrompt(ids=ids, instruction=span)

    # -- vision ------------------------------------------------------------------------------------------------

    def prepare_frames(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(images) != self.num_images:
            raise ValueError(f'{self.kind} takes {self.num_images} image(s), got {len(images)}')
        return [self.transform.frame(image) for image in images]

    def visual_tokens(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """(1, num_images * patches, d): each camera through the fused backbones and the projector."""
        pixels = self.transform.pixels(frames, device=self.device, dtype=self.dtype)
        embed = self._vision_graphs if self.cuda_graph_vision else self.model.patch_embeddings
        tokens = embed(pixels)                                           # (cams, P, d)
        return tokens.reshape(1, -1, tokens.shape[-1])

    def use_cuda_graphs(self, enabled: bool = True) -> None:
        """Replay the vision backbones and the decoder's plain layers as CUDA graphs (no effect off CUDA).

        One graph per camera count for the vision, one per layer and padded token count for the decoder: a step the
        host issues operation by operation becomes a few launches (:mod:`specprune_ros.core.cuda_graphs`). The
        methods' fixed-shape selection work (SpecPrune's layer drops, VLA-Pruner's Combine-then-Filter, the greedy
        max-min steps of DivPrune, coverage_ranked's cuts and rank updates) replays as graphs too, for the whole
        process (:mod:`specprune_ros.pruning.selection_graphs`).
        """
        self.cuda_graph_vision = enabled
        self.runner.cuda_graph_layers = enabled
        selection_graphs.ENABLED = enabled

    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor([list(ids)], device=self.device))

    # -- actions -----------------------------------------------------------------------------------------------

    @property
    def action_dim(self) -> int:
        low = self.action_stats.get('q01', self.action_stats.get('min'))
        return len(low)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        return action_ops.unnormalize(normalized, self.action_stats, self.normalization, eps=self.action_eps)

    def actions(self, normalized: np.ndarray) -> np.ndarray:
        """Un-normalised with the dataset statistics (and the LIBERO gripper convention if asked)."""
        actions = self.unnormalize(normalized)
        return action_ops.libero_gripper(actions) if self.gripper == 'libero' else actions

    def encoded(self, embeddings: torch.Tensor, layout: TokenLayout, frames: list[np.ndarray]) -> EncodedStep:
        return EncodedStep(embeddings=embeddings, layout=layout, frames=frames, info={'unnorm_key': self.unnorm_key})

    # -- one step outside a policy -----------------------------------------------------------------------------

    def step(self, images: Sequence[np.ndarray], instruction: str, proprio: Optional[np.ndarray] = None,
             method: Optional[PruningMethod] = None, step_index: int = 0,
             executed_actions: Optional[np.ndarray] = None) -> ModelOutput:
        """One step on frames in camera order (pruning as ``method`` says): the normalised actions and the record."""
        if len(images) != self.num_images:
            raise ValueError(f'{self.kind} takes {self.num_images} image(s), got {len(images)}')
        observation = Observation(images=dict(zip(self.camera_names, images)), instruction=instruction,
                                  proprio=proprio, executed_actions=executed_actions)
        return run_step(self, observation, method, step_index)
