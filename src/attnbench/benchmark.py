"""benchmark: attention kernels and whole-model training on the GPU that is present, against the limit.

Two tables, one run (so every ratio compares numbers from the same card and moment):
- attention: each variant's efficient path, forward+backward at a fixed number of tokens per
  step (batch = tokens // T), q, k, v (B, H, T, D) bf16 plus the layer input x for routing
  variants; the variant's own parameters (router, P, gates) included, projections excluded,
  as in the design notes; eager, compiled, or compiled and replayed as CUDA graphs (`graphs`,
  torch.compile's reduce-overhead: no host launch cost per kernel). Reference rows `sdpa` /
  `sdpa-flash`: the fused causal kernel alone.
- training: the whole model (params.model, and --train-sizes) in training mode: bf16 autocast,
  fused AdamW, torch.compile where the variant compiles (eager otherwise, recorded), tokens/s and
  MFU = (6 N + 6 L T d) * tokens/s / peak, N the non-embedding parameters (gpu-notes.md's count);
  first a plain GPT of the same size (mha on the flash kernel), the floor mha must beat.
What is measured (lengths, tokens per step, modes, parts, repeats) is params' `benchmark` section, which the
command's flags override. Fitted time exponents of the attention rows use T in [2K, 32K] where the run measured two
lengths there, else all its lengths (the table's header and the MLflow metric's name say which). Each attention row
is also set against its limit on the device (`limit_terms`): the least time its definition allows, from the device's
memory bandwidth and bf16 peak, with the exponent a kernel at that limit would measure.
Writes <out>/<device>-attention.csv, <device>-train.csv, <device>.md and <device>.png (after each variant, so a run
cut short keeps what it measured); with `trace`, also <device>-kernels.md: each point's GPU kernels by device time
(torch.profiler), where to look before optimising. Other devices' files in <out> stay. At the end
<out>/benchmark.json names the device, this run's files and its metrics (the pipeline's declared output). One MLflow
run (stage `benchmark`, tagged with the device) keeps the settings, the metrics and these files.
"""

from __future__ import annotations

import csv
import gc
import logging
import re
import statistics
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from .config import BenchmarkConfig, ConfigError, Params
from .files import atomic_path, write_json, write_text
from .model import ByteLM, ModelConfig
from .plots import length_label, log_length_axes
from .profile import SPEC_EXPONENT_TOLERANCE, fit_exponent, off_spec
from .runtime import autocast, one_line, peak_bandwidth, peak_flops, resolve_device
from .variants import REGISTRY, build_attention, parse_entry
from .variants.mha import MultiHeadOptions, sdpa_backends

log = logging.getLogger(__name__)

# Reference rows, the fused causal kernel alone: `sdpa` in mha's default order (cuDNN first, the fastest
# on the H100), the bar every ratio uses; `sdpa-flash`, the flash kernel, for comparison with gpu-notes.md.
REFERENCES = {"sdpa": sdpa_backends(MultiHeadOptions().kernels), "sdpa-flash": sdpa_backends(["flash"])}
# The training baseline: a plain compiled GPT of the same size, i.e. mha on the flash kernel.
PLAIN_GPT = ("plain GPT (mha, flash)", "mha", {"kernels": ["flash"]})

ATTENTION_FIELDS = ["kind", "variant", "mode", "T", "batch", "ms", "ms_min", "ms_max", "samples", "mtok_per_s", "floor_ms", "pairs_ms", "peak_gib", "status"]
# Attention modes: torch.compile's options for each (None: eager); `graphs` is its mode reduce-overhead.
COMPILE_MODES = {"eager": None, "compiled": {}, "graphs": {"triton.cudagraphs": True}}
TRAIN_FIELDS = ["kind", "variant", "model", "T", "batch", "ms", "ms_min", "ms_max", "samples", "mtok_per_s", "mfu", "peak_tflops", "peak_gib",
                "compiled", "status"]


