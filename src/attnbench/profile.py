"""profile: forward+backward time and memory of one attention layer and of the whole model vs T.

Scopes: `attention`, the variant's attention sub-layer (projections included); `reference`, mha's sub-layer (the
fused causal sdpa) at the same shapes in the same process, the bar of the report's speed ratio; `model`, the whole
language model (`profile.whole_model`).

At each T the batch is tokens_per_step // T sequences, so a T^a mechanism
takes time ~ T^(a-1) per step; the fitted exponents are slopes of log(time
per sequence) and log(memory per sequence) against log T, comparable with the
spec's "compute vs T" and "memory vs T" columns. Memory is the CUDA peak above
what was allocated before the step (weights, input, gradients) on GPU; on CPU,
where torch keeps no allocator statistics, it is the peak of the bytes autograd
holds saved for backward (the part of memory that grows with T), without the
weights and the input, which were there before the step as in the CUDA base.
torch is seeded before each point (`profile.seed`), so that lca's and sca's
clusters, on which their saved bytes depend, are the same on every run.
A point that runs out of memory is recorded as `oom` and the rest still run. Each point runs `profile.warmup` steps,
then more until it has run `profile.warmup_seconds`; its time is the median of `profile.repeats` runs, and its
`spread` says how far they disagreed (the report names the points above 10%).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import statistics
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .config import Params
from .files import atomic_path, write_json
from .model import ByteLM
from .runtime import autocast, resolve_device, use_cpu_threads
from .variants import build_attention, parse_entry

log = logging.getLogger(__name__)

# spread: the median absolute deviation of a point's timed repeats over their median, large where another load shared
# the machine or the step is too short to time steadily; unlike the range it does not grow with the repeats, and one
# stall, which the median leaves out, does not move it. Above NOISY_SPREAD (half the runs more than 10% from the
# median) the point is counted in profile.json's noisy_points and named by the report.
NOISY_SPREAD = 0.1
# How a point's memory was measured (profile.csv's memory_method), as the report explains it.
MEMORY_METHODS = {
    "cuda_peak": "the CUDA allocator's peak above what the step started with",
    "saved_activations": "the peak of the bytes autograd holds for the backward pass (a CPU keeps no allocator "
                         "statistics), not the process's memory",
}
FIELDS = ["variant", "scope", "T", "batch", "seconds", "spread", "tokens_per_s", "memory_bytes", "memory_method", "status"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Measurement(NamedTuple):
    seconds: float  # the median of the repeats
    spread: float  # median absolute deviation / median
    memory_bytes: int
    memory_method: str


class Step(NamedTuple):
    """One forward+backward to measure, and the tensors alive across it (weights, input), which are not its memory."""

    run: Callable[[], None]
    resident: tuple[torch.Tensor, ...] = ()


class SavedActivations:
    """The peak of the bytes autograd holds saved for backward inside the context: each storage counted once, while
    a tensor saved on it is alive; the storages of `resident` tensors (and of their views) not at all. (Keyed by
    address alone, a storage saved for a node that is then dropped, and a later one the allocator puts at its
    address, would count as one, by chance.)"""

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        self.resident = {t.untyped_storage().data_ptr() for t in resident}
        self.holders: Counter[int] = Counter()  # storage address -> saved tensors alive on it
        self.held = 0
        self.bytes = 0

    def __enter__(self):
        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            address, size = storage.data_ptr(), storage.nbytes()
            if address in self.resident:
                return t.detach()
            if self.holders[address] == 0:
                self.held += size
                self.bytes = max(self.bytes, self.held)
            self.holders[address] += 1
            # Kept detached: a saved output kept as itself would hold its own node (node -> tensor -> grad_fn), a
            # cycle that keeps a dropped branch's saved tensors alive, and counted, past their use.
            packed = t.detach()
            weakref.finalize(packed, self._release, address, size)
            return packed

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _release(self, address: int, size: int) -> None:
        self.holders[address] -= 1
        if self.holders[address] == 0:
            self.held -= size

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure, a plain RuntimeError ("can't allocate memory")."""
    cpu_allocator = isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or cpu_allocator


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of `step`, the device's work included."""
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def measure(step: Callable[[], None], device: torch.device, warmup: int, repeats: int,
            resident: Iterable[torch.Tensor] = (), warmup_seconds: float = 0.0) -> Measurement:
    """Median seconds of `step` (a forward+backward), their spread, and its memory, `resident` tensors not counted.
    After `warmup` calls, more follow until they have taken `warmup_seconds`."""
    for _ in range(warmup):
        step()
    spent = 0.0
    while spent < warmup_seconds:
        spent += timed(step, device)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        memory, method = torch.cuda.max_memory_allocated(device) - base, "cuda_peak"  # MEMORY_METHODS
    else:
        with SavedActivations(resident) as saved:
            step()
        memory, method = saved.bytes, "saved_activations"
    times = [timed(step, device) for _ in range(repeats)]
    median = statistics.median(times)
    return Measurement(median, statistics.median(abs(t - median) for t in times) / median, memory, method)


