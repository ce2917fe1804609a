"""ca: block cluster attention.

Blocks of b contiguous positions; query t in block i = t // b attends with
softmax to keys s <= t in blocks i - lookback .. i. lookback = 0 is
block-diagonal attention; with b >= T it is mha.

Paths:
- reference: masked softmax over the dense T x T mask;
- efficient, CPU: `chunked_segment_attention` on blocks (pad T to a multiple
  of b; query block i against key blocks i - lookback .. i), memory
  T * (lookback + 1) * b, never T x T;
- efficient, CUDA: fused_band's Triton kernels over each query's band of keys (lca's kernels, in position order);
  where Triton is absent, FlexAttention with a band block mask (flex.py).

Choices where the spec is open: the CPU path takes the (b, (lookback + 1) b)
window as lookback + 1 tiles of (b, b) sharing one row max, so lca can reuse it
on windows whose length depends on the data and a query's result stays
bitwise independent of how many tiles its row has. On CUDA the band kernels
(lca's and sca's) are as fast as Flex or faster: a 64-row tile reads exactly
its rows' keys, where Flex's 128 x 128 tiles, for b < 128, also hold keys
outside the band (2 x 128 keys per query at 2K against 128). H100, stop 60
(reports/benchmarks/NVIDIA-H100-80GB-HBM3.md): in one process 72-83 against
69-73 M tokens/s at 2K-16K, 62 against 60 at 32K; the full run after gave
72.5, 71.7 and 60.4 at 2K, 8K and 32K, within the spread of Flex's earlier
runs; the d768 model's training step at T = 1024 (b = 32) 87.4 ms against
93.4 on Flex. At 2K-32K either runs near a quarter of the memory floor's speed
(the benchmark's limit, flat in T at these lengths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import (Attention, NonNegativeAutoInt, PositiveAutoInt, VariantOptions, band_keys, causal_mask, masked_softmax_attention, pow2_block,
                   register)
from .flex import flex_band_attention

fused_band = None  # the Triton kernels, for CUDA tensors only
if torch.cuda.is_available():  # as in lca.py: importing Triton costs every CPU stage process ~1.7 s
    try:
        from . import fused_band
    except ImportError:
        pass


class BlockClusterOptions(VariantOptions):
    block: PositiveAutoInt = Field("auto", description="block size b; auto = smallest power of two >= sqrt(T), at least 16")
    lookback: NonNegativeAutoInt = Field("auto", description="earlier blocks each query sees; auto = 1, 0 = block diagonal")


def chunked_segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor, chunk: int, n_offsets: int, scale: float
) -> torch.Tensor:
    """Causal softmax attention inside segments, in chunks: O(P * n_offsets * chunk) memory.

    q, k, v: (B, H, P, D) with P a multiple of `chunk`; segment: (B|1, H|1, P) int >= 0.
    Slot i attends to slots j <= i with segment[j] == segment[i] whose chunk is at
    most n_offsets - 1 chunks before i's. Every slot must see itself (it does).
    The tiles of one query chunk (one per offset) share a row max, and offsets
    where a row sees nothing add exact zeros, so a row's result does not depend on
    n_offsets beyond the offsets it uses. Computes in fp32, returns v's dtype.
    """
    B, H, P, D = q.shape
    n = P // chunk
    n_offsets = min(n_offsets, n)
    qc, kc, vc = (t.float().reshape(B, H, n, chunk, D) for t in (q, k, v))  # (B, H, n, c, D)
    seg = segment.reshape(*segment.shape[:2], n, chunk)  # (B|1, H|1, n, c)

    scores, values = [], []
    for d in range(n_offsets):  # key chunk j - d beside query chunk j; -1 marks chunks before the start
        k_d, v_d = (F.pad(t, (0, 0, 0, 0, d, 0))[:, :, :n] for t in (kc, vc))
        seg_d = F.pad(seg, (0, 0, d, 0), value=-1)[:, :, :n]
        allowed = seg.unsqueeze(-1) == seg_d.unsqueeze(-2)  # (B|1, H|1, n, c, c)
        if d == 0:
            allowed = allowed & causal_mask(chunk, q.device)
        scores.append((qc @ k_d.transpose(-2, -1) * scale).masked_fill(~allowed, float("-inf")))  # (B, H, n, c, c)
        values.append(v_d)
    # One max per row over all its tiles; constant for the gradient (softmax is shift-invariant).
    row_max = torch.stack([s.amax(dim=-1) for s in scores]).amax(dim=0).detach().unsqueeze(-1)  # (B, H, n, c, 1)
    numerator, denominator = 0, 0
    for s, v_d in zip(scores, values):
        p = torch.exp(s - row_max)
        numerator = numerator + p @ v_d  # (B, H, n, c, D)
        denominator = denominator + p.sum(dim=-1, keepdim=True)
    return (numerator / denominator).reshape(B, H, P, D).to(v.dtype)


@register("ca")
class BlockClusterAttention(Attention):
    Options = BlockClusterOptions
    compute_exponent = 1.5  # T * b with b ~ sqrt(T)

    @property
    def block(self) -> int:
        return pow2_block(self.seq_len) if self.options.block == "auto" else self.options.block

    @property
    def lookback(self) -> int:
        return 1 if self.options.lookback == "auto" else self.options.lookback

    def band_start(self, T: int, device: torch.device) -> torch.Tensor:
        """(T,): first key position query t may see, the start of block t // b - lookback."""
        block_index = torch.arange(T, device=device) // self.block
        return (block_index - self.lookback).clamp_min(0) * self.block

    def mean_keys(self) -> float:
        return band_keys(self.band_start(self.seq_len, torch.device("cpu")))

    def reference(self, q, k, v, x):
        T = q.shape[-2]
        allowed = self.band_start(T, q.device).unsqueeze(-1) <= torch.arange(T, device=q.device)  # (T, T)
        return masked_softmax_attention(q, k, v, allowed & causal_mask(T, q.device), self.scale)

    def efficient(self, q, k, v, x):
        if not q.is_cuda:
            return self.chunked(q, k, v, x)
        return self.band(q, k, v, x) if fused_band is not None else self.flex(q, k, v, x)

    def chunked(self, q, k, v, x):
        """The CPU path: query block i against key blocks i - lookback .. i."""
        T, b = q.shape[-2], self.block
        pad = (-T) % b
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, H, P, D); padded keys lie in the future
        segment = torch.zeros(1, 1, T + pad, dtype=torch.long, device=q.device)
        return chunked_segment_attention(q, k, v, segment, b, self.lookback + 1, self.scale)[:, :, :T]

    def band(self, q, k, v, x):
        """The CUDA path (the CPU under Triton's interpreter, for tests): fused_band's kernels, query t over keys
        band_start(t) .. t, every array in position order (the sort's rows are the identity)."""
        T, b = q.shape[-2], self.block
        positions = torch.arange(T, device=q.device)
        ends = ((positions // b + self.lookback + 1) * b).clamp_max(T)  # 1 + the last query whose band holds key t
        lo, hi, rows = (t.int().view(1, 1, T) for t in (self.band_start(T, q.device), ends, positions))
        return fused_band.band_attention(q, k, v, lo, hi, rows, self.scale)

    def flex(self, q, k, v, x):
        """The CUDA path where Triton is absent; runs eagerly on CPU too (forward only), for tests."""
        return flex_band_attention(q, k, v, self.band_start(q.shape[-2], q.device).view(1, 1, -1), self.scale)
