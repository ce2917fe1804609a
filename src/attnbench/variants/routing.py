"""lca's routing in plain PyTorch: Gumbel noise, the soft and hard assignment, the gates and the balance loss.

These are the definitions: lca's and sca's reference paths and every CPU path
use them, and `fused_routing` (the Triton kernels CUDA training uses) is tested
equal to them. Logits are (..., T, C) or laid out as the router's linear gives them,
(B, T, R, C); each function says which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gumbel_noise(logits: torch.Tensor) -> torch.Tensor:
    """-log(-log u) shaped like logits, u uniform in fp32 whatever the logits' dtype (bf16 under autocast): bf16
    uniforms would cut the noise's tail at -log(-log(1 - 2^-8)) = 5.5. Clamped away from u = 0."""
    uniform = torch.rand(logits.shape, device=logits.device).clamp_min(torch.finfo(torch.float32).tiny)
    return -(-uniform.log()).log()


def route(logits: torch.Tensor, tau: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cluster ids (...) and the soft assignment y = softmax((r + g) / tau) (..., C) in fp32 from logits (..., C);
    without noise (evaluation) the argmax of the logits and no soft assignment."""
    if noise is None:
        return logits.argmax(dim=-1), None
    y = ((logits.float() + noise) / tau).softmax(dim=-1)
    return y.argmax(dim=-1), y


def straight_through_gates(cluster: torch.Tensor, soft: torch.Tensor | None, C: int) -> torch.Tensor:
    """a = h + (y - sg(y)) (..., C), forward value exactly the one-hot h; h alone in evaluation."""
    hard = F.one_hot(cluster, C).float()
    return hard if soft is None else hard + (soft - soft.detach())


def straight_through(y_own: torch.Tensor) -> torch.Tensor:
    """1 + (y - sg(y)): forward value exactly 1, gradient that of y."""
    return 1 + (y_own - y_own.detach())


def own_gate(cluster: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor | None:
    """a_t[c_t] (..., 1) without the C-wide gates: 1 + (y_c - sg(y_c)); None (the constant 1) in evaluation."""
    return None if soft is None else straight_through(soft.gather(-1, cluster.unsqueeze(-1)))


def block_cluster_slots(cluster: torch.Tensor, C: int, block: int) -> torch.Tensor:
    """(..., T): each token's (block, cluster) slot floor(t / block) C + c_t, for cluster ids (..., T)."""
    return torch.arange(cluster.shape[-1], device=cluster.device) // block * C + cluster


def block_counts(cluster: torch.Tensor, C: int, block: int, dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block j of `block` positions (n = ceil(T / block)) and cluster c: the tokens of block j routed to c, and
    those of the blocks before j, both (..., n, C) in `dtype`; cluster (..., T)."""
    n = -(-cluster.shape[-1] // block)
    counts = torch.zeros(*cluster.shape[:-1], n * C, dtype=dtype, device=cluster.device)
    slots = block_cluster_slots(cluster, C, block)
    counts = counts.scatter_add_(-1, slots, torch.ones_like(cluster, dtype=dtype)).unflatten(-1, (n, C))
    return counts, counts.cumsum(dim=-2) - counts


def block_shares(cluster: torch.Tensor, C: int, block: int) -> torch.Tensor:
    """F (..., n, C), n = ceil(T / block): per block j, the share of the tokens of the blocks before j routed to c
    (0 for j = 0); cluster (..., T)."""
    _, before = block_counts(cluster, C, block, torch.float32)
    n = before.shape[-2]
    return before / (torch.arange(n, device=cluster.device) * block).clamp_min(1).view(n, 1)


def block_sums(p: torch.Tensor, block: int) -> torch.Tensor:
    """P (..., n, C): per block j of `block` positions, the sum of p_t over its tokens; p (..., T, C)."""
    T = p.shape[-2]
    return F.pad(p, (0, 0, 0, -T % block)).unflatten(-2, (-1, block)).sum(dim=-2)


def balance_from_block_sums(sums: torch.Tensor, cluster: torch.Tensor, block: int) -> torch.Tensor:
    """The balance loss from P_j = sum of p_t over block j's tokens (..., n, C): every token of block j reads the same
    F_j, so C * mean_t sum_c F_t[c] p_t[c] = C * sum_j F_j . P_j / (number of tokens); cluster (..., T)."""
    C = sums.shape[-1]
    return C * (block_shares(cluster, C, block) * sums).sum() / cluster.numel()


def balance_loss(logits: torch.Tensor, cluster: torch.Tensor, block: int) -> torch.Tensor:
    """C * mean_t sum_c F_t[c] p_t[c]: F_t the share of the tokens of the blocks before t's routed to c
    (0 in the first block), p_t = softmax(r_t); logits (..., T, C), cluster (..., T), blocks of `block` positions."""
    p = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # fp32 for bf16 logits
    return balance_from_block_sums(block_sums(p, block), cluster, block)
