"""The project's reference VLA: OpenVLA-OFT's shape at a size that trains on a CPU.

Sequence (bidirectional attention, one forward pass per chunk, like OpenVLA-OFT)::

    [camera 0 patches][camera 1 patches][instruction words][padding][proprio][action queries x chunk*dims]

* vision encoder: a small convolutional stem per camera (shared weights) giving a grid of patch features,
  FiLM-conditioned on the instruction after every stage (as OpenVLA-OFT+ does, so the stem can pick out the
  named object), then a projector to the decoder width, plus fixed 2-D sin-cos and learned patch-position
  embeddings and a camera embedding;
* decoder: a transformers ``LlamaModel`` run by ``PrunableDecoderRunner`` (so pruning methods act on it);
* action head: an MLP over each chunk step's action-query states, regressing the normalised 8 x 7 chunk (L1);
* training aids (unused when acting): a localisation head (mean action-query state -> the named object's and the
  goal's table coordinates) and a pointing head (each patch token of the first, fixed camera -> a logit that the
  named object / the goal is there, before the decoder), so the policy learns early *where* the instruction points.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from specprune_ros.core.executor import PrunableDecoderRunner, RunResult
from specprune_ros.core.step_types import PruningMethod
from specprune_ros.core.token_layout import TokenLayout
from specprune_ros.policy.tokenizer import WordTokenizer


@dataclass
class ReferenceVLAConfig:
    """Sizes of the reference VLA (saved next to its weights as config.json)."""

    vocabulary: tuple[str, ...] = ()
    camera_names: tuple[str, ...] = ('agentview', 'wrist')
    image_size: int = 96
    patch_size: int = 8                      # pixels per patch side: 96 / 8 = 12 x 12 = 144 patches per camera
    vision_channels: tuple[int, ...] = (32, 64, 128)
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 4
    mlp_size: int = 384
    max_words: int = 12
    proprio_dim: int = 6
    chunk_size: int = 8
    action_dim: int = 7
    head_hidden: int = 512
    language_film: bool = True               # FiLM the vision stem with the instruction (OpenVLA-OFT+)
    # proprio entries the policy does not see (zeroed after normalisation). A scripted expert moves straight at
    # the target, so along the way the tcp's xy and yaw name the target and a policy learns to read it off its own
    # pose instead of the images ("copycat"); hiding them makes it look.
    blind_proprio: tuple[int, ...] = ()
    # mark the fixed camera's patches with where the pointing head puts the named object / goal, so the decoder
    # can read the instruction's target off the tokens instead of re-deriving it
    pointing_marker: bool = True
    proprio_mean: list[float] = field(default_factory=list)   # normalisation of the proprio vector
    proprio_std: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vocabulary = tuple(self.vocabulary)
        self.camera_names = tuple(self.camera_names)
        self.vision_channels = tuple(self.vision_channels)
        self.blind_proprio = tuple(int(i) for i in self.blind_proprio)
        if any(not 0 <= i < self.proprio_dim for i in self.blind_proprio):
            raise ValueError(f'blind_proprio {self.blind_proprio} outside the {self.proprio_dim} proprio entries')
        if self.image_size % self.patch_size:
            raise ValueError('image_size must be a multiple of patch_size')
        if self.patch_size != 2 ** len(self.vision_channels):
            raise ValueError('the vision stem halves the resolution once per channel stage: '
                             f'patch_size must be 2**{len(self.vision_channels)}')

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


def sincos_positions_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed (grid*grid, dim) embedding: half the channels encode the row, half the column (sin and cos)."""
    quarter = dim // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(1, quarter)))
    coords = torch.arange(grid, dtype=torch.float32)
    angles = coords[:, None] * frequencies[None]                       # (grid, quarter)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)              # (grid, 2*quarter)
    rows = axis[:, None, :].expand(grid, grid, -1)
    cols = axis[None, :, :].expand(grid, grid, -1)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)
    return nn.functional.pad(table, (0, dim - table.shape[1]))


def pointing_marks(logits: torch.Tensor) -> torch.Tensor:
    """Per-patch marks in [0, 1] from pointing logits (..., patches): the softmax scaled to 1 at its peak."""
    probs = torch.softmax(logits.float(), dim=-1)
    return probs / probs.amax(dim=-1, keepdim=True)