def device_name() -> str:
    return torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"


CHAIN = 4  # steps per timed sample
SUMMARY = "benchmark.json"  # the last run's device, files and metrics, in the output folder


def chain_ms(step: Callable[[], None]) -> float:
    """Milliseconds per call of `step` over CHAIN calls back to back, as training issues them (no synchronisation
    between steps), timed with CUDA events: the host's launch work overlaps the device's, so a short step is not
    charged for the idle device while the host prepares it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(CHAIN):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / CHAIN


def time_samples(step: Callable[[], None], warmup: int, repeats: int, warmup_seconds: float = 0.0,
                 sample_seconds: float = 0.0) -> list[float]:
    """Milliseconds per call of `step`, one value per sample (`chain_ms`), after `warmup` calls and then more until
    the device has spent `warmup_seconds` in them: `repeats` samples, then more until they span `sample_seconds` of
    the device's time (config.BenchmarkConfig's fields of these names say why)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    spent_ms = 0.0
    while spent_ms < 1e3 * warmup_seconds:
        spent_ms += CHAIN * chain_ms(step)
    samples = [chain_ms(step) for _ in range(repeats)]
    while CHAIN * sum(samples) < 1e3 * sample_seconds:
        samples.append(chain_ms(step))
    return samples


def zero_grads(tensors) -> None:
    """Gradients start from None each step, as after training's zero_grad(set_to_none=True): no step reads the
    last one's, which under CUDA graphs live in buffers the next replay overwrites."""
    for t in tensors:
        t.grad = None


