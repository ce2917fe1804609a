"""fused_band's Triton kernels against the defining formula: attention of query i over keys lo[i] <= j <= i."""

import pytest
import torch

from attnbench.variants.base import masked_softmax_attention
from attnbench.variants.lca import sort_by_cluster
from attnbench.variants.routing import straight_through
from tests.test_lca import triton_device
from tests.test_variants import FP32_RTOL, rel_err


def segment_bands(B, R, T, C, generator):
    """lo, hi (B, R, T) int32 of random clusters in sorted order: each position's segment start and end."""
    cluster = torch.randint(0, C, (B, R, T), generator=generator)
    cluster[..., : T // 2] = torch.where(cluster[..., : T // 2] < C // 2, 0, cluster[..., : T // 2])  # one long segment
    order, _, counts, starts = sort_by_cluster(cluster, C)
    sorted_cluster = cluster.gather(-1, order)
    return starts.gather(-1, sorted_cluster).int(), (starts + counts).gather(-1, sorted_cluster).int()


def band_reference(q, k, v, lo, scale):
    positions = torch.arange(q.shape[-2], device=q.device)
    allowed = (lo.unsqueeze(-1) <= positions) & (positions <= positions.unsqueeze(-1))  # (B|1, R|1, T, T)
    return masked_softmax_attention(q.float(), k.float(), v.float(), allowed, scale)


# Where the kernels read the keys' side (k, v): both sorted; both in q's order at the sort's rows (lca); k there and v
# sorted (sca, whose values are its supernode path's output in sorted order).
KEY_SIDES = {"sorted": (False, False), "at-rows": (True, True), "keys-at-rows": (True, False)}


@pytest.mark.gpu
@pytest.mark.parametrize("key_side", KEY_SIDES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value_gated", [True, False], ids=["value-gate", "no-value-gate"])
@pytest.mark.parametrize("B, H, R, T, C, layout", [(2, 2, 2, 1, 1, "model"), (1, 2, 1, 37, 3, "mixed"), (2, 2, 2, 200, 9, "model"),
                                                   (1, 3, 3, 300, 17, "mixed"), (2, 2, 1, 130, 1, "model")], ids=str)
def test_band_attention_equals_reference(B, H, R, T, C, layout, value_gated, dtype, key_side):
    """Output and the gradients of q, k and v: bands per head (R = H) and shared (R = 1), a segment longer than two
    64-row tiles, T not a multiple of a tile, T = 1, and one band over everything (C = 1: causal attention); the
    queries and the output in an order of their own (random permutations `rows`), the keys and values sorted or in
    the queries' order (KEY_SIDES); and the gradients of straight-through gates on the output and (where value_gated;
    lca's, not sca's) on v, one per head (R = H) or shared, in v's order. Layout "model": q, k, v
    views of one (B, T, 3, H, D) projection and the output read as (B, T, H * D) in place, as the model does, so that
    q, k, v and the output's gradient reach the kernels strided; "mixed": q, k and the output contiguous (B, H, T, D),
    v a view of the projection, so that k and v have strides of their own."""
    device = triton_device()
    from attnbench.variants import fused_band

    generator = torch.Generator().manual_seed(T)
    D = 64 if device == "cuda" else 16  # the interpreter is slow
    lo, hi = (t.to(device) for t in segment_bands(B, R, T, C, generator))
    # Sorted query i is q[..., rows[i], :]: a permutation from lca's sort, whose size-1 dimensions carry strides
    # of their own (batch 1, one routing row), as the layer hands it over.
    rows = sort_by_cluster(torch.randint(0, 5, (B, R, T), generator=generator), 5)[0].to(device)
    qkv = torch.randn(B, T, 3, H, D, generator=generator).to(device).requires_grad_(True)
    y, y_value = (torch.rand(B, R, T, 1, generator=generator).to(device).requires_grad_(True) for _ in range(2))  # y_value in v's order
    weight = torch.randn(B, T, H * D, generator=generator).to(device)
    scale = D**-0.5
    to_sorted, to_own = (i.unsqueeze(-1).expand(B, H, T, D) for i in (rows, rows.argsort(dim=-1)))
    keys_at_rows, values_at_rows = KEY_SIDES[key_side]

    def sorted_keys(u, at_rows):
        return u.gather(2, to_sorted) if at_rows else u

    def run(attend):
        q, k, v = qkv.to(dtype).permute(2, 0, 3, 1, 4)
        value_gate = straight_through(y_value) if value_gated else None
        if layout == "model":
            out = attend(q, k, v, lo, straight_through(y), value_gate, scale).float()
            loss = (out.transpose(1, 2).reshape(B, T, H * D) * weight).sum()
        else:
            out = attend(q.contiguous(), k.contiguous(), v, lo, straight_through(y), value_gate, scale).float()
            loss = (out * weight.view(B, T, H, D).transpose(1, 2).contiguous()).sum()
        return out, *torch.autograd.grad(loss, (qkv, y, y_value) if value_gated else (qkv, y))

    got = run(lambda q, k, v, lo, gate, value_gate, scale: fused_band.band_attention(
        q, k, v, lo, hi, rows.int(), scale, gate, value_gate, keys_at_rows=keys_at_rows, values_at_rows=values_at_rows))
    expected = run(lambda q, k, v, lo, gate, value_gate, scale: band_reference(
        q.gather(2, to_sorted), sorted_keys(k, keys_at_rows), sorted_keys(v if value_gate is None else v * value_gate, values_at_rows),
        lo, scale).gather(2, to_own) * gate)
    # bf16: the kernels round the probabilities to bf16 for their products, the reference keeps them in fp32.
    tol = FP32_RTOL if dtype == torch.float32 else 2e-2
    for name, a, b in zip(["output", "grad qkv", "grad gate", "grad value gate"], got, expected):
        # Relative to a norm of at least 1: at T = 1 q's gradient is exactly 0, the kernels' rounding ~1e-7.
        err = ((a - b).norm() / b.norm().clamp_min(1.0)).item()
        assert err < tol, f"{name}: error {err:.2e} of the reference's norm"


@pytest.mark.gpu
@pytest.mark.parametrize("router", ["head", "shared"])
@pytest.mark.parametrize("variant", ["lca", "sca"])
def test_layers_on_the_band_kernels_equal_reference(variant, router, monkeypatch):
    """lca's and sca's layers through `band_cluster_attention` (the sort, the key side in position order, sca's
    supernode kernels) against their reference, fp32: output and the gradients of q, k, v (views of one projection, as
    in the model), x and every parameter. Batch 1 with a shared router gives the sort's `order` strides of its own."""
    device = triton_device()
    from attnbench.variants import build_attention, fused_band, fused_mixing, fused_supernodes, lca, sca

    for module, name, value in ((lca, "fused_band", fused_band), (sca, "fused_mixing", fused_mixing),
                                (sca, "fused_supernodes", fused_supernodes)):
        monkeypatch.setattr(module, name, value)  # imported on CUDA machines only
    B, T, H, D = (1 if router == "shared" else 2), 130, 2, 8
    torch.manual_seed(0)
    layer = build_attention(variant, H * D, H, T, dict(clusters=3, router=router)).to(device).train()
    if variant == "sca":
        with torch.no_grad():
            layer.gate.fill_(0.5)  # the supernode path on (its gate starts at 0)
    qkv = torch.randn(B, T, 3, H, D, device=device, requires_grad=True)
    x = torch.randn(B, T, H * D, device=device, requires_grad=True)
    weight = torch.randn(B, H, T, D, device=device)

    def run(path):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        torch.manual_seed(1)  # the same Gumbel noise on both paths
        if path == "reference":
            out = layer.reference(q, k, v, x)
        else:
            cluster, own = layer.route_own(x)
            sorted_values = layer.sorted_supernode_values if variant == "sca" else None
            out = lca.band_cluster_attention(q, k, v, cluster, own, layer.clusters, layer.scale, sorted_values)
        loss = (out * weight).sum() + layer.aux_loss
        return out, *torch.autograd.grad(loss, [qkv, x, *layer.parameters()], allow_unused=True)  # not the projections

    names = ["output", "grad qkv", "grad x", *(f"grad {name}" for name, _ in layer.named_parameters())]
    for name, got, expected in zip(names, run("band"), run("reference")):
        assert (got is None) == (expected is None), f"{name}: reached by one path only"
        assert got is None or rel_err(got, expected) < FP32_RTOL, f"{name}: rel err {rel_err(got, expected):.2e}"


# Small fp32 cases of every Triton kernel family: a few seconds each under the interpreter.
INTERPRETED = [
    "tests/test_fused_band.py::test_band_attention_equals_reference[1-2-1-37-3-mixed-no-value-gate-torch.float32-sorted]",
    "tests/test_fused_band.py::test_band_attention_equals_reference[2-2-2-200-9-model-value-gate-torch.float32-at-rows]",
    "tests/test_fused_band.py::test_band_attention_equals_reference[2-2-1-130-1-model-no-value-gate-torch.float32-keys-at-rows]",
    "tests/test_fused_band.py::test_layers_on_the_band_kernels_equal_reference[lca-shared]",
    "tests/test_fused_band.py::test_layers_on_the_band_kernels_equal_reference[sca-head]",
    "tests/test_lca.py::test_fused_routing_equals_plain[2-37-3-5-8-torch.float32]",
    "tests/test_lca.py::test_fused_routing_equals_plain[1-40-2-170-16-torch.float32]",
    "tests/test_sca.py::test_fused_mixing_equals_sdpa_mixing[3-91-64-head-torch.float32]",
    "tests/test_sca.py::test_fused_supernodes_equal_position_order[37-3-16-shared-torch.float32-straight-through]",
    "tests/test_sca.py::test_fused_supernodes_equal_position_order[37-3-16-head-torch.float32-random]",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels' own tests run them compiled")
def test_the_triton_kernels_on_the_cpu_under_the_interpreter():
    """lca's and sca's kernels run only on CUDA, so on a CPU machine their tests skip and CI would miss a broken one (a
    band kernel that dropped its causal bound passed every CPU test). Triton's interpreter runs them on the CPU, but it
    must be switched on before Triton is imported: a child pytest with TRITON_INTERPRET=1 runs some small cases."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs Triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *INTERPRETED],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and f"{len(INTERPRETED)} passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
