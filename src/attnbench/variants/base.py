"""What every attention variant shares: projections, head split, path switch.

A variant subclasses `Attention` and writes two functions over (q, k, v, x):
`reference` (plain PyTorch, the definition the tests trust) and `efficient`
(the path training uses). Its hyper-parameters are a pydantic `Options` class
declared beside it; params.yaml's `variants.<name>` section is validated
against that class, so a new variant needs no change to config.py.
"""

from __future__ import annotations

import math
from types import UnionType
from typing import Annotated, ClassVar, Literal, Union, get_args, get_origin

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, PlainValidator, field_validator
from torch import nn

Path = Literal["reference", "efficient"]


def auto_option(minimum: float, integer: bool = True):
    """The type of an option that is "auto" (resolved against T by the variant) or a number >= minimum,
    an integer if `integer`; anything else is refused with one error naming what is allowed."""
    kinds, what = ((int,), "an integer") if integer else ((int, float), "a number")

    def validate(value: object) -> float | Literal["auto"]:
        if value == "auto" or (isinstance(value, kinds) and not isinstance(value, bool) and value >= minimum):
            return value
        raise ValueError(f"must be {what} >= {minimum} or 'auto'")

    return Annotated[(int if integer else float) | Literal["auto"], PlainValidator(validate)]


# Options are checked by their type when params are read, each with one clean error naming what is allowed.
PositiveAutoInt = auto_option(1)
NonNegativeAutoInt = auto_option(0)


