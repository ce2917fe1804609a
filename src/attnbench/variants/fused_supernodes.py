"""sca's supernode path fused into Triton kernels (CUDA): v'_t = v_t + gate * a_t[c_t] z_{c_t}^(i-1).

Computes what sca's plain `supernode_values_plain` computes (tested equal), in
three kernels forward and three backward, where the plain path under
torch.compile ran about sixty (2.1 of sca's 4.4 ms per layer step at T = 8K on
the H200, profiled):

- `block_sums_kernel`, one program per (batch row and head, block j): the sums
  of a_s k_s, a_s v_s and a_s over block j's tokens per cluster, as a one-hot
  product on the tensor cores (bf16 pieces of the fp32 operand, so exact to
  fp32; one piece where the operand is bf16-exact, as it is in training,
  where a_s is 1 and k, v are bf16), into rows (step, cluster) of width
  E = 2 D + 1: [k sums | v sums | weight];
- `scan_kernel`: their cumulative sum over blocks, in place: the prefix the
  supernodes of step j are means of;
- `mix_read_kernel`, one program per (row and head, step j): the means n, m,
  the mixing z = softmax(u m^T * scale) n over the non-empty supernodes
  (u = n W_u^T; all dots tf32x3, accurate to about fp32), z written out (the
  backward reads it), then block j + 1's tokens gather their cluster's row of
  z; program j = 0 also copies block 0 (v' = v).

Backward: `mix_read_backward_kernel` (per step: dz as a one-hot product of
the tokens' gradients, the mixing's backward, the prefix rows' gradient),
`scan_kernel` reversed (a token of block i is in every step j >= i, so its
gradient is a suffix sum), `block_sums_backward_kernel` (per block: each token
gathers its cluster's row). The query side of the mixing is processed in
chunks of rows so that the (C, C) tiles stay small at C = 182 (T = 32K).

Layouts: k, v (B, H, T, D) with unit stride in D; cluster ids and own gates
(B, R, T), R = H or 1 routers (head h reads router h % R).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_T = 32  # tokens per loop step
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")  # Triton's CPU interpreter: tests without a GPU


@triton.jit
def onehot_dot(hits, x, acc, EXACT_INPUT: tl.constexpr):
    """acc + hits @ x for a 0/1 matrix hits and fp32 x, exact to fp32: x as the sum of three bf16 pieces, each
    product exact on the tensor cores. The second and third pieces are skipped where they are all zero (x
    bf16-exact), unless EXACT_INPUT is False, where they are always taken. The interpreter's dot takes bf16 for
    integers: there it is one fp32 product."""
    if INTERPRET:
        return tl.dot(hits.to(tl.float32), x, acc)
    a = hits.to(tl.bfloat16)
    hi = x.to(tl.bfloat16)
    rest = x - hi.to(tl.float32)
    acc = tl.dot(a, hi, acc)
    if EXACT_INPUT:
        if tl.max(tl.abs(rest)) > 0:
            acc = rest_dots(a, rest, acc)
    else:
        acc = rest_dots(a, rest, acc)
    return acc


@triton.jit
def rest_dots(a, rest, acc):
    """acc + a @ rest, rest as two bf16 pieces."""
    mid = rest.to(tl.bfloat16)
    acc = tl.dot(a, mid, acc)
    return tl.dot(a, (rest - mid.to(tl.float32)).to(tl.bfloat16), acc)


@triton.jit
def mix_dot(a, b, acc, LOW: tl.constexpr):
    """acc + a @ b for the mixing: bf16 operands where LOW (bf16 inputs; the plain path mixes in a bf16 sdpa under
    autocast), else tf32x3 (about fp32). fp32 operands take twice the shared memory: at C > 128 the mixing's
    backward needs more than an H200 has (`supported`). The interpreter rounds to bf16 and multiplies in fp32."""
    if INTERPRET:
        if LOW:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc)
        return tl.dot(a, b, acc)
    if LOW:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def score_dot(a, b, LOW: tl.constexpr):
    """a @ b for the scores and the forward's z, which the other products and the gate's gradient go through: tf32
    where LOW, else tf32x3."""
    if INTERPRET:
        return tl.dot(a, b)
    if LOW:
        return tl.dot(a, b, input_precision="tf32")
    return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def program_ids(H, R):
    """This program's batch row b, head h, router r and (b, h) index, and the block or step j."""
    bh, j = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    return b, h, h % R, bh, j


