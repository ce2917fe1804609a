"""sca: super-cluster attention: lca plus causal supernodes that mix information across clusters.

Causal form (the default, the one the language model uses). Tokens are routed
to C clusters exactly as in lca (`route`, gates a_t, cluster ids c_t). With
blocks of b positions, after each block j cluster c has a supernode

    n_c^(j) = mean of v_s,  m_c^(j) = mean of k_s   over the tokens s in blocks <= j with c_s = c

(zero if there are none). The C supernodes of step j attend to each other,

    z_c^(j) = sum_c' softmax_c'(u_c . m_c' * scale) n_c',   u_c = W_u n_c^(j)   (empty clusters are no keys),

and query t in block i adds the mixed state of its own cluster from step i - 1
to its value, v'_t = v_t + gate * z_{c_t}^(i-1) (nothing for i = 0), before
lca's intra-cluster attention over v'. A supernode only holds tokens of
earlier blocks, so no query ever sees the future. With the gate at 0 (its
initial value) sca is lca exactly; its gradient still reaches the gate.

Paths (both call the router once per forward):
- reference: every step's supernodes from dense prefix masks (steps x T) and
  one-hot memberships, then lca's dense reference attention over v';
- efficient, CPU: sums per (block, cluster) by one scatter-add of the tokens' k and v
  ((B, H, T/b, C, D)) and a cumulative sum over blocks, O(T D + (T/b) C D), no
  T x T and no T x C tensor; each token reads its own cluster's state by one
  gather; the mixing costs (T/b) C^2 D; then lca's chunked attention over v';
- efficient, CUDA: the same states computed in lca's sorted order, where each cluster is one
  segment, by fused_supernodes' Triton kernels (per-segment masked products, no atomics; k, v and the gates read
  in position order, at the sort's order), the
  mixing by fused_mixing's, the read and the gated v' in one more of fused_supernodes' kernels,
  then lca's band attention (fused_band's kernels) over v'.

Choices where the spec is open:
- membership is weighted by the token's own straight-through gate a_s[c_s] (lca's formula
  only ever weighs a key by a_s[c_t] with c_s = c_t, i.e. its own gate):
  n_c = sum_{s: c_s = c} a_s[c_s] v_s / sum_{s: c_s = c} a_s[c_s] (the same for m), and query t
  reads a_t[c_t] z_{c_t}. The forward values are the plain means and z_{c_t}; the backward
  lets the router learn from the supernode path as well. (Weighing by the C-wide gates
  a_s[c] instead made the path dense in C: (T, C) x (C, D) products per block and (T, C)
  fp32 tensors, about half of sca's time at T = 8K on the H100, profiled.)
- W_u (D -> D, no bias) is one per layer, shared by the heads (as cka's P); the supernode
  values are their states n; scale 1/sqrt(D).
- an empty cluster's query is W_u 0 = 0, so it averages the non-empty supernodes (its mixed
  state is read only by a token that opens the cluster in the next block); a step with no
  non-empty cluster gives zero (cannot happen causally: every step holds >= 1 token).
- the gate is one scalar per head, initialised to 0.
- block: auto = pow2_block(seq_len), as ca, independent of C. The efficient path computes
  only the steps a later block reads (all but the last block's, all complete blocks).
- the supernode arithmetic runs in fp32 (the mixing in bf16 under autocast: one sdpa call, or on the efficient
  CUDA path fused_mixing's Triton kernels) and v' is cast back to v's dtype. On the CUDA path the kernels
  accumulate the sums in fp32 and store the states n, m in k's dtype (bf16 under autocast), the dtype the
  mixing reads them in.
- balance loss, tau annealing and stats() are lca's.

Non-causal form (`causal: false`): the seed design as written, for tests and layer
profiles only, never the language model (its output at t reads later positions, so
bits per byte would be meaningless). Its options accept it, since tests and the
profile build layers directly and a layer cannot tell whether it sits in the model:
refusing it for the model is the model's or the config's job.
- partition: a 1-D learned projection s_t = w . x_t (one per head, or shared, as `router`;
  it replaces lca's router), stable sort by s, and K = min(C, T) cliques of near-equal size,
  contiguous in the sorted order: the token of sorted rank r is in clique floor(r K / T).
- the sort has no gradient; the projection learns through a straight-through factor
  a_t = 1 + s_t - sg(s_t) (forward exactly 1) used like lca's gate: it weighs the token in
  its clique's supernode, in the attention values and on its output.
- supernode per clique: the (weighted) mean of v and of k over the clique, i.e. the clique
  "attends" to its supernode uniformly: mean pooling, as the causal form, rather than
  attention pooling, which would need one more learned query for no clear benefit.
- supernode-to-supernode attention as the causal form (one step, all cliques), then full
  (non-causal) softmax attention inside each clique over v'_t = v_t + gate * a_t z_{clique(t)}.
- reference: dense T x T same-clique mask; efficient: cliques laid out in (K, ceil(T / K))
  padded slots, attention per clique, O(T^1.5). The same on CPU and CUDA.
- block, balance and tau are unused; no balance loss (cliques are balanced by construction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import PositiveAutoInt, masked_softmax_attention, pow2_block, register
from . import lca
from .lca import LearnedClusterAttention, LearnedClusterOptions, band_cluster_attention, cluster_attention_reference
from .routing import block_cluster_slots, own_gate, straight_through_gates

fused_mixing = fused_supernodes = None  # the Triton kernels of the mixing and of the supernode states, for CUDA tensors only
if torch.cuda.is_available():  # as lca's fused_routing: no Triton import on a CPU machine
    try:
        from . import fused_mixing, fused_supernodes
    except ImportError:
        pass


class SuperClusterOptions(LearnedClusterOptions):
    block: PositiveAutoInt = Field("auto", description="block size b of the supernode steps; auto = smallest power of two >= sqrt(T), at least 16")
    causal: bool = Field(True, description="false: the seed's non-causal clique design, for tests and profiles only, never the language model")


def supernode_means(weights: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Weighted means of k and v per cluster: weights (B, R, ..., N, C), k, v (B, H, ..., N, D), R = H or 1.

    Returns n, m (B, H, ..., C, D) and the weight sums (B, R, ..., C); a cluster with weight 0 has n = m = 0.
    """
    total = weights.sum(dim=-2)  # (B, R, ..., C)
    denominator = torch.where(total > 0, total, 1.0).unsqueeze(-1)  # (B, R, ..., C, 1)
    return weights.transpose(-2, -1) @ v / denominator, weights.transpose(-2, -1) @ k / denominator, total


