"""lca's training-time routing fused into Triton kernels (CUDA): noise, softmax, argmax, own gate, balance loss.

Computes what `routing` defines (`route` + `own_gate` + `balance_loss`) in two
passes over the router's logits, one forward kernel and one backward kernel.
A program owns one (batch row, balance block, router) and walks the block's
tokens, so the forward also sums p_t = softmax(r_t) over the block (the
balance loss needs only those sums, `routing.balance_from_block_sums`) and
writes no per-token balance term. It writes y = softmax((r + g) / tau) in the
logits' dtype and two row statistics, max r and sum exp(r - max r), so the
backward draws no noise and takes no max: it reads y, forms p from the
statistics, and its reductions are 1 - y_own (the sum of the other clusters'
y) and the softmax backward of the block sums' gradient. Storing y costs one
write and one read of a logits-sized tensor; regenerating it cost the
backward a Philox call, two logarithms and an exponential per logit, which
made it issue-bound (reports/benchmarks/NVIDIA-H200.md).

History, measured on the H100 (bf16 logits, forward and backward): the plain
form under torch.compile made about ten fp32 passes over the logits, 1.73 ms
at T = 8K (728 logits per token) and 4.81 ms at 32K; the first fused form
(route, balance and backward kernels over rows, each backward row
recomputing both softmaxes) 1.12 and 1.95 ms. reports/benchmarks has the
current form's times.

The noise is Triton's Philox generator keyed by a seed that `draw_seed` takes
from torch's generator; `gumbel_noise` writes the same noise out, so lca's
reference path on CUDA draws exactly what the fused path draws.

Logits are laid out as the router's linear gives them, (B, T, R, W) with
R = H or 1 routers; row n = (b T + t) R + r holds C logits and W - C padding
columns: lca pads its router's weight with zero rows to W = `padded_width(C)`,
so the rows are aligned for vector loads and stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .fused_tiles import INTERPRET, LOG2E

LN2 = tl.constexpr(0.6931471805599453)
TINY = tl.constexpr(1.1754943508222875e-38)  # fp32's smallest normal, as routing's clamp
# Tokens per loop step and warps. With rows of `padded_width` Triton lays a row over 16 lanes of one warp (8
# columns each), so every row reduction stays inside a warp at (4, 2) too. Forward + backward on lca's benchmark
# logits (H200, do_bench, one call, stop 25), at 2K / 8K / 32K: (4, 2) 0.17 / 0.31 / 0.73 ms; (2, 1) 0.19 / 0.31 /
# 0.74; (8, 2) 0.16 / 0.34 / 0.81; (1, 1), (4, 1), (8, 1), (16, 4) slower. Before the padding, ftz and prefetch
# (unaligned 91-wide rows at 8K, one 2-byte load per column): (2, 1) 0.25 / 0.47 / 0.96.
ROWS, NUM_WARPS = 4, 2
# Tokens per backward program: its blocks (256 tokens at 32K) split into runs of 64, for more programs in flight.
BACKWARD_TOKENS = 64


@triton.jit
def approx_log2(x):
    """PTX's lg2.approx.ftz: the accurate log2 made the noise cost 5x its memory traffic (0.34 against 0.06 ms for
    47.7M values on the H100, measured); absolute error ~2^-22, which only the tail noted in gumbel_rows feels.
    Flushing subnormals costs no accuracy here (every input is clamped to a normal) and saves the three
    instructions per call that rescale a subnormal input. The interpreter runs no PTX: there it is the accurate log2."""
    if INTERPRET:
        return tl.log2(x)
    return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def approx_exp2(x):
    """PTX's ex2.approx.ftz, where tl.exp2 is ex2.approx without ftz, which ptxas wraps in a test and two multiplies
    per call to keep subnormal results. Every exponent here is <= 0 and every sum it enters is >= 1, so a result
    below 2^-126 flushed to 0 changes nothing."""
    if INTERPRET:
        return tl.exp2(x)
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def gumbel_rows(seed, rows, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, FIRST: tl.constexpr, WIDTH: tl.constexpr):
    """Gumbel noise (ROWS, WIDTH) for these rows' columns FIRST .. FIRST + WIDTH - 1 of BLOCK_C: one Philox call
    per 4 columns (tl.rand4x), column 4 j + i taking output i of call j (0.34 against 0.41 ms for one call per
    value, 47.7M values, H100, measured), so a row's noise is the same in whatever tiles it is drawn."""
    counters = rows[:, None] * (BLOCK_C // 4) + FIRST // 4 + tl.arange(0, WIDTH // 4)[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, counters)
    u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (ROWS, WIDTH))
    # -log(-log u), each log clamped above 0: for u within ~2^-22 of 1 (probability ~1e-7) the approximate log
    # may round -log u to 0, where the true noise is above 15 and wins its row's argmax anyway.
    exponential = tl.maximum(approx_log2(tl.maximum(u, TINY)) * -LN2, TINY)
    return approx_log2(exponential) * -LN2


