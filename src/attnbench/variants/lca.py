"""lca: learned cluster attention (Gumbel-softmax router, straight-through gates).

A router per layer gives each token logits r_t over C clusters (per head or
shared by all heads). Training: y_t = softmax((r_t + g_t) / tau) with Gumbel
noise g_t, hard h_t = onehot(argmax y_t), gate a_t = h_t + (y_t - sg(y_t)),
whose forward value is exactly h_t. Evaluation: h_t = onehot(argmax r_t), or,
with `sample_in_eval`, the training's draw (noise, no balance loss).
Query t attends to the keys s <= t of its cluster c_t:

    out_t = a_t[c_t] * sum_s softmax_s(q_t k_s * scale) * a_s[c_t] * v_s

(forward: plain attention inside the cluster; backward: the router learns
through the gates). The routing is defined in routing.py; the reference path
takes it from `route`, the efficient paths from `route_own`, which in CUDA
training runs fused_routing's Triton kernels (noise, softmax, argmax, own gate
and the balance loss's block sums; the backward reads the soft assignment y
the forward stored in the logits' dtype). Both draw their noise
from one seed taken from torch's generator, so under the same seed they route
alike.

Paths:
- reference: the formula with the dense T x T mask;
- efficient, CPU: stable sort by (cluster, position) (a counting sort, `sort_by_cluster`), each cluster's segment
  padded to whole chunks, `chunked_segment_attention` (ca.py), scatter back;
- efficient, CUDA: the same sort, then attention over the band segment_start[i] <= j <= i in sorted order by
  fused_band's Triton kernels (`band_cluster_attention`: 64-row tiles, each over exactly its rows' keys; they read q,
  k, v and write the output and the gradients in position order, at the sort's order, and the gates on v and o get
  their gradients from their backward), or by FlexAttention with that
  band's block mask (flex.py, tile lists in O(T / 128)) where Triton is absent; on CPU the eager Flex forward,
  for tests.
Inside a cluster a_s[c_t] = a_s[c_s], so the efficient paths need one gate per
token, a_t[c_t] = 1 + (y_t[c_t] - sg(y_t[c_t])), never the C-wide gates.

Choices where the spec is open:
- balance loss in causal form: C * mean_t sum_c F_t[c] p_t[c], with F_t[c]
  the fraction of the tokens in the blocks before t's (blocks of the smallest
  power of two >= sqrt(seq_len)) routed to c, 0 in the first block (the spec's f_c taken over the
  past), p_t = softmax(r_t). With the spec's whole-sequence f_c the gradient
  reaching token t would depend on later tokens, which the causality test
  forbids. Per block rather than per token: the counts are (T / b) x C, and
  the loss one reduction over the logits; the per-token prefix sum of a
  (T, C) one-hot cost more than the attention itself on the H100 (1.05 of
  5.5 ms at T = 8K, profiled). Set in training only (aux_loss None in eval).
- Gumbel noise as -log(-log u), u uniform in fp32, clamped away from 0: from
  torch's generator, or on CUDA from Triton's Philox generator keyed by a seed from it.
- tau anneals geometrically, tau = tau_start * (tau_end / tau_start) ** progress;
  tau_start = 1, tau_end = 0.1.
- the CPU path pads every cluster to a multiple of the chunk (pow2_block(T))
  so a segment starts at a chunk boundary wherever later tokens put it: a
  query's arithmetic, and so its output, is bitwise independent of the future.
- argmax r_t is not what training routed by: argmax (r_t + g_t) samples c_t from softmax(r_t) whatever tau
  (tau shapes only the gates' gradient), so a router that stays unsure trains on near-random partitions and is
  evaluated on its argmax's (reports/gpu-gcide, d768, C = 32: 4.7 of 32 clusters empty per sequence under argmax,
  0.05 sampled; test 3.189 bpb against 3.001). `sample_in_eval` scores the model as it trained; the evaluate
  stage reports both.
- stats(): max_cluster_frac (share of the largest cluster), empty_clusters
  (per row), pair_frac (sum_c f_c^2, the share of mha's query-key pairs
  computed), each averaged over batch rows and routers, and in training tau.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import Attention, PositiveAutoInt, VariantOptions, auto_option, causal_mask, pow2_block, register
from .ca import chunked_segment_attention
from .flex import flex_band_attention
from .routing import balance_from_block_sums, balance_loss, block_counts, gumbel_noise, own_gate, route, straight_through, straight_through_gates

fused_band = fused_routing = None  # the Triton kernels, for CUDA tensors only
if torch.cuda.is_available():  # importing Triton and Inductor costs ~1.7 s, in every stage process on a CPU machine too
    try:  # Triton comes with CUDA builds of torch; without it lca routes in plain PyTorch and attends by Flex
        from . import fused_band, fused_routing
    except ImportError:
        pass


class LearnedClusterOptions(VariantOptions):
    clusters: PositiveAutoInt = Field("auto", description="number of clusters C; auto = ceil(sqrt(T))")
    router: Literal["head", "shared"] = Field("head", description="one router per head, or one shared by the heads")
    tau_start: float = Field(1.0, gt=0, description="Gumbel-softmax temperature at the start of training")
    tau_end: float = Field(0.1, gt=0, description="temperature at the end (geometric annealing)")
    balance: auto_option(0.0, integer=False) = Field("auto", description="weight of the balance loss; auto = 0.01")


def gated(u: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """u * gate in u's dtype (the gate's forward value is 1); u itself where there is no gate."""
    return u if gate is None else (u * gate).to(u.dtype)


# Positions per counting-sort block: its within-block ranks compare b x b pairs, its counts are (T / b) x C.
SORT_BLOCK = 64


def sort_by_cluster(cluster: torch.Tensor, C: int):
    """Stable sort of positions by cluster id (..., T) as a counting sort: a token's sorted index is its cluster's
    start + the tokens of its cluster in earlier blocks + those before it in its own block. Pointwise work, small
    scans and one scatter, which Inductor fuses, where a comparison sort (`torch.sort`) is an opaque multi-pass
    radix sort whose launches alone took ~0.4 ms of host time per lca layer step at T = 8K on the H200.

    Returns order (..., T) (sorted index -> position), inverse (..., T) (position -> sorted index), and per cluster
    counts (..., C) and starts (..., C), the sorted index where its segment begins.
    """
    T = cluster.shape[-1]
    counts, before = block_counts(cluster, C, SORT_BLOCK)  # (..., n, C)
    totals = counts.sum(dim=-2)  # (..., C)
    starts = totals.cumsum(dim=-1) - totals
    # Whole blocks: the padding's ids (0) only come after every real token of the last block, so they change no real
    # token's rank, and their own ranks are dropped.
    ids = F.pad(cluster, (0, counts.shape[-2] * SORT_BLOCK - T)).unflatten(-1, (-1, SORT_BLOCK))  # (..., n, b)
    earlier = torch.ones(SORT_BLOCK, SORT_BLOCK, dtype=torch.bool, device=cluster.device).tril(-1)
    within = ((ids.unsqueeze(-1) == ids.unsqueeze(-2)) & earlier).sum(dim=-1)  # (..., n, b): same id, earlier in the block
    inverse = ((starts.unsqueeze(-2) + before).gather(-1, ids) + within).flatten(-2)[..., :T]
    order = torch.empty_like(inverse).scatter_(-1, inverse, torch.arange(T, device=cluster.device).expand_as(inverse))
    return order, inverse, totals, starts


def cluster_attention_reference(q, k, v, cluster, gates, scale):
    """The defining formula with dense masks; q, k, v (B, H, T, D), cluster (B, R, T), gates (B, R, T, C), R = H or 1."""
    T = q.shape[-2]
    hard = F.one_hot(cluster, gates.shape[-1]).to(gates.dtype)  # (B, R, T, C)
    same = (cluster.unsqueeze(-1) == cluster.unsqueeze(-2)) & causal_mask(T, q.device)  # (B, R, T, T)
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, T, T), the product itself in fp32
    p = scores.masked_fill(~same, float("-inf")).softmax(dim=-1)
    key_gate = hard @ gates.transpose(-2, -1)  # (B, R, T, T): a_s[c_t]
    own = gates.gather(-1, cluster.unsqueeze(-1))  # (B, R, T, 1): a_t[c_t]
    return (own * ((p * key_gate) @ v.float())).to(v.dtype)


def cluster_attention_chunked(q, k, v, cluster, gate, C, scale, chunk):
    """The CPU path: clusters laid out one after another, each padded to whole chunks, then chunked attention.

    gate: a_t[c_t] (B, R, T, 1) or None; inside a cluster a_s[c_t] = a_s[c_s], so one gate per token does.
    """
    B, H, T, D = q.shape
    _, inverse, counts, starts = sort_by_cluster(cluster, C)
    padded = (counts + chunk - 1) // chunk * chunk  # (B, R, C)
    padded_starts = padded.cumsum(dim=-1) - padded
    slot = (padded_starts - starts).gather(-1, cluster) + inverse  # (B, R, T): position -> slot, rank kept in the cluster
    P = int(padded.sum(dim=-1).max())
    segment = torch.full((*cluster.shape[:2], P), C, device=q.device).scatter_(-1, slot, cluster)  # padding: C
    n_offsets = int(padded.max()) // chunk

    index = slot.unsqueeze(-1).expand(B, H, T, D)
    q, k, v_gated = (t.new_zeros(B, H, P, D).scatter(2, index, t) for t in (q.float(), k.float(), gated(v.float(), gate)))
    out = chunked_segment_attention(q, k, v_gated, segment, chunk, n_offsets, scale)  # (B, H, P, D)
    return gated(out.gather(2, index), gate).to(v.dtype)


class Permute(torch.autograd.Function):
    """u.gather(2, index) for a permutation `index` whose inverse is known: the backward is the gather by the
    inverse, where autograd's own would zero-fill and scatter-add (atomics) a tensor of u's size."""

    @staticmethod
    def forward(ctx, u, index, inverse):
        ctx.save_for_backward(inverse)
        return u.gather(2, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.gather(2, inverse), None, None


def band_cluster_attention(q, k, v, cluster, gate, C, scale, sorted_values=None):
    """Attention inside each cluster by fused_band's kernels (CUDA; the CPU under Triton's interpreter, for tests): the
    sort, then band attention over each cluster's segment in sorted order.

    The kernels read q, k and v and write the output and the gradients of q, k and v in position order, at the sort's
    order, so no (B, H, T, D) array is gathered into the sorted order or out of it. The gates ride on v and o as the
    kernels' inputs (their forward values are 1, so they read v and write o unmade, and their backward forms the gates'
    gradients). sorted_values(k, v, gate, order, cluster, counts, starts), k, v, gate and cluster in position order,
    gives the values the attention reads, in sorted order, in place of gated(v, gate) (sca's v' with its supernodes).
    """
    order, _, counts, starts = sort_by_cluster(cluster, C)
    sorted_cluster = cluster.gather(-1, order)  # (B, R, T)
    lo, hi = (x.gather(-1, sorted_cluster).int() for x in (starts, starts + counts))  # (B, R, T): each entry's segment
    if sorted_values is None:  # lca: v's gate is applied by the attention
        values, value_gate, values_at_rows = v, gate, True
    else:  # sca: the supernodes' values in sorted order, their gate applied
        values, value_gate, values_at_rows = sorted_values(k, v, gate, order, cluster, counts, starts), None, False
    return fused_band.band_attention(q, k, values, lo, hi, order.int(), scale, gate, value_gate, keys_at_rows=True,
                                     values_at_rows=values_at_rows)


def cluster_attention_sorted(q, k, v, cluster, gate, C, scale):
    """lca's CUDA path: `band_cluster_attention`, or, where Triton is absent (and on CPU, forward only, for tests), the
    same band by Flex, which needs q, k and v gathered into the sorted order and its output gathered out (by the
    inverse permutation), the gates multiplied."""
    if q.is_cuda and fused_band is not None:
        return band_cluster_attention(q, k, v, cluster, gate, C, scale)
    B, H, T, D = q.shape
    order, inverse, _, starts = sort_by_cluster(cluster, C)
    lo = starts.gather(-1, cluster.gather(-1, order))  # (B, R, T): in sorted order, where each entry's segment begins
    to_sorted, to_positions = (i.unsqueeze(-1).expand(B, H, T, D) for i in (order, inverse))
    q, k, v = (Permute.apply(t, to_sorted, to_positions) for t in (q, k, v))  # (B, H, T, D), sorted
    gate_sorted = None if gate is None else Permute.apply(gate, order.unsqueeze(-1), inverse.unsqueeze(-1))
    out = flex_band_attention(q, k, gated(v, gate_sorted), lo, scale)
    return gated(Permute.apply(out, to_positions, to_sorted), gate)


@register("lca")
class LearnedClusterAttention(Attention):
    Options = LearnedClusterOptions
    compute_exponent = 1.5  # T^2 / C with C ~ sqrt(T) balanced clusters
    # Inductor pads a row stride over 1024 elements to whole 128 bytes; the per-head router's R C logits (1456 at
    # T = 32K) were then copied into the contiguous layout the fused routing reads, forward and backward: 0.18 of
    # 3.6 ms per layer step at 32K on the H200 (measured). Unpadded, they go straight from the GEMM to the kernels.
    compile_options = {"comprehensive_padding": False}

    def __init__(self, d_model: int, n_heads: int, seq_len: int, options: LearnedClusterOptions | dict | None = None):
        super().__init__(d_model, n_heads, seq_len, options)
        routers = n_heads if self.options.router == "head" else 1
        self.router = nn.Linear(d_model, routers * self.clusters, bias=False)
        # A buffer, not a float: a compiled model would guard on a float and recompile as tau anneals;
        # set_progress updates it in place, so CUDA graphs read the new value too.
        self.register_buffer("tau", torch.tensor(self.options.tau_start), persistent=False)
        self.last_clusters: torch.Tensor | None = None  # (B, R, T) of the last forward, for stats()

    @property
    def clusters(self) -> int:
        return math.ceil(math.sqrt(self.seq_len)) if self.options.clusters == "auto" else self.options.clusters

    def mean_keys(self) -> float:
        """Balanced clusters, sizes T // C or one more (the fewest pairs any partition into C gives): a query sees the
        earlier members of its cluster and itself."""
        T, C = self.seq_len, self.clusters
        sizes = torch.full((C,), T // C, dtype=torch.float64)
        sizes[: T % C] += 1
        return (sizes * (sizes + 1) / 2).sum().item() / T

    @property
    def balance(self) -> float:
        return 0.01 if self.options.balance == "auto" else self.options.balance

    def set_progress(self, fraction: float) -> None:
        start, end = self.options.tau_start, self.options.tau_end
        self.tau.fill_(start * (end / start) ** min(max(fraction, 0.0), 1.0))

    @property
    def balance_block(self) -> int:
        return pow2_block(self.seq_len, minimum=1)

    @property
    def noisy_routing(self) -> bool:
        return True

    def fused(self, x: torch.Tensor) -> bool:
        """Route with the Triton kernels (fused_routing): CUDA training, Triton present."""
        return self.training and x.is_cuda and fused_routing is not None

    def router_logits(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """(B, T, R, width) for x (B, T, d_model), width >= C (default C), the columns from C on zero (the weight
        padded with zero rows; the fused routing's aligned rows). fp32 operands for inputs of any dtype; under
        autocast the product runs in bf16 like every projection, and the routing takes noise and softmax to fp32."""
        B, T, _ = x.shape
        C, width = self.clusters, width or self.clusters
        weight = F.pad(self.router.weight.float().unflatten(0, (-1, C)), (0, 0, 0, width - C)).flatten(0, 1)
        # Under autocast the operands are cast to bf16 anyway: upcasting a bf16 x first only added a copy of x, and
        # one of its gradient, per step (the same values).
        operand = x if torch.is_autocast_enabled(x.device.type) else x.float()
        return F.linear(operand, weight).view(B, T, -1, width)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The plain routing: cluster ids (B, R, T) and the soft assignment (B, R, T, C) or None (evaluation);
        sets the balance loss. Where `fused`, the noise is the fused kernels' (same seed, same draw)."""
        logits = self.router_logits(x)
        noise = None
        if self.training or self.sample_in_eval:
            noise = fused_routing.gumbel_noise(fused_routing.draw_seed(x.device), list(logits.shape)) if self.fused(x) else gumbel_noise(logits)
        cluster, soft = route(logits, self.tau, noise)
        cluster, logits = cluster.transpose(1, 2), logits.transpose(1, 2)
        soft = None if soft is None else soft.transpose(1, 2)
        self.aux_loss = self.balance * balance_loss(logits, cluster, self.balance_block) if self.training else None
        self.last_clusters = cluster.detach()
        return cluster, soft

    def route_own(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the efficient paths need: cluster ids (B, R, T) and own gates a_t[c_t] (B, R, T, 1) or None;
        sets the balance loss. The Triton kernels where `fused`, else `route`."""
        if not self.fused(x):
            cluster, soft = self.route(x)
            return cluster, own_gate(cluster, soft)
        seed = fused_routing.draw_seed(x.device)
        logits = self.router_logits(x, fused_routing.padded_width(self.clusters))
        cluster, y_own, sums, *_ = fused_routing.gumbel_route(logits, seed, self.tau, self.balance_block, self.clusters)
        cluster = cluster.transpose(1, 2)
        self.aux_loss = self.balance * balance_from_block_sums(sums, cluster, self.balance_block)
        self.last_clusters = cluster.detach()
        return cluster, straight_through(y_own.transpose(1, 2).unsqueeze(-1))

    def reference(self, q, k, v, x):
        cluster, soft = self.route(x)
        return cluster_attention_reference(q, k, v, cluster, straight_through_gates(cluster, soft, self.clusters), self.scale)

    def efficient(self, q, k, v, x):
        return self.sorted_attention(q, k, v, x) if q.is_cuda else self.chunked(q, k, v, x)

    def routed_values(self, k, v, x):
        """What both efficient paths attend with: cluster ids (B, R, T), own gates a_t[c_t] (B, R, T, 1) or None,
        and the values (lca: v itself; sca adds its supernodes)."""
        cluster, own = self.route_own(x)
        return cluster, own, v

    def chunked(self, q, k, v, x):
        cluster, own, v = self.routed_values(k, v, x)
        return cluster_attention_chunked(q, k, v, cluster, own, self.clusters, self.scale, pow2_block(q.shape[-2]))

    def sorted_attention(self, q, k, v, x):
        cluster, own, v = self.routed_values(k, v, x)
        return cluster_attention_sorted(q, k, v, cluster, own, self.clusters, self.scale)

    def stats(self) -> dict[str, torch.Tensor]:
        if self.last_clusters is None:
            return {}
        share = F.one_hot(self.last_clusters, self.clusters).float().mean(dim=-2)  # (B, R, C)
        return {
            "max_cluster_frac": share.amax(dim=-1).mean(),
            "empty_clusters": (share == 0).float().sum(dim=-1).mean(),
            "pair_frac": share.square().sum(dim=-1).mean(),
        } | ({"tau": self.tau.clone()} if self.training else {})  # evaluation routes without tau
