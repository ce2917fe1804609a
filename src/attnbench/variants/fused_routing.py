"""lca's training-time routing fused into Triton kernels (CUDA): noise, softmax, argmax, own gate, balance loss.

Computes what `routing` defines (`route` + `own_gate` + `balance_loss`) in
three passes over the router's logits: the forward's route kernel and balance
kernel, and one backward kernel, which recomputes the noise and both softmaxes
instead of storing (B, T, R, C) tensors. The plain form under torch.compile
made about ten fp32 passes over them. On the H100 (bf16 logits, forward and
backward) the routing took 1.12 ms fused against 1.73 ms plain at T = 8K
(728 logits per token), 1.95 against 4.81 ms at 32K; lca's whole layer ran
21.2 against 17.4 Mtok/s at 8K (measured; reports/benchmarks).

The noise is Triton's Philox generator keyed by a seed that `draw_seed` takes
from torch's generator; `gumbel_noise` writes the same noise out, so lca's
reference path on CUDA draws exactly what the fused path draws.

Logits are laid out as the router's linear gives them, (B, T, R, C) with
R = H or 1 routers; row n = (b T + t) R + r holds C logits.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .routing import block_shares

LN2, LOG2E = tl.constexpr(0.6931471805599453), tl.constexpr(1.4426950408889634)
TINY = tl.constexpr(1.1754943508222875e-38)  # fp32's smallest normal, as routing's clamp
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")  # Triton's CPU interpreter: tests without a GPU
# Rows per program and warps: (4, 2) was within 5% of the best of 16 settings at T = 8K and the best at
# 32K for the forward and backward together (H100, measured); the worst ran 2x-4x slower.
ROWS, NUM_WARPS = 4, 2


@triton.jit
def approx_log2(x):
    """PTX's lg2.approx: the accurate log2 made the noise cost 5x its memory traffic (0.34 against 0.06 ms for
    47.7M values on the H100, measured); absolute error ~2^-22, which only the tail noted in gumbel_rows feels.
    The interpreter runs no PTX: there it is the accurate log2."""
    if INTERPRET:
        return tl.log2(x)
    return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def gumbel_rows(seed, rows, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Gumbel noise (ROWS, BLOCK_C) for these rows: one Philox call per 4 columns (tl.rand4x), column 4 j + i
    taking output i of call j (0.34 against 0.41 ms for one call per value, 47.7M values, H100, measured)."""
    counters = rows[:, None] * (BLOCK_C // 4) + tl.arange(0, BLOCK_C // 4)[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, counters)
    u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (ROWS, BLOCK_C))
    # -log(-log u), each log clamped above 0: for u within ~2^-22 of 1 (probability ~1e-7) the approximate log
    # may round -log u to 0, where the true noise is above 15 and wins its row's argmax anyway.
    exponential = tl.maximum(-LN2 * approx_log2(tl.maximum(u, TINY)), TINY)
    return -LN2 * approx_log2(exponential)


