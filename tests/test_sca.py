"""sca's own cases: the supernode path switched on (non-zero gate), the lca and mha limits, the sorted path,
the non-causal seed form, options.

The shared tests (tests/test_variants.py) build sca with its defaults, so with the gate at 0, where the
supernodes add nothing to the output; here the gate is set to 0.5 so every path through them is exercised.
"""

import pytest
import torch

from attnbench.model import ByteLM, ModelConfig
from attnbench.variants import build_attention
from tests.test_variants import FP32_RTOL, assert_equals_mha, assert_sorted_forward_equals_reference, assert_prefix_unchanged, future_changed, rel_err, run_layer

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ROUTERS = ["head", "shared"]
GATE = 0.5


def sca_layer(T, H, D, gate=GATE, seed=0, **options):
    torch.manual_seed(seed)
    layer = build_attention("sca", H * D, H, T, options)
    with torch.no_grad():
        layer.gate.fill_(gate)
    return layer


def assert_same(out_a, grads_a, out_b, grads_b, label):
    assert rel_err(out_a, out_b) < FP32_RTOL, f"{label}: output rel err {rel_err(out_a, out_b):.2e}"
    assert grads_a.keys() == grads_b.keys(), f"{label}: the paths reach different parameters"
    for key in grads_b:
        err = rel_err(grads_a[key], grads_b[key])
        assert err < FP32_RTOL, f"{label}: grad of {key} rel err {err:.2e}"


