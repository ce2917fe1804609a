"""la: causal linear attention (Katharopoulos et al. 2020) with phi(u) = elu(u) + 1.

out_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps), S_t = sum_{s<=t} phi(k_s) v_s^T, z_t = sum_{s<=t} phi(k_s).
The efficient path is the chunked form: exact masked products inside each chunk
of c positions plus a running D x D state between chunks, O(T c D + T D^2).
On CUDA it can run on flash-linear-attention's chunked Triton kernels
(`pip install 'attnbench[gpu]'`; option `kernel`); both forms are tested equal.
`auto` takes fla in eager mode and the PyTorch form under torch.compile, the
faster of the two in each mode on the H100 (reports/benchmarks, fwd+bwd at
2K..32K): eager, fla is 1.3-1.5x the PyTorch form; compiled, the PyTorch form,
fused by the compiler, is 1.8x fla at 8K (the compiler cannot see into fla's
kernels, so fla's path also breaks the compiled graph).
The plain paths compute in fp32 because the running sums lose too much in bf16.
fla's kernels take bf16 inputs and keep their running state in fp32; its own
normaliser (a cumulative sum in the input dtype, eps 1e-10) is not used: the
denominator phi(q_t) . z_t + eps is summed here in fp32, with this variant's eps.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from pydantic import Field, field_validator

from .base import Attention, PositiveAutoInt, VariantOptions, causal_mask, from_blocks, register, to_blocks

FLA_INSTALLED = importlib.util.find_spec("fla") is not None  # flash-linear-attention, the optional extra attnbench[gpu]


class LinearAttentionOptions(VariantOptions):
    chunk: PositiveAutoInt = Field("auto", description="chunk length c of the efficient path; auto = 64")
    eps: float = Field(1e-6, gt=0, description="added to the normaliser")
    kernel: Literal["auto", "fla", "torch"] = Field(
        "auto", description="efficient path on CUDA: fla's Triton kernels (attnbench[gpu]), the plain-PyTorch chunked form, "
        "or auto = fla where installed outside torch.compile, else PyTorch (the faster of the two in each mode); "
        "CPU tensors always take the PyTorch form")

    @field_validator("kernel")
    @classmethod
    def _fla_installed(cls, kernel: str) -> str:
        if kernel == "fla" and not FLA_INSTALLED:
            raise ValueError("needs flash-linear-attention, absent here: pip install 'attnbench[gpu]', or use 'auto' or 'torch'")
        return kernel


class FeatureMap(torch.autograd.Function):
    """phi(u) = elu(u) + 1, as exp(u) for u <= 0 plus u above, in fp32 at least, returned in u's dtype.

    Evaluated as elu(u) + 1, phi rounds to exactly 0 where elu(u) is within the spacing of -1: below u = -7 in bf16
    (fla's inputs under autocast), below -17 in fp32. Its gradient, exp(u), does not: a query whose features all
    round to 0 has its normaliser fall to eps, and its gradient grows by 1/eps. phi'(u) = min(phi, 1), so the
    backward keeps phi alone, as elu kept its input.
    Computed in fp32 and rounded once to u's dtype; compiled, Inductor fuses the casts into one kernel. Computing in
    u's own dtype (autocast off inside) gives the same values bitwise (the clamps are exact, and one of the two terms
    is 0 or 1) and ran the eager layer 6% faster, but la as CUDA graphs 30% slower (H200, stops 42 and 44)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:
        x = u.to(torch.promote_types(u.dtype, torch.float32))
        phi = (torch.exp(x.clamp(max=0)) + x.clamp(min=0)).to(u.dtype)
        ctx.save_for_backward(phi)
        return phi

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (phi,) = ctx.saved_tensors
        return grad * phi.clamp(max=1)


def feature_map(u: torch.Tensor) -> torch.Tensor:
    return FeatureMap.apply(u)


