"""cka: cluster kernel attention: exact softmax inside a block, rank-k kernel mixing across earlier blocks.

For query t in block i (blocks of b positions, C = ceil(T / b) of them):
    intra  e_ts = exp(q_t k_s * scale) for s in block i, s <= t;
    inter  w_tj = psi(q_t) . psi(kbar_j) for j < i, psi(u) = elu(P u) + 1, kbar_j, vbar_j: means of k, v over block j;
    out_t = (sum_s e_ts v_s + sum_{j<i} b w_tj vbar_j) / (sum_s e_ts + sum_{j<i} b w_tj).
The inter sums come from prefix sums over blocks, O(C k D). The efficient path keeps the
per-block b x b scores (memory T * b); fastcka computes the same function without them.

Choices where the spec is open:
- P (D -> k) is one per layer, shared by the heads: the heads already differ through their own q, k,
  and a per-head P would multiply its parameters by H for no change in cost or form.
- Only complete blocks are summarised: a partial block can only be the last, and only later blocks read a summary.
- Max subtraction: m_t = max(max_s q_t k_s * scale, log Z_t), Z_t = sum_{j<i} b w_tj, and both terms are
  scaled by exp(-m_t): nothing overflows, the denominator is >= 1 and, unlike exp(-max score) alone,
  very negative scores cannot blow up the inter term. The inter term enters as exp(log Z_t - m_t) times
  its weighted mean, which stays finite where Z_t = 0 (block 0, rank 0).
- rank 0: no P; every w is an empty sum, so cka is block-diagonal causal softmax (ca with lookback 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import (Attention, NonNegativeAutoInt, PositiveAutoInt, VariantOptions, band_keys, causal_mask, from_blocks, pow2_block, register,
                   to_blocks)


class ClusterKernelOptions(VariantOptions):
    block: PositiveAutoInt = Field("auto", description="block size b; auto = smallest power of two >= sqrt(T), at least 16")
    rank: NonNegativeAutoInt = Field("auto", description="rank k of the inter-block features; auto = 16; 0: no inter term")


def block_scores(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """Scores of each query against the keys s <= t of its own block: (B, H, C, b, b), -inf elsewhere.

    The zero padding of a partial last block comes after every real query there, so the causal mask hides it.
    """
    scores = (to_blocks(q, block) @ to_blocks(k, block).transpose(-2, -1)) * scale  # (B, H, C, b, b)
    return scores.masked_fill(~causal_mask(block, q.device), float("-inf"))


def safe_log(z: torch.Tensor) -> torch.Tensor:
    """log z for z >= 0: -inf where z = 0, with a finite (zero) gradient there."""
    positive = z > 0
    return torch.where(positive, torch.where(positive, z, 1.0).log(), float("-inf"))


@register("cka")
class ClusterKernelAttention(Attention):
    Options = ClusterKernelOptions
    compute_exponent = 1.5  # exact blocks of b ~ sqrt(T); the rank-k mixing is linear in T

    def __init__(self, d_model, n_heads, seq_len, options=None):
        super().__init__(d_model, n_heads, seq_len, options)
        self.P = nn.Linear(self.head_dim, self.rank, bias=False) if self.rank else None

    @property
    def block(self) -> int:
        return pow2_block(self.seq_len) if self.options.block == "auto" else self.options.block

    @property
    def rank(self) -> int:
        return 16 if self.options.rank == "auto" else self.options.rank

    def mean_keys(self) -> float:
        """The intra term's pairs (own block, s <= t); the inter term's rank-k mixing is not softmax pairs."""
        return band_keys(torch.arange(self.seq_len) // self.block * self.block)

    def features(self, u: torch.Tensor) -> torch.Tensor:
        """psi(u) = elu(P u) + 1 from fp32 operands (bf16 under autocast): (..., D) -> (..., k); no features, (..., 0), at rank 0."""
        if self.P is None:
            return u.new_zeros(*u.shape[:-1], 0)
        return F.elu(F.linear(u.float(), self.P.weight.float())) + 1

    def inter(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inter-block term of every query from fp32 q, k, v (B, H, T, D), by prefix sums over blocks.

        Returns its weighted mean o_t = sum_{j<i} w_tj vbar_j / sum_{j<i} w_tj (B, H, T, D) and
        log Z_t (B, H, T) with Z_t = sum_{j<i} b w_tj; o_t = 0 and log Z_t = -inf where no block precedes.
        """
        B, H, T, D = q.shape
        b = self.block
        n = (T - 1) // b  # blocks some later block reads: all but the last, all complete
        kbar = k[:, :, : n * b].reshape(B, H, n, b, D).mean(dim=-2)  # (B, H, n, D)
        vbar = v[:, :, : n * b].reshape(B, H, n, b, D).mean(dim=-2)  # (B, H, n, D)
        # One projection for q and the summaries, and Z as one more column of N's product: at 8K fastcka's
        # step is bound by the host's kernel launches on the H100, and each fused matmul is one launch less.
        fq, fk = self.features(torch.cat([q, kbar], dim=2)).split([T, n], dim=2)  # (B, H, T, k), (B, H, n, k)
        fk = b * fk  # a summary weighs like the b tokens it stands for
        S = torch.cat([fk.unsqueeze(-1) * vbar.unsqueeze(-2), fk.unsqueeze(-1)], dim=-1)  # (B, H, n, k, D + 1): [f vbar | f]
        # Exclusive prefix sums: entry i sums blocks j < i, for the n + 1 = C blocks; the last dim padded to a
        # multiple of 8 for aligned bf16 rows under autocast.
        S = F.pad(S.cumsum(dim=2), (0, -(D + 1) % 8, 0, 0, 1, 0))  # (B, H, C, k, D + 1 + pad)
        NZ = from_blocks(to_blocks(fq, b) @ S, T)  # (B, H, T, D + 1 + pad)
        N, Z = NZ[..., :D], NZ[..., D]  # sum_{j<i} b w_tj vbar_j (B, H, T, D), Z_t (B, H, T)
        return N / torch.where(Z > 0, Z, 1.0).unsqueeze(-1), safe_log(Z)

    def reference(self, q, k, v, x):
        T, dtype = q.shape[-2], v.dtype
        q, k, v = q.float(), k.float(), v.float()
        block_of = torch.arange(T, device=q.device) // self.block
        same = block_of[:, None] == block_of[None, :]  # (T, T)
        intra = same & causal_mask(T, q.device)  # s in t's block, s <= t
        earlier = block_of[None, :] < block_of[:, None]  # s in a block before t's (complete, since t's follows)
        scores = ((q @ k.transpose(-2, -1)) * self.scale).masked_fill(~intra, float("-inf"))  # (B, H, T, T)
        # W[t, s] = w_{t, block(s)} on earlier blocks, so W v = sum_{j<i} b w_tj vbar_j and W 1 = Z.
        kbar = (same / same.sum(dim=-1, keepdim=True)) @ k  # (B, H, T, D): mean of k over s's block
        W = (self.features(q) @ self.features(kbar).transpose(-2, -1)).masked_fill(~earlier, 0.0)  # (B, H, T, T)
        Z = W.sum(dim=-1)  # (B, H, T)
        log_Z = safe_log(Z)
        m = torch.maximum(scores.amax(dim=-1), log_Z).detach()  # (B, H, T): the shared max
        e = (scores - m.unsqueeze(-1)).exp()  # (B, H, T, T)
        inter = (log_Z - m).exp().unsqueeze(-1)  # (B, H, T, 1): Z exp(-m)
        o_inter = (W @ v) / torch.where(Z > 0, Z, 1.0).unsqueeze(-1)  # (B, H, T, D)
        out = (e @ v + inter * o_inter) / (e.sum(dim=-1, keepdim=True) + inter)
        return out.to(dtype)

    def efficient(self, q, k, v, x):
        T, dtype, b = q.shape[-2], v.dtype, self.block
        q, k, v = q.float(), k.float(), v.float()
        o_inter, log_Z = self.inter(q, k, v)  # (B, H, T, D), (B, H, T)
        scores = block_scores(q, k, b, self.scale)  # (B, H, C, b, b)
        log_Z = to_blocks(log_Z.unsqueeze(-1), b)  # (B, H, C, b, 1)
        m = torch.maximum(scores.amax(dim=-1, keepdim=True), log_Z).detach()  # the shared max
        e = (scores - m).exp()
        inter = (log_Z - m).exp()  # Z exp(-m)
        out = (e @ to_blocks(v, b) + inter * to_blocks(o_inter, b)) / (e.sum(dim=-1, keepdim=True) + inter)
        return from_blocks(out, T).to(dtype)
