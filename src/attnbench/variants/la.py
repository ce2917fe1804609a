"""la: causal linear attention (Katharopoulos et al. 2020) with phi(u) = elu(u) + 1.

out_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps), S_t = sum_{s<=t} phi(k_s) v_s^T, z_t = sum_{s<=t} phi(k_s).
The efficient path is the chunked form: exact masked products inside each chunk
of c positions plus a running D x D state between chunks, O(T c D + T D^2).
Both paths compute in fp32 because the running sums lose too much in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import Attention, AutoInt, VariantOptions, causal_mask


class LinearAttentionOptions(VariantOptions):
    chunk: AutoInt = Field("auto", description="chunk length c of the efficient path; auto = 64")
    eps: float = Field(1e-6, gt=0, description="added to the normaliser")

    def check(self, seq_len: int) -> None:
        if self.chunk != "auto" and self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")


def feature_map(u: torch.Tensor) -> torch.Tensor:
    return F.elu(u) + 1


def chunked_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, chunk: int, eps: float) -> torch.Tensor:
    """Causal linear attention on feature-mapped fq, fk (B, H, T, D) and v (B, H, T, Dv), in chunks of `chunk`."""
    B, H, T, D = fq.shape
    pad = (-T) % chunk
    if pad:  # zero features at the (future) end contribute nothing to any sum
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    n = (T + pad) // chunk
    fq, fk, v = (t.reshape(B, H, n, chunk, t.shape[-1]) for t in (fq, fk, v))  # (B, H, n, c, D)

    kv = fk.transpose(-2, -1) @ v  # (B, H, n, D, Dv): each chunk's contribution to the state
    ksum = fk.sum(dim=-2)  # (B, H, n, D)
    # State before each chunk: exclusive prefix sums over chunks.
    state = torch.cat([torch.zeros_like(kv[:, :, :1]), kv.cumsum(dim=2)[:, :, :-1]], dim=2)
    norm = torch.cat([torch.zeros_like(ksum[:, :, :1]), ksum.cumsum(dim=2)[:, :, :-1]], dim=2)

    intra = (fq @ fk.transpose(-2, -1)) * causal_mask(chunk, fq.device)  # (B, H, n, c, c)
    numerator = intra @ v + fq @ state  # (B, H, n, c, Dv)
    denominator = intra.sum(dim=-1) + (fq * norm.unsqueeze(-2)).sum(dim=-1)  # (B, H, n, c)
    out = numerator / (denominator + eps).unsqueeze(-1)
    return out.reshape(B, H, n * chunk, -1)[:, :, :T]


class LinearAttention(Attention):
    Options = LinearAttentionOptions

    @property
    def chunk(self) -> int:
        return 64 if self.options.chunk == "auto" else self.options.chunk

    def reference(self, q, k, v, x):
        fq, fk = feature_map(q.float()), feature_map(k.float())
        A = (fq @ fk.transpose(-2, -1)) * causal_mask(q.shape[-2], q.device)  # (B, H, T, T)
        out = (A @ v.float()) / (A.sum(dim=-1, keepdim=True) + self.options.eps)
        return out.to(v.dtype)

    def efficient(self, q, k, v, x):
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
