"""Stop 54 probe 4: (a) test_fused_mixing_equals_sdpa_mixing's errors, bf16, for main's fused_mixing (new) and the
old one (head), several seeds; (b) which module's kernels each sca step launches (counted in the custom ops' Python,
which runs while the graphs are recorded), then the A/B."""
import importlib.util
import statistics
import sys

import torch

from attnbench import benchmark as bm
from attnbench.config import load_params
from attnbench.variants import sca
from tests.test_sca import sca_layer
from tests.test_variants import rel_err

spec = importlib.util.spec_from_file_location("fused_mixing_head", ".dev54/fused_mixing_head.py")
head = importlib.util.module_from_spec(spec)
sys.modules["fused_mixing_head"] = head
spec.loader.exec_module(head)
new = sca.fused_mixing

for C in (91, 182):
    for seed in range(4):
        torch.manual_seed(seed)
        B, H, S, D = 2, 2, 3 if C == 91 else 2, 64
        layer = sca_layer(16, H, D, router="head").cuda()
        n, m = (torch.randn(B, H, S, C, D, device="cuda", requires_grad=True) for _ in range(2))
        total = torch.randint(0, 3, (B, H, S, C), device="cuda").float()
        total[:, :, 0] = 0
        weight = torch.randn(B, H, S, C, D, device="cuda")

        def run(fused):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                z = layer.mix(n, m, total, fused=fused)
            return z.float(), *torch.autograd.grad((z.float() * weight).sum(), (n, m, layer.supernode_query.weight))

        reference = run(False)
        line = []
        for name, module in (("head", head), ("new", new)):
            sca.fused_mixing = module
            errors = [rel_err(got, expected) for got, expected in zip(run(True), reference)]
            line.append(f"{name} " + " ".join(f"{e:.1e}" for e in errors))
        sca.fused_mixing = new
        print(f"C {C} seed {seed} (z, n, m, W_u): " + " | ".join(line), flush=True)

calls = {"head": 0, "new": 0}
kernel = {"head": head.whole_backward_kernel, "new": new.whole_backward_kernel}


class Counted:
    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        calls[self.name] += 1
        return kernel[self.name][grid]


head.whole_backward_kernel, new.whole_backward_kernel = Counted("head"), Counted("new")
torch._dynamo.config.cache_size_limit = 64
params = load_params("workflow/presets/gpu-gcide.yaml")
T, batch = 8192, 8
steps = {"mha": bm.attention_step("mha", T, batch, 8, 64, params.variants.get("mha"), "graphs")}
for label, module in (("sca-head", head), ("sca-new", new)):
    sca.fused_mixing = module
    steps[label] = bm.attention_step("sca", T, batch, 8, 64, params.variants.get("sca"), "graphs")
    bm.time_samples(steps[label], 3, 2)
    print(f"built {label}: whole_backward_kernel launches so far {calls}", flush=True)
sca.fused_mixing = new
results = {label: [] for label in steps}
for rnd in range(5):
    for label, step in steps.items():
        results[label].append(statistics.median(bm.time_samples(step, 2, 10)))
print(f"after timing: {calls}")
mha = statistics.median(results["mha"])
for label, values in results.items():
    ms = statistics.median(values)
    print(f"MEDIAN {label:9s} {ms:.3f} ms {batch * T / ms / 1e3:.1f} Mtok/s {mha / ms:.3f}x mha (rounds {min(values):.3f}-{max(values):.3f})", flush=True)
