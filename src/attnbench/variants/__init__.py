"""The registry: variant name -> attention module class. A new variant is one file plus its entry here: the import
of its class and one line of REGISTRY."""

from __future__ import annotations

from .base import Attention, PositiveAutoInt, VariantOptions
from .ca import BlockClusterAttention
from .cka import ClusterKernelAttention
from .fastcka import FastClusterKernelAttention
from .la import LinearAttention
from .lca import LearnedClusterAttention
from .mha import MultiHeadAttention
from .sca import SuperClusterAttention

REGISTRY: dict[str, type[Attention]] = {
    "mha": MultiHeadAttention,
    "la": LinearAttention,
    "ca": BlockClusterAttention,
    "lca": LearnedClusterAttention,
    "cka": ClusterKernelAttention,
    "fastcka": FastClusterKernelAttention,
    "sca": SuperClusterAttention,
}


def build_attention(name: str, d_model: int, n_heads: int, seq_len: int, options: VariantOptions | dict | None = None) -> Attention:
    """Instantiate variant `name`; `options` may be its Options model or a plain dict of overrides. (Only the lookup is
    here: what building does is Attention's, in base.py, which every variant's sources manifest lists.)"""
    return REGISTRY[name](d_model, n_heads, seq_len, options)


__all__ = ["REGISTRY", "Attention", "PositiveAutoInt", "VariantOptions", "build_attention"]