@triton.jit
def tile(rows, row_ok, W, FIRST: tl.constexpr, WIDTH: tl.constexpr):
    """Columns FIRST .. FIRST + WIDTH - 1, and the offsets and mask (ROWS, WIDTH) of these rows' entries of an (N, W)
    array there."""
    cols = FIRST + tl.arange(0, WIDTH)
    return cols, rows[:, None] * W + cols[None, :], row_ok[:, None] & (cols[None, :] < W)


@triton.jit
def token_rows(start, end, b, r, T, R, ROWS: tl.constexpr):
    """Tokens start .. start + ROWS - 1 of batch row b, router r (those before `end` real): their rows and row mask."""
    t = start + tl.arange(0, ROWS)
    return (b * T + t) * R + r, t < end


@triton.jit
def real_logits(raw, cols, C):
    """Loaded logits in fp32, -inf in the columns from C on only: a masked row stays finite, no inf - inf."""
    return tl.where(cols[None, :] < C, raw.to(tl.float32), float("-inf"))


@triton.jit
def load_logits(logits_ptr, rows, row_ok, W, FIRST: tl.constexpr, WIDTH: tl.constexpr):
    """These rows' raw logits in columns FIRST .. FIRST + WIDTH - 1 (0 past W)."""
    _, offsets, mask = tile(rows, row_ok, W, FIRST, WIDTH)
    return tl.load(logits_ptr + offsets, mask=mask, other=0.0)


@triton.jit
def first_column_at(z, top, cols, BLOCK_C: tl.constexpr):
    """Per row, the first of these columns where z equals the row's maximum `top` (BLOCK_C where none)."""
    return tl.min(tl.where(z == top[:, None], cols[None, :], BLOCK_C), axis=1)


