"""fastcka: cka for training: the same function and parameters, without keeping the T x b scores.

The intra term is block-diagonal causal softmax attention that also returns its log-sum-exp
(lse_t = log sum_s e_ts): on GPU a compiled FlexAttention kernel, so no scores are kept, with
flex.py's band mask (band = the query's own block), built from tile lists, never from T x T pairs.
The inter term is cka's prefix sum over blocks, in fp32 (its matmuls in bf16 under autocast). With the intra mean o_intra, and the inter
mean o_inter and log Z_t from cka, the one normaliser is

    out_t = sigmoid(lse_t - log Z_t) o_intra_t + sigmoid(log Z_t - lse_t) o_inter_t,

exactly cka's out_t, stable for any scores, and (log Z = -inf) pure intra where no block precedes.
On CPU (tests, no fused kernel there) the intra term is the plain per-block computation.
"""

from __future__ import annotations

import torch

from .base import from_blocks, register, to_blocks
from .cka import ClusterKernelAttention, block_scores
from .flex import band_block_mask, flex_kernel, kernel_options


def block_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each query over the keys s <= t of its own block, plain per-block form.

    q, k, v: (B, H, T, D). Returns out (B, H, T, D) and its log-sum-exp (B, H, T), both fp32.
    """
    T = q.shape[-2]
    scores = block_scores(q.float(), k.float(), block, scale)  # (B, H, C, b, b)
    lse = scores.logsumexp(dim=-1, keepdim=True)  # (B, H, C, b, 1)
    out = (scores - lse).exp() @ to_blocks(v.float(), block)  # (B, H, C, b, D)
    return from_blocks(out, T), from_blocks(lse, T).squeeze(-1)


def flex_block_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """block_causal_attention on FlexAttention: out (B, H, T, D) in q's dtype, lse (B, H, T) fp32 (natural log).

    The GPU path: a band mask (flex.py) whose band starts at each query's block, under torch.compile.
    Elsewhere the eager kernel, forward only on CPU, so tests can check it against the plain path.
    """
    from torch.nn.attention.flex_attention import AuxRequest  # imported on first use, as in flex.py

    T = q.shape[-2]
    block_start = torch.arange(T, device=q.device) // block * block  # (T,): first key each query sees
    out, aux = flex_kernel(q.device)(
        q, k, v, block_mask=band_block_mask(block_start.view(1, 1, T)), scale=scale, return_aux=AuxRequest(lse=True),
        kernel_options=kernel_options(q),
    )
    return out, aux.lse


@register("fastcka")
class FastClusterKernelAttention(ClusterKernelAttention):
    """cka's function and parameters (reference path inherited); efficient path in O(T) memory on GPU."""

    compute_exponent = 1.5  # cka's, without its T x b scores kept

    def efficient(self, q, k, v, x):
        attend = flex_block_causal_attention if q.is_cuda else block_causal_attention
        o_intra, lse = attend(q, k, v, self.block, self.scale)  # (B, H, T, D), (B, H, T)
        o_inter, log_Z = self.inter(q.float(), k.float(), v.float())  # (B, H, T, D), (B, H, T)
        # Shares of the one normaliser: Z_intra / (Z_intra + Z_inter) and Z_inter / (Z_intra + Z_inter).
        w_intra, w_inter = torch.sigmoid(lse - log_Z).unsqueeze(-1), torch.sigmoid(log_Z - lse).unsqueeze(-1)
        return (w_intra * o_intra.float() + w_inter * o_inter).to(v.dtype)
