"""OpenVLA and OpenVLA-OFT at their published dimensions with random weights, built in memory.

Nothing is downloaded or written: the model is built on the ``meta`` device, materialised on the target device
and filled with seeded random values, then handed to the same adapter classes that load the real checkpoints
(:class:`~specprune_ros.adapters.openvla.OpenVLAAdapter`,
:class:`~specprune_ros.adapters.openvla_oft.OpenVLAOFTAdapter`).
Only latency, kept-token and FLOPs figures mean anything with such weights.

Published shapes (``openvla/openvla-7b``, ``moojink/openvla-7b-oft-finetuned-libero-*``)::

    decoder     Llama-2 7B: 4096 wide, 32 layers, 32 heads (head dim 128), MLP 11008, vocabulary 32000 (+ 64 padding)
    vision      DINOv2 ViT-L/14 (registers) + SigLIP So400m/14, fused, 224 px: 16 x 16 = 256 patches per image
    projector   fused GELU MLP 2176 -> 8704 -> 4096 -> 4096
    OpenVLA     1 image, causal prompt, 7 action tokens decoded one by one
    OFT         2 images (third-person + wrist) = 512 visual tokens, proprio token (8-D LIBERO state),
                56 action placeholders (chunk 8 x 7 dims), one bidirectional pass, L1 MLP action head
                (LayerNorm, 7 * 4096 -> 4096, 2 residual blocks, LayerNorm, 4096 -> 7)

``width`` shrinks the decoder for CPU runs while keeping the token layout, the depth and the action head: the
MLP scales with it (11008 * width / 4096) and so does the head count (head dim 128 kept unless ``heads`` is given).
``vision_scale`` shrinks both ViTs' widths the same way (depth, patch size, patch count and head dim kept)::

    adapter = build_published('openvla-oft', width=512, vision_scale=0.125)   # 512 x 32, the same 598 tokens
    out = adapter.step([agentview, wrist], 'pick up the blue cube', proprio=state, method=build_method('specprune'))
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from transformers import LlamaConfig, PreTrainedTokenizerFast

from specprune_ros.adapters.base import resolve_device, resolve_dtype
from specprune_ros.adapters.openvla import OpenVLAAdapter
from specprune_ros.adapters.openvla_oft import OpenVLAOFTAdapter
from specprune_ros.adapters.preprocessing import ImageTransform
from specprune_ros.adapters.published_checkpoint import (LLAMA_DEFAULTS, PrismaticCheckpoint,
                                                         assert_materialised, restore_rotary)
from specprune_ros.adapters.prismatic import L1RegressionActionHead, PrismaticVLA, ProprioProjector
from specprune_ros.adapters.tiny import llama_layout_tokenizer
from specprune_ros.adapters.vit import timm_spec

KINDS = ('openvla', 'openvla-oft')
TIMM_IDS = ('vit_large_patch14_reg4_dinov2.lvd142m', 'vit_so400m_patch14_siglip_224')
LLAMA_WIDTH, LLAMA_LAYERS, LLAMA_MLP, LLAMA_HEAD_DIM = 4096, 32, 11008, 128
VOCAB, PAD_TO, N_BINS = 32000, 64, 256
IMAGE_SIZE = 224
ACTION_DIM, CHUNK, PROPRIO_DIM = 7, 8, 8          # LIBERO: 7-D actions, chunks of 8, 8-D proprio
DATASET = 'random_published_shape'
IN_MEMORY = Path('<in-memory random weights>')
# words of the simulator's instructions, so the in-memory tokenizer has whole-word pieces for them
PROMPT_WORDS = ('pick', 'up', 'put', 'on', 'plate', 'push', 'to', 'zone', 'red', 'green', 'blue', 'yellow', 'cube',
                'cylinder', 'left', 'right')

Adapter = Union[OpenVLAAdapter, OpenVLAOFTAdapter]


@dataclass(frozen=True)
class PublishedShape:
    """The dimensions of one build; defaults are the published 7B models'."""

    kind: str = 'openvla-oft'
    width: int = LLAMA_WIDTH
    layers: int = LLAMA_LAYERS
    heads: Optional[int] = None              # None: width / 128 (the published head dim)
    vision_scale: float = 1.0                # fraction of the ViT widths (1024 DINOv2, 1152 SigLIP)
    num_images: Optional[int] = None         # None: 1 (OpenVLA), 2 (OFT)
    proprio_dim: int = PROPRIO_DIM           # OFT only
    action_dim: int = ACTION_DIM
    chunk_size: int = CHUNK                  # OFT only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f'kind must be one of {KINDS}, got {self.kind!r}')
        if self.width % self.num_heads or self.width < 16:
            raise ValueError(f'width {self.width} does not split into {self.num_heads} heads')
        if not 0 < self.vision_scale <= 1:
            raise ValueError(f'vision_scale must be in (0, 1], got {self.vision_scale}')
        if self.layers < 1:
            raise ValueError('layers must be at least 1')

    @property
    def num_heads(self) -> int:
        return self.heads or max(1, self.width // LLAMA_HEAD_DIM)

    @property
    def mlp(self) -> int:
        return max(8, round(LLAMA_MLP * self.width / LLAMA_WIDTH))

    @property
    def images(self) -> int:
        return self.num_images or (1 if self.kind == 'openvla' else 2)

    @property
    def label(self) -> str:
        vision = '' if self.vision_scale == 1 else f', vision x{self.vision_scale:g}'
        return f'{self.kind} {self.width}x{self.layers}{vision}'

    def vision_overrides(self) -> list[dict]:
        """Per backbone: the scaled width and a head count keeping the published head dim (64 / 72)."""
        if self.vision_scale == 1:
            return [{}, {}]
        out = []
        for model_id in TIMM_IDS:
            spec = timm_spec(model_id, IMAGE_SIZE)
            head_dim = spec.embed_dim // spec.num_heads
            heads = max(1, round(spec.embed_dim * self.vision_scale / head_dim))
            out.append({'embed_dim': heads * head_dim, 'num_heads': heads})
        return out

    def text_config(self) -> LlamaConfig:
        values = {**LLAMA_DEFAULTS, 'vocab_size': VOCAB + PAD_TO, 'pad_token_id': VOCAB, 'hidden_size': self.width,
                  'intermediate_size': self.mlp, 'num_hidden_layers': self.layers,
                  'num_attention_heads': self.num_heads, 'num_key_value_heads': self.num_heads}
        config = LlamaConfig(**values)
        config._attn_implementation = 'sdpa'
        return config


def _statistics(shape: PublishedShape, rng: np.random.Generator) -> dict:
    def block(dim: int, gripper: bool) -> dict:
        low, high = -rng.uniform(0.5, 1.0, size=dim), rng.uniform(0.5, 1.0, size=dim)
        mask = [True] * dim
        if gripper:
            mask[-1] = False
        return {'q01': low.tolist(), 'q99': high.tolist(), 'min': (1.2 * low).tolist(), 'max': (1.2 * high).tolist(),
                'mean': ((low + high) / 2).tolist(), 'std': ((high - low) / 4).tolist(), 'mask': mask}

    stats = {'action': block(shape.action_dim, gripper=True)}
    if shape.kind == 'openvla-oft':
        stats['proprio'] = block(shape.proprio_dim, gripper=False)
    return {DATASET: stats}


def in_memory_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """A Llama-layout tokenizer trained in memory.

    Prompts get Llama-2's token count (whole words, punctuation and line breaks apart).
    """
    backend = llama_layout_tokenizer(1000, seed=seed, exact=False, extra_words=PROMPT_WORDS, split_punctuation=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token='<s>', eos_token='</s>', unk_token='<unk>',
                                   pad_token='<PAD>')


@torch.no_grad()
def randomise_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded values in place.

    Gains near 1, small biases, matrices with 1 / sqrt(fan-in) scale (stable activations through 32 layers in bf16).
    Drawn in float32 on the module's device, then cast.
    """
    for name, param in module.named_parameters():
        values = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)
        if name.endswith('scale_factor') or (name.endswith('weight') and param.dim() == 1):
            values = 1.0 + 0.1 * values
        elif param.dim() == 1 or name.endswith(('cls_token', 'reg_token', 'latent')):
            values = 0.02 * values
        else:
            fan_in = param[0].numel()
            values = values / max(fan_in, 1) ** 0.5
        param.copy_(values.to(param.dtype))


def _materialise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 generator: torch.Generator) -> torch.nn.Module:
    module = module.to_empty(device=device).to(dtype)
    randomise_(module, generator)
    return module


def build_published(kind: str = 'openvla-oft', width: int = LLAMA_WIDTH, layers: int = LLAMA_LAYERS,
                    vision_scale: float = 1.0, heads: Optional[int] = None, device: str = 'auto',
                    dtype: str | torch.dtype = 'auto', seed: int = 0, proprio_dim: int = PROPRIO_DIM,
                    num_images: Optional[int] = None) -> Adapter:
    """An adapter around a random-weight model of the published layout (see the module docstring)."""
    shape = PublishedShape(kind=kind, width=width, layers=layers, heads=heads, vision_scale=vision_scale,
                           num_images=num_images, proprio_dim=proprio_dim)
    return build_shape(shape, device=device, dtype=dtype, seed=seed)


def build_shape(shape: PublishedShape, device: str = 'auto', dtype: str | torch.dtype = 'auto',
                seed: int = 0) -> Adapter:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    overrides = shape.vision_overrides()
    specs = [timm_spec(model_id, IMAGE_SIZE, None, override) for model_id, override in zip(TIMM_IDS, overrides)]
    text_config = shape.text_config()
    config = {'model_type': 'openvla', 'timm_model_ids': list(TIMM_IDS), 'image_sizes': [IMAGE_SIZE] * 2,
              'use_fused_vision_backbone': True, 'n_action_bins': N_BINS, 'pad_to_multiple_of': PAD_TO,
              'timm_model_overrides': overrides, 'text_config': text_config.to_diff_dict(),
              'published_shape': shape.label}
    is_oft = shape.kind == 'openvla-oft'
    transform = ImageTransform(size=IMAGE_SIZE, means=tuple(s.mean for s in specs), stds=tuple(s.std for s in specs),
                               center_crop=is_oft)
    stats = _statistics(shape, np.random.default_rng(seed))
    checkpoint = PrismaticCheckpoint(directory=IN_MEMORY, config=config, kind=shape.kind, vision_specs=specs,
                                     text_config=text_config, transform=transform, norm_stats=stats,
                                     n_action_bins=N_BINS, pad_to_multiple_of=PAD_TO, weight_map={})
    generator = torch.Generator(device=dev).manual_seed(seed)
    with torch.device('meta'):
        model = PrismaticVLA(specs, text_config)
    model = _materialise(model, dev, dt, generator)
    restore_rotary(model.decoder, text_config, dev)
    assert_materialised(model, shape.label)
    tokenizer = in_memory_tokenizer(seed)
    if not is_oft:
        return OpenVLAAdapter(checkpoint, model, tokenizer, dev, dt, num_images=shape.images)
    with torch.device('meta'):
        head = L1RegressionActionHead(shape.width, shape.width, shape.action_dim)
        proprio = ProprioProjector(shape.width, shape.proprio_dim) if shape.proprio_dim else None
    head = _materialise(head, dev, dt, generator)
    if proprio is not None:
        proprio = _materialise(proprio, dev, dt, generator)
    return OpenVLAOFTAdapter(checkpoint, model, tokenizer, dev, dt, action_head=head, proprio_projector=proprio,
                             chunk_size=shape.chunk_size, num_images=shape.images)