def _flat(annotation) -> set:
    """The types an annotation admits: the members of its unions, without Annotated's metadata."""
    if get_origin(annotation) is Annotated:
        return _flat(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return set().union(*map(_flat, get_args(annotation)))
    return {annotation}


def _takes_a_boolean_as_a_number(types: set, value: object) -> bool:
    return isinstance(value, bool) and bool not in types and bool(types & {int, float})


class NoBooleanNumbers(BaseModel):
    """pydantic reads true (YAML's yes too) as 1 for a number: `train.steps: true` trained one step. Its models
    refuse a boolean for a number, and in a list of numbers."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value, info):
        types = _flat(cls.model_fields[info.field_name].annotation)
        items = set().union(*(_flat(t) for kind in types if get_origin(kind) in (list, tuple) for t in get_args(kind)))
        if _takes_a_boolean_as_a_number(types, value) or (
                isinstance(value, list) and any(_takes_a_boolean_as_a_number(items, v) for v in value)):
            raise ValueError("Input should be a number, not a boolean")
        return value


class VariantOptions(NoBooleanNumbers):
    """Base for a variant's hyper-parameters; `auto` values resolve against T."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def band_keys(lo: torch.Tensor) -> float:
    """Mean keys per query where query t sees keys lo[t] .. t: (T,) -> mean of t - lo[t] + 1."""
    return (torch.arange(len(lo)) - lo + 1).double().mean().item()


def pow2_block(seq_len: int, minimum: int = 16) -> int:
    """The spec's `auto` block size: smallest power of two >= sqrt(T), at least `minimum`."""
    return max(minimum, 1 << math.ceil(math.log2(max(1.0, math.sqrt(seq_len)))))


class Attention(nn.Module):
    """Causal self-attention sub-layer: x (B, T, C) -> (B, T, C).

    Subclasses implement `reference` and `efficient`, each mapping
    q, k, v (B, H, T, D) and the layer input x (B, T, C) to o (B, H, T, D).
    `self.path` chooses which one `forward` calls.
    """

    Options: ClassVar[type[VariantOptions]] = VariantOptions
    # The spec's "compute vs T" exponent (variants.md's table), which each variant's class declares itself (register
    # checks, inherited or not): the report and the benchmark set the fitted time exponent beside it.
    compute_exponent: ClassVar[float]
    # Inductor settings the variant's kernels want when a model or layer holding it is compiled (torch.compile options).
    compile_options: ClassVar[dict[str, object]] = {}

    def __init__(self, d_model: int, n_heads: int, seq_len: int, options: VariantOptions | dict | None = None):
        """`options`: the variant's Options, or a plain dict of overrides (validated here), or None (defaults)."""
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.seq_len = seq_len
        self.options = options if isinstance(options, VariantOptions) else self.Options.model_validate(options or {})
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.path: Path = "efficient"
        # Set by forward in variants that add a training loss (lca's balance loss).
        self.aux_loss: torch.Tensor | None = None
        self.sample_in_eval = False

    @property
    def causal(self) -> bool:
        """False only for modules that may see the future (sca's seed form); the language model refuses them."""
        return True

    @property
    def noisy_routing(self) -> bool:
        """True where training routes tokens by sampling (lca's Gumbel noise). Evaluation routes without noise unless
        `sample_in_eval` is set (ByteLM.sampled_routing), which scores the model as it was trained."""
        return False

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    def mean_keys(self) -> float:
        """Mean number of keys whose scores a query's softmax needs by the definition, at seq_len: the query-key pairs
        any implementation computes (for clusters routed by content, balanced ones, the fewest), which the
        benchmark's limit counts. 0 for a variant without softmax pairs (la): its limit is the memory floor alone."""
        return 0.0

    @property
    def resolved_options(self) -> dict:
        """The options as this layer runs them: an option the variant resolves against T (a property of the option's
        name, such as ca's `block`) at its value here, the others as given."""
        return {name: getattr(self, name) if isinstance(getattr(type(self), name, None), property) else value
                for name, value in self.options.model_dump().items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        attend = self.reference if self.path == "reference" else self.efficient
        o = attend(q, k, v, x)  # (B, H, T, D)
        return self.proj(o.transpose(1, 2).reshape(B, T, C))

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def efficient(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1], for variants with schedules (lca's tau)."""

    def stats(self) -> dict[str, torch.Tensor]:
        """Diagnostics of the last forward pass worth logging (cluster sizes, ...), as 0-d tensors on the layer's
        device: the caller reads them when it logs, so a forward pass is not followed by a host sync per value."""
        return {}


def to_blocks(u: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, T, E) -> (B, H, C, b, E), zero-padded at the end to C = ceil(T / b) whole blocks."""
    B, H, T, E = u.shape
    pad = (-T) % block
    if pad:  # no copy where T is whole blocks already
        u = F.pad(u, (0, 0, 0, pad))
    return u.reshape(B, H, (T + pad) // block, block, E)


def from_blocks(u: torch.Tensor, T: int) -> torch.Tensor:
    """(B, H, C, b, E) -> (B, H, T, E), dropping the padding."""
    return u.flatten(2, 3)[:, :, :T]


def causal_mask(T: int, device: torch.device | None = None) -> torch.Tensor:
    """M[t, s] = True where s <= t; shape (T, T)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def masked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain softmax attention over the keys `allowed` marks; the reference paths build on it.

    q, k, v: (B, H, T, D); allowed: bool, broadcastable to (B, H, T, T), >= 1 key per row.
    Scores are taken in fp32 so a bf16 reference is as accurate as the fused kernels.
    """
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, T, T), the product itself in fp32
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v


# ---------------------------------------------------------------- registry

REGISTRY: dict[str, type[Attention]] = {}  # variant name -> class, filled by @register as variants/__init__.py imports them


def register(name: str):
    """Class decorator: file a variant's class under `name`, the key the params file's `variants` use."""

    def add(cls: type[Attention]) -> type[Attention]:
        if name in REGISTRY:
            raise ValueError(f"variant {name!r} is registered twice: {REGISTRY[name].__name__} and {cls.__name__}")
        if "compute_exponent" not in vars(cls):  # its own: a subclass of mha would otherwise take mha's 2 unasked
            raise TypeError(f"variant {name!r}: {cls.__name__} declares no compute_exponent (the spec's compute-vs-T "
                            "exponent, e.g. 1.5 for T^1.5)")
        REGISTRY[name] = cls
        return cls

    return add