def prefix_supernodes(slots: torch.Tensor, own: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, C: int, block: int):
    """Supernodes of the steps a later block reads (all but the last): sums per (block, cluster), cumulated over blocks.

    slots (B, R, T) from `block_cluster_slots`, own gates a_t[c_t] (B, R, T, 1) or None (weight 1), k, v (B, H, T, D)
    fp32 -> n, m (B, H, S, C, D) and weight sums (B, R, S, C), S = (T - 1) // block: step j covers blocks <= j.
    """
    B, H, T, D = v.shape
    S = (T - 1) // block
    N = S * block  # the tokens of those steps
    slot = slots[..., :N]  # (B, R, N)
    weight = torch.ones_like(slot, dtype=v.dtype).unsqueeze(-1) if own is None else own[..., :N, :]  # (B, R, N, 1)
    total = v.new_zeros(B, slot.shape[1], S * C).scatter_add(-1, slot, weight.squeeze(-1)).unflatten(-1, (S, C)).cumsum(dim=2)
    kv = weight * torch.cat([k[..., :N, :], v[..., :N, :]], dim=-1)  # (B, H, N, 2D): one scatter for both
    sums = v.new_zeros(B, H, S * C, 2 * D).scatter_add(2, slot.unsqueeze(-1).expand(B, H, N, 2 * D), kv)
    m, n = (sums.unflatten(2, (S, C)).cumsum(dim=2) / torch.where(total > 0, total, 1.0).unsqueeze(-1)).split(D, dim=-1)
    return n, m, total


