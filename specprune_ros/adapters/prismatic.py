"""The Prismatic VLA module tree of OpenVLA / OpenVLA-OFT, with the parameter names of the published checkpoints.

    vision_backbone.featurizer.*          DINOv2 ViT-L/14 (registers)      } features concatenated per patch
    vision_backbone.fused_featurizer.*    SigLIP ViT-SO400M/14             }
    projector.fc1 / fc2 / fc3             3-layer GELU MLP to the LLM width (fused backbone; fc1/fc2 otherwise)
    language_model.model.*                transformers LlamaModel (Llama-2 7B)
    language_model.lm_head                vocabulary projection

OpenVLA-OFT keeps two more modules in separate files (``proprio_projector--*_checkpoint.pt``,
``action_head--*_checkpoint.pt``): :class:`ProprioProjector` (``fc1``, ``fc2``) and :class:`L1RegressionActionHead`
(``model.layer_norm1``, ``model.fc1``, ``model.mlp_resnet_blocks.N.ffn.{0,1}``, ``model.layer_norm2``,
``model.fc2``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from specprune_ros.adapters.vit import ViTSpec, VisionTransformer


class PrismaticVisionBackbone(nn.Module):
    """One or two (fused) ViTs; a fused input stacks both backbones' normalised images on the channel axis."""

    def __init__(self, specs: Sequence[ViTSpec]) -> None:
        super().__init__()
        if not 1 <= len(specs) <= 2:
            raise ValueError('Prismatic uses one or two (fused) vision backbones')
        if len(specs) == 2 and specs[0].num_patches != specs[1].num_patches:
            raise ValueError('fused backbones must give the same number of patches')
        self.specs = tuple(specs)
        self.featurizer = VisionTransformer(specs[0])
        self.fused_featurizer = VisionTransformer(specs[1]) if len(specs) == 2 else None
        self.embed_dim = sum(spec.embed_dim for spec in specs)

    @property
    def use_fused(self) -> bool:
        return self.fused_featurizer is not None

    @property
    def num_patches(self) -> int:
        return self.specs[0].num_patches

    @property
    def grid(self) -> int:
        return self.specs[0].grid

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3 * num_backbones, H, W) -> (B, num_patches, embed_dim)."""
        if not self.use_fused:
            return self.featurizer(pixel_values)
        first, second = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(first), self.fused_featurizer(second)], dim=2)


class PrismaticProjector(nn.Module):
    def __init__(self, fused: bool, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
        self.act = nn.GELU()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.act(self.fc1(patches)))
        return self.fc3(self.act(x)) if self.fused else x


class PrismaticVLA(nn.Module):
    """Vision backbone + projector + Llama (the module tree of ``model-*.safetensors``)."""

    def __init__(self, vision_specs: Sequence[ViTSpec], text_config: LlamaConfig) -> None:
        super().__init__()
        self.vision_backbone = PrismaticVisionBackbone(vision_specs)
        self.projector = PrismaticProjector(self.vision_backbone.use_fused, self.vision_backbone.embed_dim,
                                            text_config.hidden_size)
        self.language_model = LlamaForCausalLM(text_config)

    @property
    def decoder(self) -> nn.Module:
        return self.language_model.model

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def patch_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3 * num_backbones, H, W) normalised images -> (B, num_patches, llm_dim) decoder inputs."""
        return self.projector(self.vision_backbone(pixel_values))


class ProprioProjector(nn.Module):
    """OpenVLA-OFT's robot-state projector: one token of LLM width."""

    def __init__(self, llm_dim: int, proprio_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


class _ResidualMLPBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class _MLPResNet(nn.Module):
    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList([_ResidualMLPBlock(hidden_dim) for _ in range(num_blocks)])
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """OpenVLA-OFT's L1-regression head.

    The ``action_dim`` hidden states of one chunk step, concatenated, through LayerNorm -> Linear -> ReLU -> 2 residual
    (LayerNorm, Linear, ReLU) blocks -> LayerNorm -> Linear.
    """

    def __init__(self, llm_dim: int, hidden_dim: int, action_dim: int, num_blocks: int = 2) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.model = _MLPResNet(num_blocks, llm_dim * action_dim, hidden_dim, action_dim)

    def forward(self, action_states: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """(B, chunk_size * action_dim, llm_dim) -> (B, chunk_size, action_dim) normalised actions."""
        return self.model(action_states.reshape(action_states.shape[0], chunk_size, -1))
