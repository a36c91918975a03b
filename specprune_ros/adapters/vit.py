"""Vision transformers whose parameter names match timm's ``VisionTransformer`` (0.9.x) as Prismatic builds it.

OpenVLA's vision backbone is two timm ViTs created with ``num_classes=0`` and the image size of the checkpoint; their
``forward`` is replaced by ``get_intermediate_layers(n={depth - 2})``: the patch tokens (prefix tokens dropped) of the
**second-to-last** block, without the final norm. Prismatic also renames every LayerScale ``gamma`` to
``scale_factor`` (transformers would otherwise rewrite parameters called ``gamma``).

This module re-implements that architecture with the same module tree, so a published state dict loads strictly,
without depending on timm:

    patch_embed.proj (Conv2d)  cls_token  reg_token  pos_embed  [norm_pre]
    blocks.N.{norm1, attn.qkv, attn.proj, ls1.scale_factor, norm2, mlp.fc1, mlp.fc2, ls2.scale_factor}
    norm                         (final norm: held, unused for patch features)
    attn_pool.{latent, q, kv, proj, norm, mlp.fc1, mlp.fc2}   (SigLIP 'map' pooling: held, unused)

Attention runs through ``F.scaled_dot_product_attention`` (fused kernels on GPU). The last block's output is never
used by Prismatic, so :meth:`VisionTransformer.patch_features` stops after block ``depth - 2``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ViTSpec:
    """Architecture of one timm ViT (the fields timm's model registry fixes for a model id)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    img_size: int = 224
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False       # position embeddings only for the patches (DINOv2 with registers)
    layer_scale: bool = False          # LayerScale after attention and MLP (DINOv2, init_values set)
    attn_pool: bool = False            # global_pool='map' (SigLIP): an attention-pooling head is part of the weights
    pre_norm: bool = False             # CLIP-style norm before the blocks (and no patch-embedding bias)
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    act: str = 'gelu'                  # 'gelu' (exact, timm's default), 'gelu_tanh' or 'quick_gelu'
    mean: tuple[float, float, float] = HALF   # pixel normalisation the backbone was trained with
    std: tuple[float, float, float] = HALF

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def replace(self, **changes) -> 'ViTSpec':
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f'unknown ViT field(s) {unknown}')
        for key in ('mean', 'std'):
            if key in changes:
                changes[key] = tuple(changes[key])
        return dataclasses.replace(self, **changes)


# timm model ids Prismatic / OpenVLA use (architecture part of the id, before the pretrained tag).
TIMM_PRESETS: dict[str, ViTSpec] = {
    'vit_large_patch14_reg4_dinov2': ViTSpec(
        embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, reg_tokens=4, no_embed_class=True, layer_scale=True,
        mean=IMAGENET_MEAN, std=IMAGENET_STD),
    'vit_so400m_patch14_siglip_224': ViTSpec(
        embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False, attn_pool=True),
    'vit_so400m_patch14_siglip_384': ViTSpec(
        embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False, attn_pool=True, img_size=384),
}


def timm_spec(model_id: str, img_size: Optional[int] = None, act_override: Optional[str] = None,
              overrides: Optional[dict] = None) -> ViTSpec:
    """The spec of a timm model id (pretrained tag ignored), at ``img_size``, with optional field overrides."""
    arch = model_id.split('.')[0]
    if arch not in TIMM_PRESETS:
        raise ValueError(f'unsupported timm vision backbone {model_id!r}; supported: {sorted(TIMM_PRESETS)}')
    spec = TIMM_PRESETS[arch]
    changes = dict(overrides or {})
    if img_size is not None:
        changes.setdefault('img_size', int(img_size))
    if act_override:
        changes.setdefault('act', act_override)
    return spec.replace(**changes) if changes else spec


def _activation(name: str) -> nn.Module:
    if name == 'gelu':
        return nn.GELU()
    if name == 'gelu_tanh':
        return nn.GELU(approximate='tanh')
    if name == 'quick_gelu':
        return _QuickGELU()
    raise ValueError(f'unknown activation {name!r}')


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class PatchEmbed(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, spec.embed_dim, spec.patch_size, stride=spec.patch_size, bias=not spec.pre_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    """timm's LayerScale with Prismatic's parameter name (``scale_factor`` instead of ``gamma``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        d = spec.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=spec.norm_eps)
        self.attn = Attention(d, spec.num_heads, spec.qkv_bias)
        self.ls1 = LayerScale(d) if spec.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=spec.norm_eps)
        self.mlp = Mlp(d, spec.mlp_hidden, spec.act)
        self.ls2 = LayerScale(d) if spec.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """SigLIP's attention-pooling head ('map'). Part of the published weights; patch features never use it."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        d = spec.embed_dim
        self.num_heads = spec.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=spec.norm_eps)
        self.mlp = Mlp(d, spec.mlp_hidden, 'gelu')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(self.latent.expand(b, -1, -1)).view(b, -1, h, c // h).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


class VisionTransformer(nn.Module):
    """timm-compatible ViT; ``patch_features`` is what Prismatic's patched ``forward`` returns."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        if spec.img_size % spec.patch_size:
            raise ValueError(f'image size {spec.img_size} is not a multiple of the patch size {spec.patch_size}')
        if spec.depth < 2:
            raise ValueError('Prismatic reads the second-to-last block: the ViT needs at least 2 blocks')
        self.spec = spec
        d = spec.embed_dim
        self.embed_dim = d
        self.patch_embed = PatchEmbed(spec)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if spec.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, spec.reg_tokens, d)) if spec.reg_tokens else None
        embed_len = spec.num_patches + (0 if spec.no_embed_class else spec.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, d) * 0.02)
        self.norm_pre = nn.LayerNorm(d, eps=spec.norm_eps) if spec.pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[Block(spec) for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(d, eps=spec.norm_eps)
        self.attn_pool = AttentionPoolLatent(spec) if spec.attn_pool else None

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.spec.no_embed_class:
            x = x + self.pos_embed
            x = torch.cat(prefix + [x], dim=1) if prefix else x
        else:
            x = torch.cat(prefix + [x], dim=1) if prefix else x
            x = x + self.pos_embed
        return self.norm_pre(x)

    def patch_features(self, pixels: torch.Tensor, block: int = -2) -> torch.Tensor:
        """Patch tokens (B, num_patches, D) after block ``block`` (default: second-to-last), no final norm."""
        last = block % self.spec.depth
        x = self._tokens(pixels)
        for blk in self.blocks[:last + 1]:
            x = blk(x)
        return x[:, self.spec.num_prefix_tokens:]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.patch_features(pixels)
