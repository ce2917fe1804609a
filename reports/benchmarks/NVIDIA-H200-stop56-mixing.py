"""Stop 56 probe (needs a GPU): sca's mixing backward at the 8K shape, main's whole kernel (head) against branch
mixing-passes' passes_backward_kernel (new, keys outside the rows, one key tile's accumulators at a time), and the
head kernel capped with maxnreg so that more programs fit a multiprocessor; then sca's whole layer at 8K with each
against mha, interleaved. Run from main's checkout with .dev56/fused_mixing_passes.py = the branch's module.
Prints one line per setting and MEDIAN lines; nothing else is written."""
import importlib.util
import statistics
import sys

import torch
from triton.testing import do_bench

from attnbench import benchmark as bm
from attnbench.config import load_params
from attnbench.variants import fused_mixing as head
from attnbench.variants import sca


def load(name):
    spec = importlib.util.spec_from_file_location(name, f".dev56/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


new = load("fused_mixing_passes")
parts = sys.argv[1:] or ["kernel", "layer"]
torch.manual_seed(0)
print(torch.cuda.get_device_name(), torch.__version__, flush=True)


def configure(module, per_sm, options):
    """Module-level settings of one case: head's whole kernel or new's passes kernel."""
    if module is head:
        module.WHOLE_PER_SM, module.WHOLE_OPTIONS = per_sm, options
    else:
        module.PASSES_PER_SM, module.PASSES_OPTIONS = per_sm, options


HEAD = (head.WHOLE_PER_SM, dict(head.WHOLE_OPTIONS))
NEW = (new.PASSES_PER_SM, dict(new.PASSES_OPTIONS))
cases = [("head", head, *HEAD)]
cases += [("head", head, per_sm, HEAD[1] | {"maxnreg": regs}) for regs, per_sm in [(168, 3), (128, 4), (128, 3)]]
cases += [("new", new, per_sm, NEW[1] | {"KEYS_TILE": keys, "num_stages": stages})
          for keys in (64, 32) for per_sm in (2, 3, 4) for stages in (1, 2)]
cases += [("new", new, 3, NEW[1] | {"BLOCK": 64, "num_warps": warps}) for warps in (4, 8)]
cases += [("new", new, 4, NEW[1] | {"maxnreg": 128})]
best = {"head": (float("inf"), HEAD), "new": (float("inf"), NEW)}

if "kernel" in parts:
    P, L, D = 4032, 96, 64
    n, m = (torch.randn(P, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = (torch.randn(D, D, device="cuda") / D**0.5).to(torch.bfloat16)
    keys = (torch.rand(P, L, device="cuda") < 0.9).to(torch.int8)
    scale = D**-0.5
    z, lse = head.supernode_mixing(n, m, weight, keys, scale)
    grad_z = torch.randn_like(z)
    args = (n, m, weight, keys, z, lse, grad_z, scale)
    configure(head, *HEAD)
    base = head.supernode_mixing_backward(*args)

    def err(got):
        return max(float((x.float() - y.float()).abs().max() / y.float().abs().max()) for x, y in zip(got, base))

    times = {}
    for rnd in range(2):
        for i, (label, module, per_sm, options) in enumerate(cases):
            configure(module, per_sm, options)
            fn = lambda: module.supernode_mixing_backward(*args)  # noqa: E731
            try:
                e = err(fn())
                us = do_bench(fn, warmup=10, rep=100) * 1e3
                times.setdefault(i, []).append(us)
                print(f"round {rnd} {label} per_sm {per_sm} {options} {us:7.1f} us err {e:.1e}", flush=True)
            except Exception as ex:
                print(f"round {rnd} {label} per_sm {per_sm} {options} failed: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
    for i, values in times.items():
        label, _, per_sm, options = cases[i]
        us = statistics.median(values)
        print(f"KERNEL {label} per_sm {per_sm} {options} {us:7.1f} us", flush=True)
        if us < best[label][0]:
            best[label] = (us, (per_sm, options))
    configure(head, *HEAD)

if "layer" in parts:
    torch._dynamo.config.cache_size_limit = 64
    params = load_params("workflow/presets/gpu-gcide.yaml")
    T, batch = 8192, 8
    steps = {}
    for label, variant, module, setting in [("mha", "mha", None, None), ("sca-head", "sca", head, HEAD),
                                            ("sca-headbest", "sca", head, best["head"][1]),
                                            ("sca-new", "sca", new, best["new"][1])]:
        if module is not None:
            configure(module, *setting)  # read at trace time: each step keeps the setting it was built with
            sca.fused_mixing = module
        step = bm.attention_step(variant, T, batch, 8, 64, params.variants.get(variant), "graphs")
        bm.time_samples(step, 3, 2)
        steps[label] = step
        print("built", label, setting, flush=True)
    results = {label: [] for label in steps}
    for rnd in range(3):
        for label, step in steps.items():
            ms = statistics.median(bm.time_samples(step, 2, 10))
            results[label].append(ms)
            print(f"round {rnd} {label:12s} {ms:.3f} ms {batch * T / ms / 1e3:.1f} Mtok/s", flush=True)
    mha = statistics.median(results["mha"])
    for label, values in results.items():
        ms = statistics.median(values)
        print(f"MEDIAN {label:12s} {ms:.3f} ms  {batch * T / ms / 1e3:.1f} Mtok/s  {mha / ms:.3f}x mha", flush=True)
