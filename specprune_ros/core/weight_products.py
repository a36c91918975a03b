"""The decoder's matrix products from fused and re-laid-out weights.

A layer's query/key/value weights are stacked into one matrix and its gate/up weights into another
(:class:`FusedProjections`), so a layer runs two products where it ran five. On the CPU every product may also
read a copy of its weight in another layout (oneDNN's or MKL's packed weights, or an input-major copy), used only
where it gives the weight's own numbers bit for bit (:class:`ExactCopyChoice`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from specprune_ros.core.cpu_info import cpu_info


def linear_weight_bytes(modules) -> int:
    """Bytes of the weights of the plain linear layers among ``modules``."""
    return sum(m.weight.numel() * m.weight.element_size() for m in modules if isinstance(m, nn.Linear))


# the token count oneDNN's and MKL's packed weights are laid out for (any count multiplies correctly; this is a
# typical pruned sequence), and the narrowest decoder that packs them by default (no gain measured at 128 wide)
PACKED_FOR_TOKENS = 128
PACKED_MIN_WIDTH = 256
# by default, oneDNN's or MKL's packed copies only while one more copy of the decoder's linear weights takes at most
# this share of the memory available when a runner first decides (a 7B decoder in fp32 on a CPU: 26 GB more)
COPY_MEMORY_SHARE = 0.25


def cpu_vendor() -> str:
    """The processor's vendor as the kernel reports it ('GenuineIntel', 'AuthenticAMD', ...; '' where unknown)."""
    return cpu_info('vendor_id')


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN's prepacked product applies to ``weight`` (fp32 on the CPU, oneDNN present)."""
    return weight.device.type == 'cpu' and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def mkl_packable(weight: torch.Tensor) -> bool:
    """Whether MKL's packed product applies to ``weight`` (fp32 on the CPU, a torch build with MKL's packed ops)."""
    return (weight.device.type == 'cpu' and weight.dtype == torch.float32 and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, '_mkl_linear') and hasattr(torch.ops.mkl, '_mkl_reorder_linear_weight'))


class ExactCopyChoice:
    """Where a product may read a copy of its weight (another layout): where that gives the same numbers bit for bit.

    The summation order inside a CPU matrix product depends on its shapes, the weight's layout and the thread
    count, not on the values; so a check on a random input decides for every later product of that kind: once per
    (row count, weight shape, threads, dtype, device), or, from ``exact_from_rows`` rows on, once per weight shape
    for all those counts (where the copy is known to match at every such count or at none). ``product(x, copy,
    weight, bias)`` multiplies from the copy. Shared by all layers of a runner.
    """

    def __init__(self, product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
                                         torch.Tensor], exact_from_rows: Optional[int] = None) -> None:
        self.product = product
        self.exact_from_rows = exact_from_rows
        self._same: dict[tuple, bool] = {}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, copy: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
        if not x.is_contiguous():          # the check runs on contiguous inputs only
            return F.linear(x, weight, bias)
        rows = x.numel() // x.shape[-1]
        if self.exact_from_rows is not None:
            rows = min(rows, self.exact_from_rows)
        key = (rows, tuple(weight.shape), bias is None, torch.get_num_threads(), x.dtype, x.device)
        same = self._same.get(key)
        if same is None:
            generator = torch.Generator(device=x.device).manual_seed(len(self._same))
            probe = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            same = self._same[key] = torch.equal(F.linear(probe, weight, bias), self.product(probe, copy, weight, bias))
        return self.product(x, copy, weight, bias) if same else F.linear(x, weight, bias)


# MKL's packed product against its plain one, swept over 1-600 rows per weight shape on an Intel Xeon (1 and 2
# threads): the plain product takes another path for up to 3-15 rows (by shape); from there on the two matched at
# every count or, for inner sizes above ~1000, at none. From this many rows on one check per shape decides.
MKL_PACKED_EXACT_FROM_ROWS = 64


