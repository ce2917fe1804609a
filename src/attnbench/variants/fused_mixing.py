"""sca's supernode mixing as Triton kernels (CUDA): thousands of small masked attention problems.

The mixing is one attention problem per (batch row, head, step): L = C (padded to 8) supernode queries attend
over the L supernodes of that step whose mask bit is set (the non-empty ones). At T = 8K that is 4,032
problems of 96 x 96 with D = 64, about 33 GFLOP fwd+bwd in all, yet sdpa's memory-efficient kernel (the only
one taking a boolean mask) took 1.25 ms fwd+bwd on the H200, FlexAttention 1.39 ms and the fused kernels with
the mask folded into one more feature 1.85 ms (reports/benchmarks/NVIDIA-H200.md, stop 22). Here a program owns
a tile of query rows (forward, dq) or of keys (dk, dv) of one problem and loops over the rest of it, flash-style: no
(L, L) tensor is stored, the forward keeps each row's log-sum-exp for the backward. A problem of at most 128
supernodes (T <= 16K) runs its whole backward in one program, which holds all its keys.

The queries are the supernodes' own states through W_u, u = n W_u^T, with keys m and values n. The kernels form u
per tile of rows from n, and the backward adds n's gradient through the queries (du W_u) to its gradient as a value,
so neither u nor du W_u is a (P, L, D) tensor written and read again (in sca's step at 8K on the H200 they had cost
a GEMM each way and an add, about 0.09 ms). W_u's own gradient, du^T n, the whole-problem backward (below) sums
in each program as it forms du, so du is never stored either; for larger problems it is one GEMM from du.

Layout: n, m (P, L, D) contiguous, P = the problems; W_u (D, D); keys (P, L) int8, 1 where the supernode is a key.
A problem without keys gives zero rows and passes no gradient (what sca's `mix` defines for a step without
non-empty supernodes), so the caller needs no masking pass of its own over the output and its gradient. Products
run in the inputs' dtype with fp32 accumulation (bf16 under autocast, as sdpa would); fp32 inputs use IEEE
products, not TF32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_tiles import LOG2E, NEG, dot, dot_options, dot_tile, online_softmax_step

BLOCK = 64  # query rows per dq program, keys per dk-dv program, and the tile of their loops
NUM_WARPS = 4
# Problems of at most WHOLE_KEYS supernodes (C <= 128: T <= 16K) run their backward whole, each in one program
# (whole_backward_kernel), with these settings: at sca's 8K shape (4,032 problems of 96) on the H200 it took
# 266 us against 330 for dq_kernel + dkdv_kernel (stop 27). Since it forms the queries from n, 32-row tiles without
# pipelining took 311 us against 324 for 16-row tiles with 3 stages, the fastest of 12 settings (16 or 32 rows, 4 or 8
# warps, 1-3 stages: 311-521 us; stop 36, reports/benchmarks/NVIDIA-H200-stop36-probes.log).
# Since stop 54 a program takes several problems (WHOLE_PER_SM per multiprocessor), sums its part of W_u's gradient
# and holds the keys in two tiles (64 + 32 at 96). At the 8K shape on the H100 that backward, W_u's gradient included,
# took 335-341 us with 2 stages, against 368-370 for the one-tile kernel and cuBLAS's GEMM from the stored du. With
# 1 stage: 355-356 us at 2 programs per multiprocessor, 580 at 1, 443-444 at 3, 362 at 4, 362-375 at 8; 16-row tiles
# 383-387, 8 warps or 64-row tiles 448-494 (reports/benchmarks/NVIDIA-H100-80GB-HBM3-stop54-probes.md).
WHOLE_KEYS = 128
# The forward's rows per program and keys per loop step for problems of 65 to WHOLE_KEYS supernodes, which one
# program of 128 rows holds and one of 64 would not: at sca's 8K shape (96) on the H200 128 rows over 32-key tiles,
# 8 warps, took 100 us against 120 for 64 x 64 with 4 warps, the fastest of 34 settings (stop 37,
# NVIDIA-H200-stop37-probes.log). Other sizes keep 64 x 64: with 128 rows sca's step at 32K (problems of 184) was
# 0.05 ms slower in one A/B pair; no other setting was measured there or below 65.
FORWARD_OPTIONS = {"BLOCK": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
WHOLE_OPTIONS = {"BLOCK": 32, "num_warps": 4, "num_stages": 2}
WHOLE_PER_SM = 2


@triton.jit
def load_tile(ptr, p, start, L, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows start .. start + BLOCK of problem p, zero past L and D."""
    rows = start + tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < L)[:, None] & (dims < D)[None, :]
    return tl.load(ptr + (p * L + rows)[:, None] * D + dims[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, value, p, start, L, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = start + tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < L)[:, None] & (dims < D)[None, :]
    tl.store(ptr + (p * L + rows)[:, None] * D + dims[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def key_bits(KEYS, p, start, L, BLOCK: tl.constexpr):
    cols = start + tl.arange(0, BLOCK)
    return tl.load(KEYS + p * L + cols, mask=cols < L, other=0) != 0


@triton.jit
def key_tile(N, M, KEYS, p, start, L, D, KEYS_TILE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Keys start .. start + KEYS_TILE of problem p: k = m, v = n, which are keys, and their dk, dv accumulators."""
    k = load_tile(M, p, start, L, D, KEYS_TILE, BLOCK_D)
    v = load_tile(N, p, start, L, D, KEYS_TILE, BLOCK_D)
    key = key_bits(KEYS, p, start, L, KEYS_TILE)
    return k, v, key, tl.zeros([KEYS_TILE, BLOCK_D], tl.float32), tl.zeros([KEYS_TILE, BLOCK_D], tl.float32)


@triton.jit
def load_weight(WU, D, BLOCK_D: tl.constexpr):
    """W_u (D, D), zero past D."""
    dims = tl.arange(0, BLOCK_D)
    mask = (dims < D)[:, None] & (dims < D)[None, :]
    return tl.load(WU + dims[:, None] * D + dims[None, :], mask=mask, other=0.0)


@triton.jit
def query_tile(n, w, IEEE: tl.constexpr):
    """The queries u = W_u n of a tile of rows of n, rounded to n's dtype as F.linear's output would be."""
    return dot(n, tl.trans(w), IEEE).to(n.dtype)


@triton.jit
def forward_kernel(N, M, WU, KEYS, O, LSE, L, D, scale,
                   BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """Rows start_m .. start_m + BLOCK of problem p over its keys in tiles of BLOCK_N."""
    p = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK
    q = query_tile(load_tile(N, p, start_m, L, D, BLOCK, BLOCK_D), load_weight(WU, D, BLOCK_D), IEEE)
    row_max = tl.full([BLOCK], NEG, tl.float32)
    row_sum = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        k = load_tile(M, p, start_n, L, D, BLOCK_N, BLOCK_D)
        v = load_tile(N, p, start_n, L, D, BLOCK_N, BLOCK_D)
        s = dot(q, tl.trans(k), IEEE) * (scale * LOG2E)
        s = tl.where(key_bits(KEYS, p, start_n, L, BLOCK_N)[None, :], s, float("-inf"))
        row_max, row_sum, acc = online_softmax_step(s, v, row_max, row_sum, acc, IEEE)
    # No key: acc and row_sum are 0, the output 0, and the log-sum-exp -inf, so the backward's probabilities are 0.
    store_tile(O, acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None], p, start_m, L, D, BLOCK, BLOCK_D)
    rows = start_m + tl.arange(0, BLOCK)
    # The log-sum-exp in natural base, as the backward reads it.
    tl.store(LSE + p * L + rows, (row_max + tl.log2(row_sum)) / LOG2E, mask=rows < L)


@triton.jit
def row_tile(n, w, O, LSE, DO, p, start_m, L, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """What the backward needs of rows start_m .. start_m + BLOCK, whose n is given: q = u, do, delta = rowsum(do * o),
    the log-sum-exp."""
    rows = start_m + tl.arange(0, BLOCK)
    q = query_tile(n, w, IEEE)
    do = load_tile(DO, p, start_m, L, D, BLOCK, BLOCK_D)
    delta = tl.sum(do.to(tl.float32) * load_tile(O, p, start_m, L, D, BLOCK, BLOCK_D).to(tl.float32), 1)
    lse = tl.load(LSE + p * L + rows, mask=rows < L, other=0.0)
    return q, do, delta, lse


@triton.jit
def store_query_gradient(DN, dq, w, p, start_m, L, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """Stores n's gradient through the queries, du W_u, into DN, where the keys' pass adds the values' part; returns
    du rounded to n's dtype, which W_u's gradient is formed from."""
    du = dq.to(DN.dtype.element_ty)
    store_tile(DN, dot(du, w, IEEE), p, start_m, L, D, BLOCK, BLOCK_D)
    return du


@triton.jit
def probs_and_ds(q, k, v, do, delta, lse, pair_ok, scale, IEEE: tl.constexpr):
    """(rows, keys) probabilities, 0 where not pair_ok, and the scores' gradient (without `scale`)."""
    prob = tl.where(pair_ok, tl.exp(dot(q, tl.trans(k), IEEE) * scale - lse[:, None]), 0.0)
    return prob, prob * (dot(do, tl.trans(v), IEEE) - delta[:, None])


@triton.jit
def dq_kernel(N, M, WU, KEYS, O, LSE, DO, DU, DN, L, D, scale,
              BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK
    w = load_weight(WU, D, BLOCK_D)
    n = load_tile(N, p, start_m, L, D, BLOCK, BLOCK_D)
    q, do, delta, lse = row_tile(n, w, O, LSE, DO, p, start_m, L, D, BLOCK, BLOCK_D, IEEE)
    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for start_n in range(0, L, BLOCK):
        k = load_tile(M, p, start_n, L, D, BLOCK, BLOCK_D)
        v = load_tile(N, p, start_n, L, D, BLOCK, BLOCK_D)
        _, ds = probs_and_ds(q, k, v, do, delta, lse, key_bits(KEYS, p, start_n, L, BLOCK)[None, :], scale, IEEE)
        dq += dot(ds.to(k.dtype), k, IEEE)
    du = store_query_gradient(DN, dq * scale, w, p, start_m, L, D, BLOCK, BLOCK_D, IEEE)
    store_tile(DU, du, p, start_m, L, D, BLOCK, BLOCK_D)


@triton.jit
def store_key_gradients(DN, DM, dk, dv, p, start, L, D, scale, KEYS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tile of keys' dm, and dn = the queries' part the row tiles stored in DN + the values' part."""
    store_tile(DM, dk * scale, p, start, L, D, KEYS, BLOCK_D)
    store_tile(DN, dv + load_tile(DN, p, start, L, D, KEYS, BLOCK_D).to(tl.float32), p, start, L, D, KEYS, BLOCK_D)


@triton.jit
def dkdv_kernel(N, M, WU, KEYS, O, LSE, DO, DN, DM, L, D, scale,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """After dq_kernel: dm, and dn = the queries' part that dq_kernel stored in DN + the values' part."""
    p = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK
    w = load_weight(WU, D, BLOCK_D)
    k, v, key, dk, dv = key_tile(N, M, KEYS, p, start_n, L, D, BLOCK, BLOCK_D)
    for start_m in range(0, L, BLOCK):
        rows = start_m + tl.arange(0, BLOCK)
        n = load_tile(N, p, start_m, L, D, BLOCK, BLOCK_D)
        q, do, delta, lse = row_tile(n, w, O, LSE, DO, p, start_m, L, D, BLOCK, BLOCK_D, IEEE)
        s_t = dot(k, tl.trans(q), IEEE) * scale  # (keys, rows)
        prob_t = tl.where(key[:, None] & (rows < L)[None, :], tl.exp(s_t - lse[None, :]), 0.0)
        dv += dot(prob_t.to(do.dtype), do, IEEE)
        ds_t = prob_t * (dot(v, tl.trans(do), IEEE) - delta[None, :])
        dk += dot(ds_t.to(q.dtype), q, IEEE)
    store_key_gradients(DN, DM, dk, dv, p, start_n, L, D, scale, BLOCK, BLOCK_D)


@triton.jit
def key_tile_backward(q, do, delta, lse, rows_ok, k, v, key, dk, dv, scale, IEEE: tl.constexpr):
    """One tile of keys' part of a row tile's backward: the rows' dq from these keys, and the keys' dk and dv plus
    the rows' parts. The rows' log-sum-exp covers all keys, so each tile's probabilities stand alone."""
    prob, ds = probs_and_ds(q, k, v, do, delta, lse, key[None, :] & rows_ok[:, None], scale, IEEE)
    dv += dot(tl.trans(prob.to(do.dtype)), do, IEEE)
    dk += dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    return dot(ds.to(k.dtype), k, IEEE), dk, dv


@triton.jit
def whole_backward_kernel(N, M, WU, KEYS, O, LSE, DO, DN, DM, DW, P, L, D, scale, BLOCK: tl.constexpr,
                          KEYS_A: tl.constexpr, KEYS_B: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """dn and dm of whole problems, L <= KEYS_A + KEYS_B, and this program's part of W_u's gradient: every key of a
    problem is in its program, so each row tile's du is complete where it is formed, n, m, o and do are read once
    (dq_kernel and dkdv_kernel read them twice), and du goes into du^T n at once instead of out to memory. The keys
    sit in two tiles, KEYS_A then KEYS_B (0: none), so that 96 keys cost 64 + 32 columns of each product, not 128.
    A program takes the problems pid, pid + programs, ...: few programs, so their parts of W_u's gradient, (programs,
    D, D) fp32, are few bytes to add up."""
    w = load_weight(WU, D, BLOCK_D)
    dw = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    for problem in range(tl.program_id(0), P, tl.num_programs(0)):
        p = tl.cast(problem, tl.int64)
        k_a, v_a, key_a, dk_a, dv_a = key_tile(N, M, KEYS, p, 0, L, D, KEYS_A, BLOCK_D)
        if KEYS_B > 0:
            k_b, v_b, key_b, dk_b, dv_b = key_tile(N, M, KEYS, p, KEYS_A, L, D, KEYS_B, BLOCK_D)
        for start_m in range(0, L, BLOCK):
            rows_ok = start_m + tl.arange(0, BLOCK) < L
            n = load_tile(N, p, start_m, L, D, BLOCK, BLOCK_D)
            q, do, delta, lse = row_tile(n, w, O, LSE, DO, p, start_m, L, D, BLOCK, BLOCK_D, IEEE)
            dq, dk_a, dv_a = key_tile_backward(q, do, delta, lse, rows_ok, k_a, v_a, key_a, dk_a, dv_a, scale, IEEE)
            if KEYS_B > 0:
                dq_b, dk_b, dv_b = key_tile_backward(q, do, delta, lse, rows_ok, k_b, v_b, key_b, dk_b, dv_b, scale,
                                                     IEEE)
                dq += dq_b
            du = store_query_gradient(DN, dq * scale, w, p, start_m, L, D, BLOCK, BLOCK_D, IEEE)
            dw += dot(tl.trans(du), n, IEEE)
        tl.debug_barrier()  # the row tiles' stores to DN, by other threads of this program, before they are read
        store_key_gradients(DN, DM, dk_a, dv_a, p, 0, L, D, scale, KEYS_A, BLOCK_D)
        if KEYS_B > 0:
            store_key_gradients(DN, DM, dk_b, dv_b, p, KEYS_A, L, D, scale, KEYS_B, BLOCK_D)
    dims = tl.arange(0, BLOCK_D)
    mask = (dims < D)[:, None] & (dims < D)[None, :]
    tl.store(DW + tl.program_id(0) * D * D + dims[:, None] * D + dims[None, :], dw, mask=mask)


def whole_key_tiles(L: int) -> dict:
    """The whole backward's two tiles of keys for L >= 1 of them: the largest power of two that L fills, at least 16
    (tl.dot's least, so one tile for L <= 16), then the rest rounded up to a tile (none if nothing is left)."""
    first = max(16, 1 << (L.bit_length() - 1))
    return dict(KEYS_A=first, KEYS_B=dot_tile(L - first) if L > first else 0)


def launch_options(n: torch.Tensor) -> dict:
    """The split backward's tiles (dq_kernel, dkdv_kernel) for problems n (P, L, D), and the base of the others'."""
    return dict(BLOCK=BLOCK, num_warps=NUM_WARPS, **dot_options(n))


def forward_options(n: torch.Tensor) -> dict:
    L = n.shape[1]
    return launch_options(n) | (FORWARD_OPTIONS if BLOCK < L <= WHOLE_KEYS else {"BLOCK_N": BLOCK})


def whole_options(n: torch.Tensor) -> dict:
    return launch_options(n) | WHOLE_OPTIONS | whole_key_tiles(n.shape[1])


# Opaque custom ops: Inductor calls them as they are and Triton's own launcher compiles the kernels, as in eager
# mode. As `triton_op`s, Inductor's code generation for user-defined Triton kernels failed on them (stop 22, call 6).
@torch.library.custom_op("attnbench::supernode_mixing", mutates_args=())
def supernode_mixing(n: torch.Tensor, m: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(u m^T * scale, over the keys marked) n per problem, u = n W_u^T: n, m (P, L, D), W_u (D, D) in n's
    dtype, keys (P, L) int8 -> z (P, L, D) in n's dtype and the rows' log-sum-exp (P, L) fp32."""
    n, m, weight, keys = (t.contiguous() for t in (n, m, weight, keys))
    z, lse = supernode_mixing_fake(n, m, weight, keys, scale)
    P, L, D = n.shape
    options = forward_options(n)
    forward_kernel[(P, triton.cdiv(L, options["BLOCK"]))](n, m, weight, keys, z, lse, L, D, scale, **options)
    return z, lse


@supernode_mixing.register_fake
def supernode_mixing_fake(n, m, weight, keys, scale):
    P, L, D = n.shape
    return torch.empty(P, L, D, dtype=n.dtype, device=n.device), torch.empty(P, L, dtype=torch.float32, device=n.device)


def whole_programs(P: int, device: torch.device) -> int:
    """Programs of the whole backward: WHOLE_PER_SM per multiprocessor, at most one per problem; for tensors off CUDA
    (Triton's interpreter) 2, so that tests see programs take several problems."""
    if device.type != "cuda":
        return min(P, 2)
    return min(P, WHOLE_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)


@torch.library.custom_op("attnbench::supernode_mixing_backward", mutates_args=())
def supernode_mixing_backward(n: torch.Tensor, m: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor, z: torch.Tensor,
                              lse: torch.Tensor, grad_z: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of n (through the queries and the values) and of m, (P, L, D), and of W_u, (D, D), in n's
    dtype (W_u's summed in fp32)."""
    grad_z = grad_z.contiguous()
    P, L, D = n.shape
    grad_n, grad_m, _ = supernode_mixing_backward_fake(n, m, weight, keys, z, lse, grad_z, scale)
    if L <= WHOLE_KEYS:
        programs = whole_programs(P, n.device)
        parts = torch.empty(programs, D, D, dtype=torch.float32, device=n.device)
        whole_backward_kernel[(programs,)](n, m, weight, keys, z, lse, grad_z, grad_n, grad_m, parts, P, L, D, scale,
                                           **whole_options(n))
        return grad_n, grad_m, parts.sum(dim=0).to(n.dtype)
    grad_u = torch.empty_like(n)
    grid = (P, triton.cdiv(L, BLOCK))
    dq_kernel[grid](n, m, weight, keys, z, lse, grad_z, grad_u, grad_n, L, D, scale, **launch_options(n))
    dkdv_kernel[grid](n, m, weight, keys, z, lse, grad_z, grad_n, grad_m, L, D, scale, **launch_options(n))
    return grad_n, grad_m, grad_u.flatten(0, 1).T @ n.flatten(0, 1)  # (D, D): u = n W_u^T


@supernode_mixing_backward.register_fake
def supernode_mixing_backward_fake(n, m, weight, keys, z, lse, grad_z, scale):
    return torch.empty_like(n), torch.empty_like(n), n.new_empty(n.shape[-1], n.shape[-1])


def setup_context(ctx, inputs, output):
    n, m, weight, keys, scale = inputs
    z, lse = output
    ctx.save_for_backward(n.contiguous(), m.contiguous(), weight.contiguous(), keys.contiguous(), z, lse)
    ctx.scale = scale


def backward(ctx, grad_z, _grad_lse):
    n, m, weight, keys, z, lse = ctx.saved_tensors
    grad_n, grad_m, grad_weight = supernode_mixing_backward(n, m, weight, keys, z, lse, grad_z, ctx.scale)
    return grad_n, grad_m, grad_weight, None, None


supernode_mixing.register_autograd(backward, setup_context=setup_context)