class PatchEncoder(nn.Module):
    """Convolutional stem: (B, 3, H, W) uint8-range images -> (B, grid*grid, channels) patch features.

    With ``film`` (B, 2 * sum(channels)) scales and shifts, each stage's normalised features become
    ``x * (1 + scale) + shift`` (FiLM), so the instruction decides what the stem emphasises.
    """

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.GELU()]
            previous = width
        layers += [nn.Conv2d(previous, previous, 3, padding=1), nn.GELU()]
        self.stem = nn.Sequential(*layers)
        self.channels = tuple(channels)
        self.register_buffer('mean', torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, film: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = images.float() / 255.0 - self.mean
        offset = 0
        for layer in self.stem:
            x = layer(x)
            if film is not None and isinstance(layer, nn.GroupNorm):
                width = x.shape[1]
                scale = film[:, offset:offset + width, None, None]
                shift = film[:, offset + width:offset + 2 * width, None, None]
                x = x * (1 + scale) + shift
                offset += 2 * width
        return x.flatten(2).transpose(1, 2)


LOCALISATION_DIMS = 4   # (object x, object y, goal x, goal y), table metres x LOCALISATION_SCALE
LOCALISATION_SCALE = 5.0


class ReferenceVLA(nn.Module):
    """Vision encoder + projector + word embeddings + proprio + action queries -> Llama -> MLP action head."""

    def __init__(self, config: ReferenceVLAConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = WordTokenizer(config.vocabulary, config.max_words)
        d = config.hidden_size
        num_patches = config.grid * config.grid
        self.patch_encoder = PatchEncoder(config.vision_channels)
        self.projector = nn.Sequential(nn.Linear(config.vision_channels[-1], d), nn.GELU(), nn.Linear(d, d))
        self.patch_position = nn.Parameter(torch.randn(num_patches, d) * 0.02)
        self.register_buffer('patch_sincos', sincos_positions_2d(config.grid, d), persistent=False)
        self.sincos_gain = nn.Parameter(torch.zeros(1))   # grows from 0, so a warm start keeps its function
        self.camera_embedding = nn.Parameter(torch.randn(len(config.camera_names), d) * 0.02)
        self.word_embedding = nn.Embedding(self.tokenizer.vocab_size, d)
        self.film = None
        if config.language_film:
            film_width = 2 * sum(config.vision_channels)
            self.film = nn.Sequential(nn.Linear(config.max_words * d, 2 * d), nn.GELU(), nn.Linear(2 * d, film_width))
            nn.init.zeros_(self.film[-1].weight)          # identity FiLM at initialisation
            nn.init.zeros_(self.film[-1].bias)
        self.proprio_projector = nn.Sequential(nn.Linear(config.proprio_dim, d), nn.GELU(), nn.Linear(d, d))
        self.action_queries = nn.Parameter(torch.randn(config.chunk_size * config.action_dim, d) * 0.02)
        llama = LlamaConfig(hidden_size=d, intermediate_size=config.mlp_size, num_hidden_layers=config.num_layers,
                            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                            vocab_size=1, max_position_embeddings=1024, rms_norm_eps=1e-5,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)   # no token table: no ids
        llama._attn_implementation = 'sdpa'
        decoder = LlamaModel(llama)
        decoder.embed_tokens = None  # inputs are embeddings; no token table needed
        self.runner = PrunableDecoderRunner(decoder)
        self.action_head = nn.Sequential(
            nn.LayerNorm(config.action_dim * d), nn.Linear(config.action_dim * d, config.head_hidden), nn.GELU(),
            nn.Linear(config.head_hidden, config.head_hidden), nn.GELU(),
            nn.Linear(config.head_hidden, config.action_dim))
        self.localisation_head = nn.Linear(d, LOCALISATION_DIMS)
        self.pointer_head = nn.Linear(d, 2)          # (named object, goal) logits per patch of camera 0
        self.pointed_embedding = None
        if config.pointing_marker:
            self.pointed_embedding = nn.Parameter(torch.zeros(2, d))   # zero: a warm start keeps its function
        mean = torch.tensor(config.proprio_mean or [0.0] * config.proprio_dim)
        std = torch.tensor(config.proprio_std or [1.0] * config.proprio_dim)
        self.register_buffer('proprio_mean', mean, persistent=False)
        self.register_buffer('proprio_std', std.clamp(min=1e-3), persistent=False)
        visible = torch.ones(config.proprio_dim)
        visible[list(config.blind_proprio)] = 0.0
        self.register_buffer('proprio_visible', visible, persistent=False)

    # -- sequence -------------------------------------------------------------------------------------------

    def layout(self, num_words: int) -> TokenLayout:
        """Token layout of one sequence (``num_words`` real instruction words, the rest padding)."""
        c = self.config
        patches = c.grid * c.grid
        cams = tuple((i * patches, (i + 1) * patches) for i in range(len(c.camera_names)))
        text_start = cams[-1][1]
        proprio = text_start + c.max_words
        actions = proprio + 1
        return TokenLayout(num_tokens=actions + c.chunk_size * c.action_dim, camera_spans=cams,
                           grid_shape=(c.grid, c.grid), text_span=(text_start, text_start + num_words),
                           proprio_span=(proprio, proprio + 1),
                           action_span=(actions, actions + c.chunk_size * c.action_dim),
                           causal=False)

    def embed(self, images: torch.Tensor, word_ids: torch.Tensor, proprio: torch.Tensor,
              with_pointing: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Decoder input embeddings (B, N, d) from images (B, cams, 3, H, W) uint8, word ids (B, max_words), proprio.

        ``with_pointing``: also return the pointing head's logits (B, 2, patches) over camera 0's patch tokens
        (named object, goal), computed before those tokens are marked with them.
        """
        batch, cams = images.shape[:2]
        words = self.word_embedding(word_ids)
        film = None
        if self.film is not None:
            film = self.film(words.flatten(1)).repeat_interleave(cams, dim=0)     # one row per (sample, camera)
        patches = self.projector(self.patch_encoder(images.flatten(0, 1), film))
        patches = patches.view(batch, cams, -1, patches.shape[-1])
        positions = self.patch_position + self.sincos_gain * self.patch_sincos
        patches = patches + positions + self.camera_embedding[:cams, None]
        logits = None
        if with_pointing or self.pointed_embedding is not None:
            logits = self.pointer_head(patches[:, 0].float()).transpose(1, 2)
        if self.pointed_embedding is not None:
            marks = pointing_marks(logits.detach()).to(patches.dtype)            # (B, 2, patches)
            fixed = patches[:, 0] + marks.transpose(1, 2) @ self.pointed_embedding.to(patches.dtype)
            patches = torch.cat([fixed.unsqueeze(1), patches[:, 1:]], dim=1)
        proprio = (proprio.float() - self.proprio_mean) / self.proprio_std * self.proprio_visible
        embeddings = torch.cat([
            patches.flatten(1, 2),
            words,
            self.proprio_projector(proprio).unsqueeze(1),
            self.action_queries.expand(batch, -1, -1),
        ], dim=1)
        return (embeddings, logits) if with_pointing else embeddings

    def decode_actions(self, result: RunResult, layout: TokenLayout) -> torch.Tensor:
        """(B, chunk, action_dim) actions from the action-query states of a decoder pass."""
        c = self.config
        states = result.select(torch.arange(*layout.action_span, device=result.kept.device))
        states = states.reshape(states.shape[0], c.chunk_size, c.action_dim * c.hidden_size)
        return self.action_head(states.float())

    def localise(self, result: RunResult, layout: TokenLayout) -> torch.Tensor:
        """(B, 4) predicted (object xy, goal xy) x LOCALISATION_SCALE from the action-query states of a pass."""
        states = result.select(torch.arange(*layout.action_span, device=result.kept.device))
        return self.localisation_head(states.float().mean(dim=1))

    def forward(self, images: torch.Tensor, word_ids: torch.Tensor, num_words: int, proprio: torch.Tensor,
                method: Optional[PruningMethod] = None) -> tuple[torch.Tensor, RunResult]:
        """Predict the chunk; ``num_words`` sets the text span of the layout (padding is never 'text')."""
        layout = self.layout(num_words)
        embeddings = self.embed(images, word_ids, proprio)
        result = self.runner(embeddings, layout, method)
        return self.decode_actions(result, layout), result
