"""Stop 57, one H100 (main 43d1467; run as .dev57/warmup_probe.py <out.csv> beside `nvidia-smi --query-gpu=timestamp,
clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv -lms 100`).
Where does sca's run-to-run spread at 8K come from? (graphs mode, the benchmark's own functions)
1. builds: mha and sca alternately, three fresh builds each, each point exactly as the benchmark times it (run_point);
2. series: one build each of sdpa, mha, sca, then 100 samples one after another from the first call (a ramp?);
3. interleaved: the three steps of part 2, sample by sample, 40 rounds. Writes a CSV of every sample."""
import csv, gzip, statistics, sys, time
from functools import partial
import torch
from attnbench.benchmark import CHAIN, attention_step, run_point
from attnbench.config import load_params



def clock_windows(samples_csv: str, clocks_csv_gz: str) -> None:
    """`--clocks samples.csv clocks.csv.gz`: the card's SM clock, power and power-cap share while each run of samples ran."""
    import pandas as pd

    c = pd.read_csv(gzip.open(clocks_csv_gz), skipinitialspace=True)
    c.columns = [x.split(" [")[0] for x in c.columns]
    c["t"] = (pd.to_datetime(c["timestamp"], format="%Y/%m/%d %H:%M:%S.%f") - pd.Timestamp("1970-01-01")).dt.total_seconds()
    sm, watts = c["clocks.current.sm"].str.removesuffix(" MHz").astype(float), c["power.draw"].str.removesuffix(" W").astype(float)
    capped = c["clocks_event_reasons.active"] == "0x0000000000000004"  # SW power cap
    p = pd.read_csv(samples_csv)
    for phase, spans in (("series", [(0, 20), (20, 60), (60, 100)]), ("interleaved", [(0, 40)])):
        for v in p[p.phase == phase].variant.unique():
            g = p[(p.phase == phase) & (p.variant == v)]
            for a, b in spans:
                s = g.iloc[a:b]
                w = (c.t >= s.t.min() - 4e-3 * s.ms.max()) & (c.t <= s.t.max())
                print(f"{phase} {v} samples {a}-{b}: {s.ms.median():.3f} ms; SM {sm[w].median():.0f} MHz (min {sm[w].min():.0f}), "
                      f"{watts[w].median():.0f} W, power-capped in {capped[w].mean():.0%} of {w.sum()} readings")


if sys.argv[1] == "--clocks":
    clock_windows(*sys.argv[2:4])
    sys.exit()
params = load_params("workflow/presets/gpu-gcide.yaml")
T, heads, D = 8192, 8, 64
batch = 65536 // T
out = sys.argv[1]
rows = []
med = statistics.median

def build(variant):
    return attention_step(variant, T, batch, heads, D, params.variants.get(variant), "graphs")

print("1. fresh builds, as the benchmark times a point (warmup 3, 10 samples of 4 steps)", flush=True)
builds = {"mha": [], "sca": []}
for r in range(3):
    for variant in ["mha", "sca"]:
        row = run_point("attention", variant, T, batch, partial(build, variant), 3, 10)
        builds[variant].append(row["ms"])
        rows.append(dict(phase="build", variant=variant, i=r, ms=row["ms"], t=time.time()))
        print(f"  build {r} {variant}: {row['ms']:.3f} ms ({row['ms_min']:.3f}-{row['ms_max']:.3f})", flush=True)
print("  ratios mha/sca per round: " + ", ".join(f"{m / s:.3f}" for m, s in zip(builds["mha"], builds["sca"])), flush=True)

def sample(step):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(CHAIN):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / CHAIN

print("2. one build each, 100 samples from the first call", flush=True)
torch._dynamo.reset()
steps = {}
for variant in ["sdpa", "mha", "sca"]:
    step = build(variant)
    step(); torch.cuda.synchronize()  # compile and capture
    time.sleep(2.0)  # idle, as while the next point compiles
    series = []
    for i in range(100):
        series.append(sample(step))
        rows.append(dict(phase="series", variant=variant, i=i, ms=series[-1], t=time.time()))
    print(f"  {variant}: samples 0-9 median {med(series[:10]):.3f} (max {max(series[:10]):.3f}); 10-49 {med(series[10:50]):.3f}; "
          f"50-99 {med(series[50:]):.3f} ({min(series[50:]):.3f}-{max(series[50:]):.3f})", flush=True)
    steps[variant] = step
print("3. interleaved, 40 rounds", flush=True)
inter = {v: [] for v in steps}
for r in range(40):
    for variant in steps:
        inter[variant].append(sample(steps[variant]))
        rows.append(dict(phase="interleaved", variant=variant, i=r, ms=inter[variant][-1], t=time.time()))
for v, a in inter.items():
    print(f"  {v}: median {med(a):.3f} ({min(a):.3f}-{max(a):.3f})")
print(f"  mha/sca {med(inter['mha']) / med(inter['sca']):.3f}, sdpa/sca {med(inter['sdpa']) / med(inter['sca']):.3f}")
with open(out, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["phase", "variant", "i", "ms", "t"]); w.writeheader(); w.writerows(rows)