@triton.jit
def block_of_program(T, R, n_blocks, block, parts):
    """This program's batch row b, router r and its part of balance block j (the block split into `parts` runs of
    tokens; r fastest, so neighbouring programs share cache lines of the logits), the part's first and end token,
    and block j's index in the (B, R, n_blocks) block arrays."""
    pid = tl.program_id(0)
    r, i, b = pid % R, pid // R % (n_blocks * parts), pid // (R * n_blocks * parts)
    first = i * (block // parts)
    return b, r, first, tl.minimum(first + block // parts, T), (b * R + r) * n_blocks + i // parts


@triton.jit
def noise_kernel(seed_ptr, out_ptr, N, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The route kernel's noise written out (N, C), for the reference path."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    _, offsets, mask = tile(rows, rows < N, C, 0, BLOCK_C)
    tl.store(out_ptr + offsets, gumbel_rows(tl.load(seed_ptr), rows, ROWS, BLOCK_C, 0, BLOCK_C), mask=mask)


# Wide rows are two tiles of columns: a head of BLOCK_C / 2 and a tail of the next power of two >= W - BLOCK_C / 2
# (`column_tiles`), so a row of W = 192 (C = 182 at T = 32K) is 128 + 64 lanes, not 256 of which 64 are masked but
# still draw noise; every row statistic combines the two tiles'. TAIL = 0: the row is one tile, HEAD = BLOCK_C.


@triton.jit
def route_kernel(
    logits_ptr, seed_ptr, tau_ptr, cluster_ptr, own_ptr, soft_ptr, stats_ptr, sums_ptr,
    T, R, C, W, n_blocks, block, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr,
):
    """Per token of the block: c_t = argmax z_t, z = (r_t + g_t) / tau; y_t = softmax(z_t) and its own entry
    y_t[c_t] = 1 / sum_c exp(z_c - z_{c_t}); the row statistics max_c r and sum_c exp(r_c - max r); and, per
    block, P = sum_t softmax(r_t)."""
    b, r, first, end, block_index = block_of_program(T, R, n_blocks, block, 1)
    seed, inverse_tau = tl.load(seed_ptr), 1.0 / tl.load(tau_ptr)
    rows, row_ok = token_rows(first, end, b, r, T, R, ROWS)
    p_head, head_ahead = tl.zeros((ROWS, HEAD), tl.float32), load_logits(logits_ptr, rows, row_ok, W, 0, HEAD)
    if TAIL > 0:
        p_tail, tail_ahead = tl.zeros((ROWS, TAIL), tl.float32), load_logits(logits_ptr, rows, row_ok, W, HEAD, TAIL)
    for start in range(first, end, ROWS):
        # The next step's logits are loaded before this step's arithmetic, which hides their latency: 0.21 -> 0.18
        # ms at 8K, 0.17 -> 0.11 at 2K (H200, probe of stop 25).
        rows, row_ok = token_rows(start, end, b, r, T, R, ROWS)
        next_rows, next_ok = token_rows(start + ROWS, end, b, r, T, R, ROWS)
        head_cols, head_offsets, head_mask = tile(rows, row_ok, W, 0, HEAD)
        head = real_logits(head_ahead, head_cols, C)
        head_ahead = load_logits(logits_ptr, next_rows, next_ok, W, 0, HEAD)
        z_head = (head + gumbel_rows(seed, rows, ROWS, BLOCK_C, 0, HEAD)) * inverse_tau
        top, shift = tl.max(z_head, axis=1), tl.max(head, axis=1)
        if TAIL > 0:
            tail_cols, tail_offsets, tail_mask = tile(rows, row_ok, W, HEAD, TAIL)
            tail = real_logits(tail_ahead, tail_cols, C)
            tail_ahead = load_logits(logits_ptr, next_rows, next_ok, W, HEAD, TAIL)
            z_tail = (tail + gumbel_rows(seed, rows, ROWS, BLOCK_C, HEAD, TAIL)) * inverse_tau
            top, shift = tl.maximum(top, tl.max(z_tail, axis=1)), tl.maximum(shift, tl.max(tail, axis=1))
        # The argmax as the first column holding the row's maximum: the same index as tl.argmax, in fewer
        # instructions (one reduction of a min, no (value, index) pairs).
        cluster = first_column_at(z_head, top, head_cols, BLOCK_C)
        e_z_head, e_head = approx_exp2((z_head - top[:, None]) * LOG2E), approx_exp2((head - shift[:, None]) * LOG2E)
        z_sum, total = tl.sum(e_z_head, axis=1), tl.sum(e_head, axis=1)
        if TAIL > 0:
            cluster = tl.minimum(cluster, first_column_at(z_tail, top, tail_cols, BLOCK_C))
            e_z_tail, e_tail = approx_exp2((z_tail - top[:, None]) * LOG2E), approx_exp2((tail - shift[:, None]) * LOG2E)
            z_sum, total = z_sum + tl.sum(e_z_tail, axis=1), total + tl.sum(e_tail, axis=1)
        own = 1.0 / z_sum
        tl.store(cluster_ptr + rows, cluster.to(tl.int64), mask=row_ok)
        tl.store(own_ptr + rows, own, mask=row_ok)
        tl.store(stats_ptr + 2 * rows, shift, mask=row_ok)
        tl.store(stats_ptr + 2 * rows + 1, total, mask=row_ok)
        tl.store(soft_ptr + head_offsets, (e_z_head * own[:, None]).to(soft_ptr.dtype.element_ty), mask=head_mask)
        p_head += tl.where(row_ok[:, None], e_head / total[:, None], 0.0)
        if TAIL > 0:
            tl.store(soft_ptr + tail_offsets, (e_z_tail * own[:, None]).to(soft_ptr.dtype.element_ty), mask=tail_mask)
            p_tail += tl.where(row_ok[:, None], e_tail / total[:, None], 0.0)
    sums = sums_ptr + block_index * C  # this block's row of P
    cols = tl.arange(0, HEAD)
    tl.store(sums + cols, tl.sum(p_head, axis=0), mask=cols < C)
    if TAIL > 0:
        cols = HEAD + tl.arange(0, TAIL)
        tl.store(sums + cols, tl.sum(p_tail, axis=0), mask=cols < C)


@triton.jit
def probabilities(logits_ptr, offsets, mask, cols, C, shift, total):
    """p = softmax(r) on one tile of columns, formed as the forward formed it, from its row statistics."""
    logits = real_logits(tl.load(logits_ptr + offsets, mask=mask, other=0.0), cols, C)
    return approx_exp2((logits - shift[:, None]) * LOG2E) / total[:, None]


@triton.jit
def route_backward_kernel(
    logits_ptr, tau_ptr, cluster_ptr, own_ptr, soft_ptr, stats_ptr, grad_own_ptr, grad_sums_ptr, grad_ptr,
    T, R, C, W, n_blocks, block, parts, ROWS: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr,
):
    """dL/dr_t = g_own y_c (onehot_c - y) / tau + p (G - sum_c G_c p_c), G = dL/dP of t's block; y as the forward
    stored it, p formed as the forward formed it, from its row statistics.

    1 - y_own is taken as the sum of the other y, never as a difference from 1: exactly 0 with one cluster,
    where y_own, an approximate division of e by e, need not be exactly 1 (a nonzero gradient came out that way
    on the GPU: PTX div.full.f32), and accurate wherever the router is sure (y_own near 1).

    Each tile's y, p, G and own column are loaded in this kernel, not in a helper: one that took these pointers and
    returned all four read as writing through them to torch's analysis of user Triton kernels (torch 2.14), so Inductor
    copied the logits and y before every call (0.19 ms at 32K, H200)."""
    b, r, first, end, block_index = block_of_program(T, R, n_blocks, block, parts)
    inverse_tau = 1.0 / tl.load(tau_ptr)
    # G of this program's block, loaded once: the same for every token of it.
    grad_sums = grad_sums_ptr + block_index * C
    head_cols = tl.arange(0, HEAD)
    g_head = tl.load(grad_sums + head_cols, mask=head_cols < C, other=0.0)[None, :]
    if TAIL > 0:
        tail_cols = HEAD + tl.arange(0, TAIL)
        g_tail = tl.load(grad_sums + tail_cols, mask=tail_cols < C, other=0.0)[None, :]
    for start in range(first, end, ROWS):
        rows, row_ok = token_rows(start, end, b, r, T, R, ROWS)
        own = tl.load(own_ptr + rows, mask=row_ok, other=0.0)
        shift = tl.load(stats_ptr + 2 * rows, mask=row_ok, other=0.0)
        total = tl.load(stats_ptr + 2 * rows + 1, mask=row_ok, other=1.0)
        cluster = tl.load(cluster_ptr + rows, mask=row_ok, other=0)
        scale = (tl.load(grad_own_ptr + rows, mask=row_ok, other=0.0) * own * inverse_tau)[:, None]
        head_cols, head_offsets, head_mask = tile(rows, row_ok, W, 0, HEAD)
        y_head = tl.load(soft_ptr + head_offsets, mask=head_mask, other=0.0).to(tl.float32)
        p_head = probabilities(logits_ptr, head_offsets, head_mask, head_cols, C, shift, total)
        own_head = head_cols[None, :] == cluster[:, None]
        others = tl.sum(tl.where(own_head, 0.0, y_head), axis=1)  # sum_{c != c_t} y_c = 1 - y_own
        p_dot_g = tl.sum(p_head * g_head, axis=1)
        if TAIL > 0:
            tail_cols, tail_offsets, tail_mask = tile(rows, row_ok, W, HEAD, TAIL)
            y_tail = tl.load(soft_ptr + tail_offsets, mask=tail_mask, other=0.0).to(tl.float32)
            p_tail = probabilities(logits_ptr, tail_offsets, tail_mask, tail_cols, C, shift, total)
            own_tail = tail_cols[None, :] == cluster[:, None]
            others += tl.sum(tl.where(own_tail, 0.0, y_tail), axis=1)
            p_dot_g += tl.sum(p_tail * g_tail, axis=1)
            grad_tail = scale * tl.where(own_tail, others[:, None], -y_tail) + p_tail * (g_tail - p_dot_g[:, None])
            tl.store(grad_ptr + tail_offsets, grad_tail.to(grad_ptr.dtype.element_ty), mask=tail_mask)
        grad_head = scale * tl.where(own_head, others[:, None], -y_head) + p_head * (g_head - p_dot_g[:, None])
        tl.store(grad_ptr + head_offsets, grad_head.to(grad_ptr.dtype.element_ty), mask=head_mask)


def draw_seed(device: torch.device) -> torch.Tensor:
    """The Philox seed (1,) int64 on `device`, from torch's generator: a manual seed fixes the noise."""
    return torch.randint(2**31 - 1, (1,), device=device)


def column_block(C: int) -> int:
    """The kernels' columns per row: a power of two >= C, and the same for C and `padded_width(C)`, so the noise
    of a padded row is that of the unpadded one."""
    return max(16, triton.next_power_of_2(C))


def column_tiles(W: int) -> dict[str, int]:
    """The route kernels' tiles for rows of W: BLOCK_C = `column_block(W)` (the noise's layout), and a head of half of
    it and a tail of the next power of two >= the rest where the head holds >= 128 lanes and the tail saves some;
    otherwise one tile (TAIL = 0). Kernels alone (H200, stop 31): two tiles took 292 against 366 us forward at W = 192,
    and were slower at W = 48 and 96 (199 against 178 us forward, 125 against 79 backward at 48)."""
    block = column_block(W)
    head, tail = block // 2, triton.next_power_of_2(W - block // 2)
    return dict(BLOCK_C=block, HEAD=head, TAIL=tail) if head >= 128 and tail < head else dict(BLOCK_C=block, HEAD=block, TAIL=0)


def padded_width(C: int) -> int:
    """The logits' row width the route kernels want for C clusters: C rounded up to a multiple of 16, so every row
    starts 32-byte aligned, the width is a multiple Triton specialises on, and its loads and stores are vectors
    (with rows of C = 91 bf16 each row took one 2-byte load per column)."""
    return -(-C // 16) * 16


def block_grid(B: int, R: int, T: int, block: int, parts: int = 1) -> tuple[int, tuple[int]]:
    """The balance blocks per row n and the grid of the route kernels: one program per (b, j, r), or per part of
    each block (the backward, which sums nothing over a block, splits them: `backward_parts`)."""
    n_blocks = triton.cdiv(T, block)
    return n_blocks, (B * n_blocks * R * parts,)


def backward_parts(block: int) -> int:
    return block // min(block, BACKWARD_TOKENS)


def check_size(logits: torch.Tensor) -> None:
    # Philox offsets and row offsets are int32 inside the kernels.
    assert logits.numel() < 2**31, f"router logits of {logits.numel()} elements: the fused routing indexes them in int32"


@triton_op("attnbench::gumbel_noise", mutates_args=())
def gumbel_noise(seed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The fused route's noise for logits of this shape and seed, written out (fp32), for the reference path."""
    noise = torch.empty(shape, dtype=torch.float32, device=seed.device)
    check_size(noise)
    N = noise.numel() // shape[-1]
    wrap_triton(noise_kernel)[(triton.cdiv(N, ROWS),)](seed, noise, N, shape[-1], ROWS=ROWS, BLOCK_C=column_block(shape[-1]), num_warps=NUM_WARPS)
    return noise


@triton_op("attnbench::gumbel_route", mutates_args=())
def gumbel_route(
    logits: torch.Tensor, seed: torch.Tensor, tau: torch.Tensor, block: int, clusters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, T, R, W), W >= C = clusters, columns from C on padding (`padded_width`) -> cluster ids (B, T, R)
    int64, y_t[c_t] (B, T, R) fp32 (the own gate's soft value), the block sums of softmax(r) (B, R, n, C) fp32 (for
    `routing.balance_from_block_sums`), and what the backward reads: y (B, T, R, W) in the logits' dtype and the
    row statistics (B, T, R, 2) fp32. The logits' gradient is 0 in the padding columns."""
    B, T, R, W = logits.shape
    logits = logits.contiguous()
    check_size(logits)
    n_blocks, grid = block_grid(B, R, T, block)
    cluster = torch.empty(B, T, R, dtype=torch.int64, device=logits.device)
    own = torch.empty(B, T, R, dtype=torch.float32, device=logits.device)
    soft = torch.empty_like(logits)
    stats = torch.empty(B, T, R, 2, dtype=torch.float32, device=logits.device)
    sums = torch.empty(B, R, n_blocks, clusters, dtype=torch.float32, device=logits.device)
    wrap_triton(route_kernel)[grid](logits, seed, tau, cluster, own, soft, stats, sums, T, R, clusters, W, n_blocks, block,
                                     ROWS=ROWS, **column_tiles(W), num_warps=NUM_WARPS)
    return cluster, own, sums, soft, stats


@triton_op("attnbench::gumbel_route_backward", mutates_args=())
def gumbel_route_backward(
    logits: torch.Tensor, tau: torch.Tensor, cluster: torch.Tensor, own: torch.Tensor, soft: torch.Tensor,
    stats: torch.Tensor, grad_own: torch.Tensor, grad_sums: torch.Tensor, block: int,
) -> torch.Tensor:
    B, T, R, W = logits.shape
    logits = logits.contiguous()
    parts = backward_parts(block)
    n_blocks, grid = block_grid(B, R, T, block, parts)
    tiles = column_tiles(W)
    grad = torch.empty_like(logits)
    wrap_triton(route_backward_kernel)[grid](
        logits, tau, cluster, own, soft, stats, grad_own.contiguous(), grad_sums.contiguous(), grad,
        T, R, grad_sums.shape[-1], W, n_blocks, block, parts, ROWS=ROWS, HEAD=tiles["HEAD"], TAIL=tiles["TAIL"],
        num_warps=NUM_WARPS,
    )
    return grad


def setup_context(ctx, inputs, output):
    logits, _seed, tau, block, clusters = inputs
    cluster, own, _, soft, stats = output
    ctx.save_for_backward(logits, tau, cluster, own, soft, stats)
    ctx.block, ctx.clusters = block, clusters


def backward(ctx, _grad_cluster, grad_own, grad_sums, _grad_soft, _grad_stats):
    logits, tau, cluster, own, soft, stats = ctx.saved_tensors
    grad_own = torch.zeros_like(own) if grad_own is None else grad_own
    if grad_sums is None:
        B, T, R, _ = logits.shape
        grad_sums = own.new_zeros(B, R, block_grid(B, R, T, ctx.block)[0], ctx.clusters)
    return gumbel_route_backward(logits, tau, cluster, own, soft, stats, grad_own, grad_sums, ctx.block), None, None, None, None


gumbel_route.register_autograd(backward, setup_context=setup_context)
