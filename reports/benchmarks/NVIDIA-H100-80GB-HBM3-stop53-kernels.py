"""Probe (stop 53): sca's and lca's kernels at 8K on the H100, top 45 by own device time, graphs mode."""
import os, sys
from attnbench import benchmark
from attnbench.config import parse_params

params = parse_params({"variants": {"lca": {}, "sca": {}, "mha": {}}})
out = os.environ.get("OUT", ".")
lines = []
for variant in sys.argv[1:] or ["mha", "lca", "sca"]:
    T = 8192
    batch = 65536 // T
    row = benchmark.run_point("attention", variant, T, batch, lambda: benchmark.attention_step(
        variant, T, batch, 8, 64, params.variants.get(variant), "graphs"), 5, 20)
    print(variant, row.get("ms"), row.get("mtok_per_s"), row["status"], flush=True)
    if row["status"] == "ok":
        step = benchmark.attention_step(variant, T, batch, 8, 64, params.variants.get(variant), "graphs")
        for _ in range(5):
            step()
        table = benchmark.kernel_table(step, top=45)
        lines += [f"## {variant} T=8192 {row['ms']:.3f} ms {row['mtok_per_s']:.1f} Mtok/s", "", *table, ""]
open(os.path.join(out, "kernels.md"), "w").write("\n".join(lines))
print("\n".join(lines))