def attention_step(variant: str, T: int, batch: int, heads: int, head_dim: int, options, mode: str) -> Callable[[], None]:
    """fwd+bwd of one variant's efficient path (or a REFERENCES row) on random bf16 inputs, in `mode` (COMPILE_MODES)."""
    d_model = heads * head_dim
    q, k, v = (torch.randn(batch, heads, T, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    x = torch.randn(batch, T, d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, heads, T, head_dim, device="cuda", dtype=torch.bfloat16)
    inputs = (q, k, v, x)
    if variant in REFERENCES:

        def step():
            zero_grads(inputs)
            with sdpa_kernel(REFERENCES[variant], set_priority=True):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
        return step
    layer = build_attention(variant, d_model, heads, T, options).cuda().train()
    mode_options = COMPILE_MODES[mode]
    if mode == "graphs":
        # The inputs stay put from step to step, as a layer's inputs do inside a training graph: without this the
        # graphs copy q, k, v and x into their own buffers every step (4 x 64 MiB at 65,536 tokens).
        for t in inputs:
            torch._dynamo.mark_static_address(t)
    efficient = layer.efficient if mode_options is None else torch.compile(
        layer.efficient, dynamic=False, options={**mode_options, **layer.compile_options})  # static T

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # a new step: graphs may reuse the last one's outputs
        zero_grads([*inputs, *layer.parameters()])
        with autocast(torch.device("cuda")):
            out = efficient(q, k, v, x)
        aux = [layer.aux_loss] if layer.aux_loss is not None else []
        torch.autograd.backward([out, *aux], [grad, *[None] * len(aux)])

    return step


def train_step(cfg: ModelConfig, batch: int, compile: bool) -> tuple[Callable[[], None], int]:
    """One optimizer step of the whole model; returns it and the model's training FLOPs per token."""
    device = torch.device("cuda")
    model = ByteLM(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model, dynamic=False, options=model.compile_options) if compile else model
    idx = torch.randint(0, 256, (batch, cfg.seq_len + 1), device=device)

    def step():
        with autocast(device):
            _, loss = forward(idx[:, :-1], idx[:, 1:])
        model.with_aux_loss(loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model.flops_per_token()


def kernel_table(step: Callable[[], None], steps: int = CHAIN, top: int = 12) -> list[str]:
    """The `top` GPU kernels of `step` by their own device time per step (torch.profiler over `steps` calls), as
    markdown rows, and a last row for the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in kernels) or 1.0
    rows = ["| kernel | ms per step | calls per step | share |", "|---|---|---|---|"]
    for e in kernels[:top]:
        rows.append(f"| `{e.key[:90]}` | {e.self_device_time_total / steps / 1e3:.3f} | {e.count / steps:g} | {e.self_device_time_total / total:.0%} |")
    rest = sum(e.self_device_time_total for e in kernels[top:])
    return rows + [f"| {len(kernels) - top} others | {rest / steps / 1e3:.3f} | | {rest / total:.0%} |",
                   f"| **all kernels** | **{total / steps / 1e3:.3f}** | | |"]


def run_point(kind: str, variant: str, T: int, batch: int, build: Callable[[], Callable[[], None]], warmup: int, repeats: int,
              trace: bool = False, warmup_seconds: float = 0.0, sample_seconds: float = 0.0) -> dict:
    """One timed point (a row), with its kernel table under "kernels" where `trace`."""
    row = {"kind": kind, "variant": variant, "T": T, "batch": batch}
    # Start each point clean: compiled graphs of earlier points hold their models and buffers.
    torch._dynamo.reset()
    gc.collect()
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step = build()
        samples = time_samples(step, warmup, repeats, warmup_seconds, sample_seconds)
        ms = statistics.median(samples)  # the figure; the fastest and slowest sample show how far it could move
        row.update(ms=ms, ms_min=min(samples), ms_max=max(samples), samples=len(samples), mtok_per_s=batch * T / ms / 1e3,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30, status="ok")
        if trace:
            row["kernels"] = kernel_table(step)
    except torch.OutOfMemoryError:
        row.update(status="oom")
    except Exception as err:  # a variant that fails at one point is recorded, and the rest still run
        row.update(status=f"error: {type(err).__name__}: {one_line(str(err))}")
        log.warning("%s %s T=%d failed:\n%s", kind, variant, T, traceback.format_exc())
    log.info("%s %s T=%d: %s", kind, variant, T, f"{row['ms']:.2f} ms, {row['mtok_per_s']:.1f} Mtok/s" if row["status"] == "ok" else row["status"])
    return row


# An attention row's limit: the least time the variant's definition allows on the device, the longer of its memory
# floor and its softmax pairs' FLOPs at the dense bf16 peak. The floor: the forward reads q, k, v and writes o, the
# backward reads q, k, v, do and writes dq, dk, dv, eleven (B, H, T, D) bf16 arrays through memory once each (the
# routing input, saved statistics and the variants' terms other than softmax pairs not counted, so a bound).
FLOOR_ARRAYS = 11
# FLOPs per query-key pair and head dim: q k and p v forward (2 x 2 D); the scores again, dv, dp, dq and dk backward (5 x 2 D).
PAIR_FLOPS = 14


def limit_terms(variant: str, T: int, batch: int, heads: int, head_dim: int, options, flops_peak: float | None,
                bytes_peak: float | None) -> dict[str, float]:
    """An attention row's `floor_ms` and `pairs_ms`, the two terms of its limit (above), or none where the device's
    peaks are unknown; the references compute mha's definition."""
    if flops_peak is None or bytes_peak is None:
        return {}
    layer = build_attention("mha" if variant in REFERENCES else variant, heads * head_dim, heads, T, options)
    token_heads = batch * T * heads
    return {"floor_ms": 1e3 * FLOOR_ARRAYS * token_heads * head_dim * 2 / bytes_peak,
            "pairs_ms": 1e3 * PAIR_FLOPS * head_dim * layer.mean_keys() * token_heads / flops_peak}


def limit(row: dict) -> float | None:
    """A measured row's limit in ms, or None where it has none."""
    return max(row["floor_ms"], row["pairs_ms"]) if row["status"] == "ok" and row.get("floor_ms") is not None else None


def benchmark(params: Params, variants: list[str], part: str, settings: BenchmarkConfig, trace: bool = False) -> tuple[list[dict], list[dict]]:
    """The attention rows of `variants` (which may name REFERENCES), or their training rows (where the plain GPT's
    label names the baseline; see the module docstring), as `part` says, measured as `settings` say (params.benchmark):
    attention in each of its `modes` (COMPILE_MODES); training at params.model's size and its `train_sizes`
    (plain GPT and mha only). `trace` adds each row's kernel table."""
    attention, training = [], []
    point_settings = dict(warmup=settings.warmup, repeats=settings.repeats, warmup_seconds=settings.warmup_seconds,
                          sample_seconds=settings.sample_seconds, trace=trace)
    peak, bandwidth = peak_flops(torch.device("cuda")), peak_bandwidth(torch.device("cuda"))
    for variant in variants if part == "attention" else []:
        options = params.variants.get(variant)  # None for the references
        for T in settings.seq_lens:
            batch = max(1, settings.tokens // T)
            for mode in settings.modes if variant not in REFERENCES else ("eager",):
                build = partial(attention_step, variant, T, batch, settings.heads, settings.head_dim, options, mode)
                row = run_point("attention", variant, T, batch, build, **point_settings)
                terms = limit_terms(variant, T, batch, settings.heads, settings.head_dim, options, peak, bandwidth)
                attention.append(row | {"mode": mode, "label": row_label(variant, mode)} | terms)
    T = params.model.seq_len
    batch = max(1, settings.tokens // T)
    sizes = [(params.model.d_model, params.model.n_layers), *settings.train_models]
    runs = [PLAIN_GPT if v == PLAIN_GPT[0] else (v, v, params.variant_options(v)) for v in variants] if part == "train" else []
    for d_model, n_layers in sizes:
        model = params.model.model_copy(update={"d_model": d_model, "n_layers": n_layers, "n_heads": d_model // settings.head_dim})
        for label, variant, options in runs if (d_model, n_layers) == sizes[0] else [r for r in runs if r[1] == "mha"]:  # other sizes: baseline and mha
            cfg = ModelConfig(variant=variant, **model.model_dump(), variant_options=options)
            flops = {}

            def build(compile):
                step, flops["per_token"] = train_step(cfg, batch, compile)
                return step

            row = run_point("train", label, T, batch, lambda: build(True), **point_settings)
            row["compiled"] = row["status"] == "ok"
            if not row["compiled"]:  # the clean fallback: eager
                row = run_point("train", label, T, batch, lambda: build(False), **point_settings) | {"compiled": False}
            if row["status"] == "ok" and peak:
                row["mfu"] = flops["per_token"] * row["mtok_per_s"] * 1e6 / peak
            training.append(row | {"model": f"d{d_model} L{n_layers} H{model.n_heads}", "peak_tflops": peak / 1e12 if peak else None})
    return attention, training


def row_label(variant: str, mode: str) -> str:
    """An attention row's name in the tables: the variant, and its mode unless eager (the CSV keeps the two apart)."""
    return variant if mode == "eager" else f"{variant} ({mode})"


ACCEPTANCE_FIT = (2048, 32768)  # the issues' range of T for the fitted exponents


def fit_range(rows: list[dict]) -> tuple[int, int]:
    """The range of T the exponents fit: ACCEPTANCE_FIT where the rows hold two lengths in it, else all the lengths
    measured (a run past 32K: how the time grows there)."""
    lengths = sorted({r["T"] for r in rows})
    inside = [T for T in lengths if ACCEPTANCE_FIT[0] <= T <= ACCEPTANCE_FIT[1]]
    return ACCEPTANCE_FIT if len(inside) >= 2 or not lengths else (lengths[0], lengths[-1])


def fit_label(fitted: tuple[int, int]) -> str:
    """A fit range as the table's header and the metric's name give it: 2K-32K."""
    return "-".join(map(length_label, fitted))


def exponents(rows: list[dict]) -> dict[str, float | None]:
    """Per row label: slope of log(time per sequence) against log T over `fit_range`."""
    lo, hi = fit_range(rows)
    out = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        ok = [r for r in rows if r["label"] == label and r["status"] == "ok" and lo <= r["T"] <= hi]
        out[label] = fit_exponent([r["T"] for r in ok], [r["ms"] / r["batch"] for r in ok])
    return out


def speedups(attention: list[dict], base: Callable[[dict], str | None]) -> dict[tuple[str, int], float]:
    """Each measured row's Mtok/s over that of the row labelled base(row) at its T, by (label, T); none where either
    is missing or base gives None."""
    ok = {(r["label"], r["T"]): r["mtok_per_s"] for r in attention if r["status"] == "ok"}
    return {(r["label"], r["T"]): r["mtok_per_s"] / ok[base(r), r["T"]] for r in attention
            if r["status"] == "ok" and (base(r), r["T"]) in ok}


def sdpa_ratios(attention: list[dict]) -> dict[tuple[str, int], float]:
    """Each measured row's speed-up over the sdpa row at its T."""
    return speedups(attention, lambda r: "sdpa")


def mha_ratios(attention: list[dict]) -> dict[tuple[str, int], float]:
    """Each variant row's speed-up over mha's row in the same mode at its T (the issues' acceptance ratios); none for
    the references, which run once, eager."""
    return speedups(attention, lambda r: None if r["variant"] in REFERENCES else row_label("mha", r["mode"]))


def exponent_cell(slope: float | None) -> str:
    return "—" if slope is None else f"{slope:.2f}"


def cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    return f"{row['mtok_per_s']:.1f}" if row["status"] == "ok" else row["status"][:20]


def spec_exponents(rows: list[dict]) -> dict[str, float]:
    """Per row label: the spec's compute exponent of its variant (the references are mha's kernel)."""
    return {r["label"]: REGISTRY["mha" if r["variant"] in REFERENCES else r["variant"]].compute_exponent for r in rows}


def attention_section(attention: list[dict], settings: BenchmarkConfig) -> list[str]:
    seq_lens = sorted({r["T"] for r in attention})
    slopes, specs = exponents(attention), spec_exponents(attention)
    fitted = fit_label(fit_range(attention))
    # The ratios at the issues' 8K and 32K, and at the longest length where a run goes past them.
    at = [8192, 32768] + ([seq_lens[-1]] if seq_lens[-1] > 32768 else [])
    lines = [f"## Attention forward+backward, Mtok/s ({settings.tokens:,} tokens per step, H = {settings.heads}, "
             f"D = {settings.head_dim}, bf16, median)", "",
             "| variant | " + " | ".join(length_label(T) for T in seq_lens) + f" | time exponent ({fitted}) | spec | "
             + " | ".join(f"x {bar} at {length_label(T)}" for bar in ("sdpa", "mha") for T in at) + " |",
             "|---|" + "---|" * (len(seq_lens) + 2 + 2 * len(at))]
    by = {(r["label"], r["T"]): r for r in attention}
    ratios = [sdpa_ratios(attention), mha_ratios(attention)]

    def ratio(of, label, T):
        return f"{of[label, T]:.2f}" if (label, T) in of else "—"

    for label in dict.fromkeys(r["label"] for r in attention):
        cells = [cell(by.get((label, T))) for T in seq_lens]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {exponent_cell(slopes[label])} | {specs[label]:g} | "
                     + " | ".join(ratio(of, label, T) for of in ratios for T in at) + " |")
    off = off_spec(slopes, specs)
    agreement = (f"off it by more than {SPEC_EXPONENT_TOLERANCE:g}: {'; '.join(off)}" if off
                 else f"every fitted row within {SPEC_EXPONENT_TOLERANCE:g} of it")
    return lines + ["", "Time exponent: slope of log(time per sequence) against log T, i.e. the spec's compute-vs-T exponent "
                    f"(`spec`, variants.md's table; {agreement}). "
                    "`sdpa`: the fused causal kernel in mha's order (cuDNN first), the bar of the x sdpa columns; x mha: "
                    "over mha's row in the same mode; "
                    f"`sdpa-flash`: the flash kernel alone. Each sample times {CHAIN} steps back to back (as training runs them), after "
                    f"{settings.warmup} steps and {settings.warmup_seconds:g} s of warm-up at that point (the clocks of a steady load); "
                    f"a point takes {settings.repeats} samples or more, until they span {settings.sample_seconds:g} s (a power cap's "
                    "swings of the clock); the CSV keeps each point's fastest and slowest sample (`ms_min`, `ms_max`) beside the median.", ""]


def limit_section(attention: list[dict]) -> list[str]:
    """Each row's limit and the share of it reached, and the exponent a kernel at the limit would measure; nothing
    where the device's peaks are unknown."""
    rows = [r | {"ms": at_limit, "measured_ms": r["ms"]} for r in attention if (at_limit := limit(r)) is not None]
    if not rows:
        return []
    seq_lens = sorted({r["T"] for r in rows})
    slopes = exponents(rows)
    lines = ["## Against the limit: the least time each row's definition allows on this device, and the share of it reached", "",
             "| variant | " + " | ".join(length_label(T) for T in seq_lens) + f" | limit's time exponent ({fit_label(fit_range(rows))}) |",
             "|---|" + "---|" * (len(seq_lens) + 1)]
    by = {(r["label"], r["T"]): r for r in rows}

    def limit_cell(r: dict | None) -> str:
        if r is None:
            return "—"
        bound = "memory" if r["floor_ms"] >= r["pairs_ms"] else "pairs"
        return f"{r['ms']:.3f} ms ({bound}), {100 * r['ms'] / r['measured_ms']:.0f}%"

    for label in dict.fromkeys(r["label"] for r in rows):
        lines.append(f"| {label} | " + " | ".join(limit_cell(by.get((label, T))) for T in seq_lens) + f" | {exponent_cell(slopes[label])} |")
    return lines + ["", f"The limit: the longer of the memory floor (the forward reads q, k and v and writes o, the backward reads "
                    f"q, k, v and do and writes dq, dk and dv: {FLOOR_ARRAYS} (B, H, T, D) bf16 arrays through memory once each, at "
                    "the device's bandwidth, runtime.PEAK_MEMORY_BANDWIDTH) and the FLOPs of the query-key pairs the row's "
                    f"definition needs (the variant's `mean_keys()` per query, clusters balanced; {PAIR_FLOPS} D FLOPs a pair "
                    "forward and backward, at the dense bf16 peak, runtime.PEAK_BF16_FLOPS). Routing, saved statistics and "
                    "terms other than softmax pairs are not counted: a bound no kernel beats, not a model of one. Its time "
                    "exponent is the one a kernel at the limit would measure: 1 where the memory floor holds at every length, "
                    "however the pairs grow.", ""]


def training_section(training: list[dict], seq_len: int) -> list[str]:
    lines = [f"## Training step of the whole model (T = {seq_len}, {training[0]['batch'] * seq_len:,} tokens per step, "
             "bf16 autocast, fused AdamW)", "", "| variant | model | ms/step | Mtok/s | MFU | peak GiB | compiled |", "|---|---|---|---|---|---|---|"]
    models = list(dict.fromkeys(r["model"] for r in training))  # the params' size first, as measured
    for r in sorted(training, key=lambda r: models.index(r["model"])):  # each run measures its sizes in turn
        if r["status"] == "ok":
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "—"
            lines.append(f"| {r['variant']} | {r['model']} | {r['ms']:.1f} | {r['mtok_per_s']:.3f} | {mfu} | {r['peak_gib']:.1f} | {r['compiled']} |")
        else:
            lines.append(f"| {r['variant']} | {r['model']} | {r['status'][:60]} | | | | |")
    peaks = {r["peak_tflops"] for r in training if r.get("peak_tflops")}
    peak = f"{peaks.pop():,.0f} TFLOP/s" if len(peaks) == 1 else "the device's peak"
    return lines + ["", f"MFU = (6 N + 6 L T d) x tokens/s / {peak} (dense bf16 peak, runtime.PEAK_BF16_FLOPS; none for a "
                    "device not listed there), N = non-embedding parameters. "
                    "Peak GiB: the most memory allocated from building the model to the end of its timing (weights, optimizer state, "
                    "activations).", ""]


def markdown(attention: list[dict], training: list[dict], device: str, settings: BenchmarkConfig, params: Params) -> str:
    """The report: a section for each part that has rows (a run of one part shows no empty table for the other)."""
    lines = [f"# attnbench benchmark on {device}", "", "`python -m attnbench benchmark --help` tells how to reproduce it.", ""]
    if attention:
        lines += attention_section(attention, settings) + limit_section(attention)
    if training:
        lines += training_section(training, params.model.seq_len)
    return "\n".join(lines)


def kernels_markdown(rows: list[dict], device: str) -> str:
    """Every traced row's kernel table under a heading naming the point."""
    lines = [f"# GPU kernels per step on {device} (torch.profiler, own device time)", ""]
    for r in rows:
        if "kernels" in r:
            what = r.get("label") or f"{r['variant']} {r.get('model', '')}"
            lines += [f"## {r['kind']}: {what}, T = {r['T']}, batch {r['batch']}, {r['ms']:.2f} ms per step timed", "", *r["kernels"], ""]
    return "\n".join(lines)


def figure(attention: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    ok = [r for r in attention if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(x=[r["T"] for r in ok], y=[r["mtok_per_s"] for r in ok], hue=[r["label"] for r in ok], marker="o", ax=ax)
    ax.set(xlabel="sequence length T", ylabel="Mtok/s (fwd+bwd)", title="Attention throughput")
    log_length_axes(ax, [r["T"] for r in ok])
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def metric_key(*parts: object) -> str:
    """An MLflow metric name from parts joined by dots, each reduced to the characters MLflow allows in a name
    (a row label such as "plain GPT (mha, flash)" has others)."""
    return ".".join(re.sub(r"[^\w\-/]+", "_", str(part)).strip("_") for part in parts)


def tracked_metrics(attention: list[dict], training: list[dict]) -> dict[int | None, dict[str, float]]:
    """What the MLflow run keeps of the tables, by step (T, or None for no step): each attention row's Mtok/s, ratios
    to sdpa and to mha and share of its limit (`of_limit`) at every T, as a curve over T as the profile stage logs its
    own; each row's fitted exponent; each training row's ms per step, Mtok/s and MFU."""
    by_step: dict[int | None, dict[str, float]] = {None: {}}
    ratios = {"x_sdpa": sdpa_ratios(attention), "x_mha": mha_ratios(attention)}
    for r in attention:
        if r["status"] != "ok":
            continue
        row = by_step.setdefault(r["T"], {})
        row[metric_key("attention", r["variant"], r["mode"], "mtok_per_s")] = r["mtok_per_s"]
        if (at_limit := limit(r)) is not None:
            row[metric_key("attention", r["variant"], r["mode"], "of_limit")] = at_limit / r["ms"]
        for name, of in ratios.items():
            if (r["label"], r["T"]) in of:
                row[metric_key("attention", r["variant"], r["mode"], name)] = of[r["label"], r["T"]]
    names = {r["label"]: (r["variant"], r["mode"]) for r in attention}
    fitted = fit_range(attention)
    exponent = "time_exponent" + ("" if fitted == ACCEPTANCE_FIT else f"_{fit_label(fitted)}")
    for label, slope in exponents(attention).items():
        if slope is not None:
            by_step[None][metric_key("attention", *names[label], exponent)] = slope
    for r in training:
        if r["status"] == "ok":
            for field in ("ms", "mtok_per_s", "mfu"):
                if r.get(field) is not None:
                    by_step[None][metric_key("train", r["model"], r["variant"], field)] = r[field]
    return by_step


def benchmarked(params: Params, variants: list[str] | None) -> list[str]:
    """The variants whose rows the benchmark measures besides the references (which always run, once): `variants`, or
    the params file's. Not an entry with a seed of its own (`<variant>-seed<N>`): its layer and model are its
    variant's. A variant's rows use its options in the params file, so a name must be configured there (not only
    registered): a clear error before any work otherwise."""
    allowed = [v for v in params.variants if parse_entry(v)[1] is None]
    if unknown := [v for v in variants or [] if v not in allowed and v not in REFERENCES]:
        raise ConfigError(f"--variants: unknown {', '.join(map(repr, unknown))} (not a reference row nor one of the params file's "
                          f"variants without a seed of its own); allowed: {', '.join([*REFERENCES, *allowed])}")
    return [v for v in variants if v not in REFERENCES] if variants else allowed


def main(params: Params, out_dir: Path, variants: list[str] | None = None, settings: BenchmarkConfig | None = None,
         trace: bool = False) -> str:
    """Measure as `settings` (default: params.benchmark) say; `variants` default to the params file's, less the
    entries with a seed of their own (`<variant>-seed<N>`: the same layer and model as their variant's)."""
    settings = settings or params.benchmark
    variants = benchmarked(params, variants)
    if resolve_device(params.train.device).type != "cuda":
        raise RuntimeError("benchmark needs a CUDA device (absolute speeds count on a GPU only)")
    from .tracking import stage_run

    device = device_name()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    attention, training = [], []
    suffixes = ("-attention.csv", "-train.csv", ".md", ".png", "-kernels.md")
    attention_csv, train_csv, page, png, kernels = (out_dir / f"{device}{suffix}" for suffix in suffixes)
    steps = [("attention", [name]) for name in [*REFERENCES, *variants]] if "attention" in settings.parts else []
    steps += [("train", [name]) for name in [PLAIN_GPT[0], *variants]] if "train" in settings.parts else []
    with stage_run(params, "benchmark") as tracker:
        tracker.log_params({"device": device, "variants": variants, "benchmark": settings.model_dump(), "model": params.model.model_dump(),
                            "variant_options": {v: params.variants[v].model_dump() for v in variants if v in params.variants}})
        tracker.set_tags({"device": device})
        for part, names in steps:  # results are written after each variant's rows, so a run cut short keeps them
            more_attention, more_training = benchmark(params, names, part, settings, trace)
            attention, training = attention + more_attention, training + more_training
            write_csv(attention_csv, attention, ATTENTION_FIELDS)
            write_csv(train_csv, training, TRAIN_FIELDS)
            text = markdown(attention, training, device, settings, params)
            write_text(page, text)
            if attention:
                figure(attention, png)
            if trace:
                write_text(kernels, kernels_markdown(attention + training, device))
        tracked = tracked_metrics(attention, training)
        for step, metrics in tracked.items():
            tracker.log_metrics(metrics, step=step)
        # What this run wrote, not whatever else the folder holds (earlier runs' pages, a figure or kernel table of theirs).
        written = [attention_csv, train_csv, page, *([png] if attention else []), *([kernels] if trace else [])]
        for path in written:
            tracker.log_artifact(path)
    # Last, the pipeline's declared output: a run cut short leaves none, so the front ends run it again.
    write_json(out_dir / SUMMARY, {"device": device, "files": [path.name for path in written], "metrics": tracked.pop(None),
                                   "metrics_by_T": {str(T): metrics for T, metrics in tracked.items()}})
    log.info("%d attention points, %d training points on %s in %.0fs -> %s", len(attention), len(training), device,
             time.perf_counter() - t0, page)
    return text
