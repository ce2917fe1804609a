"""fused_band's Triton kernels against the defining formula: attention of query i over keys lo[i] <= j <= i."""

import pytest
import torch

from attnbench.variants.base import masked_softmax_attention
from attnbench.variants.lca import sort_by_cluster
from attnbench.variants.routing import straight_through
from tests.test_lca import triton_device
from tests.test_variants import FP32_RTOL


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value_gated", [True, False], ids=["value-gate", "no-value-gate"])
@pytest.mark.parametrize("B, H, R, T, C, layout", [(2, 2, 2, 1, 1, "model"), (1, 2, 1, 37, 3, "contiguous"), (2, 2, 2, 200, 9, "model"),
                                                   (1, 3, 3, 300, 17, "contiguous"), (2, 2, 1, 130, 1, "model")], ids=str)
def test_band_attention_equals_reference(B, H, R, T, C, layout, value_gated, dtype):
    """Output and the gradients of q, k and v: bands per head (R = H) and shared (R = 1), a segment longer than two
    64-row tiles, T not a multiple of a tile, T = 1, and one band over everything (C = 1: causal attention); the
    queries and the output in an order of their own (random permutations `rows`), the keys and values sorted; and
    the gradients of straight-through gates on the output and (where value_gated; lca's, not sca's) on v, one per
    head (R = H) or shared. Layout "model": q, k, v
    views of one (B, T, 3, H, D) projection and the output read as (B, T, H * D) in place, as the model does, so that
    q and the output's gradient reach the kernels strided; "contiguous": both contiguous (B, H, T, D)."""
    device = triton_device()
    from attnbench.variants import fused_band

    generator = torch.Generator().manual_seed(T)
    D = 64 if device == "cuda" else 16  # the interpreter is slow
    lo, hi = (t.to(device) for t in segment_bands(B, R, T, C, generator))
    # Sorted query i is q[..., rows[i], :]: a permutation from lca's sort, whose size-1 dimensions carry strides
    # of their own (batch 1, one routing row), as the layer hands it over.
    rows = sort_by_cluster(torch.randint(0, 5, (B, R, T), generator=generator), 5)[0].to(device)
    qkv = torch.randn(B, T, 3, H, D, generator=generator).to(device).requires_grad_(True)
    y, y_value = (torch.rand(B, R, T, 1, generator=generator).to(device).requires_grad_(True) for _ in range(2))  # y_value sorted
    weight = torch.randn(B, T, H * D, generator=generator).to(device)
    scale = D**-0.5
    to_sorted, to_own = (i.unsqueeze(-1).expand(B, H, T, D) for i in (rows, rows.argsort(dim=-1)))

    def run(attend):
        q, k, v = qkv.to(dtype).permute(2, 0, 3, 1, 4)
        value_gate = straight_through(y_value) if value_gated else None
        if layout == "model":
            out = attend(q, k, v, lo, straight_through(y), value_gate, scale).float()
            loss = (out.transpose(1, 2).reshape(B, T, H * D) * weight).sum()
        else:
            out = attend(q.contiguous(), k.contiguous(), v.contiguous(), lo, straight_through(y), value_gate, scale).float()
            loss = (out * weight.view(B, T, H, D).transpose(1, 2).contiguous()).sum()
        return out, *torch.autograd.grad(loss, (qkv, y, y_value) if value_gated else (qkv, y))

    got = run(lambda q, k, v, lo, gate, value_gate, scale: fused_band.band_attention(q, k, v, lo, hi, rows.int(), scale, gate, value_gate))
    expected = run(lambda q, k, v, lo, gate, value_gate, scale:
                   band_reference(q.gather(2, to_sorted), k, v if value_gate is None else v * value_gate, lo, scale).gather(2, to_own) * gate)
    # bf16: the kernels round the probabilities to bf16 for their products, the reference keeps them in fp32.
    tol = FP32_RTOL if dtype == torch.float32 else 2e-2
    for name, a, b in zip(["output", "grad qkv", "grad gate", "grad value gate"], got, expected):
        # Relative to a norm of at least 1: at T = 1 q's gradient is exactly 0, the kernels' rounding ~1e-7.
        err = ((a - b).norm() / b.norm().clamp_min(1.0)).item()
        assert err < tol, f"{name}: error {err:.2e} of the reference's norm"


# Small fp32 cases of every Triton kernel family: a few seconds each under the interpreter.
INTERPRETED = [
    "tests/test_fused_band.py::test_band_attention_equals_reference[1-2-1-37-3-contiguous-no-value-gate-torch.float32]",
    "tests/test_fused_band.py::test_band_attention_equals_reference[2-2-2-200-9-model-value-gate-torch.float32]",
    "tests/test_fused_band.py::test_band_attention_equals_reference[2-2-1-130-1-model-no-value-gate-torch.float32]",
    "tests/test_lca.py::test_fused_routing_equals_plain[2-37-3-5-8-torch.float32]",
    "tests/test_lca.py::test_fused_routing_equals_plain[1-40-2-170-16-torch.float32]",
    "tests/test_sca.py::test_fused_mixing_equals_sdpa_mixing[3-91-64-head-torch.float32]",
    "tests/test_sca.py::test_fused_supernodes_equal_position_order[37-3-16-shared-torch.float32]",
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