@triton.jit
def token_tile(start, end, b, r, T, R, cluster_ptr, own_ptr, BLOCK_T: tl.constexpr):
    """Tokens start .. start + BLOCK_T - 1 (those before `end` real): positions, mask, cluster ids (-1 outside),
    own gates (0 outside)."""
    t = start + tl.arange(0, BLOCK_T)
    ok = t < end
    routed = (b * R + r) * T + t
    return t, ok, tl.load(cluster_ptr + routed, mask=ok, other=-1), tl.load(own_ptr + routed, mask=ok, other=0.0)


@triton.jit
def rows_of(x_ptr, b, h, t, ok, s_b, s_h, s_t, D, BLOCK_D: tl.constexpr):
    """Rows t of x (B, H, T, D) at (b, h) in fp32, and their mask."""
    d = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (d[None, :] < D)
    return tl.load(x_ptr + b * s_b + h * s_h + t[:, None] * s_t + d[None, :], mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def table_rows(ptr, rows, row_ok, width, column, D, BLOCK_D: tl.constexpr):
    """(len(rows), BLOCK_D) fp32 from columns column .. column + D - 1 of a row-major table of `width` columns."""
    d = tl.arange(0, BLOCK_D)
    return tl.load(ptr + rows[:, None] * width + column + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def store_table_rows(ptr, values, rows, row_ok, width, column, D, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    tl.store(ptr + rows[:, None] * width + column + d[None, :], values, mask=row_ok[:, None] & (d[None, :] < D))


@triton.jit
def supernode_weights(prefix_ptr, first_row, clusters, C, D):
    """The weight sums w of rows `clusters` of a step's prefix (first row first_row), and 1 / w (1 where w = 0)."""
    w = tl.load(prefix_ptr + (first_row + clusters) * (2 * D + 1) + 2 * D, mask=clusters < C, other=0.0)
    return w, 1.0 / tl.where(w > 0, w, 1.0)


@triton.jit
def supernode_means(prefix_ptr, first_row, clusters, inverse, column, C, D, BLOCK_D: tl.constexpr):
    """The means (len(clusters), BLOCK_D) of those rows: m (column 0) or n (column D); 0 for an empty cluster."""
    return table_rows(prefix_ptr, first_row + clusters, clusters < C, 2 * D + 1, column, D, BLOCK_D) * inverse[:, None]


@triton.jit
def key_mask(w, keys, C, nonempty):
    """Which of these supernodes are keys: the non-empty ones, or all C where none of the step's `nonempty` is
    (z is then zeroed)."""
    return (keys < C) & ((w > 0) | (nonempty == 0))


@triton.jit
def count_nonempty(w, clusters, C):
    return tl.sum(((clusters < C) & (w > 0)).to(tl.int32), axis=0)


@triton.jit
def scores(u, m, is_key, scale, LOW: tl.constexpr):
    """u m^T * scale over the keys, -inf elsewhere: (len(u), len(m))."""
    return tl.where(is_key[None, :], score_dot(u, tl.trans(m), LOW) * scale, float("-inf"))


@triton.jit
def block_sums_kernel(
    k_ptr, v_ptr, cluster_ptr, own_ptr, sums_ptr, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    T, H, R, C, S, D, block, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row (bh, j, c) of sums: [sum a_s k_s | sum a_s v_s | sum a_s] over block j's tokens s with c_s = c."""
    b, h, r, bh, j = program_ids(H, R)
    clusters = tl.arange(0, BLOCK_C)
    acc_k = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    acc_v = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    acc_w = tl.zeros((BLOCK_C,), tl.float32)
    first = j * block
    end = tl.minimum(first + block, T)
    for start in range(first, end, BLOCK_T):
        t, ok, cluster, own = token_tile(start, end, b, r, T, R, cluster_ptr, own_ptr, BLOCK_T)
        hits = clusters[:, None] == cluster[None, :]  # (BLOCK_C, BLOCK_T)
        k, mask = rows_of(k_ptr, b, h, t, ok, sk_b, sk_h, sk_t, D, BLOCK_D)
        v, mask = rows_of(v_ptr, b, h, t, ok, sv_b, sv_h, sv_t, D, BLOCK_D)
        acc_k = onehot_dot(hits, own[:, None] * k, acc_k, True)
        acc_v = onehot_dot(hits, own[:, None] * v, acc_v, True)
        acc_w += tl.sum(tl.where(hits, own[None, :], 0.0), axis=1)
    rows = (bh * S + j) * C + clusters
    row_ok = clusters < C
    E = 2 * D + 1
    store_table_rows(sums_ptr, acc_k, rows, row_ok, E, 0, D, BLOCK_D)
    store_table_rows(sums_ptr, acc_v, rows, row_ok, E, D, D, BLOCK_D)
    tl.store(sums_ptr + rows * E + 2 * D, acc_w, mask=row_ok)


@triton.jit
def scan_kernel(x_ptr, S, W, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """x (N, S, W) in place: the cumulative sum over S (from the end where REVERSE)."""
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < W
    base = x_ptr + tl.program_id(0).to(tl.int64) * S * W + columns
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, S):
        if REVERSE:
            j = S - 1 - i
        else:
            j = i
        acc += tl.load(base + j * W, mask=mask, other=0.0)
        tl.store(base + j * W, acc, mask=mask)


@triton.jit
def mix_read_kernel(
    prefix_ptr, weight_ptr, gate_ptr, v_ptr, cluster_ptr, own_ptr, out_ptr, z_ptr, lse_ptr, sv_b, sv_h, sv_t, scale,
    T, H, R, C, S, D, block, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
    LOW: tl.constexpr,
):
    """Step j's mixed supernodes z (C, D) and their softmax's log-normaliser, written out (the backward reads them);
    block j + 1's tokens read theirs: v' = v + gate a_t z_{c_t}. Program j = 0 also writes block 0, v' = v."""
    b, h, r, bh, j = program_ids(H, R)
    d = tl.arange(0, BLOCK_D)
    if j == 0:
        for start in range(0, tl.minimum(block, T), BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            v, mask = rows_of(v_ptr, b, h, t, t < tl.minimum(block, T), sv_b, sv_h, sv_t, D, BLOCK_D)
            tl.store(out_ptr + (bh * T + t[:, None]) * D + d[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)
    if j < S:
        first_row = (bh * S + j) * C
        keys = tl.arange(0, BLOCK_C)
        w, inverse = supernode_weights(prefix_ptr, first_row, keys, C, D)
        m = supernode_means(prefix_ptr, first_row, keys, inverse, 0, C, D, BLOCK_D)
        n = supernode_means(prefix_ptr, first_row, keys, inverse, D, C, D, BLOCK_D)
        nonempty = count_nonempty(w, keys, C)
        is_key, has_keys = key_mask(w, keys, C, nonempty), nonempty > 0
        weight_t = tl.load(weight_ptr + d[None, :] * D + d[:, None], mask=(d[None, :] < D) & (d[:, None] < D), other=0.0)  # W_u^T
        for q0 in range(0, BLOCK_C, BLOCK_Q):
            queries = q0 + tl.arange(0, BLOCK_Q)
            w_q, inverse_q = supernode_weights(prefix_ptr, first_row, queries, C, D)
            n_q = supernode_means(prefix_ptr, first_row, queries, inverse_q, D, C, D, BLOCK_D)
            s = scores(mix_dot(n_q, weight_t, None, LOW), m, is_key, scale, LOW)
            top = tl.max(s, axis=1)
            e = tl.exp(s - top[:, None])
            total = tl.sum(e, axis=1)
            z = tl.where(has_keys, score_dot(e / total[:, None], n, LOW), 0.0)
            store_table_rows(z_ptr, z, first_row + queries, queries < C, D, 0, D, BLOCK_D)
            tl.store(lse_ptr + first_row + queries, top + tl.log(total), mask=queries < C)
        tl.debug_barrier()  # z's rows, written by all threads, are gathered by all
        gate = tl.load(gate_ptr + h)
        first = (j + 1) * block
        end = tl.minimum(first + block, T)
        for start in range(first, end, BLOCK_T):
            t, ok, cluster, own = token_tile(start, end, b, r, T, R, cluster_ptr, own_ptr, BLOCK_T)
            v, mask = rows_of(v_ptr, b, h, t, ok, sv_b, sv_h, sv_t, D, BLOCK_D)
            z_t = table_rows(z_ptr, first_row + cluster, ok, D, 0, D, BLOCK_D)
            tl.store(out_ptr + (bh * T + t[:, None]) * D + d[None, :], (v + (gate * own)[:, None] * z_t).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def read_backward_kernel(
    z_ptr, gate_ptr, grad_out_ptr, cluster_ptr, own_ptr, scratch_ptr, grad_own_ptr, grad_gate_ptr,
    T, H, R, C, S, D, block, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Step j's read, backward: from dL/dv' of block j + 1's tokens, dz = dL/dz (one-hot product) into scratch
    (rows of 2 D, columns 0 .. D - 1), and the read's part of the own gates' and the gate's gradients."""
    b, h, r, bh, j = program_ids(H, R)
    first_row = (bh * S + j) * C
    clusters = tl.arange(0, BLOCK_C)
    gate = tl.load(gate_ptr + h)
    dz = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    gate_terms = tl.zeros((BLOCK_T,), tl.float32)
    first = (j + 1) * block
    end = tl.minimum(first + block, T)
    for start in range(first, end, BLOCK_T):
        t, ok, cluster, own = token_tile(start, end, b, r, T, R, cluster_ptr, own_ptr, BLOCK_T)
        grad, mask = rows_of(grad_out_ptr, b, h, t, ok, H * T * D, T * D, D, D, BLOCK_D)
        grad_dot_z = tl.sum(grad * table_rows(z_ptr, first_row + cluster, ok, D, 0, D, BLOCK_D), axis=1)
        tl.store(grad_own_ptr + bh * T + t, gate * grad_dot_z, mask=ok)
        gate_terms += own * grad_dot_z
        dz = onehot_dot(clusters[:, None] == cluster[None, :], (gate * own)[:, None] * grad, dz, False)
    tl.store(grad_gate_ptr + bh * S + j, tl.sum(gate_terms, axis=0))
    store_table_rows(scratch_ptr, dz, first_row + clusters, clusters < C, 2 * D, 0, D, BLOCK_D)


@triton.jit
def mix_backward_kernel(
    prefix_ptr, weight_ptr, z_ptr, lse_ptr, scratch_ptr, grad_prefix_ptr, grad_weight_ptr, scale,
    T, H, R, C, S, D, block, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, LOW: tl.constexpr,
):
    """Step j's mixing, backward, from dz (scratch columns 0 .. D - 1), over chunks of keys as flash attention's
    backward (p from the forward's log-normaliser): the gradient of step j's prefix row, [dL/d k sums |
    dL/d v sums | dL/d weight], and W_u's part. The keys' part of dL/dn goes through scratch (columns D ..)."""
    b, h, r, bh, j = program_ids(H, R)
    first_row = (bh * S + j) * C
    clusters = tl.arange(0, BLOCK_C)
    row_ok = clusters < C
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    E = 2 * D + 1
    w, inverse = supernode_weights(prefix_ptr, first_row, clusters, C, D)
    nonempty = count_nonempty(w, clusters, C)
    has_keys = nonempty > 0
    weight = tl.load(weight_ptr + d[:, None] * D + d[None, :], mask=d_ok[:, None] & d_ok[None, :], other=0.0)
    u = mix_dot(supernode_means(prefix_ptr, first_row, clusters, inverse, D, C, D, BLOCK_D), tl.trans(weight), None, LOW)
    dz = tl.where(has_keys, table_rows(scratch_ptr, first_row + clusters, row_ok, 2 * D, 0, D, BLOCK_D), 0.0)
    delta = tl.sum(dz * table_rows(z_ptr, first_row + clusters, row_ok, D, 0, D, BLOCK_D), axis=1)  # sum_k p dp
    lse = tl.load(lse_ptr + first_row + clusters, mask=row_ok, other=0.0)
    du = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    for k0 in range(0, BLOCK_C, BLOCK_K):
        keys = k0 + tl.arange(0, BLOCK_K)
        w_k, inverse_k = supernode_weights(prefix_ptr, first_row, keys, C, D)
        key_k = key_mask(w_k, keys, C, nonempty)
        m_k = supernode_means(prefix_ptr, first_row, keys, inverse_k, 0, C, D, BLOCK_D)
        n_k = supernode_means(prefix_ptr, first_row, keys, inverse_k, D, C, D, BLOCK_D)
        p = tl.exp(scores(u, m_k, key_k, scale, LOW) - lse[:, None])  # (BLOCK_C, BLOCK_K)
        ds = p * (mix_dot(dz, tl.trans(n_k), None, LOW) - delta[:, None])
        grad_m_k = mix_dot(tl.trans(ds), u, None, LOW) * scale  # complete for these keys
        du = mix_dot(ds, m_k, du, LOW)
        store_table_rows(scratch_ptr, mix_dot(tl.trans(p), dz, None, LOW), first_row + keys, keys < C, 2 * D, D, D, BLOCK_D)
        valid_k = w_k > 0
        rows_k = first_row + keys
        store_table_rows(grad_prefix_ptr, tl.where(valid_k[:, None], grad_m_k * inverse_k[:, None], 0.0), rows_k, keys < C, E, 0, D, BLOCK_D)
        # n = N / w: dL/dw = -(dL/dn . n + dL/dm . m) / w; the m part here, the n part below
        tl.store(grad_prefix_ptr + rows_k * E + 2 * D, tl.where(valid_k, -tl.sum(grad_m_k * m_k, axis=1) * inverse_k, 0.0), mask=keys < C)
    du = du * scale
    n = supernode_means(prefix_ptr, first_row, clusters, inverse, D, C, D, BLOCK_D)
    tl.store(grad_weight_ptr + (bh * S + j) * D * D + d[:, None] * D + d[None, :], mix_dot(tl.trans(du), n, None, LOW), mask=d_ok[:, None] & d_ok[None, :])
    tl.debug_barrier()  # the key chunks' rows are read whole
    grad_n = mix_dot(du, weight, None, LOW) + table_rows(scratch_ptr, first_row + clusters, row_ok, 2 * D, D, D, BLOCK_D)
    valid = w > 0
    rows = first_row + clusters
    grad_w = tl.load(grad_prefix_ptr + rows * E + 2 * D, mask=row_ok, other=0.0) - tl.sum(grad_n * n, axis=1) * inverse
    store_table_rows(grad_prefix_ptr, tl.where(valid[:, None], grad_n * inverse[:, None], 0.0), rows, row_ok, E, D, D, BLOCK_D)
    tl.store(grad_prefix_ptr + rows * E + 2 * D, tl.where(valid, grad_w, 0.0), mask=row_ok)


@triton.jit
def block_sums_backward_kernel(
    grad_prefix_ptr, k_ptr, v_ptr, grad_out_ptr, cluster_ptr, own_ptr, grad_own_read_ptr, grad_k_ptr, grad_v_ptr,
    grad_own_ptr, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    T, H, R, C, S, D, block, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Block j's tokens: each gathers its cluster's row of the suffix-summed prefix gradient (a token of block j is
    in the prefixes of steps j .. S - 1; the last block's in none): dL/dk, dL/dv (plus dL/dv', v' = v + ...) and
    dL/da (plus the read's part, blocks >= 1)."""
    b, h, r, bh, j = program_ids(H, R)
    E = 2 * D + 1
    d = tl.arange(0, BLOCK_D)
    first = j * block
    end = tl.minimum(first + block, T)
    for start in range(first, end, BLOCK_T):
        t, ok, cluster, own = token_tile(start, end, b, r, T, R, cluster_ptr, own_ptr, BLOCK_T)
        rows, summed = (bh * S + j) * C + cluster, ok & (j < S)
        grad_k_sums = table_rows(grad_prefix_ptr, rows, summed, E, 0, D, BLOCK_D)
        grad_v_sums = table_rows(grad_prefix_ptr, rows, summed, E, D, D, BLOCK_D)
        grad_w = tl.load(grad_prefix_ptr + rows * E + 2 * D, mask=summed, other=0.0)
        k, mask = rows_of(k_ptr, b, h, t, ok, sk_b, sk_h, sk_t, D, BLOCK_D)
        v, mask = rows_of(v_ptr, b, h, t, ok, sv_b, sv_h, sv_t, D, BLOCK_D)
        grad, mask = rows_of(grad_out_ptr, b, h, t, ok, H * T * D, T * D, D, D, BLOCK_D)
        grad_own = tl.load(grad_own_read_ptr + bh * T + t, mask=ok & (j > 0), other=0.0)
        grad_own += tl.sum(k * grad_k_sums, axis=1) + tl.sum(v * grad_v_sums, axis=1) + grad_w
        out = (bh * T + t[:, None]) * D + d[None, :]
        tl.store(grad_k_ptr + out, (own[:, None] * grad_k_sums).to(grad_k_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_v_ptr + out, (grad + own[:, None] * grad_v_sums).to(grad_v_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_own_ptr + bh * T + t, grad_own, mask=ok)


SCAN_BLOCK = 512


def launch_settings(C: int, D: int) -> dict:
    """Tile sizes and warps of the per-step kernels: BLOCK_K keys per chunk of the mixing's backward."""
    block_c = max(16, triton.next_power_of_2(C))
    return dict(BLOCK_C=block_c, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_K=min(block_c, 32),
                num_warps=4 if block_c <= 32 else 8 if block_c <= 128 else 16)


def supported(dtype: torch.dtype, C: int) -> bool:
    """Whether the kernels take these inputs: bf16 (training under autocast) at any C; fp32 up to C = 128."""
    return dtype != torch.float32 or C <= 128


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def shapes(v: torch.Tensor, cluster: torch.Tensor, block: int):
    B, H, T, D = v.shape
    S = (T - 1) // block  # the steps a later block reads
    assert B * H * T * D < 2**31, f"sca's fused supernodes index in int32: (B, H, T, D) = {tuple(v.shape)}"
    return B, H, T, D, cluster.shape[1], S


def outputs_like(v: torch.Tensor, S: int, C: int):
    """v' (B, H, T, D), the prefix rows (B H, S, C, 2 D + 1), z (B H, S, C, D) and the log-normalisers (B H, S, C)."""
    B, H, T, D = v.shape
    rows = dict(dtype=torch.float32, device=v.device)
    return torch.empty_like(v, memory_format=torch.contiguous_format), torch.empty(B * H, S, C, 2 * D + 1, **rows), \
        torch.empty(B * H, S, C, D, **rows), torch.empty(B * H, S, C, **rows)


# Opaque custom ops, not triton_op: Inductor's code generation for user-defined Triton kernels failed to compile
# mix_read_kernel (on the H200, torch 2.11), which Triton's own launcher compiles. Launched as they are, the
# kernels are the same; Inductor only cannot fuse into them.
@torch.library.custom_op("attnbench::supernode_values", mutates_args=())
def supernode_values(
    k: torch.Tensor, v: torch.Tensor, cluster: torch.Tensor, own: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor,
    clusters: int, block: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """v' (B, H, T, D) in v's dtype from k, v (B, H, T, D), cluster ids (B, R, T), own gates a_t[c_t] (B, R, T, 1),
    W_u (D, D) and the gate (H,) (fp32); also what the backward reads (`outputs_like`)."""
    B, H, T, D, R, S = shapes(v, cluster, block)
    C, E = clusters, 2 * D + 1
    k, v, cluster, own = unit_stride(k), unit_stride(v), cluster.contiguous(), own.reshape(B, R, T).float().contiguous()
    out, prefix, z, lse = outputs_like(v, S, C)
    settings = launch_settings(C, D)
    block_c, block_d, warps = (settings[key] for key in ("BLOCK_C", "BLOCK_D", "num_warps"))
    sizes = (T, H, R, C, S, D, block)
    if S > 0:
        block_sums_kernel[(B * H, S)](k, v, cluster, own, prefix, *k.stride()[:3], *v.stride()[:3], *sizes,
                                      BLOCK_T=BLOCK_T, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=warps)
        scan_kernel[(B * H, triton.cdiv(C * E, SCAN_BLOCK))](prefix, S, C * E, REVERSE=False, BLOCK=SCAN_BLOCK)
    mix_read_kernel[(B * H, max(S, 1))](
        prefix, weight.contiguous(), gate.contiguous(), v, cluster, own, out, z, lse, *v.stride()[:3], scale, *sizes,
        BLOCK_T=BLOCK_T, BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_Q=settings["BLOCK_K"], LOW=v.dtype != torch.float32, num_warps=warps)
    return out, prefix, z, lse


@supernode_values.register_fake
def _(k, v, cluster, own, weight, gate, clusters, block, scale):
    return outputs_like(v, (v.shape[2] - 1) // block, clusters)


@torch.library.custom_op("attnbench::supernode_values_backward", mutates_args=())
def supernode_values_backward(
    grad_out: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cluster: torch.Tensor, own: torch.Tensor, weight: torch.Tensor,
    gate: torch.Tensor, prefix: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, clusters: int, block: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dL/dk (the supernode path's part), dL/dv, dL/da (B, R, T, 1), dL/dW_u and dL/dgate from dL/dv'."""
    B, H, T, D, R, S = shapes(v, cluster, block)
    C, E = clusters, 2 * D + 1
    k, v, cluster = unit_stride(k), unit_stride(v), cluster.contiguous()
    own, grad_out = own.reshape(B, R, T).float().contiguous(), grad_out.contiguous()
    grad_k, grad_v = (torch.empty(B, H, T, D, dtype=x.dtype, device=v.device) for x in (k, v))
    grad_own_read, grad_own = (torch.empty(B, H, T, dtype=torch.float32, device=v.device) for _ in range(2))
    grad_prefix = torch.empty_like(prefix)
    grad_gate = torch.zeros(B, H, max(S, 1), dtype=torch.float32, device=v.device)
    grad_weight = torch.zeros(B * H * max(S, 1), D, D, dtype=torch.float32, device=v.device)
    settings = launch_settings(C, D)
    block_c, block_d, warps = (settings[key] for key in ("BLOCK_C", "BLOCK_D", "num_warps"))
    sizes = (T, H, R, C, S, D, block)
    if S > 0:
        scratch = torch.empty(B * H, S, C, 2 * D, dtype=torch.float32, device=v.device)
        read_backward_kernel[(B * H, S)](z, gate.contiguous(), grad_out, cluster, own, scratch, grad_own_read, grad_gate, *sizes,
                                         BLOCK_T=BLOCK_T, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=warps)
        mix_backward_kernel[(B * H, S)](prefix, weight.contiguous(), z, lse, scratch, grad_prefix, grad_weight, scale, *sizes,
                                        BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_K=settings["BLOCK_K"], LOW=v.dtype != torch.float32, num_warps=warps)
        scan_kernel[(B * H, triton.cdiv(C * E, SCAN_BLOCK))](grad_prefix, S, C * E, REVERSE=True, BLOCK=SCAN_BLOCK)
    block_sums_backward_kernel[(B * H, S + 1)](
        grad_prefix, k, v, grad_out, cluster, own, grad_own_read, grad_k, grad_v, grad_own,
        *k.stride()[:3], *v.stride()[:3], *sizes, BLOCK_T=BLOCK_T, BLOCK_D=block_d, num_warps=4)
    grad_own = grad_own.view(B, H, T).sum(dim=1, keepdim=True) if R == 1 else grad_own.view(B, H, T)
    return grad_k, grad_v, grad_own.unsqueeze(-1), grad_weight.sum(dim=0), grad_gate.sum(dim=(0, 2))


@supernode_values_backward.register_fake
def _(grad_out, k, v, cluster, own, weight, gate, prefix, z, lse, clusters, block, scale):
    B, H, T, D = v.shape
    return torch.empty_like(k), torch.empty_like(v), own.new_empty(own.shape), weight.new_empty(D, D), gate.new_empty(H)


def setup_context(ctx, inputs, output):
    k, v, cluster, own, weight, gate, clusters, block, scale = inputs
    _, prefix, z, lse = output
    ctx.save_for_backward(k, v, cluster, own, weight, gate, prefix, z, lse)
    ctx.sizes = (clusters, block, scale)


def backward(ctx, grad_out, _grad_prefix, _grad_z, _grad_lse):
    grad_k, grad_v, grad_own, grad_weight, grad_gate = supernode_values_backward(grad_out, *ctx.saved_tensors, *ctx.sizes)
    return grad_k, grad_v, None, grad_own, grad_weight, grad_gate, None, None, None


supernode_values.register_autograd(backward, setup_context=setup_context)