def layer_step(params: Params, variant: str, options, T: int, batch: int, device: torch.device) -> Step:
    """forward+backward of one attention sub-layer (projections included) of `variant` with `options`."""
    m = params.model
    layer = build_attention(variant, m.d_model, m.n_heads, T, options).to(device).train()
    x = torch.randn(batch, T, m.d_model, device=device, requires_grad=True)

    def step():
        with autocast(device):
            out = layer(x)
        out.float().sum().backward()

    return Step(step, (x, *layer.parameters()))


def attention_step(params: Params, variant: str, T: int, batch: int, device: torch.device) -> Step:
    return layer_step(params, parse_entry(variant)[0], params.variants[variant], T, batch, device)


def reference_step(params: Params, variant: str, T: int, batch: int, device: torch.device) -> Step:
    """mha's sub-layer with its default options, whose attention is the fused causal sdpa, at the same shapes: the
    bar the report holds each variant's attention scope against, measured in the same process."""
    return layer_step(params, "mha", None, T, batch, device)


def model_step(params: Params, variant: str, T: int, batch: int, device: torch.device) -> Step:
    model = ByteLM(dataclasses.replace(params.model_for(variant), seq_len=T)).to(device).train()
    idx = torch.randint(0, 256, (batch, T + 1), device=device)

    def step():
        with autocast(device):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        model.with_aux_loss(loss).backward()
        model.zero_grad(set_to_none=True)

    return Step(step, (idx, *model.parameters()))


def fit_exponent(T: list[int], values: list[float]) -> float | None:
    """Slope of log(values) against log(T); None with fewer than two usable points."""
    points = [(t, v) for t, v in zip(T, values) if v and v > 0]
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


# variants.md: a measured compute exponent agrees with the spec's table within this.
SPEC_EXPONENT_TOLERANCE = 0.25


def off_spec(fitted: dict[str, float | None], spec: dict[str, float]) -> list[str]:
    """'name fitted, spec s' for each fitted time exponent further than the tolerance from its spec's (None or NaN:
    not fitted, not judged)."""
    return [f"{name} {value:.2f}, spec {spec[name]:g}" for name, value in fitted.items()
            if value is not None and not math.isnan(value) and abs(value - spec[name]) > SPEC_EXPONENT_TOLERANCE]


def profile(params: Params, variant: str) -> tuple[list[dict], dict]:
    """Rows of measurements (one per scope and T) and the fitted exponents."""
    cfg = params.profile
    device = resolve_device(params.train.device)
    scopes = {"attention": attention_step, "reference": reference_step, **({"model": model_step} if cfg.whole_model else {})}
    rows = []
    for scope, build in scopes.items():
        for T in cfg.seq_lens:
            batch = max(1, cfg.tokens_per_step // T)
            row = {"variant": variant, "scope": scope, "T": T, "batch": batch}
            torch.manual_seed(cfg.seed)  # the same weights, inputs and clusters on every run: reproducible memory
            try:
                step = build(params, variant, T, batch, device)
                m = measure(step.run, device, cfg.warmup, cfg.repeats, step.resident, cfg.warmup_seconds)
                row.update(m._asdict(), tokens_per_s=batch * T / m.seconds, status="ok")
            except Exception as err:
                if not out_of_memory(err):
                    raise
                row.update(dict.fromkeys(Measurement._fields), tokens_per_s=None, status="oom")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            log.info("profile %s %s T=%d: %s", variant, scope, T,
                     f"{row['tokens_per_s']:.0f} tok/s, {row['memory_bytes'] / 2**20:.1f} MiB" if row["status"] == "ok" else "out of memory")
    exponents = {}
    for scope in scopes:
        ok = [r for r in rows if r["scope"] == scope and r["status"] == "ok"]
        Ts = [r["T"] for r in ok]
        exponents[f"{scope}_time_exponent"] = fit_exponent(Ts, [r["seconds"] / r["batch"] for r in ok])
        exponents[f"{scope}_memory_exponent"] = fit_exponent(Ts, [r["memory_bytes"] / r["batch"] for r in ok])
    noisy = sum(r["status"] == "ok" and r["spread"] > NOISY_SPREAD for r in rows)
    return rows, {"variant": variant, "device": str(device), "cpu_threads": torch.get_num_threads(), "noisy_points": noisy, **exponents}


def main(params: Params, variant: str, out_dir: Path) -> dict:
    from .tracking import stage_run

    use_cpu_threads(params.train.threads)
    with stage_run(params, "profile", variant) as tracker:
        tracker.log_params(params.logged(variant, "profile"))
        rows, summary = profile(params, variant)
        with atomic_path(out_dir / "profile.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        write_json(out_dir / "profile.json", summary)
        for row in rows:
            if row["status"] == "ok":
                tracker.log_metrics({f"{row['scope']}_tokens_per_s": row["tokens_per_s"], f"{row['scope']}_memory_bytes": row["memory_bytes"]}, step=row["T"])
        tracker.log_metrics({k: v for k, v in summary.items() if (k.endswith("exponent") or k == "noisy_points") and v is not None})
        tracker.log_artifact(out_dir / "profile.csv")
    shown = ", ".join(f"{k} {v:.2f}" for k, v in summary.items() if k.endswith("exponent") and v is not None)
    noisy = f"; {summary['noisy_points']} with repeats spread over {NOISY_SPREAD:.0%}" if summary["noisy_points"] else ""
    log.info("profile %s: %d points on %s; %s%s", variant, len(rows), summary["device"], shown, noisy)
    return summary
