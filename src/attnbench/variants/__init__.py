"""The registry: variant name -> attention module class. A new variant is one file, its class decorated with
@register("<name>") (base.py), plus one line here that imports it."""

from __future__ import annotations

import re

from .base import REGISTRY, Attention, NoBooleanNumbers, PositiveAutoInt, VariantOptions

# One line per variant: importing its file registers its class (@register); this order is REGISTRY's.
from . import mha  # noqa: F401
from . import la  # noqa: F401
from . import ca  # noqa: F401
from . import lca  # noqa: F401
from . import cka  # noqa: F401
from . import fastcka  # noqa: F401
from . import sca  # noqa: F401


# A params entry `<variant>-seed<N>` trains that variant again with train.seed N: seeds are entries like any other,
# so both front ends, which iterate over the entries, run them unchanged.
SEEDED_ENTRY = re.compile(r"(?P<variant>.+)-seed(?P<seed>0|[1-9][0-9]*)")


def parse_entry(name: str) -> tuple[str, int | None]:
    """The registered variant a params entry runs and its own training seed (None: train.seed); a ValueError naming
    what is allowed for a name that is neither a variant nor `<variant>-seed<N>`."""
    if name in REGISTRY:
        return name, None
    seeded = SEEDED_ENTRY.fullmatch(name)
    variant, seed = (seeded["variant"], int(seeded["seed"])) if seeded else (name, None)
    if variant not in REGISTRY:
        raise ValueError(f"unknown variant {name!r}; allowed: {', '.join(REGISTRY)}, each also as <variant>-seed<N> "
                         "(trained again with seed N)")
    return variant, seed


def build_attention(name: str, d_model: int, n_heads: int, seq_len: int, options: VariantOptions | dict | None = None) -> Attention:
    """Instantiate variant `name`; `options` may be its Options model or a plain dict of overrides. (Only the lookup is
    here: what building does is Attention's, in base.py, which every variant's sources manifest lists.)"""
    return REGISTRY[name](d_model, n_heads, seq_len, options)


__all__ = ["REGISTRY", "Attention", "NoBooleanNumbers", "PositiveAutoInt", "VariantOptions", "build_attention", "parse_entry"]