# (batch, length, heads, head size, options): T not a multiple of b, T = 1, b = 1, long clusters, many clusters.
CASES = {
    "B2-T37-b16-C3": (2, 37, 2, 8, dict(clusters=3)),
    "B1-T1": (1, 1, 2, 8, dict()),
    "B3-T50-b5-C4": (3, 50, 2, 8, dict(block=5, clusters=4)),
    "B2-T23-b1-C2": (2, 23, 1, 8, dict(block=1, clusters=2)),
    "B2-T90-b8-C2": (2, 90, 1, 8, dict(block=8, clusters=2)),  # clusters span several of lca's chunks
    "B2-T80-b8-C12": (2, 80, 2, 8, dict(block=8, clusters=12)),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_reference_equals_efficient_with_supernodes(case, router, mode):
    B, T, H, D, options = case
    layer = sca_layer(T, H, D, router=router, **options).train(mode == "train")
    x = torch.randn(B, T, H * D)
    out_ref, grads_ref = run_layer(layer, x, "reference")
    out_eff, grads_eff = run_layer(layer, x, "efficient")
    assert_same(out_eff, grads_eff, out_ref, grads_ref, f"sca {options} {router} {mode}")
    if T > layer.block:
        assert grads_ref["supernode_query.weight"].abs().sum() > 0, "no gradient reaches the supernode query"
        assert grads_ref["gate"].abs().sum() > 0, "no gradient reaches the gate"


@pytest.mark.parametrize("path", ["reference", "efficient"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("options", [dict(clusters=3), dict(block=7, clusters=5)], ids=str)
def test_causal_with_supernodes(options, router, mode, path):
    """Changing inputs after t leaves outputs at <= t and their input gradients bitwise equal; T = 45 is no multiple of b.
    t at a block's first, inner and last positions for both blocks (16: 16, 20, 31; 7: 14, 17, 20): a supernode that
    read its own block would leak only where t is not a block's last position."""
    B, T, H, D = 2, 45, 2, 8
    layer = sca_layer(T, H, D, router=router, **options).train(mode == "train")
    for t in (14, 16, 17, 20, 31):
        x, x_changed, weight = future_changed(B, T, H * D, t)
        runs = [run_layer(layer, inputs, path, grad_weight=weight) for inputs in (x, x_changed)]
        assert_prefix_unchanged(*runs, t, f"sca/{path} t={t}")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_whole_model_with_supernodes_is_causal(mode):
    cfg = ModelConfig(variant="sca", d_model=32, n_layers=2, n_heads=2, seq_len=48, variant_options=dict(block=8, clusters=3))
    torch.manual_seed(0)
    model = ByteLM(cfg).train(mode == "train")
    with torch.no_grad():
        for attn in model.attention_layers:
            attn.gate.fill_(GATE)
    idx = torch.randint(0, 256, (2, 48))
    changed = idx.clone()
    t = 30
    changed[:, t + 1 :] = torch.randint(0, 256, (2, 48 - t - 1))
    with torch.no_grad():
        torch.manual_seed(1)
        a, _ = model(idx)
        torch.manual_seed(1)
        b, _ = model(changed)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1]), f"model logits at <= {t} depend on the future"


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("path", ["reference", "efficient"])
def test_one_cluster_is_mha(path, router):
    """The spec's degenerate case, at the gate's initial value 0 (with a non-zero gate one cluster's
    supernode would add the running mean of earlier blocks' values, which mha does not have)."""
    B, T, H, D = 2, 50, 2, 8
    assert_equals_mha(sca_layer(T, H, D, gate=0.0, clusters=1, router=router).train(), path, "sca C=1", B)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("path", ["reference", "efficient"])
def test_gate_zero_is_lca(path, router, mode):
    """At its initial gate 0, sca is lca with the same weights: the outputs bitwise; the gate still gets a gradient."""
    B, T, H, D = 2, 70, 2, 8
    options = dict(clusters=4, router=router)
    layer = sca_layer(T, H, D, gate=0.0, **options).train(mode == "train")
    lca = build_attention("lca", H * D, H, T, options).train(mode == "train")
    lca.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(B, T, H * D)
    out, grads = run_layer(layer, x, path)
    out_lca, grads_lca = run_layer(lca, x, path)
    assert torch.equal(out, out_lca), f"sca gate 0 {path}: output rel err {rel_err(out, out_lca):.2e}"
    for key in grads_lca:
        assert rel_err(grads[key], grads_lca[key]) < FP32_RTOL, f"sca gate 0 {path}: grad of {key}"
    assert grads["gate"].abs().sum() > 0, "no gradient reaches the gate at 0"
    # The same layer with the gate open computes something else: the supernode path is live.
    with torch.no_grad():
        layer.gate.fill_(GATE)
    assert rel_err(run_layer(layer, x, path)[0], out_lca) > 1e-3


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("T,clusters,block", [(1, 1, 16), (37, 3, 16), (300, 17, 8)], ids=str)
def test_sorted_path_equals_reference(T, clusters, block, router, mode):
    H, D = 2, 8
    assert_sorted_forward_equals_reference(sca_layer(T, H, D, clusters=clusters, block=block, router=router).train(mode == "train"), B=2)


NON_CAUSAL = {
    "B2-T37-C7": (2, 37, 2, 8, dict()),
    "B1-T1": (1, 1, 2, 8, dict()),
    "B3-T50-C4": (3, 50, 2, 8, dict(clusters=4)),
    "B2-T10-C40": (2, 10, 1, 8, dict(clusters=40)),  # more cliques asked than tokens: K = T
}


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("case", NON_CAUSAL.values(), ids=NON_CAUSAL.keys())
def test_non_causal_reference_equals_efficient(case, router):
    B, T, H, D, options = case
    layer = sca_layer(T, H, D, causal=False, router=router, **options).train()
    x = torch.randn(B, T, H * D)
    out_ref, grads_ref = run_layer(layer, x, "reference")
    out_eff, grads_eff = run_layer(layer, x, "efficient")
    assert layer.aux_loss is None
    assert_same(out_eff, grads_eff, out_ref, grads_ref, f"sca causal=false {options} {router}")
    assert grads_ref["router.weight"].abs().sum() > 0, "no gradient reaches the 1-D projection"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["reference", "efficient"])
def test_non_causal_finite_at_large_magnitudes(path, dtype):
    B, T, H, D = 2, 40, 2, 16
    layer = sca_layer(T, H, D, causal=False).to(dtype)
    with torch.no_grad():
        layer.qkv.weight.mul_(10)
    out, grads = run_layer(layer, (torch.randn(B, T, H * D) * 100).to(dtype), path)
    assert torch.isfinite(out).all(), f"{path}: non-finite output"
    for key, g in grads.items():
        assert torch.isfinite(g).all(), f"{path}: non-finite grad of {key}"


