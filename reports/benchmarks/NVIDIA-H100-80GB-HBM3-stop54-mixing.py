"""Stop 54 probe: sca's mixing backward with keys in 64 + 32 tiles and W_u's gradient formed in the kernel (new)
against main's (head: one 128-key tile, du stored, then a GEMM), alone and inside sca's whole layer at 8K."""
import importlib.util
import statistics
import sys

import torch
from triton.testing import do_bench

from attnbench import benchmark as bm
from attnbench.config import load_params
from attnbench.variants import sca


def load(name):
    spec = importlib.util.spec_from_file_location(name, f".dev54/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


head, new = load("fused_mixing_head"), load("fused_mixing_new")
parts = sys.argv[1:] or ["kernel", "layer"]
torch.manual_seed(0)
print(torch.cuda.get_device_name(), torch.__version__, flush=True)

if "kernel" in parts:
    P, L, D = 4032, 96, 64
    n, m = (torch.randn(P, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = (torch.randn(D, D, device="cuda") / D**0.5).to(torch.bfloat16)
    keys = (torch.rand(P, L, device="cuda") < 0.9).to(torch.int8)
    scale = D**-0.5
    z, lse = head.supernode_mixing(n, m, weight, keys, scale)
    grad_z = torch.randn_like(z)

    def run_head():
        gn, gm, gu = head.supernode_mixing_backward(n, m, weight, keys, z, lse, grad_z, scale)
        return gn, gm, gu.flatten(0, 1).T @ n.flatten(0, 1)

    def run_new():
        return new.supernode_mixing_backward(n, m, weight, keys, z, lse, grad_z, scale)

    def err(a, b):
        return [float((x.float() - y.float()).abs().max() / y.float().abs().max()) for x, y in zip(a, b)]

    base = run_head()
    print("new vs head rel err (n, m, W_u):", ["%.1e" % e for e in err(run_new(), base)], flush=True)
    cases = [("head", None, None)]
    cases += [("new", per_sm, None) for per_sm in (1, 2, 3, 4, 8)]
    cases += [("new", 2, dict(BLOCK=b, num_warps=w, num_stages=s)) for b, w, s in [(32, 4, 2), (16, 4, 1), (32, 8, 1), (64, 4, 1), (64, 8, 1)]]
    default_options, default_per_sm = dict(new.WHOLE_OPTIONS), new.WHOLE_PER_SM
    for rnd in range(2):
        for kind, per_sm, options in cases:
            new.WHOLE_PER_SM = per_sm or default_per_sm
            new.WHOLE_OPTIONS = options or default_options
            fn = run_head if kind == "head" else run_new
            try:
                e = max(err(fn(), base))
                us = do_bench(fn, warmup=10, rep=100) * 1e3
                print(f"round {rnd} {kind} per_sm {per_sm} {options} {us:7.1f} us err {e:.1e}", flush=True)
            except Exception as ex:
                print(f"round {rnd} {kind} per_sm {per_sm} {options} failed: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
    new.WHOLE_PER_SM, new.WHOLE_OPTIONS = default_per_sm, default_options

if "layer" in parts:
    torch._dynamo.config.cache_size_limit = 64
    params = load_params("workflow/presets/gpu-gcide.yaml")
    T, batch = 8192, 8
    steps = {}
    for label, variant, module in [("mha", "mha", None), ("sca-head", "sca", head), ("sca-new", "sca", new), ("lca", "lca", None)]:
        if module is not None:
            sca.fused_mixing = module  # traced into the compiled graph at the first call, in the warm-up below
        step = bm.attention_step(variant, T, batch, 8, 64, params.variants.get(variant), "graphs")
        bm.time_samples(step, 3, 2)
        steps[label] = step
        print("built", label, flush=True)
    results = {label: [] for label in steps}
    for rnd in range(3):
        for label, step in steps.items():
            ms = statistics.median(bm.time_samples(step, 2, 10))
            results[label].append(ms)
            print(f"round {rnd} {label:9s} {ms:.3f} ms {batch * T / ms / 1e3:.1f} Mtok/s", flush=True)
    mha = statistics.median(results["mha"])
    for label, values in results.items():
        ms = statistics.median(values)
        print(f"MEDIAN {label:9s} {ms:.3f} ms  {batch * T / ms / 1e3:.1f} Mtok/s  {mha / ms:.3f}x mha", flush=True)
