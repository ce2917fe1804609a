"""cka and fastcka's own cases: the two are one function, stable at large scores, rank 0 is block attention."""

import pytest
import torch

from attnbench.variants import REGISTRY, build_attention
from attnbench.variants import fastcka
from attnbench.variants.base import masked_softmax_attention
from attnbench.variants.cka import ClusterKernelOptions
from tests.test_variants import FP32_RTOL, rel_err, run_layer

# (batch, length, heads, head size, block, rank)
SHAPES = {
    "B2-T37-b8": (2, 37, 2, 8, 8, 4),
    "B1-T1-b8": (1, 1, 2, 8, 8, 4),
    "B3-T64-b16": (3, 64, 4, 16, 16, 16),
    "B2-T50-b16": (2, 50, 1, 16, 16, 16),
    "B2-T33-b1": (2, 33, 2, 8, 1, 3),
}


def make_pair(T, H, D, block, rank):
    """cka and fastcka with the same parameters."""
    torch.manual_seed(0)
    options = {"block": block, "rank": rank}
    cka = build_attention("cka", H * D, H, T, options).train()
    fast = build_attention("fastcka", H * D, H, T, options).train()
    fast.load_state_dict(cka.state_dict())
    return cka, fast


def assert_close(got, want, what):
    out_got, grads_got = got
    out_want, grads_want = want
    assert rel_err(out_got, out_want) < FP32_RTOL, f"{what}: output rel err {rel_err(out_got, out_want):.2e}"
    assert grads_got.keys() == grads_want.keys(), what
    for key in grads_want:
        err = rel_err(grads_got[key], grads_want[key])
        assert err < FP32_RTOL, f"{what}: grad of {key} rel err {err:.2e}"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cka_equals_fastcka(shape):
    B, T, H, D, block, rank = shape
    cka, fast = make_pair(T, H, D, block, rank)
    x = torch.randn(B, T, H * D)
    reference = run_layer(cka, x, "reference")
    cka_eff = run_layer(cka, x, "efficient")
    fast_eff = run_layer(fast, x, "efficient")
    assert_close(fast_eff, cka_eff, "fastcka vs cka")
    assert_close(cka_eff, reference, "cka vs reference")
    if T > block:  # an earlier block exists, so the inter term, and P, count
        assert reference[1]["P.weight"].abs().sum() > 0


def test_large_scores_are_stable():
    """Scores scaled 100x (|q k * scale| in the hundreds, exp overflows fp32): finite, and all paths agree."""
    B, T, H, D = 2, 45, 2, 16
    cka, fast = make_pair(T, H, D, block=16, rank=16)
    torch.manual_seed(1)
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    q = q * 100
    results = {}
    for name, attend in [("reference", cka.reference), ("cka", cka.efficient), ("fastcka", fast.efficient)]:
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        layer = fast if name == "fastcka" else cka
        layer.zero_grad(set_to_none=True)
        out = attend(*inputs, None)
        out.backward(torch.ones_like(out))
        grads = {key: t.grad for key, t in zip("qkv", inputs)} | {"P": layer.P.weight.grad.clone()}
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values()), name
        results[name] = (out.detach(), grads)
    assert (q @ k.transpose(-2, -1) / D**0.5).abs().max() > 200
    assert_close(results["cka"], results["reference"], "cka vs reference at 100x scores")
    assert_close(results["fastcka"], results["reference"], "fastcka vs reference at 100x scores")


def block_attention_reference(q, k, v, block, scale):
    """Block-diagonal causal softmax attention (ca with lookback 0), from the shared masked reference."""
    T = q.shape[-2]
    block_of = torch.arange(T) // block
    allowed = (block_of[:, None] == block_of[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    return masked_softmax_attention(q, k, v, allowed, scale)


@pytest.mark.parametrize("name", ["cka", "fastcka"])
def test_rank_zero_is_block_attention(name):
    B, T, H, D, block = 2, 41, 2, 8, 16
    torch.manual_seed(0)
    layer = build_attention(name, H * D, H, T, {"block": block, "rank": 0})
    assert layer.P is None
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    want = block_attention_reference(q, k, v, block, layer.scale)
    for attend in (layer.reference, layer.efficient):
        assert rel_err(attend(q, k, v, None), want) < 1e-5


@pytest.mark.skipif("ca" not in REGISTRY, reason="ca is not registered yet")
def test_rank_zero_equals_ca_lookback_zero():
    B, T, H, D, block = 2, 41, 2, 8, 16
    torch.manual_seed(0)
    cka = build_attention("cka", H * D, H, T, {"block": block, "rank": 0})
    ca = build_attention("ca", H * D, H, T, {"block": block, "lookback": 0})
    ca.load_state_dict(cka.state_dict())
    x = torch.randn(B, T, H * D)
    assert_close(run_layer(cka, x, "efficient"), run_layer(ca, x, "efficient"), "cka rank 0 vs ca lookback 0")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("T", [1, 37, 64])
def test_flex_path_equals_plain_path(T):
    """The GPU kernel's function, run eagerly on CPU (forward only there): out and log-sum-exp."""
    B, H, D, block = 2, 2, 8, 16
    torch.manual_seed(0)
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    with torch.no_grad():
        out, lse = fastcka.flex_block_causal_attention(q, k, v, block, 0.3)
    want_out, want_lse = fastcka.block_causal_attention(q, k, v, block, 0.3)
    assert rel_err(out, want_out) < 1e-5
    assert rel_err(lse, want_lse) < 1e-5
    assert rel_err(out, block_attention_reference(q, k, v, block, 0.3)) < 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_fastcka_through_flex_equals_reference(monkeypatch):
    """The whole fastcka layer with its intra term on (eager) FlexAttention, forward."""
    B, T, H, D = 2, 45, 2, 8
    _, fast = make_pair(T, H, D, block=16, rank=16)
    x = torch.randn(B, T, H * D)
    with torch.no_grad():
        fast.path = "reference"
        want = fast(x)
        monkeypatch.setattr(fastcka, "block_causal_attention", fastcka.flex_block_causal_attention)
        fast.path = "efficient"
        got = fast(x)
    assert rel_err(got, want) < FP32_RTOL


@pytest.mark.parametrize(
    "bad, allowed", [({"block": 0}, "block.*must be an integer >= 1 or 'auto'"), ({"rank": -1}, "rank.*must be an integer >= 0 or 'auto'")]
)
def test_bad_options_are_refused_naming_field_and_value(bad, allowed):
    value = next(iter(bad.values()))
    with pytest.raises(ValueError, match=f"(?s){allowed}.*input_value={value}"):
        ClusterKernelOptions(**bad)
    with pytest.raises(ValueError, match=f"(?s){allowed}"):
        build_attention("cka", 16, 2, 64, bad)


def test_features_are_elu_of_a_bias_free_projection_plus_one():
    """"rank-k features psi(u) = elu(P u) + 1 with P: D -> k": linear, no bias; on random u of both signs (elu's two
    branches)."""
    D, rank = 8, 5
    torch.manual_seed(0)
    layer = build_attention("cka", 2 * D, 2, 32, {"rank": rank})
    assert layer.P.bias is None, "P has a bias"
    u = 3 * torch.randn(2, 2, 11, D)
    Pu = u @ layer.P.weight.detach().T
    expected = torch.where(Pu > 0, Pu, Pu.exp() - 1) + 1
    assert torch.allclose(layer.features(u).detach(), expected, atol=1e-6)
    assert (Pu < 0).any() and (Pu > 0).any()
