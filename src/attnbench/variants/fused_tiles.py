"""Triton building blocks of the fused kernels (fused_band, fused_mixing, fused_supernodes, fused_routing): products,
tiles of the rows of (B, H, T, D) arrays, and a flash forward's online softmax step; and the host's side of their
layouts. CUDA tensors, or Triton's CPU interpreter in tests."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")  # Triton's CPU interpreter: tests without a GPU
NEG = tl.constexpr(-1.0e30)  # the running maximum's start: finite, so a tile whose keys are all masked adds 0, not NaN
LOG2E = tl.constexpr(1.4426950408889634)  # the forwards take scores in base 2: exp2 is one instruction


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    if INTERPRET:  # the interpreter's products of 16-bit operands are wrong (numpy has no bf16); the same in fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def online_softmax_step(scores, v, row_max, row_sum, acc, IEEE: tl.constexpr):
    """One key tile of a flash forward, scores (rows, keys) in base 2 and -inf where masked: the rows' running
    maximum, sum of exponentials and output accumulator, carried over the tile."""
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    e = tl.exp2(scores - new_max[:, None])
    shrink = tl.exp2(row_max - new_max)
    return new_max, row_sum * shrink + tl.sum(e, 1), acc * shrink[:, None] + dot(e.to(v.dtype), v, IEEE)


@triton.jit
def token_tile(X, bh, T, index, ok, dims, D):
    """Rows `index` of (bh)'s (T, D) slice of X, zero where not ok or past D."""
    return tl.load(X + (bh * T + index)[:, None] * D + dims[None, :], mask=ok[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit
def slice_offset(bh, H, stride_b, stride_h):
    """Where (bh)'s slice starts in an array of these batch and head strides (0 where broadcast)."""
    return bh // H * stride_b + bh % H * stride_h


@triton.jit
def strided_rows(X, bh, H, stride_b, stride_h, stride_t, index, ok, dims, D):
    """Rows `index` of (bh)'s (T, D) slice of X of these strides (head dims contiguous), zero where not ok or past D."""
    address = slice_offset(bh, H, stride_b, stride_h) + index[:, None] * stride_t + dims[None, :]
    return tl.load(X + address, mask=ok[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit
def store_strided_rows(X, value, bh, H, stride_b, stride_h, stride_t, index, ok, dims, D):
    """value into rows `index` of (bh)'s (T, D) slice of X, in X's dtype (`strided_rows`'s store)."""
    address = slice_offset(bh, H, stride_b, stride_h) + index[:, None] * stride_t + dims[None, :]
    tl.store(X + address, value.to(X.dtype.element_ty), mask=ok[:, None] & (dims < D)[None, :])


@triton.jit
def store_token_tile(X, value, bh, T, index, ok, dims, D):
    """value into rows `index` of (bh)'s (T, D) slice of X, in X's dtype, where ok and within D (`token_tile`'s store)."""
    tl.store(X + (bh * T + index)[:, None] * D + dims[None, :], value.to(X.dtype.element_ty), mask=ok[:, None] & (dims < D)[None, :])


def dot_tile(size: int) -> int:
    """Rows or columns of a tile that `dot` multiplies: a power of two, at least 16 (tl.dot's least)."""
    return max(16, triton.next_power_of_2(size))


def dot_options(x: torch.Tensor) -> dict:
    """The kernels' head-dimension tile for x's last dimension, and IEEE products for fp32 x (not TF32)."""
    return dict(BLOCK_D=dot_tile(x.shape[-1]), IEEE=x.dtype == torch.float32)


def row_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and row strides of a (B, H, T, D) array with contiguous head dims, whose offsets within a (batch
    row, head) slice the kernels take in int32."""
    assert t.stride(-1) == 1, f"strides {t.stride()}: the kernels read rows with contiguous head dims"
    extent = 1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))  # elements that t's rows span
    assert extent < 2**31, f"an array spanning {extent} elements: the kernels index rows in int32"
    return t.stride(0), t.stride(1), t.stride(2)


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t where its head dims are contiguous (what the kernels' strided rows need), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()
