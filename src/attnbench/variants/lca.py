"""lca: learned cluster attention (Gumbel-softmax router, straight-through gates).

A router per layer gives each token logits r_t over C clusters (per head or
shared by all heads). Training: y_t = softmax((r_t + g_t) / tau) with Gumbel
noise g_t, hard h_t = onehot(argmax y_t), gate a_t = h_t + (y_t - sg(y_t)),
whose forward value is exactly h_t. Evaluation: h_t = onehot(argmax r_t).
Query t attends to the keys s <= t of its cluster c_t:

    out_t = a_t[c_t] * sum_s softmax_s(q_t k_s * scale) * a_s[c_t] * v_s

(forward: plain attention inside the cluster; backward: the router learns
through the gates). Both paths take the routing from `route`, called once per
forward, so they draw the same noise under the same seed.

Paths:
- reference: the formula with the dense T x T mask;
- efficient, CPU: stable sort by (cluster, position), each cluster's segment
  padded to whole chunks, `chunked_segment_attention` (ca.py), scatter back;
- efficient, CUDA: the same sort, then FlexAttention with the segment mask
  segment_start[i] <= j <= i in sorted order (flex.py), tile lists in O(T / 128).

Choices where the spec is open:
- balance loss in causal form: C * mean_t sum_c F_t[c] p_t[c], with F_t[c]
  the fraction of tokens s <= t of the row routed to c (the spec's f_c taken
  over the prefix), p_t = softmax(r_t). With the spec's whole-sequence f_c the
  gradient reaching token t would depend on later tokens, which the causality
  test forbids. It is set in training only (self.aux_loss is None in eval).
- tau anneals geometrically, tau = tau_start * (tau_end / tau_start) ** progress;
  tau_start = 1, tau_end = 0.1.
- the CPU path pads every cluster to a multiple of the chunk (pow2_block(T))
  so a segment starts at a chunk boundary wherever later tokens put it: a
  query's arithmetic, and so its output, is bitwise independent of the future.
- stats(): max_cluster_frac (share of the largest cluster), empty_clusters
  (per row), pair_frac (sum_c f_c^2, the share of mha's query-key pairs
  computed), each averaged over batch rows and routers, and tau.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import Attention, AutoFloat, AutoInt, VariantOptions, causal_mask, pow2_block
from .ca import chunked_segment_attention
from .flex import flex_band_attention


class LearnedClusterOptions(VariantOptions):
    clusters: AutoInt = Field("auto", description="number of clusters C; auto = ceil(sqrt(T))")
    router: Literal["head", "shared"] = Field("head", description="one router per head, or one shared by the heads")
    tau_start: float = Field(1.0, gt=0, description="Gumbel-softmax temperature at the start of training")
    tau_end: float = Field(0.1, gt=0, description="temperature at the end (geometric annealing)")
    balance: AutoFloat = Field("auto", description="weight of the balance loss; auto = 0.01")

    def check(self, seq_len: int) -> None:
        if self.clusters != "auto" and self.clusters < 1:
            raise ValueError(f"clusters must be >= 1 or 'auto', got {self.clusters}")
        if self.balance != "auto" and self.balance < 0:
            raise ValueError(f"balance must be >= 0 or 'auto', got {self.balance}")


def route(logits: torch.Tensor, tau: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ids (B, R, T) and straight-through gates a (B, R, T, C) from router logits (B, R, T, C)."""
    C = logits.shape[-1]
    if not training:
        cluster = logits.argmax(dim=-1)
        return cluster, F.one_hot(cluster, C).to(logits.dtype)
    gumbel = -torch.empty_like(logits).exponential_().log()
    y = ((logits + gumbel) / tau).softmax(dim=-1)
    cluster = y.argmax(dim=-1)
    return cluster, F.one_hot(cluster, C).to(y.dtype) + (y - y.detach())  # forward value exactly one-hot