def input_major_product(x: torch.Tensor, copy: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The product read from an input-major (transposed in memory) copy of the weight."""
    return F.linear(x, copy, bias)


def mkl_packed_product(x: torch.Tensor, copy: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The product read from MKL's packed copy of the weight (any number of rows; ``weight`` for its shape)."""
    rows = x.numel() // x.shape[-1]
    return torch.ops.mkl._mkl_linear(x, copy, weight, bias, rows)


def plain_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A plain linear layer's product without the module call (the same numbers); any other module is called."""
    if type(module) is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module(x)


@dataclass
class FusedProjections:
    """One layer's query/key/value weights stacked into one matrix, and the MLP's gate/up weights into another."""

    qkv_weight: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    qkv_sizes: list[int]
    gate_up_weight: torch.Tensor
    gate_up_bias: Optional[torch.Tensor]
    sources: list[tuple[torch.Tensor, int, int]]      # (parameter, data_ptr, version) the copies were made from
    # copies of every product's weight that a product reads instead (``copy_kind``): 'input_major', (out, in) views
    # of transposed storage, or 'mkl_packed', MKL's packed weights, each read where ``exact`` allows; or 'packed',
    # oneDNN's prepacked weights
    copy_kind: Optional[str] = None
    qkv_copy: Optional[torch.Tensor] = None
    gate_up_copy: Optional[torch.Tensor] = None
    o_copy: Optional[torch.Tensor] = None
    down_copy: Optional[torch.Tensor] = None
    exact: Optional[ExactCopyChoice] = None
    copied_from: dict[int, torch.Tensor] = field(default_factory=dict)   # id(copy) -> the weight it copies

    @classmethod
    def build(cls, layer: nn.Module, copy_kind: Optional[str] = None,
              exact: Optional[ExactCopyChoice] = None) -> Optional[FusedProjections]:
        """The fused copies of ``layer``'s weights, or None where its modules are not plain linear layers.

        ``copy_kind``: also hold every weight 'input_major' or 'mkl_packed' (read where ``exact`` allows), or
        'packed' for oneDNN.
        """
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [getattr(attn, name, None) for name in ('q_proj', 'k_proj', 'v_proj')]
        gate_up = [getattr(mlp, name, None) for name in ('gate_proj', 'up_proj')]
        modules = qkv + gate_up
        if any(type(m) is not nn.Linear for m in modules) or not all(hasattr(mlp, a) for a in ('down_proj', 'act_fn')):
            return None
        if len({(m.bias is None) for m in qkv}) > 1 or len({(m.bias is None) for m in gate_up}) > 1:
            return None
        if gate_up[0].out_features != gate_up[1].out_features:
            return None

        def stack(group: list[nn.Linear], bias: bool) -> Optional[torch.Tensor]:
            if bias and group[0].bias is None:
                return None
            return torch.cat([(m.bias if bias else m.weight).detach() for m in group]).contiguous()

        def copy(weight: torch.Tensor) -> torch.Tensor:
            if copy_kind == 'packed':
                return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_TOKENS)
            if copy_kind == 'mkl_packed':
                return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), PACKED_FOR_TOKENS)
            return weight.detach().t().contiguous().t()

        fused = cls(qkv_weight=stack(qkv, False), qkv_bias=stack(qkv, True), qkv_sizes=[m.out_features for m in qkv],
                    gate_up_weight=stack(gate_up, False), gate_up_bias=stack(gate_up, True), sources=[])
        if copy_kind is not None:
            fused.copy_kind, fused.exact = copy_kind, exact
            fused.qkv_copy = copy(fused.qkv_weight)
            fused.gate_up_copy = copy(fused.gate_up_weight)
            if type(attn.o_proj) is nn.Linear:
                fused.o_copy = copy(attn.o_proj.weight)
                fused.copied_from[id(fused.o_copy)] = attn.o_proj.weight
                modules.append(attn.o_proj)
            if type(mlp.down_proj) is nn.Linear:
                fused.down_copy = copy(mlp.down_proj.weight)
                fused.copied_from[id(fused.down_copy)] = mlp.down_proj.weight
                modules.append(mlp.down_proj)
        fused.sources = [(p, p.data_ptr(), p._version) for m in modules for p in m.parameters(recurse=False)]
        return fused

    def product(self, x: torch.Tensor, weight: torch.Tensor, copy: Optional[torch.Tensor],
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``x`` times ``weight`` (+ ``bias``), from the weight's copy where there is one.

        A oneDNN packed copy is always read; an input-major or MKL packed one where it gives the weight's own numbers.
        """
        if copy is None or self.copy_kind is None:
            return F.linear(x, weight, bias)
        if self.copy_kind in ('packed', 'mkl_packed') and (x.dtype != weight.dtype or x.device.type != 'cpu'):
            return F.linear(x, weight, bias)
        if self.copy_kind == 'packed':
            return torch.ops.mkldnn._linear_pointwise(x, copy, bias, 'none', [], '')
        return self.exact(x, weight, copy, bias)

    def linear(self, module: nn.Module, x: torch.Tensor, copy: Optional[torch.Tensor]) -> torch.Tensor:
        """A layer's own linear module applied to ``x`` (from its copy where allowed).

        A module replaced since the copy was made runs itself.
        """
        if copy is None or type(module) is not nn.Linear or self.copied_from.get(id(copy)) is not module.weight:
            return plain_linear(module, x)
        return self.product(x, module.weight, copy, module.bias)

    def current(self) -> bool:
        """Whether the source weights are still the ones copied (same storage, not modified in place)."""
        return all(p.data_ptr() == ptr and p._version == version for p, ptr, version in self.sources)
