"""fused_mixing's ops against a float64 autograd reference: the whole-problem backward at sizes that fill one or two
tiles of keys, with padding in either, with any number of programs (so that a program takes several problems on a GPU
too), problems without keys; the fake functions against the real outputs; and every kernel compiled for Hopper at the
options it is launched with, which needs no GPU and catches what Triton's interpreter lets pass (a loop variable that
changes type, a product smaller than tl.dot's 16)."""

import os
import subprocess
import sys

import pytest
import torch

from tests.test_lca import triton_device
from tests.test_variants import rel_err


def mixing_reference(n, m, weight, keys, scale):
    """softmax(u m^T * scale over the keys) n per problem, u = n W_u^T; zero rows for a problem without keys."""
    scores = (n @ weight.T @ m.transpose(-1, -2) * scale).masked_fill(~keys.bool()[:, None, :], float("-inf"))
    has_keys = keys.bool().any(-1)[:, None, None]
    return torch.where(has_keys, torch.softmax(torch.where(has_keys, scores, 0.0), -1), 0.0) @ n


@pytest.mark.gpu
@pytest.mark.parametrize("programs", [1, 3, None], ids=str)  # None: the module's own count
@pytest.mark.parametrize("P, L, D", [(1, 8, 8), (5, 17, 24), (7, 64, 16), (5, 72, 16), (3, 100, 32), (5, 127, 16), (3, 128, 16)])
def test_whole_backward_equals_reference(P, L, D, programs, monkeypatch):
    from attnbench.variants import fused_mixing

    device = triton_device()
    if programs is not None:
        monkeypatch.setattr(fused_mixing, "whole_programs", lambda problems, _: min(problems, programs))
    torch.manual_seed(P * 1000 + L)
    n, m = (torch.randn(P, L, D, device=device) for _ in range(2))
    weight = torch.randn(D, D, device=device) / D**0.5
    keys = (torch.rand(P, L, device=device) < 0.6).to(torch.int8)
    keys[0] = 0  # a problem without keys
    if P > 1:
        keys[-1] = 0
        keys[-1, -1] = 1  # only the last key: in the second tile where there is one
    scale, grad = D**-0.5, torch.randn(P, L, D, device=device)
    leaves = [t.clone().double().requires_grad_() for t in (n, m, weight)]
    expected = mixing_reference(*leaves, keys, scale)
    expected_grads = torch.autograd.grad((expected * grad.double()).sum(), leaves)
    leaves = [t.clone().requires_grad_() for t in (n, m, weight)]
    z, _ = fused_mixing.supernode_mixing(*leaves, keys, scale)
    grads = torch.autograd.grad((z * grad).sum(), leaves)
    assert rel_err(z, expected) < 1e-5
    for name, got, want in zip(["n", "m", "W_u"], grads, expected_grads):
        assert rel_err(got, want) < 1e-5, f"grad {name}: {rel_err(got, want):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("L", [72, 184], ids=str)  # the whole backward, the split one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fake_backward_matches_real(L, dtype):
    from attnbench.variants import fused_mixing

    device = triton_device()
    P, D = 3, 16
    n, m = (torch.randn(P, L, D, device=device, dtype=dtype) for _ in range(2))
    weight = torch.randn(D, D, device=device, dtype=dtype)
    keys = (torch.rand(P, L, device=device) < 0.6).to(torch.int8)
    z, lse = fused_mixing.supernode_mixing(n, m, weight, keys, 0.25)
    args = (n, m, weight, keys, z, lse, torch.randn_like(z), 0.25)
    for real, fake in zip(fused_mixing.supernode_mixing_backward(*args), fused_mixing.supernode_mixing_backward_fake(*args)):
        assert (real.shape, real.dtype, real.device, real.stride()) == (fake.shape, fake.dtype, fake.device, fake.stride())
    torch.library.opcheck(fused_mixing.supernode_mixing_backward, args, test_utils=("test_schema", "test_faketensor"))


COMPILE = r"""
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attnbench.variants import fused_mixing as fm

TYPES = {"KEYS": "*i8", "LSE": "*fp32", "DW": "*fp32", "L": "i32", "D": "i32", "P": "i32", "scale": "fp32"}
failures = []
for dtype, pointer in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
    for L, D in ((8, 8), (72, 16), (96, 64), (184, 64)):
        n = torch.empty(1, L, D, dtype=dtype)
        kernels = [(fm.forward_kernel, fm.forward_options(n))]
        if L <= fm.WHOLE_KEYS:
            kernels.append((fm.whole_backward_kernel, fm.whole_options(n)))
        else:
            kernels += [(fm.dq_kernel, fm.launch_options(n)), (fm.dkdv_kernel, fm.launch_options(n))]
        for kernel, options in kernels:
            launch = {key: options.pop(key) for key in ("num_warps", "num_stages") if key in options}
            signature = {a: "constexpr" if a in options else TYPES.get(a, pointer) for a in kernel.arg_names}
            constants = {(kernel.arg_names.index(a),): value for a, value in options.items()}
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                          options=launch)
                if kernel is fm.whole_backward_kernel and "barrier" not in compiled.asm["ttgir"]:
                    failures.append(f"{kernel.__name__} L={L}: tl.debug_barrier is gone")
            except Exception as error:
                failures.append(f"{kernel.__name__} {dtype} L={L} D={D}: {type(error).__name__}: {str(error)[-800:]}")
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # interpreted kernels do not compile
    result = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