@pytest.mark.parametrize(
    "options,message",
    [
        ({"clusters": 0}, "(?s)clusters.*must be an integer >= 1 or 'auto'"),
        ({"block": 0}, "(?s)block.*must be an integer >= 1 or 'auto'"),
        ({"block": "big"}, "(?s)block.*must be an integer >= 1 or 'auto'"),
        ({"causal": "maybe"}, "valid boolean"),
        ({"lookback": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        build_attention("sca", 16, 2, 32, options)


def test_language_model_refuses_the_non_causal_form():
    from attnbench.model import ByteLM, ModelConfig

    with pytest.raises(ValueError, match="not causal"):
        ByteLM(ModelConfig(variant="sca", d_model=16, n_heads=2, n_layers=1, seq_len=16, variant_options={"causal": False}))


@pytest.mark.parametrize("router", ROUTERS)
def test_mix_is_attention_over_the_non_empty_supernodes(router):
    """Both paths share `mix`, so it is checked here against its definition written out per step and cluster:
    z_c = sum over non-empty c' of softmax_c'(W_u n_c . m_c' / sqrt(D)) n_c', and zero in a step with none non-empty."""
    B, H, S, C, D = 2, 2, 4, 5, 8
    layer = sca_layer(16, H, D, router=router)
    R = H if router == "head" else 1
    n, m = torch.randn(B, H, S, C, D), torch.randn(B, H, S, C, D)
    total = torch.randint(0, 3, (B, R, S, C)).float()
    total[:, :, 1] = 0  # a step with no non-empty supernode
    z = layer.mix(n, m, total)
    W = layer.supernode_query.weight
    for b, h, s, c in torch.cartesian_prod(*(torch.arange(k) for k in (B, H, S, C))).tolist():
        keys = (total[b, h % R, s] > 0).nonzero().flatten()
        if len(keys) == 0:
            expected = torch.zeros(D)
        else:
            weights = ((W @ n[b, h, s, c]) @ m[b, h, s, keys].T / D**0.5).softmax(dim=0)
            expected = weights @ n[b, h, s, keys]
        assert torch.allclose(z[b, h, s, c], expected, atol=1e-5), (b, h, s, c)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("S, C, D", [(4, 5, 8), (3, 70, 16), (3, 91, 64), (2, 182, 64)])
def test_fused_mixing_equals_sdpa_mixing(S, C, D, router, dtype, monkeypatch):
    """fused_mixing's kernels against the sdpa call in `mix`: z and the gradients of n, m and W_u, at C below one
    64-wide tile, at C = 70 (the whole backward's second tile of keys 16 wide, 8 of them padding), at sca's C for 8K
    (64 + 32 keys) and for 32K (three tiles of the split kernels), with a step that has no non-empty supernode."""
    from attnbench.variants import fused_mixing, sca
    from tests.test_lca import triton_device

    device = triton_device()
    monkeypatch.setattr(sca, "fused_mixing", fused_mixing)  # imported on CUDA machines only
    B, H = 2, 2
    layer = sca_layer(16, H, D, router=router).to(device)
    R = H if router == "head" else 1
    n, m = (torch.randn(B, H, S, C, D, device=device, requires_grad=True) for _ in range(2))
    total = torch.randint(0, 3, (B, R, S, C), device=device).float()
    total[:, :, 0] = 0
    weight = torch.randn(B, H, S, C, D, device=device)

    def run(fused):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            z = layer.mix(n, m, total, fused=fused)
        return z.float(), *torch.autograd.grad((z.float() * weight).sum(), (n, m, layer.supernode_query.weight))

    # bf16: both sides round their operands to bf16; ~7e-3 apart under Triton's interpreter.
    tol = FP32_RTOL if dtype == torch.float32 else 3e-2
    for name, got, expected in zip(["z", "grad n", "grad m", "grad W_u"], run(True), run(False)):
        assert rel_err(got, expected) < tol, f"{name}: rel err {rel_err(got, expected):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, gates", [(torch.float32, "straight-through"), (torch.bfloat16, "straight-through"),
                                          (torch.float32, "random")], ids=str)
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("T, C, block", [(1, 1, 16), (37, 3, 16), (300, 17, 8), (700, 5, 8)], ids=str)
def test_fused_supernodes_equal_position_order(T, C, block, router, dtype, gates, monkeypatch):
    """The CUDA path's gated v', computed in sorted order by fused_supernodes' kernels, against the CPU path's
    position-order PyTorch (scatter-add, cumulative sum, gather), sorted: the gated v' and the gradients of k, v, the
    own gates, W_u and the gate. k and v are strided views of one array, as the model's are of its projection. The
    gates are the straight-through ones (forward value 1), or random weights in (0, 1) (fp32), whose values the
    kernels must read at each token's own position.
    The last cluster is empty; at T = 700 the steps span two of the kernels' tiles and a cluster several token tiles."""
    from attnbench.variants import fused_mixing, fused_supernodes, sca
    from attnbench.variants.lca import gated, sort_by_cluster
    from attnbench.variants.routing import straight_through
    from tests.test_lca import triton_device

    device = triton_device()
    monkeypatch.setattr(sca, "fused_mixing", fused_mixing)  # imported on CUDA machines only
    monkeypatch.setattr(sca, "fused_supernodes", fused_supernodes)
    B, H, D = 2, 2, 8
    R = H if router == "head" else 1
    layer = sca_layer(T, H, D, clusters=C, block=block, router=router).to(device)
    # Both paths mix with fused_mixing's kernels, as on CUDA (the plain path picks sdpa on a CPU tensor).
    monkeypatch.setattr(layer, "mix", lambda n, m, total, fused=False: sca.SuperClusterAttention.mix(layer, n, m, total, fused=True))
    kv = torch.randn(B, T, 2, H, D, device=device, requires_grad=True)
    y = torch.rand(B, R, T, 1, device=device, requires_grad=True)
    cluster = torch.randint(0, max(C - 1, 1), (B, R, T), device=device)
    order, _, counts, starts = sort_by_cluster(cluster, C)
    weight = torch.randn(B, H, T, D, device=device)

    def to_sorted(u):
        return u.gather(2, order.unsqueeze(-1).expand(*u.shape[:2], T, u.shape[-1]))

    def run(fused, dtype):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            own = straight_through(y) if gates == "straight-through" else y
            k_in, v_in = kv.to(dtype).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each, strided
            if fused:
                values = layer.sorted_supernode_values(k_in, v_in, own, order, cluster, counts, starts)
            else:
                values = to_sorted(gated(layer.supernode_values(k_in, v_in, cluster, own), own))
        grads = torch.autograd.grad((values.float() * weight).sum(), (kv, y, layer.supernode_query.weight, layer.gate))
        return values.float(), *grads

    # bf16: within twice the plain path's own bf16 error, both against the plain path in fp32 (the fused path stores
    # n and m in bf16, the plain one keeps them in fp32 until the mixing casts them; a gradient summed over all tokens,
    # as the gate's, cancels, which magnifies rounding). Four times under Triton's interpreter, whose fp32 -> bf16
    # casts truncate where the GPU's round to nearest.
    names = ["v'", "grad k and v", "grad own", "grad W_u", "grad gate"]
    exact = run(False, torch.float32)
    plain = exact if dtype == torch.float32 else run(False, dtype)
    factor = 2 if device == "cuda" else 4
    for name, got, expected, baseline in zip(names, run(True, dtype), exact, plain):
        tol = FP32_RTOL if dtype == torch.float32 else factor * rel_err(baseline, expected) + 1e-3
        assert rel_err(got, expected) < tol, f"{name}: rel err {rel_err(got, expected):.2e}, tolerance {tol:.2e}"


def test_values_add_the_gated_supernode_state():
    """"query t in block i adds the mixed state of its own cluster from step i - 1 ... through a learned gate":
    v'_t = v_t + gate * z, one gate per head (v itself not scaled)."""
    B, H, T, D = 2, 2, 9, 4
    layer = sca_layer(T, H, D)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.5, -1.5]))
    v, extra = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    expected = v + torch.tensor([0.5, -1.5]).view(1, H, 1, 1) * extra
    assert torch.allclose(layer.add_to_values(v, extra), expected, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_fresh_layer_has_its_supernode_gate_at_zero(causal):
    """"through a learned gate (initialised 0)", one scalar per head: a freshly built layer (not sca_layer, which sets
    it) has gate == 0."""
    layer = build_attention("sca", 24, 3, 32, {"causal": causal})
    assert tuple(layer.gate.shape) == (3,)
    assert torch.equal(layer.gate.detach(), torch.zeros(3))


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("T", [10, 37, 50, 64])
def test_non_causal_partition_is_sqrt_T_balanced_cliques(T, router):
    """Seed form: "1-D projection + sort into sqrt(T) cliques": with clusters auto, K = ceil(sqrt(T)) cliques, of
    floor(T / K) or ceil(T / K) tokens, contiguous in the order of the scores s_t = w . x_t (rank r in floor(r K / T))."""
    B, H, D = 2, 2, 8
    K = next(c for c in range(1, T + 1) if c * c >= T)
    layer = sca_layer(T, H, D, causal=False, router=router)
    x = torch.randn(B, T, H * D)
    clique, rank, cliques, _ = layer.partition(x)
    assert cliques == K
    sizes = torch.nn.functional.one_hot(clique, cliques).sum(dim=-2)  # (B, R, K)
    assert set(sizes.unique().tolist()) <= {T // K, -(-T // K)}, sizes
    assert sizes.sum(dim=-1).eq(T).all()
    scores = layer.router(x).transpose(1, 2)  # (B, R, T)
    in_score_order = clique.gather(-1, scores.argsort(dim=-1, stable=True))
    assert (in_score_order.diff(dim=-1) >= 0).all(), "cliques are not contiguous in the sorted order"
    assert torch.equal(clique, rank * K // T)
