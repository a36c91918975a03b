r"""pi0 / pi0.5 built from transformers' SigLIP and Gemma modules, with LeRobot's parameter names.

Module tree (the names of LeRobot's ``model.safetensors``, without its leading ``model.``)::

    paligemma_with_expert.paligemma.model.vision_tower          SigLIP (files: ``vision_tower.vision_model.*``)
    paligemma_with_expert.paligemma.model.multi_modal_projector.linear     1152 -> 2048
    paligemma_with_expert.paligemma.model.language_model        Gemma 2B: embed_tokens, layers, norm
    paligemma_with_expert.gemma_expert.model                    Gemma 300M action expert: layers, norm (no embedding)
    action_in_proj, action_out_proj                             32 <-> 1024
    pi0:   state_proj, action_time_mlp_in, action_time_mlp_out  state token; action + sin-cos time MLP
    pi0.5: time_mlp_in, time_mlp_out                            time -> adaRMS condition of every expert norm

Sequence of one inference: prefix = each camera's 256 SigLIP tokens, then the prompt (BOS + task + newline; pi0.5:
"Task: ..., State: <discretised state>;\nAction: "), all attending to each other; suffix = (pi0: one state token)
+ the chunk's 50 noisy-action tokens at positions after the prefix; the state token sees the prefix and itself, the
action tokens see the prefix, the state token and each other. The prefix never sees the suffix, so its keys/values
are computed once; ``num_inference_steps`` Euler steps integrate the predicted velocity from t = 1 (noise) to 0.

:meth:`Pi0Model.reference_sample` is the model's own unpruned forward: every denoising step runs the prefix and the
suffix jointly, layer by layer with one shared attention over both weight sets (as the published implementation's
training pass), without any cache; the backend's pruned path (prefix on the executor, expert against its cache)
must match it when nothing is pruned.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GemmaConfig, SiglipVisionConfig, SiglipVisionModel
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaModel, GemmaRMSNorm, GemmaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from specprune_ros.adapters.pi0.configuration import GemmaShape, Pi0Config
from specprune_ros.core.expert_attention import apply_norm, gated


def gemma_config(shape: GemmaShape, vocab_size: int) -> GemmaConfig:
    return GemmaConfig(vocab_size=vocab_size, hidden_size=shape.width, intermediate_size=shape.mlp_dim,
                       num_hidden_layers=shape.depth, num_attention_heads=shape.num_heads,
                       num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                       hidden_act='gelu_pytorch_tanh', rms_norm_eps=1e-6, max_position_embeddings=8192,
                       attn_implementation='sdpa')


def siglip_config(config: Pi0Config) -> SiglipVisionConfig:
    v = config.vision
    return SiglipVisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                              num_attention_heads=v.num_heads, image_size=config.image_resolution,
                              patch_size=v.patch_size, hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6,
                              vision_use_head=False, attn_implementation='sdpa')


class AdaRMSNorm(nn.Module):
    """pi0.5's adaptive RMSNorm: ``cond`` (B, c) -> scale, shift and a gate for the residual it feeds."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim, bias=True)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond).unsqueeze(1).chunk(3, dim=-1)
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


