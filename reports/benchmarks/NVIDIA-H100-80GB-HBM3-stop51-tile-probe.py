"""Probe (stop 50, run in stop 51 on an H100): FlexAttention's sparse block size for ca's band and fastcka's own block.

The band masks are built with 128-wide tiles (flex.TILE) while ca's kernel already runs 64 x 64 tiles
(flex.SMALL_TILES): a 128 sparse block at b = 64 makes the kernel loop over key sub-tiles outside the band.
With flex.TILE = 64 it skips them (tile lists checked on the CPU with TILE = 64 in stop 50). fastcka calls Flex
with Inductor's default tiles (128-row forward), which need 128 sparse blocks; it is timed with SMALL_TILES at
both block sizes as well. One process, alternating, two rounds, CUDA graphs, 65,536 tokens per step, H 8, D 64.
"""
import csv
import functools
import os
import sys

from attnbench import benchmark
from attnbench.config import parse_params
from attnbench.profile import fit_exponent
from attnbench.variants import fastcka, flex

params = parse_params({"variants": {"ca": {}, "fastcka": {}}})
default_kernel = fastcka.flex_kernel


def small_tiles_kernel(device):
    return functools.partial(default_kernel(device), kernel_options=flex.SMALL_TILES)


configs = [  # (variant, sparse tile, fastcka's kernel tiles)
    ("ca", 128, None), ("ca", 64, None),
    ("fastcka", 128, "default"), ("fastcka", 128, "small"), ("fastcka", 64, "small"),
]
rows = []
for rnd in range(2):
    for variant, tile, kernel in configs:
        flex.TILE = tile
        fastcka.flex_kernel = small_tiles_kernel if kernel == "small" else default_kernel
        for T in (2048, 4096, 8192, 16384, 32768):
            batch = 65536 // T
            row = benchmark.run_point("attention", variant, T, batch, lambda: benchmark.attention_step(
                variant, T, batch, 8, 64, params.variants[variant], "graphs"), 3, 10)
            rows.append({"round": rnd, "variant": variant, "tile": tile, "kernel": kernel or "small", "T": T,
                         "ms": row.get("ms"), "mtok_per_s": row.get("mtok_per_s"), "status": row["status"]})
            print(rows[-1], flush=True)
with open(os.path.join(os.environ.get("OUT", "."), "tile-probe.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
for rnd in range(2):
    for variant, tile, kernel in configs:
        pts = [r for r in rows if (r["round"], r["variant"], r["tile"], r["kernel"]) == (rnd, variant, tile, kernel or "small") and r["status"] == "ok"]
        slope = fit_exponent([r["T"] for r in pts], [r["ms"] / (65536 // r["T"]) for r in pts])
        print(f"round {rnd} {variant:8s} tile {tile:3d} kernel {kernel or 'small':7s} " + " ".join(f"{r['mtok_per_s']:.1f}" for r in pts)
              + f"  exponent {slope if slope is None else round(slope, 2)}", file=sys.stderr, flush=True)