def read_supernodes(z: torch.Tensor, slots: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
    """a_t[c_t] z_{c_t}^(i - 1) for query t in block i, zero in block 0: z (B, H, S, C, D), slots (B, R, T) = i C + c_t
    (`block_cluster_slots`, or the same for tokens in sorted order) -> (B, H, T, D)."""
    B, H, S, C, D = z.shape
    T = slots.shape[-1]
    z = F.pad(z, (0, 0, 0, 0, 1, 0)).flatten(2, 3)  # (B, H, (S + 1) C, D): row i C + c is step i - 1, zeros for i = 0
    extra = z.gather(2, slots.unsqueeze(-1).expand(B, H, T, D))
    return extra if own is None else extra * own


def clique_partition(scores: torch.Tensor, cliques: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clique ids (B, R, T) from 1-D scores (B, R, T): sorted rank r goes to clique floor(r K / T); and ranks (B, R, T)."""
    T = scores.shape[-1]
    order = torch.argsort(scores, dim=-1, stable=True)  # sorted index -> position
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(T, device=scores.device).expand_as(order))
    return rank * cliques // T, rank


@register("sca")
class SuperClusterAttention(LearnedClusterAttention):
    Options = SuperClusterOptions
    compute_exponent = 1.5  # lca's, plus T log T (sort) and (T / b) C^2 D (mixing): T^1.5 with b = C = sqrt(T)

    @property
    def causal(self) -> bool:
        return self.options.causal

    @property
    def noisy_routing(self) -> bool:
        return self.options.causal  # the seed's form sorts a 1-D projection, without noise

    def __init__(self, d_model: int, n_heads: int, seq_len: int, options: SuperClusterOptions | dict | None = None):
        super().__init__(d_model, n_heads, seq_len, options)
        if not self.options.causal:  # the seed's 1-D projection takes the place of lca's router
            self.router = nn.Linear(d_model, n_heads if self.options.router == "head" else 1, bias=False)
        self.supernode_query = nn.Linear(self.head_dim, self.head_dim, bias=False)  # W_u
        self.gate = nn.Parameter(torch.zeros(n_heads))

    @property
    def block(self) -> int:
        return pow2_block(self.seq_len) if self.options.block == "auto" else self.options.block

    def mean_keys(self) -> float:
        """lca's pairs, plus the mixing's: C supernodes over C keys at each of the ceil(T / b) steps (the causal form)."""
        T = self.seq_len
        return super().mean_keys() + -(-T // self.block) * self.clusters**2 / T

    def mix(self, n: torch.Tensor, m: torch.Tensor, total: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """Supernode-to-supernode attention: n, m (B, H, S, C, D), weight sums total (B, R, S, C) (or per head,
        (B, H, S, C), as fused_supernodes gives them) -> z (B, H, S, C, D).

        One fused sdpa call over the B x H x S steps (its boolean mask: the non-empty supernodes are the keys), so no
        (C, C) score or probability tensor is stored; with `fused` (CUDA tensors, Triton present) fused_mixing's
        kernels instead, in autocast's dtype as sdpa would run. A step without keys gives zeros (for sdpa it attends to
        all, finite, and is zeroed).
        """
        # Padded to whole multiples of 8 clusters (empty, so never keys): under bf16 autocast unaligned (C, C)
        # problems run on slow kernels (cuBLAS's align-1 GEMMs took 119 us each at T = 8K, C = 91, on the H100).
        B, H, S, C, D = n.shape
        n, m, total = F.pad(n, (0, 0, 0, -C % 8)), F.pad(m, (0, 0, 0, -C % 8)), F.pad(total, (0, -C % 8))
        weight = self.supernode_query.weight
        if S == 0:  # T <= b: no step is read. sdpa's memory-efficient backward fails on an empty batch; the empty
            return F.linear(n, weight.to(n.dtype))[..., :C, :]  # u is the empty z, and W_u gets its (zero) gradient
        nonempty = (total > 0).unsqueeze(-2)  # (B, R, S, 1, C8): the supernodes that can be keys
        if fused and fused_mixing is not None:  # its kernels form u themselves; a step without keys gives zeros
            where = n.device.type
            dtype = torch.get_autocast_dtype(where) if torch.is_autocast_enabled(where) else n.dtype
            problems = (a.flatten(0, 2).to(dtype) for a in (n, m))  # (B H S, C8, D)
            keys = nonempty.expand(B, H, S, 1, n.shape[-2]).flatten(0, 3).to(torch.int8)
            z, _ = fused_mixing.supernode_mixing(*problems, weight.to(dtype), keys, self.scale)
            return z.unflatten(0, (B, H, S))[..., :C, :]
        u = F.linear(n, weight.to(n.dtype))  # (B, H, S, C8, D)
        has_keys = nonempty.any(dim=-1, keepdim=True)  # (B, R, S, 1, 1)
        keys = (nonempty | ~has_keys).expand(B, H, S, 1, n.shape[-2])
        z = F.scaled_dot_product_attention(*(a.flatten(1, 2) for a in (u, m, n, keys)), scale=self.scale).unflatten(1, (H, S))
        return torch.where(has_keys, z, 0.0)[..., :C, :]

    def add_to_values(self, v: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """v' = v + gate * extra, per head; v (B, H, T, D), extra (B, H, T, D) fp32."""
        return (v.float() + self.gate.float().view(-1, 1, 1) * extra).to(v.dtype)

    # Causal form.

    def supernode_values_reference(self, k, v, cluster, own):
        """v' from dense prefix masks and one-hot memberships: every step's supernodes at once, then each token
        reads step block(t) - 1."""
        T, b = v.shape[-2], self.block
        gates = F.one_hot(cluster, self.clusters).float() * (1.0 if own is None else own)  # (B, R, T, C): a_t[c_t] at c_t
        block_of = torch.arange(T, device=v.device) // b  # (T,)
        steps = torch.arange(int(block_of[-1]) + 1, device=v.device)  # (S,)
        in_prefix = block_of <= steps.unsqueeze(-1)  # (S, T): token s is in a block <= j
        weights = gates.unsqueeze(2) * in_prefix.unsqueeze(-1)  # (B, R, S, T, C)
        n, m, total = supernode_means(weights, k.float().unsqueeze(2), v.float().unsqueeze(2))  # (B, H, S, C, D)
        z = self.mix(n, m, total)  # (B, H, S, C, D)
        z_read = z[:, :, (block_of - 1).clamp_min(0)] * (block_of > 0).view(T, 1, 1)  # (B, H, T, C, D)
        extra = (gates.unsqueeze(-2) @ z_read).squeeze(-2)  # (B, H, T, D): a_t[c_t] z_{c_t}^(i-1)
        return self.add_to_values(v, extra)

    def supernode_values(self, k, v, cluster, own):
        """v' by one scatter-add per (block, cluster), a cumulative sum over blocks and one gather: no T x C tensor."""
        slots = block_cluster_slots(cluster, self.clusters, self.block)  # (B, R, T)
        n, m, total = prefix_supernodes(slots, own, k.float(), v.float(), self.clusters, self.block)  # (B, H, S, C, D)
        z = self.mix(n, m, total, fused=v.is_cuda)
        return self.add_to_values(v, read_supernodes(z, slots, own))

    def sorted_supernode_values(self, k, v, own, order, cluster, counts, starts):
        """The gated v' the attention reads, in lca's sorted order, by fused_supernodes' kernels, which read k, v
        (B, H, T, D) and the own gates (B, R, T, 1) or None in position order, at the sort's order; cluster ids (B, R, T)
        in position order, and order, counts, starts from `sort_by_cluster`."""
        steps, padded = (v.shape[-2] - 1) // self.block, self.clusters + -self.clusters % 8
        weights = torch.ones_like(cluster, dtype=torch.float32) if own is None else own.squeeze(-1).float()
        segments = (order.int(), starts.int(), counts.int())
        n, m, total = fused_supernodes.prefix_means(k, v, weights, *segments, cluster.int(), self.block, steps, padded)  # (B, H, S, C8, D)
        z = self.mix(n, m, total, fused=True)
        return fused_supernodes.read_values(v, z, weights, self.gate.float(), *segments, self.block)

    def reference(self, q, k, v, x):
        if not self.options.causal:
            return self.cliques_reference(q, k, v, x)
        cluster, soft = self.route(x)
        v = self.supernode_values_reference(k, v, cluster, own_gate(cluster, soft))
        return cluster_attention_reference(q, k, v, cluster, straight_through_gates(cluster, soft, self.clusters), self.scale)

    def efficient(self, q, k, v, x):
        return super().efficient(q, k, v, x) if self.options.causal else self.cliques(q, k, v, x)

    def routed_values(self, k, v, x):
        cluster, own, v = super().routed_values(k, v, x)
        return cluster, own, self.supernode_values(k, v, cluster, own)

    def sorted_attention(self, q, k, v, x):
        if fused_supernodes is None or lca.fused_band is None or not q.is_cuda:
            return super().sorted_attention(q, k, v, x)
        cluster, own = self.route_own(x)
        return band_cluster_attention(q, k, v, cluster, own, self.clusters, self.scale, self.sorted_supernode_values)

    # Non-causal form (tests and profiles only).

    def partition(self, x: torch.Tensor):
        """Clique ids (B, R, T), sorted ranks (B, R, T), K, and the straight-through factors a (B, R, T, 1)."""
        T = x.shape[1]
        scores = self.router(x).float().transpose(1, 2)  # (B, R, T)
        cliques = min(self.clusters, T)
        clique, rank = clique_partition(scores.detach(), cliques)
        self.last_clusters = clique
        return clique, rank, cliques, (1 + scores - scores.detach()).unsqueeze(-1)

    def cliques_reference(self, q, k, v, x):
        """Dense form: one-hot clique memberships and a T x T same-clique mask."""
        clique, _, cliques, a = self.partition(x)
        gates = F.one_hot(clique, cliques) * a  # (B, R, T, K)
        n, m, total = supernode_means(gates, k.float(), v.float())  # (B, H, K, D)
        z = self.mix(n.unsqueeze(2), m.unsqueeze(2), total.unsqueeze(2)).squeeze(2)  # (B, H, K, D)
        v = self.add_to_values(v, gates @ z)
        same = clique.unsqueeze(-1) == clique.unsqueeze(-2)  # (B, R, T, T)
        return (a * masked_softmax_attention(q, k, (a * v).to(v.dtype), same, self.scale).float()).to(v.dtype)

    def cliques(self, q, k, v, x):
        """Padded form: clique j holds slots j L .. j L + L - 1, L = ceil(T / K); attention inside each clique."""
        B, H, T, D = q.shape
        clique, rank, K, a = self.partition(x)
        L = -(-T // K)
        first = (clique * T + K - 1) // K  # (B, R, T): sorted rank of the clique's first token
        slot = (clique * L + rank - first).unsqueeze(-1)  # (B, R, T, 1): position -> slot

        def to_slots(u):  # (B, H|R, T, E) -> (B, H|R, K, L, E), zero in the padding
            return u.new_zeros(*u.shape[:2], K * L, u.shape[-1]).scatter(2, slot.expand_as(u), u).unflatten(2, (K, L))

        a_s = to_slots(a)  # (B, R, K, L, 1): 0 in the padding
        q_s, k_s, v_s = (to_slots(u.float()) for u in (q, k, v))  # (B, H, K, L, D)
        total = a_s.sum(dim=(-2, -1))  # (B, R, K): clique sizes, >= 1 as K <= T
        n = (a_s * v_s).sum(dim=-2) / total.unsqueeze(-1)  # (B, H, K, D)
        m = (a_s * k_s).sum(dim=-2) / total.unsqueeze(-1)  # (B, H, K, D)
        z = self.mix(n.unsqueeze(2), m.unsqueeze(2), total.unsqueeze(2)).squeeze(2)  # (B, H, K, D)
        v_s = self.add_to_values(v_s.flatten(2, 3), (a_s * z.unsqueeze(-2)).flatten(2, 3)).unflatten(2, (K, L))
        real_keys = to_slots(torch.ones_like(a, dtype=torch.bool)).transpose(-2, -1)  # (B, R, K, 1, L)
        out = a_s * masked_softmax_attention(q_s, k_s, a_s * v_s, real_keys, self.scale)  # (B, H, K, L, D)
        return out.flatten(2, 3).gather(2, slot.expand(B, H, T, D)).to(v.dtype)