class MultiModalProjector(nn.Module):
    def __init__(self, vision_width: int, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_width, width, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class PaliGemmaBody(nn.Module):
    def __init__(self, config: Pi0Config) -> None:
        super().__init__()
        self.vision_tower = SiglipVisionModel(siglip_config(config))
        self.multi_modal_projector = MultiModalProjector(config.vision.width, config.vlm.width)
        self.language_model = GemmaModel(gemma_config(config.vlm, config.vocab_size))


class PaliGemma(nn.Module):
    def __init__(self, config: Pi0Config) -> None:
        super().__init__()
        self.model = PaliGemmaBody(config)


class ExpertBody(nn.Module):
    """The action expert's decoder: Gemma layers and final norm, no embedding (its inputs are projections)."""

    def __init__(self, config: Pi0Config) -> None:
        super().__init__()
        gconfig = gemma_config(config.expert, config.vocab_size)
        self.config = gconfig
        width = config.expert.width
        self.layers = nn.ModuleList([GemmaDecoderLayer(gconfig, i) for i in range(config.expert.depth)])
        if config.is_pi05:
            for layer in self.layers:
                layer.input_layernorm = AdaRMSNorm(width, width)
                layer.post_attention_layernorm = AdaRMSNorm(width, width)
            self.norm = AdaRMSNorm(width, width)
        else:
            self.norm = GemmaRMSNorm(width, eps=1e-6)
        self.rotary_emb = GemmaRotaryEmbedding(config=gconfig)


class GemmaExpert(nn.Module):
    def __init__(self, config: Pi0Config) -> None:
        super().__init__()
        self.model = ExpertBody(config)


class PaliGemmaWithExpert(nn.Module):
    def __init__(self, config: Pi0Config) -> None:
        super().__init__()
        self.paligemma = PaliGemma(config)
        self.gemma_expert = GemmaExpert(config)


def sincos_time_embedding(time: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, dim) sine-cosine features with periods from ``min_period`` to ``max_period``."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None, :] * time.to(torch.float64)[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


class Pi0Model(nn.Module):
    """pi0 / pi0.5 weights and the pieces of one inference (see the module docstring)."""

    def __init__(self, config: Pi0Config) -> None:
        super().__init__()
        self.config = config
        width = config.expert.width
        self.paligemma_with_expert = PaliGemmaWithExpert(config)
        self.action_in_proj = nn.Linear(config.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, config.max_action_dim)
        if config.is_pi05:
            self.time_mlp_in = nn.Linear(width, width)
            self.time_mlp_out = nn.Linear(width, width)
        else:
            self.state_proj = nn.Linear(config.max_state_dim, width)
            self.action_time_mlp_in = nn.Linear(2 * width, width)
            self.action_time_mlp_out = nn.Linear(width, width)

    # -- parts -------------------------------------------------------------------------------------------------

    @property
    def vlm(self) -> GemmaModel:
        return self.paligemma_with_expert.paligemma.model.language_model

    @property
    def expert(self) -> ExpertBody:
        return self.paligemma_with_expert.gemma_expert.model

    def restore_buffers(self, device: torch.device | str) -> None:
        """Recompute the non-persistent buffers after building on the meta device.

        Rotary frequencies, SigLIP position ids, the embedding scale.
        """
        self.vlm.rotary_emb = GemmaRotaryEmbedding(config=self.vlm.config).to(device)
        self.expert.rotary_emb = GemmaRotaryEmbedding(config=self.expert.config).to(device)
        embeddings = self.paligemma_with_expert.paligemma.model.vision_tower.embeddings
        num = embeddings.num_positions
        embeddings.register_buffer('position_ids', torch.arange(num, device=device).expand((1, -1)), persistent=False)
        embed = self.vlm.embed_tokens
        embed.embed_scale = torch.tensor(embed.scalar_embed_scale, device=device)

    # -- embeddings --------------------------------------------------------------------------------------------

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(cams, 3, H, W) in [-1, 1] -> (cams, patches, d): SigLIP's last hidden state through the projector."""
        body = self.paligemma_with_expert.paligemma.model
        features = body.vision_tower(pixel_values=pixels).last_hidden_state
        return body.multi_modal_projector(features)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(1, n) token ids -> (1, n, d), scaled by sqrt(d) as Gemma's embedding does."""
        return self.vlm.embed_tokens(ids)

    def embed_suffix(self, state: Optional[torch.Tensor], noisy_actions: torch.Tensor, time: float
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Expert input for one denoising step: ((1, S, d_e) embeddings, adaRMS condition or None).

        pi0: the state token then the action tokens (action projection fused with the time embedding by an MLP);
        pi0.5: the action tokens only, the time goes into every expert norm as the condition.
        """
        cfg = self.config
        batch = noisy_actions.shape[0]
        times = torch.full((batch,), float(time), device=noisy_actions.device)
        time_emb = sincos_time_embedding(times, self.action_in_proj.out_features, cfg.min_period, cfg.max_period)
        time_emb = time_emb.to(noisy_actions.dtype)
        actions = self.action_in_proj(noisy_actions)
        if cfg.is_pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
            return actions, cond
        fused = torch.cat([actions, time_emb[:, None, :].expand_as(actions)], dim=2)
        fused = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(fused)))
        return torch.cat([self.state_proj(state)[:, None, :], fused], dim=1), None

    def suffix_mask(self, device: torch.device | str = 'cpu') -> torch.Tensor:
        """(S, S) bool: which suffix tokens see which (pi0: the state token sees itself only; actions see all)."""
        chunk = self.config.chunk_size
        state = 0 if self.config.is_pi05 else 1
        blocks = torch.arange(state + chunk, device=device) >= state     # 0: the state token, 1: the actions
        return blocks[None, :] <= blocks[:, None]

    @property
    def suffix_state_tokens(self) -> int:
        return 0 if self.config.is_pi05 else 1

    def velocity(self, expert_hidden: torch.Tensor) -> torch.Tensor:
        """The last ``chunk_size`` expert outputs -> (B, chunk, max_action_dim) velocity."""
        return self.action_out_proj(expert_hidden[:, -self.config.chunk_size:])

    def integrate(self, noise: torch.Tensor, velocity_at) -> torch.Tensor:
        """Euler steps of dx/dt = v from t = 1 (``noise``) to t = 0; ``velocity_at(x_t, t)`` -> v."""
        steps = self.config.num_inference_steps
        dt = -1.0 / steps
        x = noise
        for step in range(steps):
            x = x + dt * velocity_at(x, 1.0 + step * dt)
        return x

    # -- the model's own unpruned forward ----------------------------------------------------------------------

    @torch.no_grad()
    def joint_pass(self, prefix: torch.Tensor, suffix: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        """Prefix (B, N, d) and suffix (B, S, d_e) through both weight sets, one attention per layer over all tokens.

        Eager softmax over the N + S tokens, at least float32; returns the expert's final-normed suffix states.
        """
        vlm, expert = self.vlm, self.expert
        batch, n, _ = prefix.shape
        s = suffix.shape[1]
        positions = torch.arange(n + s, device=prefix.device).view(1, -1)
        allowed = torch.zeros(n + s, n + s, dtype=torch.bool, device=prefix.device)
        allowed[:n, :n] = True
        allowed[n:, :n] = True
        allowed[n:, n:] = self.suffix_mask(prefix.device)
        cos, sin = vlm.rotary_emb(prefix, positions)
        hp, he = prefix, suffix
        for layer_p, layer_e in zip(vlm.layers, expert.layers):
            xp = layer_p.input_layernorm(hp)
            xe, gate = apply_norm(layer_e.input_layernorm, he, cond)
            heads = []
            for proj in ('q_proj', 'k_proj', 'v_proj'):
                a = getattr(layer_p.self_attn, proj)(xp).view(batch, n, -1, layer_p.self_attn.head_dim)
                b = getattr(layer_e.self_attn, proj)(xe).view(batch, s, -1, layer_e.self_attn.head_dim)
                heads.append(torch.cat([a, b], dim=1).transpose(1, 2))
            q, k, v = heads
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            wide = torch.promote_types(q.dtype, torch.float32)
            scores = torch.matmul(q.to(wide), k.to(wide).transpose(-1, -2)) * layer_p.self_attn.scaling
            scores = scores.masked_fill(~allowed, torch.finfo(wide).min)
            out = torch.matmul(scores.softmax(-1), v.to(wide)).to(q.dtype).transpose(1, 2).reshape(batch, n + s, -1)
            hp = hp + layer_p.self_attn.o_proj(out[:, :n])
            he = gated(he, layer_e.self_attn.o_proj(out[:, n:]), gate)
            hp = hp + layer_p.mlp(layer_p.post_attention_layernorm(hp))
            x, gate = apply_norm(layer_e.post_attention_layernorm, he, cond)
            he = gated(he, layer_e.mlp(x), gate)
        out, _ = apply_norm(expert.norm, he, cond)
        return out

    @torch.no_grad()
    def reference_sample(self, prefix: torch.Tensor, state: Optional[torch.Tensor], noise: torch.Tensor
                         ) -> torch.Tensor:
        """Unpruned actions (B, chunk, max_action_dim) from prefix embeddings, padded normalised state, noise."""
        def velocity_at(x: torch.Tensor, time: float) -> torch.Tensor:
            suffix, cond = self.embed_suffix(state, x, time)
            return self.velocity(self.joint_pass(prefix, suffix, cond))
        return self.integrate(noise, velocity_at)
