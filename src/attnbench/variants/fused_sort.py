"""lca's counting sort by cluster as Triton kernels (CUDA): `lca.counting_sort` in two passes over the ids.

A token's sorted index is its cluster's start + the tokens of its cluster in earlier blocks + those before it in its
own block. The plain form (lca.py) builds the block counts by a scatter-add and the within-block ranks by comparing
each token with every token of its block, reloaded per token, and scatters the order in one more pass: in sca's step
at T = 8K on the H200 those took about 0.08 ms in nine kernels (stop 37). Here one program owns one block of one
(batch row, router) and holds its ids in registers:

- `block_counts_kernel`: the block's tokens per cluster;
- between them, in PyTorch: each cluster's start and its tokens in the blocks before, (..., n, C) sums;
- `ranks_kernel`: within-block ranks by comparing the block's ids pairwise, the sorted index (`inverse`), and the
  order scattered from it.

Arrays: cluster ids (B, R, T) int64 of any strides (the routing gives a transposed view), in [0, C). Outputs as
`lca.counting_sort`'s, contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per program: the pairwise ranks compare BLOCK ids per token, in registers; the counts are (T / BLOCK) x C.
BLOCK = 128
NUM_WARPS = 4


@triton.jit
def block_ids(CLUSTER, row, j, T, R, stride_b, stride_r, stride_t, BLOCK: tl.constexpr):
    """Block j of row (b R + r): its positions, their mask and their cluster ids (-1 past T, which matches none)."""
    t = j * BLOCK + tl.arange(0, BLOCK)
    ok = t < T
    ids = tl.load(CLUSTER + (row // R) * stride_b + (row % R) * stride_r + t * stride_t, mask=ok, other=-1)
    return t, ok, ids


@triton.jit
def block_counts_kernel(CLUSTER, COUNTS, T, R, C, n_blocks, stride_b, stride_r, stride_t,
                        BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    row, j = tl.program_id(0) // n_blocks, tl.program_id(0) % n_blocks
    _, _, ids = block_ids(CLUSTER, row, j, T, R, stride_b, stride_r, stride_t, BLOCK)
    clusters = tl.arange(0, BLOCK_C)
    counts = tl.sum((ids[:, None] == clusters[None, :]).to(tl.int32), axis=0)
    tl.store(COUNTS + (row.to(tl.int64) * n_blocks + j) * C + clusters, counts, mask=clusters < C)


@triton.jit
def ranks_kernel(CLUSTER, BASE, INVERSE, ORDER, T, R, C, n_blocks, stride_b, stride_r, stride_t,
                 BLOCK: tl.constexpr):
    """BASE (rows, n, C): per block and cluster, the sorted index of the block's first token of that cluster."""
    row, j = tl.program_id(0) // n_blocks, tl.program_id(0) % n_blocks
    t, ok, ids = block_ids(CLUSTER, row, j, T, R, stride_b, stride_r, stride_t, BLOCK)
    slot = tl.arange(0, BLOCK)
    earlier = (ids[:, None] == ids[None, :]) & (slot[None, :] < slot[:, None])
    within = tl.sum(earlier.to(tl.int32), axis=1)  # same id, earlier in the block
    row = row.to(tl.int64)
    inverse = tl.load(BASE + (row * n_blocks + j) * C + ids, mask=ok, other=0) + within
    tl.store(INVERSE + row * T + t, inverse, mask=ok)
    tl.store(ORDER + row * T + inverse, t.to(tl.int64), mask=ok)


def launch(cluster: torch.Tensor) -> tuple[tuple[int, ...], dict]:
    """The grid (a program per block of each row) and the shape arguments both kernels take."""
    B, R, T = cluster.shape
    n_blocks = triton.cdiv(T, BLOCK)
    sizes = dict(T=T, R=R, n_blocks=n_blocks, stride_b=cluster.stride(0), stride_r=cluster.stride(1), stride_t=cluster.stride(2))
    return (B * R * n_blocks,), sizes


@torch.library.custom_op("attnbench::cluster_block_counts", mutates_args=())
def block_counts(cluster: torch.Tensor, C: int) -> torch.Tensor:
    """Tokens per (block of BLOCK positions, cluster): (B, R, n, C) int64 for cluster ids (B, R, T)."""
    counts = block_counts_fake(cluster, C)
    grid, sizes = launch(cluster)
    block_counts_kernel[grid](cluster, counts, C=C, BLOCK=BLOCK, BLOCK_C=max(16, triton.next_power_of_2(C)), num_warps=NUM_WARPS, **sizes)
    return counts


@block_counts.register_fake
def block_counts_fake(cluster, C):
    B, R, T = cluster.shape
    return cluster.new_empty(B, R, triton.cdiv(T, BLOCK), C)


@torch.library.custom_op("attnbench::cluster_ranks", mutates_args=())
def ranks(cluster: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """order and inverse (B, R, T) int64 from the ids and each (block, cluster)'s first sorted index (B, R, n, C)."""
    order, inverse = ranks_fake(cluster, base)
    grid, sizes = launch(cluster)
    ranks_kernel[grid](cluster, base.contiguous(), inverse, order, C=base.shape[-1], BLOCK=BLOCK, num_warps=NUM_WARPS, **sizes)
    return order, inverse


@ranks.register_fake
def ranks_fake(cluster, base):
    return tuple(torch.empty(cluster.shape, dtype=torch.int64, device=cluster.device) for _ in range(2))


def sort_by_cluster(cluster: torch.Tensor, C: int):
    """`lca.counting_sort` by the kernels, for ids (B, R, T): order, inverse (B, R, T), counts and starts (B, R, C),
    all int64."""
    counts = block_counts(cluster, C)  # (B, R, n, C)
    totals = counts.sum(dim=-2)
    starts = totals.cumsum(dim=-1) - totals
    order, inverse = ranks(cluster, starts.unsqueeze(-2) + counts.cumsum(dim=-2) - counts)
    return order, inverse, totals, starts
