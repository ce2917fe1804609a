"""The registry: variant name -> attention module class. A new variant is one file, its class decorated with
@register("<name>") (base.py), plus one line here that imports it."""

from __future__ import annotations

from .base import REGISTRY, Attention, NoBooleanNumbers, PositiveAutoInt, VariantOptions

# One line per variant: importing its file registers its class (@register); this order is REGISTRY's.
from . import mha  # noqa: F401
from . import la  # noqa: F401
from . import ca  # noqa: F401
from . import lca  # noqa: F401
from . import cka  # noqa: F401
from . import fastcka  # noqa: F401
from . import sca  # noqa: F401


def build_attention(name: str, d_model: int, n_heads: int, seq_len: int, options: VariantOptions | dict | None = None) -> Attention:
    """Instantiate variant `name`; `options` may be its Options model or a plain dict of overrides. (Only the lookup is
    here: what building does is Attention's, in base.py, which every variant's sources manifest lists.)"""
    return REGISTRY[name](d_model, n_heads, seq_len, options)


__all__ = ["REGISTRY", "Attention", "NoBooleanNumbers", "PositiveAutoInt", "VariantOptions", "build_attention"]
