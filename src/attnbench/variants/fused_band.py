"""Softmax attention over a band of keys, query i over keys lo[i] <= j <= i, as Triton kernels (CUDA).

lca's and sca's segments in (cluster, position) sorted order are such bands (lo[i] = the start of i's cluster segment,
hi[i] = its end), and so are ca's blocks in position order (rows the identity); `flex.flex_band_attention` is the same
computation by FlexAttention. Flex lists key tiles per 128-row sparse block, aligned to the 128 grid, and computes
every listed tile whole: with segments of ~sqrt(T) tokens (~90 at 8K, ~180 at 32K) a query tile then reaches back to
the start of the first segment it holds, rounded down to 128. Here a program owns 64 query rows (forward, dq) or 64
keys (dk, dv) and loops over exactly the keys lo[first row] .. last row (or the queries first key ..
hi[last key] - 1), from any row, not a multiple of a tile: about 1.6x (32K) and 1.8x (8K) fewer query-key pairs than
Flex's tiles on balanced random clusters (counted).

The query side (q, o, do, dq) stays in the caller's order: sorted row i is row rows[i] of those arrays, which the
kernels read and write by that index. lca's queries and outputs are in position order, so neither q and do nor o and
dq are copied into and out of the sorted order (four passes over a (B, H, T, D) array per step). q and do may have any
batch, head and row strides (head dims contiguous), and o is laid out (B, T, H, D): in the model q is a view of the
qkv projection, o goes into the output projection as (B, T, H * D), and do comes back in that layout, so none of the
three is copied to or from a contiguous (B, H, T, D). The key side (k, v, dk, dv) may be in the same order, read and
written at rows[j] (lca's k and v, sca's k), or in sorted order (sca's values, its supernode path's output).

The forward stores each row's log-sum-exp (base 2); the backward is flash-style, dq per query tile (which also
stores delta = rowsum(do * o)) and then dk, dv per key tile. Every row holds its own key, so no row is empty.

Arrays: q, k, v (B, H, T, D) with contiguous head dims (any other strides); lo, hi and rows (B|1, H|1, T) int32
of one shape, lo and hi non-decreasing along T, rows a permutation of 0..T-1 along T, a dimension of size 1 shared
(stride 0). Products run in the inputs' dtype with fp32 accumulation; fp32 inputs use IEEE products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_tiles import (LOG2E, NEG, dot, dot_options, online_softmax_step, row_strides, rows_contiguous, slice_offset,
                          store_strided_rows, strided_rows)
from .fused_tiles import store_token_tile as store_rows


def kernel_layouts(q, k, v, lo, hi, rows) -> tuple[torch.Tensor, ...]:
    """The op's arrays in the layouts the kernels read: q, k, v with contiguous head dims, the rest contiguous (no
    copy where they already are)."""
    return *(rows_contiguous(t) for t in (q, k, v)), *(t.contiguous() for t in (lo, hi, rows))

# Query rows and keys per program and per loop step, warps and pipeline stages: the fastest of seven to nine settings
# each on lca's sorted segments (H200, do_bench, bf16, 65,536 tokens, stop 33; reports/benchmarks/NVIDIA-H200-stop33-probes.log),
# at 8K / 32K. Forward 64 x 32: 99 / 119 us (64 x 64: 115 / 131; 32- and 128-row tiles 130-230). dq 64 x 32: 121 / 134
# (64 x 64: 135 / 149; 32- or 128-row tiles 153-215). dk, dv with 32-row steps over 64 keys: 154 / 182 (64 x 64: 204 /
# 235; 16 x 64: 152 / 185; 64 x 32 and 32 x 32: 211-283); 8 warps were the slowest settings of every kernel.
TILES = {"forward": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
         "dq": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
         "dkdv": dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3)}


@triton.jit
def key_index(ROWS, offset, cols, col_ok, AT_ROWS: tl.constexpr):
    """Where sorted keys `cols` are in an array of the keys' side: at the sort's rows (an array in q's order), or at
    cols themselves (an array in sorted order)."""
    if AT_ROWS:
        return tl.load(ROWS + offset + cols, mask=col_ok, other=0)
    return cols


@triton.jit
def key_indices(ROWS, offset, cols, col_ok, K_AT_ROWS: tl.constexpr, V_AT_ROWS: tl.constexpr):
    """`key_index` of k and of v, the sort's rows loaded once where both are at them (lca's)."""
    k_at = key_index(ROWS, offset, cols, col_ok, K_AT_ROWS)
    if K_AT_ROWS == V_AT_ROWS:
        return k_at, k_at
    return k_at, key_index(ROWS, offset, cols, col_ok, V_AT_ROWS)


@triton.jit
def in_band(lo, rows, cols):
    """(rows, keys) pairs with lo[row] <= key <= row."""
    return (lo[:, None] <= cols[None, :]) & (cols[None, :] <= rows[:, None])


@triton.jit
def query_tile(Q, q_sb, q_sh, q_st, LO, ROWS, T, H, D, stride_b, stride_h, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch row, head) bh, its rows (and which are real), where they are in the query-side arrays,
    head dims, the rows' lo (T for padding rows: no key), q, and the keys any of its rows reads: lo[first row] (the
    least) up to the last row."""
    bh = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0) * BLOCK_M
    rows, dims = first + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    row_ok = rows < T
    offset = slice_offset(bh, H, stride_b, stride_h)
    lo = tl.load(LO + offset + rows, mask=row_ok, other=T)
    at = tl.load(ROWS + offset + rows, mask=row_ok, other=0)
    q = strided_rows(Q, bh, H, q_sb, q_sh, q_st, at, row_ok, dims, D)
    return bh, rows, row_ok, at, dims, lo, q, tl.load(LO + offset + first), tl.minimum(first + BLOCK_M, T)


