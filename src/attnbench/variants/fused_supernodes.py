"""sca's supernode states as Triton kernels (CUDA), in lca's (cluster, position) sorted order.

In sorted order the tokens of cluster c are one contiguous segment, in position order, so their blocks never
decrease. The prefix sums sca needs are then masked products per segment, one program per (batch row, head,
cluster), with no atomics and no (T, C) tensor:

- `prefix_means`: n^(j) = A^(j) / W^(j), A^(j) = sum w_s v_s and W^(j) = sum w_s over the segment's tokens in
  blocks <= j (the same for m with k), for every step j < S: one (steps x tokens) 0/1 matrix times the tokens'
  (w v, w k) per tile. In its backward a token in block i collects sum_{j >= i} dA^(j) and sum_{j >= i} dW^(j),
  dA = dn / W, dW = -(dn . n + dm . m) / W: suffix sums over the steps in one more kernel (`suffix_sums`, a
  program per (batch row, head, 8 clusters) walking the steps from the last), then a gather per token in position
  order in PyTorch, which Inductor fuses with the sum of k's and v's gradients from their other paths.
- `read_values`: the values the attention reads, w_t v'_t with v'_t = v_t + gate w_t z^(i - 1)[c_t] for token t in
  block i (sca's `read_supernodes` and `add_to_values`, then lca's gating), in sorted order, in one pass that never
  stores the read z as a (T, D) tensor. Its backward gives dv per token and dz^(j)[c], the sum of the read's
  gradients over the segment's tokens in block j + 1: the same masked product with the mask "block = j + 1".

The kernels walk the sorted order but read k, v and w where they are, in position order, at the sort's order (the
position of each sorted token), and write v's and w's gradients there: no (B, H, T, D) array is gathered into the
sorted order or out of it (sca's k and v are views of the model's projection, read by their strides).

The plain-PyTorch twin, in position order (scatter-add per (block, cluster), cumulative sum over blocks, gather),
is sca's `prefix_supernodes` / `read_supernodes`, which the CPU path runs and tests compare these kernels to.

Arrays: k, v (B, H, T, D) in position order with contiguous head dims (any batch, head and row strides); weights w
(B, R, T) fp32 in position order (the tokens' own gates, R = H or 1 routing rows); order (B, R, T) int32 (sorted
index -> position, from lca's sort), the block size b (a token's block is its position // b), starts and counts
(B, R, C) int32 (each cluster's segment), and for the prefix's backward alone clusters (B, R, T) int32 (each
position's cluster). Outputs (B, H, S, C8, D) in k's dtype, C8 = C padded to 8 (the padding clusters are empty),
and W (B, H, S, C8) fp32. The masks are exact in any dtype; w rides in the products' dtype, which is exact for the
straight-through gates, whose forward value is 1; fp32 inputs use IEEE products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_tiles import (dot, dot_options, dot_tile, row_strides, rows_contiguous, store_token_tile, strided_rows,
                          token_tile)

# Steps and tokens per tile, per kernel, 4 warps (H200, do_bench, each kernel alone at sca's 8K / 32K shapes):
# - prefix 32 x 32: 131 / 130 us in one pass over the tokens; the other settings of 32 to 128 steps, 16 to 64 tokens,
#   2 or 4 warps: 138-6216 / 144-4650 us (stop 28). The pass that re-read every token per tile of steps took 146 / 209.
# - read_values_backward 64 x 32: 107 / 105 us inside sca's step; the probe's timings of its settings were too noisy
#   to rank (stop 28). Logs: reports/benchmarks/NVIDIA-H200-stop26-supernodes-probe.log, -stop28-probes.log.
# - suffix_sums, 8 clusters per program, 3 stages: 85 / 110 us at 8K with bf16 / fp32 sums, 115 us at 32K (fp32);
#   4, 8 or 16 clusters, 2 to 4 stages, 2 or 4 warps: 81-136 / 108-129 us at 8K (stop 36, -stop36-probes.log).
TILES = {"prefix": dict(BLOCK_S=32, BLOCK_L=32), "suffix_sums": dict(BLOCK_C=8, STAGES=3), "read_values": dict(BLOCK_L=32), "read_values_backward": dict(BLOCK_S=64, BLOCK_L=32)}
NUM_WARPS = 4


@triton.jit
def segment_of_program(STARTS, COUNTS, H, R, C, C8):
    """This program's (batch row, head) index bh, its routing row, cluster c and segment start and length."""
    pid = tl.program_id(0)
    c = pid % C8
    bh = (pid // C8).to(tl.int64)
    routing_row = bh // H * R + bh % H % R  # R = H: the head's router; R = 1: the shared one
    real = c < C  # padding clusters have empty segments
    start = tl.load(STARTS + routing_row * C + c, mask=real, other=0)
    count = tl.load(COUNTS + routing_row * C + c, mask=real, other=0)
    return bh, routing_row, c, start, count


@triton.jit
def token_lanes(ORDER, routing_row, T, start, token0, count, BLOCK_L: tl.constexpr):
    """Sorted indices of the segment's tokens token0 .. token0 + BLOCK_L - 1, which of them are in the segment, and
    their positions (0 outside it)."""
    lanes = token0 + tl.arange(0, BLOCK_L)
    ok = lanes < count
    return start + lanes, ok, tl.load(ORDER + routing_row * T + start + lanes, mask=ok, other=0)


@triton.jit
def last_block_of(ORDER, routing_row, T, start, token0, count, block_size, BLOCK_L: tl.constexpr):
    """The block of the tile's last token in the segment (positions never decrease along it)."""
    return tl.load(ORDER + routing_row * T + start + tl.minimum(token0 + BLOCK_L, count) - 1) // block_size


@triton.jit
def store_steps(X, value, rows, steps, S, dims, D):
    """value (steps, D) into rows `rows` of X, the steps past S left out."""
    tl.store(X + rows[:, None] * D + dims[None, :], value.to(X.dtype.element_ty), mask=(steps < S)[:, None] & (dims < D)[None, :])


@triton.jit
def as_operand(mask, dtype: tl.constexpr):
    """A 0/1 mask as a product operand; by way of fp32, since Triton's interpreter casts bool to bf16 wrongly."""
    return tl.where(mask, 1.0, 0.0).to(dtype)


@triton.jit
def step_rows(bh, steps, S, C8, c):
    """Row of (bh, step, c) in the (B, H, S, C8) layout."""
    return (bh * S + steps) * C8 + c


@triton.jit
def add_to_prefix(acc_k, acc_v, acc_w, block, w, wk, wv, step0, BLOCK_S: tl.constexpr, IEEE: tl.constexpr):
    """Adds the tokens of blocks step0 <= block <= j to each step j of the tile of steps from step0."""
    steps = step0 + tl.arange(0, BLOCK_S)
    member = (block[None, :] <= steps[:, None]) & (block[None, :] >= step0)  # (steps, tokens)
    acc_w += tl.sum(tl.where(member, w[None, :], 0.0), 1)
    member = as_operand(member, wk.dtype)
    return acc_k + dot(member, wk, IEEE), acc_v + dot(member, wv, IEEE), acc_w


@triton.jit
def store_prefix(N, M, TOTAL, acc_k, acc_v, acc_w, bh, c, step0, S, C8, dims, D, BLOCK_S: tl.constexpr):
    """Stores the means of the tile of steps from step0 and returns the next tile's sums, all carried from its last step."""
    steps = step0 + tl.arange(0, BLOCK_S)
    inverse = 1.0 / tl.where(acc_w > 0, acc_w, 1.0)
    rows = step_rows(bh, steps, S, C8, c)
    store_steps(N, acc_v * inverse[:, None], rows, steps, S, dims, D)
    store_steps(M, acc_k * inverse[:, None], rows, steps, S, dims, D)
    tl.store(TOTAL + rows, acc_w, mask=steps < S)
    last = tl.arange(0, BLOCK_S) == BLOCK_S - 1
    return (tl.zeros_like(acc_k) + tl.sum(tl.where(last[:, None], acc_k, 0.0), 0)[None, :],
            tl.zeros_like(acc_v) + tl.sum(tl.where(last[:, None], acc_v, 0.0), 0)[None, :],
            tl.zeros_like(acc_w) + tl.sum(tl.where(last, acc_w, 0.0), 0))


@triton.jit
def prefix_kernel(K, V, W, ORDER, STARTS, COUNTS, N, M, TOTAL, T, H, R, C, C8, S, D, block_size, k_sb, k_sh, k_st,
                  v_sb, v_sh, v_st, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    bh, routing_row, c, start, count = segment_of_program(STARTS, COUNTS, H, R, C, C8)
    dims = tl.arange(0, BLOCK_D)
    # One pass over the tokens, whose blocks never decrease: a tile of steps is stored once the tokens have passed
    # it, and its last step's sums start the next tile's.
    step0 = tl.full([], 0, tl.int32)
    acc_k = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    acc_w = tl.zeros([BLOCK_S], tl.float32)
    for token0 in range(0, count, BLOCK_L):
        _, ok, at = token_lanes(ORDER, routing_row, T, start, token0, count, BLOCK_L)
        block = tl.where(ok, at // block_size, S)  # S: in no step's prefix
        w = tl.load(W + routing_row * T + at, mask=ok, other=0.0)
        k = strided_rows(K, bh, H, k_sb, k_sh, k_st, at, ok, dims, D)
        v = strided_rows(V, bh, H, v_sb, v_sh, v_st, at, ok, dims, D)
        wk, wv = (k * w[:, None]).to(k.dtype), (v * w[:, None]).to(v.dtype)
        last_block = last_block_of(ORDER, routing_row, T, start, token0, count, block_size, BLOCK_L)
        while last_block >= step0 + BLOCK_S:  # the tile reaches past this tile of steps: finish it
            acc_k, acc_v, acc_w = add_to_prefix(acc_k, acc_v, acc_w, block, w, wk, wv, step0, BLOCK_S, IEEE)
            acc_k, acc_v, acc_w = store_prefix(N, M, TOTAL, acc_k, acc_v, acc_w, bh, c, step0, S, C8, dims, D, BLOCK_S)
            step0 += BLOCK_S
        acc_k, acc_v, acc_w = add_to_prefix(acc_k, acc_v, acc_w, block, w, wk, wv, step0, BLOCK_S, IEEE)
    while step0 < S:  # the last tile of steps the tokens reached, then tiles of the carried sums alone
        acc_k, acc_v, acc_w = store_prefix(N, M, TOTAL, acc_k, acc_v, acc_w, bh, c, step0, S, C8, dims, D, BLOCK_S)
        step0 += BLOCK_S


@triton.jit
def read_tiles(V, Z, W, at, bh, routing_row, c, ok, dims, T, H, C8, S, D, block_size, v_sb, v_sh, v_st):
    """Block numbers, own gates w, v and the read z^(block - 1)[c] (zero in block 0), fp32, of the tokens at
    positions `at`."""
    block = tl.where(ok, at // block_size, 0)  # 0: reads nothing
    w = tl.load(W + routing_row * T + at, mask=ok, other=0.0)
    rows = step_rows(bh, block - 1, S, C8, c)
    z = tl.load(Z + rows[:, None] * D + dims[None, :], mask=(ok & (block > 0))[:, None] & (dims < D)[None, :], other=0.0)
    v = strided_rows(V, bh, H, v_sb, v_sh, v_st, at, ok, dims, D)
    return block, w, v.to(tl.float32), z.to(tl.float32)


@triton.jit
def values_read(v, z, w, gate, dtype: tl.constexpr):
    """v' = v + gate w z rounded to v's dtype `dtype`, then fp32: the forward's values, which the backward recomputes."""
    return (v + gate * (z * w[:, None])).to(dtype).to(tl.float32)


@triton.jit
def add_reads(acc, block, grad_read, step0, BLOCK_S: tl.constexpr, IEEE: tl.constexpr):
    """Adds each token's read gradient to step block - 1 of the tile of steps from step0."""
    steps = step0 + tl.arange(0, BLOCK_S)
    return acc + dot(as_operand(block[None, :] == steps[:, None] + 1, grad_read.dtype), grad_read, IEEE)


@triton.jit
def read_values_kernel(V, Z, W, GATE, ORDER, STARTS, COUNTS, OUT, T, H, R, C, C8, S, D, block_size, v_sb, v_sh, v_st,
                       BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, routing_row, c, start, count = segment_of_program(STARTS, COUNTS, H, R, C, C8)
    dims = tl.arange(0, BLOCK_D)
    gate = tl.load(GATE + bh % H)
    for token0 in range(0, count, BLOCK_L):
        index, ok, at = token_lanes(ORDER, routing_row, T, start, token0, count, BLOCK_L)
        _, w, v, z = read_tiles(V, Z, W, at, bh, routing_row, c, ok, dims, T, H, C8, S, D, block_size, v_sb, v_sh, v_st)
        store_token_tile(OUT, values_read(v, z, w, gate, V.dtype.element_ty) * w[:, None], bh, T, index, ok, dims, D)


@triton.jit
def read_values_backward_kernel(G, V, Z, W, GATE, ORDER, STARTS, COUNTS, DV, DZ, DOT_OWN, DOT_GATE, T, H, R, C, C8, S, D,
                                block_size, v_sb, v_sh, v_st, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
                                BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    bh, routing_row, c, start, count = segment_of_program(STARTS, COUNTS, H, R, C, C8)
    dims = tl.arange(0, BLOCK_D)
    gate = tl.load(GATE + bh % H)
    # One pass over the tokens. Per token: dv = dv' = g w (rounded as v'), and the two dot products the gates'
    # gradients are made of. Per step j: dz^(j)[c] sums the read's gradients gate w dv' of the tokens in block j + 1,
    # a contiguous run of the segment, so a tile of steps is stored once the tokens have passed it.
    step0 = tl.full([], 0, tl.int32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for token0 in range(0, count, BLOCK_L):
        index, ok, at = token_lanes(ORDER, routing_row, T, start, token0, count, BLOCK_L)
        block, w, v, z = read_tiles(V, Z, W, at, bh, routing_row, c, ok, dims, T, H, C8, S, D, block_size, v_sb, v_sh, v_st)
        g = token_tile(G, bh, T, index, ok, dims, D).to(tl.float32)
        values = values_read(v, z, w, gate, V.dtype.element_ty)
        grad_values = (g * w[:, None]).to(V.dtype.element_ty)
        store_token_tile(DV, grad_values, bh, T, at, ok, dims, D)  # in position order
        read_dot = tl.sum(grad_values.to(tl.float32) * z, 1)  # dv' . z
        tl.store(DOT_OWN + bh * T + at, tl.sum(g * values, 1) + gate * read_dot, mask=ok)
        tl.store(DOT_GATE + bh * T + at, w * read_dot, mask=ok)
        grad_read = (gate * w[:, None] * grad_values.to(tl.float32)).to(Z.dtype.element_ty)
        last_block = last_block_of(ORDER, routing_row, T, start, token0, count, block_size, BLOCK_L)
        while last_block - 1 >= step0 + BLOCK_S:  # the tile reaches past this tile of steps: finish it
            acc = add_reads(acc, block, grad_read, step0, BLOCK_S, IEEE)
            steps = step0 + tl.arange(0, BLOCK_S)
            store_steps(DZ, acc, step_rows(bh, steps, S, C8, c), steps, S, dims, D)
            step0 += BLOCK_S
            acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        acc = add_reads(acc, block, grad_read, step0, BLOCK_S, IEEE)
    while step0 < S:  # the last tile of steps the tokens reached, then zeros
        steps = step0 + tl.arange(0, BLOCK_S)
        store_steps(DZ, acc, step_rows(bh, steps, S, C8, c), steps, S, dims, D)
        step0 += BLOCK_S
        acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)


@triton.jit
def suffix_sums_kernel(DN, DM, N, M, TOTAL, SUMS_KV, SUMS_W, S, C8, D,
                       BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    """One (batch row, head) and BLOCK_C clusters: from the last step to the first, the sums over the steps j' >= j of
    dA = (dm, dn) / W and dW = -(dn . n + dm . m) / W, stored at step j; step S (the last block's tokens) stores 0."""
    bh = tl.program_id(1).to(tl.int64)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    dims = tl.arange(0, BLOCK_D)
    c_ok = c < C8
    ok = c_ok[:, None] & (dims < D)[None, :]
    acc_k = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    acc_w = tl.zeros([BLOCK_C], tl.float32)
    for i in tl.range(0, S + 1, num_stages=STAGES):  # the rows' loads do not depend on the sums: prefetched
        j = S - i
        rows = (bh * S + j) * C8 + c  # (B, H, S, C8) row of step j; step S has no row and adds 0
        row_ok = c_ok & (j < S)
        total = tl.load(TOTAL + rows, mask=row_ok, other=0.0)
        inverse = 1.0 / tl.where(total > 0, total, 1.0)
        tile = rows[:, None] * D + dims[None, :]
        tile_ok = ok & (j < S)
        dn = tl.load(DN + tile, mask=tile_ok, other=0.0).to(tl.float32) * inverse[:, None]
        dm = tl.load(DM + tile, mask=tile_ok, other=0.0).to(tl.float32) * inverse[:, None]
        n = tl.load(N + tile, mask=tile_ok, other=0.0).to(tl.float32)
        m = tl.load(M + tile, mask=tile_ok, other=0.0).to(tl.float32)
        acc_k += dm
        acc_v += dn
        acc_w -= tl.sum(dn * n + dm * m, 1)
        out = (bh * (S + 1) + j) * C8 + c  # (B, H, S + 1, C8)
        tl.store(SUMS_KV + out[:, None] * (2 * D) + dims[None, :], acc_k.to(SUMS_KV.dtype.element_ty), mask=ok)
        tl.store(SUMS_KV + out[:, None] * (2 * D) + D + dims[None, :], acc_v.to(SUMS_KV.dtype.element_ty), mask=ok)
        tl.store(SUMS_W + out, acc_w, mask=c_ok)


def launch_options(kernel: str, x: torch.Tensor, C8: int, B: int, H: int) -> tuple[tuple[int], dict]:
    """The grid, one program per (batch row, head, padded cluster), and the kernel's tiles."""
    assert x.numel() < 2**31, f"{x.numel()} elements: the supernode kernels index in int32 within a row"
    options = dict(TILES[kernel], num_warps=NUM_WARPS, **dot_options(x))
    if "BLOCK_S" not in options:  # only the kernels with products over step tiles take IEEE
        del options["IEEE"]
    return (B * H * C8,), options


# Opaque custom ops, as fused_mixing's (Inductor's code generation for user-defined Triton kernels failed there).
@torch.library.custom_op("attnbench::supernode_prefix_means", mutates_args=())
def prefix_means(k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, starts: torch.Tensor,
                 counts: torch.Tensor, clusters: torch.Tensor, block: int, steps: int,
                 padded_clusters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n, m (B, H, S, C8, D) and W (B, H, S, C8) fp32 for S = `steps`, C8 = `padded_clusters` (module docstring)."""
    n, m, total = prefix_means_fake(k, v, weights, order, starts, counts, clusters, block, steps, padded_clusters)
    k, v = rows_contiguous(k), rows_contiguous(v)
    B, H, T, D = k.shape
    if steps > 0:
        grid, options = launch_options("prefix", k, padded_clusters, B, H)
        prefix_kernel[grid](k, v, weights.contiguous(), order.contiguous(), starts.contiguous(), counts.contiguous(), n, m,
                            total, T, H, weights.shape[1], starts.shape[-1], padded_clusters, steps, D, block,
                            *row_strides(k), *row_strides(v), **options)
    return n, m, total


@prefix_means.register_fake
def prefix_means_fake(k, v, weights, order, starts, counts, clusters, block, steps, padded_clusters):
    B, H, T, D = k.shape
    n, m = (k.new_empty(B, H, steps, padded_clusters, D) for _ in range(2))
    return n, m, k.new_empty(B, H, steps, padded_clusters, dtype=torch.float32)


def per_routing_row(grad: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A gradient per head (B, H, T) as the weights' (B, R, T): a shared router (R = 1) gets the sum over the heads."""
    return grad if weights.shape[1] == grad.shape[1] else grad.sum(dim=1, keepdim=True)


def setup_prefix_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], inputs[6], *output)  # k, v, weights, clusters; n, m, total
    ctx.block = inputs[7]


@torch.library.custom_op("attnbench::supernode_suffix_sums", mutates_args=())
def suffix_sums(grad_n: torch.Tensor, grad_m: torch.Tensor, n: torch.Tensor, m: torch.Tensor,
                total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every step j <= S and cluster c, the sums over the steps j' >= j (none for j = S) of dA = (dm, dn) / W,
    (B, H, (S + 1) C8, 2 D), and of dW = -(dn . n + dm . m) / W, (B, H, (S + 1) C8) fp32: grad_n, grad_m, n, m
    (B, H, S, C8, D), W = total (B, H, S, C8). The sums accumulate in fp32; dA's are stored in the gradients' dtype:
    in bf16 they are rounded as finely as dn and dm themselves, and the gathers that read them move half the bytes
    (H200, sca's step at 8K: 2.42 ms against 2.50 with fp32 sums, stop 36)."""
    sums_kv, sums_w = suffix_sums_fake(grad_n, grad_m, n, m, total)
    B, H, S, C8, D = n.shape
    options = dict(TILES["suffix_sums"], BLOCK_D=dot_tile(D), num_warps=NUM_WARPS)
    grid = (triton.cdiv(C8, options["BLOCK_C"]), B * H)
    suffix_sums_kernel[grid](*(t.contiguous() for t in (grad_n, grad_m, n, m, total)), sums_kv, sums_w, S, C8, D, **options)
    return sums_kv, sums_w


@suffix_sums.register_fake
def suffix_sums_fake(grad_n, grad_m, n, m, total):
    B, H, S, C8, D = n.shape
    return (torch.empty(B, H, (S + 1) * C8, 2 * D, dtype=grad_n.dtype, device=n.device),
            torch.empty(B, H, (S + 1) * C8, dtype=torch.float32, device=n.device))


def prefix_backward(ctx, grad_n, grad_m, _grad_total):
    """A token in block i collects sum_{j >= i} of dA and dW (module docstring): `suffix_sums` over the steps of every
    (step, cluster) row, then one gather per token in position order, which Inductor fuses with the sum of k's and
    v's gradients from their other paths when compiled."""
    k, v, weights, clusters, n, m, total = ctx.saved_tensors
    B, H, S, C8, D = n.shape
    grad_n, grad_m = (torch.zeros_like(x) if g is None else g for g, x in ((grad_n, n), (grad_m, m)))
    sums_kv, sums_w = suffix_sums(grad_n, grad_m, n, m, total)
    blocks = torch.arange(k.shape[2], device=k.device) // ctx.block  # (T,)
    slot = blocks * C8 + clusters.long()  # (B, R, T)
    # (B, H, T, D) each, in the sums' dtype: the products with the fp32 w and k.float() promote them exactly
    sums_k, sums_v = sums_kv.gather(2, slot.unsqueeze(-1).expand(B, H, -1, 2 * D)).split(D, dim=-1)
    w = weights.unsqueeze(-1)  # (B, R, T, 1)
    grad_k, grad_v = (sums_k * w).to(k.dtype), (sums_v * w).to(v.dtype)
    grad_w = sums_w.gather(2, slot.expand(B, H, -1)) + (k.float() * sums_k).sum(-1) + (v.float() * sums_v).sum(-1)  # (B, H, T)
    return grad_k, grad_v, per_routing_row(grad_w, weights), None, None, None, None, None, None, None


prefix_means.register_autograd(prefix_backward, setup_context=setup_prefix_context)


@torch.library.custom_op("attnbench::supernode_read_values", mutates_args=())
def read_values(v: torch.Tensor, z: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, order: torch.Tensor,
                starts: torch.Tensor, counts: torch.Tensor, block: int) -> torch.Tensor:
    """w_t v'_t in v's dtype (B, H, T, D), contiguous, in sorted order, v'_t = v_t + gate_h w_t z^(block_t - 1)[c_t]
    rounded to v's dtype (no read in block 0): v in position order, z (B, H, S, C8, D) from the mixing, gate (H,) fp32
    (module docstring for the rest)."""
    out = read_values_fake(v, z, weights, gate, order, starts, counts, block)
    v = rows_contiguous(v)
    B, H, T, D = v.shape
    grid, options = launch_options("read_values", v, z.shape[3], B, H)
    read_values_kernel[grid](v, z.contiguous(), weights.contiguous(), gate.contiguous(), order.contiguous(),
                             starts.contiguous(), counts.contiguous(), out, T, H, weights.shape[1], starts.shape[-1],
                             z.shape[3], z.shape[2], D, block, *row_strides(v), **options)
    return out


@read_values.register_fake
def read_values_fake(v, z, weights, gate, order, starts, counts, block):
    return torch.empty(v.shape, dtype=v.dtype, device=v.device)


@torch.library.custom_op("attnbench::supernode_read_values_backward", mutates_args=())
def read_values_backward(grad: torch.Tensor, v: torch.Tensor, z: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor,
                         order: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                         block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dv (B, H, T, D) contiguous, in position order, dz (B, H, S, C8, D) in z's dtype, and per head and token
    (B, H, T) fp32, in position order, the weights' gradient g . v' + gate dv' . z and the gate's summands w dv' . z
    (dv' = g w, the gradient of v'; grad in sorted order)."""
    grad_v, grad_z, dot_own, dot_gate = read_values_backward_fake(grad, v, z, weights, gate, order, starts, counts, block)
    B, H, T, D = v.shape
    grid, options = launch_options("read_values_backward", v, z.shape[3], B, H)
    read_values_backward_kernel[grid](grad.contiguous(), v, z, weights, gate, order, starts, counts, grad_v, grad_z,
                                      dot_own, dot_gate, T, H, weights.shape[1], starts.shape[-1], z.shape[3], z.shape[2],
                                      D, block, *row_strides(v), **options)
    return grad_v, grad_z, dot_own, dot_gate


@read_values_backward.register_fake
def read_values_backward_fake(grad, v, z, weights, gate, order, starts, counts, block):
    # Left unfilled: the segments cover every token, and the kernel stores every step of every (padded) cluster.
    dots = (torch.empty(v.shape[:3], dtype=torch.float32, device=v.device) for _ in range(2))
    return torch.empty(v.shape, dtype=v.dtype, device=v.device), torch.empty_like(z), *dots


def setup_read_context(ctx, inputs, output):
    v, *arrays, block = inputs
    ctx.save_for_backward(rows_contiguous(v), *(t.contiguous() for t in arrays))
    ctx.block = block


def read_values_gradients(ctx, grad):
    v, z, weights, gate, order, starts, counts = ctx.saved_tensors
    grad_v, grad_z, dot_own, dot_gate = read_values_backward(grad, v, z, weights, gate, order, starts, counts, ctx.block)
    return grad_v, grad_z, per_routing_row(dot_own, weights), dot_gate.sum(dim=(0, 2)), None, None, None, None


read_values.register_autograd(read_values_gradients, setup_context=setup_read_context)
