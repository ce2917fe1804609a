"""FlexAttention over a band of keys: query i sees keys lo[i] <= j <= i.

ca (lo[i] = start of the block `lookback` blocks before i's) and lca/sca in
(cluster, position) sorted order (lo[i] = start of i's cluster segment) are
both of this form (on CUDA ca, lca and sca attend by fused_band's kernels,
which skip more of their short bands' tiles; this is their path where Triton
is absent; fastcka's own-block band stays here). lo is non-decreasing along
the sequence, so the key tiles a 128-row query tile needs run from the tile
holding lo of its first row up to the diagonal tile: the block mask is built
from those tile lists in O(T / 128) per row (gpu-notes.md), never by
evaluating the mask over T x T pairs.

Tiles that lie wholly inside the band are listed as full, so the kernel skips
the mask there: only the tiles a band edge cuts (the diagonal and the tiles
holding some row's lo) pay for it. The backward's lists per key tile (which
query tiles need it) are contiguous ranges too, built the same way, where
BlockMask.from_kv_blocks would transpose a dense (n, n) tile mask and argsort
it: at T = 32K that sort took 0.14 ms of each sca step on the H200. A mask
shared by all rows and heads (ca's) is built once at batch and head size 1,
which FlexAttention broadcasts.

On CUDA the kernel is flex_attention under torch.compile; elsewhere the eager
flex_attention, which materialises the scores and has no backward on CPU: it
is there so tests can check the mask and tile lists against the references.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

# torch's FlexAttention module is imported in the functions that call it, not here: the import takes ~1 s (on a 2-core
# CPU machine), which every stage process paid while only the CUDA paths call it.
if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

TILE = 128  # FlexAttention's default sparse block size, for queries and keys
# The kernels' own tiles for 16-bit inputs of head size <= 64, instead of Inductor's sm90 defaults (forward
# 128 x 128; backward 64 x 128 x 128 x 64, 8 warps): these masks leave ~2-4 key tiles per query tile, and smaller
# tiles skip more of what the mask removes. The Flex call alone on the H200 (do_bench, one call; forward and
# backward times of seven configurations, reports/benchmarks/NVIDIA-H200-flex-configs-probe.csv): the fastest
# forward and the fastest backward, added, against the defaults: lca's segments 0.84 -> 0.71 ms at 8K, 0.91 -> 0.77
# at 32K, 0.82 -> 0.78 at 2K; ca's band at 2K 0.91 -> 0.69. fastcka's own-block band: its whole layer 3.9-10.8% faster
# at 2K-32K on the H100 (reports/benchmarks/NVIDIA-H100-80GB-HBM3-stop51-tile-probe.csv).
SMALL_TILES = {
    "fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
    "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64, "bwd_num_stages": 3, "bwd_num_warps": 4,
}


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled once per process; dynamic=False since training keeps T fixed.
    return torch.compile(flex_attention, dynamic=False)


def flex_kernel(device: torch.device):
    """The FlexAttention to call: the plain op inside a compiled region (the caller's compile fuses it; a
    nested compiled function would break the caller's graph), compiled on its own on CUDA, eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention
    return compiled_flex_attention() if device.type == "cuda" else flex_attention


def kernel_options(q: torch.Tensor) -> dict | None:
    """SMALL_TILES where they were measured (CUDA, 16-bit, head size <= 64); Inductor's defaults elsewhere (its fp32
    backward tiles are 16 wide, sized for shared memory; these were not tried in fp32)."""
    return SMALL_TILES if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 64 else None


def band_block_mask(lo: torch.Tensor) -> BlockMask:
    """Block mask for `lo[b, h, i] <= j <= i`; lo: (B|1, H|1, T) int, non-decreasing along T.

    Per query tile q (rows r0 .. r1), with lo non-decreasing: the key tiles from lo[r0] // TILE up
    to q are needed; those from ceil(lo[r1] / TILE) to q - 1 hold only allowed pairs (full); the
    rest, first .. that start - 1 and the diagonal tile q, are partial and keep the mask.
    """
    from torch.nn.attention.flex_attention import BlockMask

    Bl, Hl, T = lo.shape
    n = -(-T // TILE)
    # Pad lo to whole tiles so the mask function never indexes past its end.
    lo = torch.cat([lo, lo[..., -1:].expand(Bl, Hl, n * TILE - T)], dim=-1)  # (Bl, Hl, n * TILE)
    tiles = torch.arange(n, device=lo.device)
    first = lo[..., ::TILE] // TILE  # (Bl, Hl, n): first key tile of each query tile
    full_start = torch.minimum(-(-lo[..., TILE - 1 :: TILE] // TILE), tiles)  # (Bl, Hl, n): first full tile
    full_count = tiles - full_start
    full_indices = (full_start.unsqueeze(-1) + tiles).clamp_max(n - 1)  # entries past the count are ignored
    partial_count = full_start - first + 1
    # Partial tiles: first .. full_start - 1, then the diagonal.
    column = tiles.expand(Bl, Hl, n, n)
    partial_indices = torch.where(column < (partial_count - 1).unsqueeze(-1), first.unsqueeze(-1) + column, tiles.unsqueeze(-1))
    # Per key tile j, the query tiles that list it: the diagonal j, partial for q in [after_full, partial_end)
    # (first[q] <= j < full_start[q]), full for q in [j + 1, after_full) (full_start[q] <= j < q). Both bounds
    # are counts over q, as first and full_start are non-decreasing.
    partial_end = (first.unsqueeze(-2) <= tiles.unsqueeze(-1)).sum(dim=-1)  # (Bl, Hl, n): min q with first[q] > j
    after_full = (full_start.unsqueeze(-2) <= tiles.unsqueeze(-1)).sum(dim=-1)  # (Bl, Hl, n): min q with full_start[q] > j
    q_partial_count = 1 + (partial_end - after_full).clamp_min(0)
    q_partial_indices = torch.where(column == 0, tiles.unsqueeze(-1), after_full.unsqueeze(-1) + column - 1).clamp_max(n - 1)
    q_full_count = after_full - 1 - tiles
    q_full_indices = (tiles.unsqueeze(-1) + 1 + column).clamp_max(n - 1)

    b_of = (lambda b: b) if Bl > 1 else (lambda b: 0)  # a shared mask reads row 0 for every batch row and head
    h_of = (lambda h: h) if Hl > 1 else (lambda h: 0)

    def mask_mod(b, h, q_idx, kv_idx):
        return (lo[b_of(b), h_of(h), q_idx] <= kv_idx) & (kv_idx <= q_idx)

    return BlockMask(
        seq_lengths=(T, T), kv_num_blocks=partial_count.int(), kv_indices=partial_indices.int(),
        full_kv_num_blocks=full_count.int(), full_kv_indices=full_indices.int(),
        q_num_blocks=q_partial_count.int(), q_indices=q_partial_indices.int(),
        full_q_num_blocks=q_full_count.int(), full_q_indices=q_full_indices.int(), BLOCK_SIZE=(TILE, TILE), mask_mod=mask_mod,
    )


def flex_band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of query i over keys lo[i] <= j <= i; q, k, v (B, H, T, D), lo (B|1, H|1, T)."""
    return flex_kernel(q.device)(q, k, v, block_mask=band_block_mask(lo), scale=scale, kernel_options=kernel_options(q))
