"""Probe (stop 60): ca's CUDA path by Flex (then its path) against fused_band's kernels with three tile settings, T 2K-32K,
65,536 tokens, H 8, D 64, CUDA graphs, the benchmark's protocol; sdpa and mha in the same process.

Ran (call A) on edf0058 plus ca's `band` method, where ca's CUDA path was still Flex; since f359d6c it is the band
kernels, so this copy selects each path by name. python reports/benchmarks/NVIDIA-H100-80GB-HBM3-stop60-ca-probe.py
[config ...] writes $OUT/ca-probe.csv (NVIDIA-H100-80GB-HBM3-stop60-ca-probe.csv) and prints the table."""
import csv, logging, os, sys
import torch
from attnbench import benchmark as bm
from attnbench.config import load_params
from attnbench.variants import ca, fused_band

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
params = load_params("workflow/presets/gpu-gcide.yaml")
lens = [2048, 4096, 8192, 16384, 32768]
settings = params.benchmark.model_copy(update={"seq_lens": lens, "modes": ["graphs"]})
default = {k: dict(v) for k, v in fused_band.TILES.items()}
configs = {
    "flex": None,
    "band-lca-tiles": default,
    "band-64x64": {"forward": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                   "dq": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                   "dkdv": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)},
    "band-128": {"forward": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                 "dq": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                 "dkdv": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3)},
}
only = sys.argv[1:] or list(configs)
rows = []
out = os.environ.get("OUT", "/tmp")
def save():
    with open(f"{out}/ca-probe.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["config", "T", "batch", "ms", "ms_min", "ms_max", "samples", "mtok_per_s", "peak_gib", "status"], extrasaction="ignore")
        w.writeheader(); w.writerows(rows)
for name in ["sdpa", "mha"]:
    att, _ = bm.benchmark(params, [name], "attention", settings)
    rows += [r | {"config": name} for r in att]; save()
for name in only:
    tiles = configs[name]
    if tiles is None:
        ca.BlockClusterAttention.efficient = lambda self, q, k, v, x: self.flex(q, k, v, x)
    else:
        fused_band.TILES.clear(); fused_band.TILES.update(tiles)
        ca.BlockClusterAttention.efficient = lambda self, q, k, v, x: self.band(q, k, v, x)
    att, _ = bm.benchmark(params, ["ca"], "attention", settings)
    rows += [r | {"config": name} for r in att]; save()
by = {(r["config"], r["T"]): r for r in rows if r["status"] == "ok"}
import math
print("| config | " + " | ".join(f"{T // 1024}K" for T in lens) + " | exponent 2K-32K | x mha 8K |")
for name in ["sdpa", "mha", *only]:
    cells = [by.get((name, T)) for T in lens]
    pts = [(math.log(T), math.log(r["ms"] * T / 65536)) for T, r in zip(lens, cells) if r]
    n = len(pts); mx = sum(p[0] for p in pts) / n; my = sum(p[1] for p in pts) / n
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    r8, m8 = by.get((name, 8192)), by.get(("mha", 8192))
    print(f"| {name} | " + " | ".join(f"{r['mtok_per_s']:.1f}" if r else "-" for r in cells) + f" | {slope:.2f} | {m8['ms'] / r8['ms']:.2f} |")
