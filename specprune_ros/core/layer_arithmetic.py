"""One Llama decoder layer as plain tensor arithmetic, and the norm and activation the eager layers run.

:func:`layer_arithmetic` is what ``compile_layers`` compiles and what CUDA graphs capture: the layer's weights
as operands (:func:`layer_operands`), no module calls, fixed shapes.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaRMSNorm

if TYPE_CHECKING:
    from specprune_ros.core.weight_products import FusedProjections


def compilable(layer: nn.Module) -> bool:
    """Whether a layer is the plain Llama layer the compiled graph reproduces."""
    attn, mlp = layer.self_attn, layer.mlp
    projections = [getattr(attn, name, None) for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj')] + \
        [getattr(mlp, name, None) for name in ('gate_proj', 'up_proj', 'down_proj')]
    return (type(layer.input_layernorm) is LlamaRMSNorm and type(layer.post_attention_layernorm) is LlamaRMSNorm
            and all(type(m) is nn.Linear for m in projections)
            and type(getattr(mlp, 'act_fn', None)) in (nn.SiLU, SiLUActivation))


def layer_arithmetic(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                     causal: bool, qkv_weight: torch.Tensor | tuple, qkv_bias: Optional[torch.Tensor] | tuple,
                     o_weight: torch.Tensor, o_bias: Optional[torch.Tensor], gate_up_weight: torch.Tensor | tuple,
                     gate_up_bias: Optional[torch.Tensor] | tuple, down_weight: torch.Tensor,
                     down_bias: Optional[torch.Tensor], norm_weight: torch.Tensor, post_norm_weight: torch.Tensor,
                     eps: float, post_eps: float, heads: int, kv_heads: int, head_dim: int, scaling: float,
                     kv_slots: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Llama layer as pure tensor arithmetic (what ``compile_layers`` compiles and CUDA graphs capture).

    Returns the output, queries, keys and values. The query/key/value and gate/up weights are fused tensors or
    tuples of the layer's own (:func:`layer_operands`). ``kv_slots`` (decoding into fixed buffers): (keys,
    values, slot): the new keys and values are written at ``slot`` (a (1,) index) of the (1, kv heads, capacity,
    head dim) buffers, ``mask`` (1, 1, 1, capacity) is set there, and the queries attend to the buffers where
    ``mask`` is set.
    """
    batch, n, _ = hidden.shape
    x = F.rms_norm(hidden, norm_weight.shape, norm_weight, eps)
    qkv = _projection(x, qkv_weight, qkv_bias).view(batch, n, -1, head_dim)
    qk = qkv[:, :, :heads + kv_heads].transpose(1, 2)
    half = head_dim // 2
    qk = qk * cos + torch.cat([qk[..., half:], qk[..., :half]], dim=-1) * sin
    q, k = qk[:, :heads], qk[:, heads:]
    v = qkv[:, :, heads + kv_heads:].transpose(1, 2)
    if kv_slots is not None:
        keys, values, slot = kv_slots
        keys.index_copy_(2, slot, k.to(keys.dtype))
        values.index_copy_(2, slot, v.to(values.dtype))
        mask.index_fill_(-1, slot, True)
        k, v = keys, values
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling,
                                         enable_gqa=heads != kv_heads)
    hidden = hidden + F.linear(out.transpose(1, 2).reshape(batch, n, -1), o_weight, o_bias)
    gate, up = _projection(F.rms_norm(hidden, post_norm_weight.shape, post_norm_weight, post_eps), gate_up_weight,
                           gate_up_bias).chunk(2, dim=-1)
    return hidden + F.linear(F.silu(gate) * up, down_weight, down_bias), q, k, v


def _projection(x: torch.Tensor, weight: torch.Tensor | tuple, bias: Optional[torch.Tensor] | tuple) -> torch.Tensor:
    """``x`` through one (fused) weight, or through several whose outputs are concatenated (the layer's own)."""
    if isinstance(weight, tuple):
        return torch.cat([F.linear(x, w, b) for w, b in zip(weight, bias)], dim=-1)
    return F.linear(x, weight, bias)


def layer_operands(layer: nn.Module, fused: Optional[FusedProjections]) -> tuple:
    """The arguments of :func:`layer_arithmetic` after ``causal``: one layer's weights, norms and head sizes.

    With ``fused`` None, the query/key/value and gate/up weights are the layer's own, as tuples.
    """
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    if fused is not None:
        qkv_weight, qkv_bias, sizes = fused.qkv_weight, fused.qkv_bias, fused.qkv_sizes
        gate_up_weight, gate_up_bias = fused.gate_up_weight, fused.gate_up_bias
    else:
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        qkv_weight, qkv_bias = tuple(m.weight for m in qkv), tuple(m.bias for m in qkv)
        sizes = [m.out_features for m in qkv]
        gate_up_weight = (mlp.gate_proj.weight, mlp.up_proj.weight)
        gate_up_bias = (mlp.gate_proj.bias, mlp.up_proj.bias)
    return (qkv_weight, qkv_bias, attn.o_proj.weight, attn.o_proj.bias, gate_up_weight, gate_up_bias,
            mlp.down_proj.weight, mlp.down_proj.bias, layer.input_layernorm.weight,
            layer.post_attention_layernorm.weight, layer.input_layernorm.variance_epsilon,
            layer.post_attention_layernorm.variance_epsilon, sizes[0] // head_dim, sizes[1] // head_dim, head_dim,
            attn.scaling)


@functools.cache
def compiled_layer():
    """``layer_arithmetic`` compiled once per process (one graph per shape; every layer shares it)."""
    # one recompilation per bucket (and per kept-set kind): allow more than dynamo's default of 8
    config = torch._dynamo.config
    limit = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'    # before torch 2.7
    setattr(config, limit, max(getattr(config, limit), 64))
    return torch.compile(layer_arithmetic, dynamic=False, fullgraph=True)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama RMS norm in six element-wise operations where that gives its numbers (fp32); the module otherwise.

    The module's own arithmetic in its order (mean of squares, reciprocal square root, the weight last), the
    scratch tensors updated in place: bit for bit the module's output. ``F.rms_norm`` gives the same numbers but runs
    twice as many operations on the CPU (dtype round trips of the statistics), which costs in a pruned pass whose
    element-wise work no longer hides the per-operation overhead.
    """
    if type(norm) is LlamaRMSNorm and x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        scale = x.pow(2).mean(-1, keepdim=True).add_(norm.variance_epsilon).rsqrt_()
        return (x * scale).mul_(norm.weight)
    return norm(x)


def activation(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's activation; SiLU without the module call."""
    return F.silu(x) if type(act) in (nn.SiLU, SiLUActivation) else act(x)