@triton.jit
def forward_kernel(Q, K, V, LO, ROWS, O, LSE, T, H, D, stride_b, stride_h, q_sb, q_sh, q_st, o_sb, o_sh, o_st, k_sb, k_sh, k_st,
                   v_sb, v_sh, v_st, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   IEEE: tl.constexpr, K_AT_ROWS: tl.constexpr, V_AT_ROWS: tl.constexpr):
    bh, rows, row_ok, at, dims, lo, q, key_start, key_end = query_tile(Q, q_sb, q_sh, q_st, LO, ROWS, T, H, D, stride_b, stride_h,
                                                                       BLOCK_M, BLOCK_D)
    scale2 = scale * LOG2E  # scores in base 2: exp2 is one instruction
    row_max = tl.full([BLOCK_M], NEG, tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offset = slice_offset(bh, H, stride_b, stride_h)
    for start in range(key_start, key_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        k_at, v_at = key_indices(ROWS, offset, cols, col_ok, K_AT_ROWS, V_AT_ROWS)
        k = strided_rows(K, bh, H, k_sb, k_sh, k_st, k_at, col_ok, dims, D)
        v = strided_rows(V, bh, H, v_sb, v_sh, v_st, v_at, col_ok, dims, D)
        s = tl.where(in_band(lo, rows, cols), dot(q, tl.trans(k), IEEE) * scale2, float("-inf"))
        row_max, row_sum, acc = online_softmax_step(s, v, row_max, row_sum, acc, IEEE)
    store_strided_rows(O, acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None], bh, H, o_sb, o_sh, o_st, at, row_ok, dims, D)
    tl.store(LSE + bh * T + rows, row_max + tl.log2(row_sum), mask=row_ok)


@triton.jit
def dq_kernel(Q, K, V, LO, ROWS, O, LSE, DO, DQ, DELTA, T, H, D, stride_b, stride_h, q_sb, q_sh, q_st, o_sb, o_sh, o_st,
              do_sb, do_sh, do_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, IEEE: tl.constexpr, K_AT_ROWS: tl.constexpr, V_AT_ROWS: tl.constexpr):
    bh, rows, row_ok, at, dims, lo, q, key_start, key_end = query_tile(Q, q_sb, q_sh, q_st, LO, ROWS, T, H, D, stride_b, stride_h,
                                                                       BLOCK_M, BLOCK_D)
    do = strided_rows(DO, bh, H, do_sb, do_sh, do_st, at, row_ok, dims, D)
    o = strided_rows(O, bh, H, o_sb, o_sh, o_st, at, row_ok, dims, D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * T + at, delta, mask=row_ok)  # in q's order: for dkdv_kernel (launched after) and the gate
    lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
    scale2 = scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offset = slice_offset(bh, H, stride_b, stride_h)
    for start in range(key_start, key_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        k_at, v_at = key_indices(ROWS, offset, cols, col_ok, K_AT_ROWS, V_AT_ROWS)
        k = strided_rows(K, bh, H, k_sb, k_sh, k_st, k_at, col_ok, dims, D)
        v = strided_rows(V, bh, H, v_sb, v_sh, v_st, v_at, col_ok, dims, D)
        prob = tl.where(in_band(lo, rows, cols), tl.exp2(dot(q, tl.trans(k), IEEE) * scale2 - lse[:, None]), 0.0)
        grad_scores = prob * (dot(do, tl.trans(v), IEEE) - delta[:, None])
        dq += dot(grad_scores.to(k.dtype), k, IEEE)
    store_rows(DQ, dq * scale, bh, T, at, row_ok, dims, D)


@triton.jit
def dkdv_kernel(Q, K, V, LO, HI, ROWS, LSE, DO, DELTA, DK, DV, VALUE_DELTA, T, H, D, stride_b, stride_h, q_sb, q_sh, q_st, do_sb, do_sh,
                do_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, IEEE: tl.constexpr, VALUE_GATE: tl.constexpr, K_AT_ROWS: tl.constexpr,
                V_AT_ROWS: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0) * BLOCK_N
    cols, dims = first + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    col_ok = cols < T
    offset = slice_offset(bh, H, stride_b, stride_h)
    k_at, v_at = key_indices(ROWS, offset, cols, col_ok, K_AT_ROWS, V_AT_ROWS)
    k = strided_rows(K, bh, H, k_sb, k_sh, k_st, k_at, col_ok, dims, D)
    v = strided_rows(V, bh, H, v_sb, v_sh, v_st, v_at, col_ok, dims, D)
    scale2 = scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # The queries that read these keys: from the first key on, up to the end of the last key's band (hi is
    # non-decreasing).
    for start in range(first, tl.load(HI + offset + tl.minimum(first + BLOCK_N, T) - 1), BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        lo = tl.load(LO + offset + rows, mask=row_ok, other=T)
        at = tl.load(ROWS + offset + rows, mask=row_ok, other=0)
        q = strided_rows(Q, bh, H, q_sb, q_sh, q_st, at, row_ok, dims, D)
        do = strided_rows(DO, bh, H, do_sb, do_sh, do_st, at, row_ok, dims, D)
        lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * T + at, mask=row_ok, other=0.0)
        # Transposed, (keys, rows), so dk and dv accumulate without transposing the products' results.
        pair_ok = tl.trans(in_band(lo, rows, cols))
        prob_t = tl.where(pair_ok, tl.exp2(dot(k, tl.trans(q), IEEE) * scale2 - lse[None, :]), 0.0)
        dv += dot(prob_t.to(do.dtype), do, IEEE)
        grad_scores_t = prob_t * (dot(v, tl.trans(do), IEEE) - delta[None, :])
        dk += dot(grad_scores_t.to(q.dtype), q, IEEE)
    store_rows(DK, dk * scale, bh, T, k_at, col_ok, dims, D)  # dk, dv contiguous, in k's and v's order
    store_rows(DV, dv, bh, T, v_at, col_ok, dims, D)
    if VALUE_GATE:  # its gradient. v read again: kept live through the loop, it made this kernel a third slower (stop 40)
        v = strided_rows(V, bh, H, v_sb, v_sh, v_st, v_at, col_ok, dims, D)
        tl.store(VALUE_DELTA + bh * T + v_at, tl.sum(dv * v.to(tl.float32), 1), mask=col_ok)


def broadcast_bands(q: torch.Tensor, *bands: torch.Tensor) -> tuple[list[torch.Tensor], int, int]:
    """lo, hi, rows (B|1, H|1, T) int32 broadcast to (B, H, T) (stride 0 where shared) and their batch and head
    strides, one pair for all, once per op call."""
    B, H, T, D = q.shape
    assert q.numel() < 2**31, f"{q.numel()} elements: the band kernels index rows in int32"
    assert B * H < 2**16, f"batch x heads = {B * H}: the band kernels' grid holds at most 65,535 in its second dimension"
    assert len({t.shape for t in bands}) == 1 and all(t.is_contiguous() for t in bands), \
        f"bands of shapes {[tuple(t.shape) for t in bands]}: one shape, contiguous"
    broadcast = [t.expand(B, H, T) for t in bands]
    # A dimension of size 1 may carry any stride in a contiguous tensor (lca's sort gives `order` (1, 1, T) strides
    # (64, 64, 1), where lo's are (T, T, 1)); its index is always 0, so its stride is taken as 0, one pair for all.
    return broadcast, *(stride if n > 1 else 0 for n, stride in zip(broadcast[0].shape[:2], broadcast[0].stride()[:2]))


def kernel_options(kernel: str, q: torch.Tensor) -> dict:
    return dict(TILES[kernel], **dot_options(q))


# Opaque custom ops, as fused_mixing's.
@torch.library.custom_op("attnbench::band_attention", mutates_args=())
def band_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                           rows: torch.Tensor, gate: torch.Tensor | None, value_gate: torch.Tensor | None,
                           scale: float, keys_at_rows: bool, values_at_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, H, T, D) in q's dtype, in q's order, laid out (B, T, H, D), and the sorted rows' log-sum-exp in base 2
    (B, H, T) fp32; hi and the gates (whose forward values are 1) are for the backward."""
    q, k, v, lo, hi, rows = kernel_layouts(q, k, v, lo, hi, rows)
    o, lse = band_attention_forward_fake(q, k, v, lo, hi, rows, gate, value_gate, scale, keys_at_rows, values_at_rows)
    B, H, T, D = q.shape
    (band, at), stride_b, stride_h = broadcast_bands(q, lo, rows)
    options = kernel_options("forward", q)
    forward_kernel[(triton.cdiv(T, options["BLOCK_M"]), B * H)](q, k, v, band, at, o, lse, T, H, D, stride_b, stride_h,
                                                                *row_strides(q), *row_strides(o), *row_strides(k),
                                                                *row_strides(v), scale, K_AT_ROWS=keys_at_rows,
                                                                V_AT_ROWS=values_at_rows, **options)
    return o, lse


@band_attention_forward.register_fake
def band_attention_forward_fake(q, k, v, lo, hi, rows, gate, value_gate, scale, keys_at_rows, values_at_rows):
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)


@torch.library.custom_op("attnbench::band_attention_backward", mutates_args=())
def band_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, rows: torch.Tensor,
                            o: torch.Tensor, lse: torch.Tensor, grad_o: torch.Tensor, scale: float, value_gate: bool,
                            keys_at_rows: bool, values_at_rows: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (dk and dv contiguous, in k's and v's order); delta = sum(o * grad_o) over D (B, H, T) fp32 in q's
    order: the flash backward's row term, and the gradient of a gate of value 1 on o; and where value_gate,
    sum(v * dv) over D (B, H, T) fp32 in v's order: the gradient of a gate of value 1 on v (else an empty tensor)."""
    q, k, v, lo, hi, rows = kernel_layouts(q, k, v, lo, hi, rows)
    o, grad_o = rows_contiguous(o), rows_contiguous(grad_o)
    dq, dk, dv, delta, value_delta = band_attention_backward_fake(q, k, v, lo, hi, rows, o, lse, grad_o, scale, value_gate,
                                                                  keys_at_rows, values_at_rows)
    B, H, T, D = q.shape
    (band, ends, at), stride_b, stride_h = broadcast_bands(q, lo, hi, rows)
    # Both kernels read q and do; the keys' side by its own strides, at the sort's rows where it is in q's order.
    q_strides, do_strides, kv_strides = row_strides(q), row_strides(grad_o), (*row_strides(k), *row_strides(v))
    key_side = dict(K_AT_ROWS=keys_at_rows, V_AT_ROWS=values_at_rows)
    options = kernel_options("dq", q)
    dq_kernel[(triton.cdiv(T, options["BLOCK_M"]), B * H)](q, k, v, band, at, o, lse, grad_o, dq, delta, T, H, D,
                                                           stride_b, stride_h, *q_strides, *row_strides(o),
                                                           *do_strides, *kv_strides, scale, **key_side, **options)
    options = kernel_options("dkdv", q)
    dkdv_kernel[(triton.cdiv(T, options["BLOCK_N"]), B * H)](q, k, v, band, ends, at, lse, grad_o, delta, dk, dv, value_delta, T, H, D,
                                                             stride_b, stride_h, *q_strides, *do_strides, *kv_strides,
                                                             scale, VALUE_GATE=value_gate, **key_side, **options)
    return dq, dk, dv, delta, value_delta


@band_attention_backward.register_fake
def band_attention_backward_fake(q, k, v, lo, hi, rows, o, lse, grad_o, scale, value_gate, keys_at_rows, values_at_rows):
    return *(t.new_empty(t.shape) for t in (q, k, v)), torch.empty_like(lse), lse.new_empty(lse.shape if value_gate else 0)


def setup_context(ctx, inputs, output):
    *arrays, gate, value_gate, scale, keys_at_rows, values_at_rows = inputs
    o, lse = output
    ctx.save_for_backward(*arrays, o, lse)
    ctx.scale, ctx.key_side = scale, (keys_at_rows, values_at_rows)
    ctx.gate_shapes = [None if g is None else g.shape for g in (gate, value_gate)]


def backward(ctx, grad_o, _grad_lse):
    *arrays, o, lse = ctx.saved_tensors
    value_gated = ctx.gate_shapes[1] is not None
    dq, dk, dv, delta, value_delta = band_attention_backward(*arrays, o, lse, grad_o, ctx.scale, value_gated, *ctx.key_side)
    grad_gate, grad_value_gate = (None if shape is None else d.unsqueeze(-1).sum_to_size(shape)  # over shared heads
                                  for d, shape in zip((delta, value_delta), ctx.gate_shapes))
    return dq, dk, dv, None, None, None, grad_gate, grad_value_gate, None, None, None


band_attention_forward.register_autograd(backward, setup_context=setup_context)


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, rows: torch.Tensor,
                   scale: float, gate: torch.Tensor | None = None, value_gate: torch.Tensor | None = None,
                   keys_at_rows: bool = False, values_at_rows: bool = False) -> torch.Tensor:
    """Softmax attention of sorted query i over sorted keys lo[i] <= j <= i: q (B, H, T, D) in its own order, sorted
    query i being q[..., rows[i], :], and the output in q's order; k and v (B, H, T, D) in sorted order, or, with
    keys_at_rows / values_at_rows, in q's order (sorted key j at rows[j], and its gradient there); lo, hi, rows
    (B|1, H|1, T) int32 of one shape, hi[j] = 1 + the last query whose band holds key j (the end of j's segment),
    lo and hi non-decreasing.

    gate (B, H|1, T, 1), in q's order, or None: a straight-through gate on the output whose forward value is exactly 1
    (`routing.straight_through`), so the output o * gate is o, unmade; its gradient, sum(o * grad) over D, is the
    backward's delta, which the dq kernel forms anyway. value_gate (B, H|1, T, 1), in v's order, or None: the same
    on v (the attention reads v, unmade); its gradient, sum(v * dv) over D, the dk, dv kernel forms from the dv it holds."""
    # Here, once, so that the tensors saved for the backward are those the op's body reads (no copy of its own).
    q, k, v, lo, hi, rows = kernel_layouts(q, k, v, lo, hi, rows)
    return band_attention_forward(q, k, v, lo, hi, rows, gate, value_gate, scale, keys_at_rows, values_at_rows)[0]