def sum_of_chunks_before(per_chunk: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum over the chunk dim (2) of (B, H, n, ...): entry i sums the chunks j < i."""
    return torch.cat([torch.zeros_like(per_chunk[:, :, :1]), per_chunk.cumsum(dim=2)[:, :, :-1]], dim=2)


def chunked_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, chunk: int, eps: float) -> torch.Tensor:
    """Causal linear attention on feature-mapped fq, fk (B, H, T, D) and v (B, H, T, Dv), in chunks of `chunk`."""
    T = fq.shape[-2]
    # Zero features at the (future) end, padding the last chunk, contribute nothing to any sum.
    fq, fk, v = (to_blocks(t, chunk) for t in (fq, fk, v))  # (B, H, n, c, D)

    state = sum_of_chunks_before(fk.transpose(-2, -1) @ v)  # (B, H, n, D, Dv): the state before each chunk
    norm = sum_of_chunks_before(fk.sum(dim=-2))  # (B, H, n, D)

    intra = (fq @ fk.transpose(-2, -1)) * causal_mask(chunk, fq.device)  # (B, H, n, c, c)
    numerator = intra @ v + fq @ state  # (B, H, n, c, Dv)
    denominator = intra.sum(dim=-1) + (fq * norm.unsqueeze(-2)).sum(dim=-1)  # (B, H, n, c)
    out = numerator / (denominator + eps).unsqueeze(-1)
    return from_blocks(out, T)


def prefix_sum(u: torch.Tensor, chunk: int) -> torch.Tensor:
    """Inclusive cumulative sum of u (B, H, T, D) along T, in fp32: a triangular matmul inside each chunk plus
    the sum of the chunks before (a cumsum over T / chunk). One cumsum along all of T runs slowly on the GPU
    outside torch.compile (measured: it cost fla's path 2/3 of its time at 32K)."""
    T = u.shape[-2]
    u = to_blocks(u.float(), chunk)  # (B, H, n, c, D)
    within = causal_mask(chunk, u.device).float() @ u
    return from_blocks(within + sum_of_chunks_before(u.sum(dim=-2)).unsqueeze(-2), T)


def fla_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, chunk: int, eps: float) -> torch.Tensor:
    """The same function as chunked_linear_attention on CUDA tensors, the numerator from fla's chunked kernels."""
    from fla.ops.linear_attn import chunk_linear_attn

    numerator, _ = chunk_linear_attn(fq.transpose(1, 2), fk.transpose(1, 2), v.transpose(1, 2), scale=1.0, normalize=False)
    denominator = (fq.float() * prefix_sum(fk, chunk)).sum(dim=-1, keepdim=True) + eps  # (B, H, T, 1)
    return numerator.transpose(1, 2).float() / denominator


@register("la")
class LinearAttention(Attention):
    Options = LinearAttentionOptions
    compute_exponent = 1.0

    @property
    def chunk(self) -> int:
        return 64 if self.options.chunk == "auto" else self.options.chunk

    def reference(self, q, k, v, x):
        fq, fk = feature_map(q.float()), feature_map(k.float())
        A = (fq @ fk.transpose(-2, -1)) * causal_mask(q.shape[-2], q.device)  # (B, H, T, T)
        out = (A @ v.float()) / (A.sum(dim=-1, keepdim=True) + self.options.eps)
        return out.to(v.dtype)

    def uses_fla(self, device: torch.device) -> bool:
        kernel = self.options.kernel
        if kernel == "auto":
            kernel = "torch" if torch.compiler.is_compiling() or not FLA_INSTALLED else "fla"
        return device.type == "cuda" and kernel == "fla"

    def efficient(self, q, k, v, x):
        if self.uses_fla(q.device):
            out = fla_linear_attention(feature_map(q), feature_map(k), v, self.chunk, self.options.eps)
        else:
            out = chunked_linear_attention(feature_map(q.float()), feature_map(k.float()), v.float(), self.chunk, self.options.eps)
        return out.to(v.dtype)

    def step(
        self, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One generation step on q_t, k_t, v_t (B, H, D): O(D^2) state (S, z), independent of T."""
        fq, fk = feature_map(q_t.float()), feature_map(k_t.float())
        if state is None:
            state = (fq.new_zeros(*fk.shape, v_t.shape[-1]), fq.new_zeros(fk.shape))
        S, z = state
        S = S + fk.unsqueeze(-1) * v_t.float().unsqueeze(-2)  # (B, H, D, Dv)
        z = z + fk  # (B, H, D)
        out = (fq.unsqueeze(-2) @ S).squeeze(-2) / ((fq * z).sum(dim=-1, keepdim=True) + self.options.eps)
        return out.to(v_t.dtype), (S, z)
