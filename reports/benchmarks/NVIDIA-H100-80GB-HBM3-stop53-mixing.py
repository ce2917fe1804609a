"""Probe (stop 53): sca's mixing backward at its 8K shape (4,032 problems of 96 supernodes, D 64, bf16) on this GPU:
the whole-problem kernel (current) against dq_kernel + dkdv_kernel over tiles of 32 or 64, warps and stages."""
import itertools
import torch
import triton
from triton.testing import do_bench
from attnbench.variants import fused_mixing as fm

torch.manual_seed(0)
P, L, D = 4032, 96, 64
n, m = (torch.randn(P, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
weight = (torch.randn(D, D, device="cuda") / D**0.5).to(torch.bfloat16)
keys = (torch.rand(P, L, device="cuda") < 0.9).to(torch.int8)
scale = D**-0.5
z, lse = fm.supernode_mixing(n, m, weight, keys, scale)
grad_z = torch.randn_like(z)

def whole(options):
    out = [torch.empty_like(n) for _ in range(3)]  # n, m, u
    fm.whole_backward_kernel[(P,)](n, m, weight, keys, z, lse, grad_z, out[2], out[0], out[1], L, D, scale,
                                   BLOCK_KEYS=fm.dot_tile(L), **fm.launch_options(n) | options)
    return out

def split(options):
    out = [torch.empty_like(n) for _ in range(3)]
    opts = fm.launch_options(n) | options
    grid = (P, triton.cdiv(L, opts["BLOCK"]))
    fm.dq_kernel[grid](n, m, weight, keys, z, lse, grad_z, out[2], out[0], L, D, scale, **opts)
    fm.dkdv_kernel[grid](n, m, weight, keys, z, lse, grad_z, out[0], out[1], L, D, scale, **opts)
    return out

def err(a, b):
    return max(float((x.float() - y.float()).abs().max() / y.float().abs().max()) for x, y in zip(a, b))

base = whole(dict(fm.WHOLE_OPTIONS))
results = []
cases = [("whole", dict(fm.WHOLE_OPTIONS))] + [("whole", dict(BLOCK=b, num_warps=w, num_stages=s)) for b, w, s in [(32, 4, 2), (16, 4, 1)]]
cases += [("split", dict(BLOCK=b, num_warps=w, num_stages=s)) for b, w, s in itertools.product((32, 64), (2, 4, 8), (1, 2, 3))]
for rnd in range(2):
    for kind, options in cases:
        fn = whole if kind == "whole" else split
        try:
            e = err(fn(options), base)
            us = do_bench(lambda: fn(options), warmup=10, rep=80) * 1e3
            results.append((us, kind, str(options)))
            print(f"round {rnd} {kind:6s} {str(options):50s} {us:7.1f} us err {e:.1e}", flush=True)
        except Exception as ex:
            print(f"round {rnd} {kind:6s} {str(options):50s} failed: {type(ex).__name__}: {str(ex)[:100]}", flush=True)
for us, kind, options in sorted(results)[:6]:
    print(f"BEST {kind} {options} {us:.1f} us")