@triton.jit
def tile(N, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's rows (ROWS,), columns (BLOCK_C,), and the offsets and mask (ROWS, BLOCK_C) of its (N, C) entries."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    return rows, cols, rows[:, None] * C + cols[None, :], (rows[:, None] < N) & (cols[None, :] < C)


@triton.jit
def load_rows(logits_ptr, N, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """`tile`, and this program's logits in fp32 (-inf outside the mask)."""
    rows, cols, offsets, mask = tile(N, C, ROWS, BLOCK_C)
    # -inf in the padding columns only: a row past N stays finite (no inf - inf in its softmax).
    logits = tl.where(cols[None, :] < C, tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32), float("-inf"))
    return rows, cols, offsets, mask, logits


@triton.jit
def softmax_rows(z):
    e = tl.exp2((z - tl.max(z, axis=1)[:, None]) * LOG2E)
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def shares_of_rows(share_ptr, rows, cols, mask, C, R, T, n_blocks, block):
    """F_t (ROWS, BLOCK_C) for each row's (b, r, block of t) from the shares (B, R, n_blocks, C)."""
    b, t, r = rows // (T * R), rows // R % T, rows % R
    offsets = ((b * R + r) * n_blocks + t // block) * C
    return tl.load(share_ptr + offsets[:, None] + cols[None, :], mask=mask, other=0.0)


@triton.jit
def noise_kernel(seed_ptr, out_ptr, N, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The route kernels' noise written out (N, C), for the reference path."""
    rows, _, offsets, mask = tile(N, C, ROWS, BLOCK_C)
    tl.store(out_ptr + offsets, gumbel_rows(tl.load(seed_ptr), rows, ROWS, BLOCK_C), mask=mask)


@triton.jit
def route_kernel(logits_ptr, seed_ptr, tau_ptr, cluster_ptr, own_ptr, N, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """c_t = argmax (r_t + g_t) and y_t[c_t] = 1 / sum_c exp(z_c - z_{c_t}), z = (r + g) / tau."""
    rows, cols, offsets, mask, logits = load_rows(logits_ptr, N, C, ROWS, BLOCK_C)
    z = (logits + gumbel_rows(tl.load(seed_ptr), rows, ROWS, BLOCK_C)) * (1.0 / tl.load(tau_ptr))
    top = tl.max(z, axis=1)
    tl.store(cluster_ptr + rows, tl.argmax(z, axis=1).to(tl.int64), mask=rows < N)
    tl.store(own_ptr + rows, 1.0 / tl.sum(tl.exp2((z - top[:, None]) * LOG2E), axis=1), mask=rows < N)


@triton.jit
def balance_kernel(logits_ptr, share_ptr, terms_ptr, N, C, R, T, n_blocks, block, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The balance loss's terms sum_c F_t[c] p_t[c], p_t = softmax(r_t)."""
    rows, cols, offsets, mask, logits = load_rows(logits_ptr, N, C, ROWS, BLOCK_C)
    share = shares_of_rows(share_ptr, rows, cols, mask, C, R, T, n_blocks, block)
    tl.store(terms_ptr + rows, tl.sum(softmax_rows(logits) * share, axis=1), mask=rows < N)


@triton.jit
def route_backward_kernel(
    logits_ptr, seed_ptr, tau_ptr, cluster_ptr, share_ptr, grad_own_ptr, grad_terms_ptr, grad_ptr,
    N, C, R, T, n_blocks, block, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dL/dr = g_own y_c (onehot_c - y) / tau + g_terms p (F - sum_c F_c p_c), the noise regenerated from the seed."""
    rows, cols, offsets, mask, logits = load_rows(logits_ptr, N, C, ROWS, BLOCK_C)
    inverse_tau = 1.0 / tl.load(tau_ptr)
    y = softmax_rows((logits + gumbel_rows(tl.load(seed_ptr), rows, ROWS, BLOCK_C)) * inverse_tau)
    own = cols[None, :] == tl.load(cluster_ptr + rows, mask=rows < N, other=0)[:, None]
    y_own = tl.sum(tl.where(own, y, 0.0), axis=1)
    grad_own = tl.load(grad_own_ptr + rows, mask=rows < N, other=0.0)
    grad = (grad_own * y_own * inverse_tau)[:, None] * (own.to(tl.float32) - y)
    p = softmax_rows(logits)
    share = shares_of_rows(share_ptr, rows, cols, mask, C, R, T, n_blocks, block)
    terms = tl.sum(p * share, axis=1)
    grad += tl.load(grad_terms_ptr + rows, mask=rows < N, other=0.0)[:, None] * p * (share - terms[:, None])
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def draw_seed(device: torch.device) -> torch.Tensor:
    """The Philox seed (1,) int64 on `device`, from torch's generator: a manual seed fixes the noise."""
    return torch.randint(2**31 - 1, (1,), device=device)


def launch(logits: torch.Tensor):
    """Rows N, the grid and the column block for kernels over logits (..., C)."""
    N = logits.numel() // logits.shape[-1]
    # Philox offsets and row offsets are int32 inside the kernels.
    assert logits.numel() < 2**31, f"router logits of {logits.numel()} elements: the fused routing indexes them in int32"
    return N, (triton.cdiv(N, ROWS),), max(16, triton.next_power_of_2(logits.shape[-1]))


@triton_op("attnbench::gumbel_noise", mutates_args=())
def gumbel_noise(seed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The fused route's noise for logits of this shape and seed, written out (fp32), for the reference path."""
    noise = torch.empty(shape, dtype=torch.float32, device=seed.device)
    N, grid, BLOCK_C = launch(noise)
    wrap_triton(noise_kernel)[grid](seed, noise, N, shape[-1], ROWS=ROWS, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    return noise


@triton_op("attnbench::gumbel_route", mutates_args=())
def gumbel_route(logits: torch.Tensor, seed: torch.Tensor, tau: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, T, R, C) -> cluster ids (B, T, R) int64, y_t[c_t] (B, T, R) fp32 (the own gate's soft value),
    the balance loss's terms (B, T, R) fp32, and the block shares (B, R, n, C) the backward reads."""
    B, T, R, C = logits.shape
    logits = logits.contiguous()
    N, grid, BLOCK_C = launch(logits)
    cluster = torch.empty(B, T, R, dtype=torch.int64, device=logits.device)
    own = torch.empty(B, T, R, dtype=torch.float32, device=logits.device)
    wrap_triton(route_kernel)[grid](logits, seed, tau, cluster, own, N, C, ROWS=ROWS, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    share = block_shares(cluster.transpose(1, 2), C, block).contiguous()  # (B, R, n, C)
    terms = torch.empty_like(own)
    wrap_triton(balance_kernel)[grid](logits, share, terms, N, C, R, T, share.shape[2], block, ROWS=ROWS, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    return cluster, own, terms, share


@triton_op("attnbench::gumbel_route_backward", mutates_args=())
def gumbel_route_backward(
    logits: torch.Tensor, seed: torch.Tensor, tau: torch.Tensor, cluster: torch.Tensor, share: torch.Tensor,
    grad_own: torch.Tensor, grad_terms: torch.Tensor, block: int,
) -> torch.Tensor:
    B, T, R, C = logits.shape
    logits = logits.contiguous()
    N, grid, BLOCK_C = launch(logits)
    grad = torch.empty_like(logits)
    wrap_triton(route_backward_kernel)[grid](
        logits, seed, tau, cluster, share, grad_own.contiguous(), grad_terms.contiguous(), grad,
        N, C, R, T, share.shape[2], block, ROWS=ROWS, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
    )
    return grad


def setup_context(ctx, inputs, output):
    logits, seed, tau, block = inputs
    cluster, _, _, share = output
    ctx.save_for_backward(logits, seed, tau, cluster, share)
    ctx.block = block


def backward(ctx, _grad_cluster, grad_own, grad_terms, _grad_share):
    logits, seed, tau, cluster, share = ctx.saved_tensors
    grad_own = torch.zeros_like(cluster, dtype=torch.float32) if grad_own is None else grad_own
    grad_terms = torch.zeros_like(cluster, dtype=torch.float32) if grad_terms is None else grad_terms
    return gumbel_route_backward(logits, seed, tau, cluster, share, grad_own, grad_terms, ctx.block), None, None, None


gumbel_route.register_autograd(backward, setup_context=setup_context)
