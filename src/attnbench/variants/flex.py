"""FlexAttention over a band of keys: query i sees keys lo[i] <= j <= i.

ca (lo[i] = start of the block `lookback` blocks before i's) and lca/sca in
(cluster, position) sorted order (lo[i] = start of i's cluster segment) are
both of this form. lo is non-decreasing along the sequence, so the key tiles a
128-row query tile needs run from the tile holding lo of its first row up to
the diagonal tile: the block mask is built from those tile lists in O(T / 128)
per row (gpu-notes.md), never by evaluating the mask over T x T pairs.

On CUDA the kernel is flex_attention under torch.compile; elsewhere the eager
flex_attention, which materialises the scores and has no backward on CPU: it
is there so tests can check the mask and tile lists against the references.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

TILE = 128  # FlexAttention's default sparse block size, for queries and keys


@functools.cache
def compiled_flex_attention():
    # Compiled once per process; dynamic=False since training keeps T fixed.
    return torch.compile(flex_attention, dynamic=False)


def band_block_mask(lo: torch.Tensor) -> BlockMask:
    """Block mask for `lo[b, h, i] <= j <= i`; lo: (B, H, T) int, non-decreasing along T."""
    B, H, T = lo.shape
    n = -(-T // TILE)
    # Pad lo to whole tiles so the mask function never indexes past its end.
    lo = torch.cat([lo, lo[..., -1:].expand(B, H, n * TILE - T)], dim=-1)  # (B, H, n * TILE)
    first = lo[..., ::TILE] // TILE  # (B, H, n): first key tile of each query tile
    tiles = torch.arange(n, device=lo.device)
    kv_num_blocks = tiles - first + 1  # first .. diagonal tile
    kv_indices = (first.unsqueeze(-1) + tiles).clamp_max(n - 1)  # (B, H, n, n); entries past kv_num_blocks are ignored

    def mask_mod(b, h, q_idx, kv_idx):
        return (lo[b, h, q_idx] <= kv_idx) & (kv_idx <= q_idx)

    return BlockMask.from_kv_blocks(
        kv_num_blocks.int(), kv_indices.int(), BLOCK_SIZE=TILE, mask_mod=mask_mod, seq_lengths=(T, T)
    )


def flex_band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of query i over keys lo[i] <= j <= i; q, k, v (B, H, T, D), lo broadcastable to (B, H, T)."""
    B, H, T, _ = q.shape
    block_mask = band_block_mask(lo.expand(B, H, T))
    attend = compiled_flex_attention() if q.is_cuda else flex_attention
    return attend(q, k, v, block_mask=block_mask, scale=scale)