def balance_loss(logits: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
    """C * mean_t sum_c F_t[c] p_t[c]: F_t the share of tokens s <= t routed to c, p_t = softmax(r_t)."""
    T, C = logits.shape[-2:]
    counts = F.one_hot(cluster, C).cumsum(dim=-2)  # (B, R, T, C)
    share = counts / torch.arange(1, T + 1, device=logits.device).unsqueeze(-1)
    return C * (share * logits.softmax(dim=-1)).sum(dim=-1).mean()


def own_gate(cluster: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """a_t[c_t]: (B, R, T, 1), forward value 1."""
    return gates.gather(-1, cluster.unsqueeze(-1))


def sort_segments(cluster: torch.Tensor, C: int):
    """Stable sort by (cluster, position).

    Returns order (B, R, T) (sorted index -> position), the sorted cluster ids,
    counts (B, R, C) and starts (B, R, C), the sorted index where each cluster's segment begins.
    """
    sorted_ids, order = torch.sort(cluster, dim=-1, stable=True)
    counts = torch.zeros(*cluster.shape[:-1], C, dtype=torch.long, device=cluster.device)
    counts.scatter_add_(-1, cluster, torch.ones_like(cluster))
    return order, sorted_ids, counts, counts.cumsum(dim=-1) - counts


def cluster_attention_reference(q, k, v, cluster, gates, scale):
    """The defining formula with dense masks; q, k, v (B, H, T, D), cluster (B, R, T), gates (B, R, T, C), R = H or 1."""
    T = q.shape[-2]
    hard = F.one_hot(cluster, gates.shape[-1]).to(gates.dtype)  # (B, R, T, C)
    same = (cluster.unsqueeze(-1) == cluster.unsqueeze(-2)) & causal_mask(T, q.device)  # (B, R, T, T)
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, H, T, T)
    p = scores.masked_fill(~same, float("-inf")).softmax(dim=-1)
    key_gate = hard @ gates.transpose(-2, -1)  # (B, R, T, T): a_s[c_t]
    return (own_gate(cluster, gates) * ((p * key_gate) @ v.float())).to(v.dtype)


def cluster_attention_chunked(q, k, v, cluster, gates, scale, chunk):
    """The CPU path: clusters laid out one after another, each padded to whole chunks, then chunked attention."""
    B, H, T, D = q.shape
    C = gates.shape[-1]
    order, sorted_ids, counts, starts = sort_segments(cluster, C)
    padded = (counts + chunk - 1) // chunk * chunk  # (B, R, C)
    padded_starts = padded.cumsum(dim=-1) - padded
    rank = torch.arange(T, device=q.device) - starts.gather(-1, sorted_ids)  # (B, R, T): index inside the cluster
    slot = torch.empty_like(order).scatter_(-1, order, padded_starts.gather(-1, sorted_ids) + rank)  # position -> slot
    P = int(padded.sum(dim=-1).max())
    segment = torch.full((*cluster.shape[:2], P), C, device=q.device).scatter_(-1, slot, cluster)  # padding: C
    n_offsets = int(padded.max()) // chunk

    index = slot.unsqueeze(-1).expand(B, H, T, D)
    g = own_gate(cluster, gates)  # (B, R, T, 1)
    q, k, v_gated = (t.new_zeros(B, H, P, D).scatter(2, index, t) for t in (q.float(), k.float(), v * g))
    out = chunked_segment_attention(q, k, v_gated, segment, chunk, n_offsets, scale)  # (B, H, P, D)
    return (out.gather(2, index) * g).to(v.dtype)


def cluster_attention_flex(q, k, v, cluster, gates, scale):
    """The CUDA path (eager on CPU, forward only): sorted order, FlexAttention over each segment, scatter back."""
    B, H, T, D = q.shape
    order, sorted_ids, counts, starts = sort_segments(cluster, gates.shape[-1])
    segment_start = starts.gather(-1, sorted_ids)  # (B, R, T), sorted order
    index = order.unsqueeze(-1).expand(B, H, T, D)
    g = own_gate(cluster, gates)  # (B, R, T, 1)
    q, k, v_gated = (t.gather(2, index) for t in (q, k, (v * g).to(v.dtype)))  # (B, H, T, D), sorted
    out = flex_band_attention(q, k, v_gated, segment_start, scale)
    return (torch.zeros_like(out).scatter(2, index, out) * g).to(v.dtype)


class LearnedClusterAttention(Attention):
    Options = LearnedClusterOptions

    def __init__(self, d_model: int, n_heads: int, seq_len: int, options: LearnedClusterOptions | None = None):
        super().__init__(d_model, n_heads, seq_len, options)
        routers = n_heads if self.options.router == "head" else 1
        self.router = nn.Linear(d_model, routers * self.clusters, bias=False)
        self.tau = self.options.tau_start
        self.last_clusters: torch.Tensor | None = None  # (B, R, T) of the last forward, for stats()

    @property
    def clusters(self) -> int:
        return math.ceil(math.sqrt(self.seq_len)) if self.options.clusters == "auto" else self.options.clusters

    @property
    def balance(self) -> float:
        return 0.01 if self.options.balance == "auto" else self.options.balance

    def set_progress(self, fraction: float) -> None:
        start, end = self.options.tau_start, self.options.tau_end
        self.tau = start * (end / start) ** min(max(fraction, 0.0), 1.0)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster ids (B, R, T) and gates (B, R, T, C) for input x (B, T, C_model); sets the balance loss."""
        B, T, _ = x.shape
        # fp32 router: a bf16 logit flips near-tied argmaxes, and the choice of cluster is discrete.
        logits = F.linear(x.float(), self.router.weight.float()).view(B, T, -1, self.clusters).transpose(1, 2)  # (B, R, T, C)
        cluster, gates = route(logits, self.tau, self.training)
        self.aux_loss = self.balance * balance_loss(logits, cluster) if self.training else None
        self.last_clusters = cluster.detach()
        return cluster, gates

    def reference(self, q, k, v, x):
        return cluster_attention_reference(q, k, v, *self.route(x), self.scale)

    def efficient(self, q, k, v, x):
        return self.flex(q, k, v, x) if q.is_cuda else self.chunked(q, k, v, x)

    def chunked(self, q, k, v, x):
        return cluster_attention_chunked(q, k, v, *self.route(x), self.scale, pow2_block(q.shape[-2]))

    def flex(self, q, k, v, x):
        return cluster_attention_flex(q, k, v, *self.route(x), self.scale)

    def stats(self) -> dict[str, float]:
        if self.last_clusters is None:
            return {}
        share = F.one_hot(self.last_clusters, self.clusters).float().mean(dim=-2)  # (B, R, C)
        return {
            "max_cluster_frac": share.amax(dim=-1).mean().item(),
            "empty_clusters": (share == 0).float().sum(dim=-1).mean().item(),
            "pair_frac": share.square().sum(dim=-1).mean().item(),
            "tau": self.tau,
        }
