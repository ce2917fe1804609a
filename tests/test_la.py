"""la's own cases: the recurrent step function equals the parallel form; fla's kernels equal the PyTorch chunked form."""

import pytest
import torch
from pydantic import ValidationError

from attnbench.variants import build_attention, la
from attnbench.variants.la import chunked_linear_attention, feature_map
from tests.test_variants import rel_err


@pytest.mark.parametrize("eps", [None, 10.0], ids=["default-eps", "eps-10"])
def test_step_and_chunked_forms_equal_the_parallel_form(eps):
    """The recurrent step and the chunked efficient path against the reference; with eps 10 the normaliser's eps is of
    the size of phi(q) . z, so a path that adds it otherwise (or not at all) fails, where 1e-6 hides it."""
    B, T, H, D = 2, 29, 3, 8
    torch.manual_seed(0)
    layer = build_attention("la", H * D, H, T, {} if eps is None else {"eps": eps})
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    parallel = layer.reference(q, k, v, None)
    state = None
    steps = []
    for t in range(T):
        out_t, state = layer.step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        steps.append(out_t)
    assert rel_err(torch.stack(steps, dim=2), parallel) < 1e-5
    assert rel_err(layer.efficient(q, k, v, None), parallel) < 1e-5


def test_chunk_size_does_not_change_the_result():
    torch.manual_seed(1)
    fq, fk = (feature_map(t) for t in torch.randn(2, 1, 2, 50, 8).unbind(0))
    v = torch.randn(1, 2, 50, 8)
    one = chunked_linear_attention(fq, fk, v, chunk=1, eps=1e-6)
    for chunk in (7, 16, 64):
        assert rel_err(chunked_linear_attention(fq, fk, v, chunk=chunk, eps=1e-6), one) < 1e-5, chunk


def test_kernel_fla_is_refused_where_fla_is_absent(monkeypatch):
    monkeypatch.setattr(la, "FLA_INSTALLED", False)
    with pytest.raises(ValidationError, match="needs flash-linear-attention"):
        la.LinearAttentionOptions(kernel="fla")
    monkeypatch.setattr(la, "FLA_INSTALLED", True)
    assert la.LinearAttentionOptions(kernel="fla").kernel == "fla"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_feature_map_keeps_relative_precision_far_below_zero(dtype):
    """phi(u) = exp(u) for u <= 0, u + 1 above, within the dtype's rounding everywhere (elu(u) + 1 rounds to 0 below
    u = -7 in bf16, -17 in fp32)."""
    u = torch.linspace(-60, 4, 257).to(dtype)
    x = u.double()
    exact = torch.where(x > 0, x + 1, torch.exp(x.clamp(max=0)))
    phi = feature_map(u)
    assert phi.dtype == dtype
    assert ((phi.double() - exact).abs() <= torch.finfo(dtype).eps * exact).all()
    assert torch.autograd.gradcheck(feature_map, x[::8].detach().requires_grad_(True)), "its own backward"


def every_finite_value(dtype: torch.dtype, device: str) -> torch.Tensor:
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32, device=device).to(torch.int16)
    values = bits.view(dtype)
    return values[torch.isfinite(values)]


def check_half_precision_map_is_fp32_rounded(device: str):
    for dtype in (torch.bfloat16, torch.float16):
        u = every_finite_value(dtype, device)
        in_fp32 = feature_map(u.float()).to(dtype)
        with torch.autocast(device, dtype=dtype):  # as training calls it; CUDA's autocast runs exp in fp32
            phi = feature_map(u)
        assert torch.equal(phi.view(torch.int16), in_fp32.view(torch.int16)), dtype


def test_feature_map_in_bf16_and_fp16_is_the_fp32_map_rounded_for_every_value():
    """Computed in the input's own 16-bit dtype, phi is bitwise fp32's phi rounded to that dtype, at every value."""
    check_half_precision_map_is_fp32_rounded("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_feature_map_in_bf16_and_fp16_is_the_fp32_map_rounded_for_every_value():
    check_half_precision_map_is_fp32_rounded("cuda")


def test_a_query_far_below_zero_in_bf16_gets_a_gradient_of_the_size_of_v():
    """A query with every component at -8, its features formed in bf16 as fla's path forms them: out_t still averages
    v, and the gradient of q_t stays of v's size. With phi = elu(u) + 1 in bf16 its features were 0, the normaliser
    eps, and the gradient of q_t 27,776 against 0.058 now (v's largest entry: 4.09)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 64, 16).unbind(0)
    q[..., 40, :] = -8.0
    q = q.bfloat16().requires_grad_(True)
    out = chunked_linear_attention(feature_map(q).float(), feature_map(k.bfloat16()).float(), v, chunk=16, eps=1e-6)
    out[..., 40, :].sum().backward()
    assert out[..., 40, :].abs().max() <= v[..., :41, :].abs().max()
    assert q.grad.float().abs().max() < 10 * v.abs().max()


def test_prefix_sum_is_the_cumulative_sum():
    u = torch.randn(2, 3, 77, 5)
    for chunk in (1, 16, 64, 128):
        assert rel_err(la.prefix_sum(u, chunk), u.cumsum(dim=2)) < 1e-6, chunk


def test_cpu_tensors_take_the_pytorch_form_whatever_the_kernel(monkeypatch):
    monkeypatch.setattr(la, "FLA_INSTALLED", True)
    for kernel in ("auto", "fla", "torch"):
        layer = build_attention("la", 16, 2, 8, la.LinearAttentionOptions(kernel=kernel))
        assert not layer.uses_fla(torch.device("cpu")), kernel


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and la.FLA_INSTALLED), reason="needs a CUDA device and flash-linear-attention")
@pytest.mark.parametrize("T", [1, 77, 1000])
def test_gpu_fla_equals_the_pytorch_chunked_form(T):
    """fla's kernels (bf16 in, under autocast, as training feeds them) against the fp32 chunked form: outputs and
    the gradients of q, k, v, within bf16 rounding."""
    B, H, D = 2, 4, 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device="cuda") for _ in range(3))
    grad = torch.randn(B, H, T, D, device="cuda")

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fn(feature_map(inputs[0]), feature_map(inputs[1]), inputs[2])
        out.float().backward(grad)
        return [out, *(t.grad for t in inputs)]

    fla = run(lambda fq, fk, v_: la.fla_linear_attention(fq, fk, v_, chunk=64, eps=1e-6), torch.bfloat16)
    torch_form = run(lambda fq, fk, v_: chunked_linear_attention(fq, fk, v_, chunk=64, eps=1e-6), torch.float32)
    for name, a, b in zip(["out", "dq", "dk", "dv"], fla, torch_form):
        if T == 1 and name in ("dq", "dk"):  # out_0 = v_0 whatever q, k: zero gradients, up to rounding
            assert a.abs().max() < 1e-2 * fla[3].abs().max(), f"{name} should be ~0 at T = 1"
        else:
            assert rel_err(a, b) < 2e-2, f"{name}: rel err {rel_err(a, b):.2e}"
    layer = build_attention("la", H * D, H, T).cuda()
    assert layer.uses_fla(q.device), "kernel auto should take fla on CUDA where it is installed"


def test_the_normaliser_eps_defaults_to_the_documented_1e_6():
    """la.py's choice where the spec is open: out_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps) with eps = 1e-6."""
    assert build_attention("la", 16, 2, 16).options.eps == 1e-6
