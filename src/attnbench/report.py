"""report: one comparison of all variants of a params file: markdown table plus seaborn figures."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from .config import Params  # noqa: E402
from .files import atomic_path, read_json, write_text  # noqa: E402
from .plots import legend_beside, log_length_axes  # noqa: E402
from .profile import MEMORY_METHODS, NOISY_SPREAD, SPEC_EXPONENT_TOLERANCE, off_spec  # noqa: E402
from .splits import MANIFEST, load_split  # noqa: E402
from .variants import REGISTRY, parse_entry  # noqa: E402

log = logging.getLogger(__name__)

FIGURES = {
    "learning_curves": "Validation bits-per-byte during training",
    "bpb_vs_throughput": "Test bits-per-byte against training throughput",
    "time_vs_T": "Forward+backward time per sequence against T",
    "memory_vs_T": "Memory per sequence against T",
}


NGRAMS = ("unigram", "bigram", "trigram")  # byte models with 0, 1 and 2 bytes of context


def ngram_bpb(data_dir: Path, max_order: int, chunk: int = 1 << 23) -> list[float]:
    """Bits per byte of the test split under byte models of 0 .. `max_order` bytes of context counted on the train
    split, one pass building each on the last: bars any LM must beat to show it learned more than those counts give.
    Order 0: add-one smoothed frequencies. Longer contexts: Witten-Bell interpolation, so a context seen s times,
    followed by n distinct bytes, gives P(x | context) = (count(context, x) + n P(x | shorter context)) / (s + n), and
    an unseen one the shorter context's P. Each order scores the test bytes that have that many bytes before them;
    counts in chunks of `chunk` bytes."""
    train, test = load_split(data_dir, "train", verify=False), load_split(data_dir, "test", verify=False)

    def score(probs: np.ndarray, order: int) -> float:
        context = sum(test[i : len(test) - order + i].astype(np.int64) * 256 ** (order - 1 - i) for i in range(order))
        return float(-np.log2(probs[context, test[order:]]).mean())

    probs = ((np.bincount(train, minlength=256) + 1.0) / (len(train) + 256))[None]  # (contexts, 256); one context
    scores = [score(probs, 0)]
    for k in range(1, max_order + 1):
        counts = np.zeros(256 ** (k + 1))
        for start in range(0, len(train) - k, chunk):  # (context, next byte) as one number: oldest byte first
            stop = min(start + chunk, len(train) - k)
            counts += np.bincount(sum(train[start + i : stop + i].astype(np.int64) * 256 ** (k - i) for i in range(k + 1)),
                                  minlength=256 ** (k + 1))
        counts = counts.reshape(256**k, 256)
        seen, kinds = counts.sum(axis=1, keepdims=True), (counts > 0).sum(axis=1, keepdims=True)
        shorter = probs[np.arange(256**k) % 256 ** (k - 1)]  # each context's model without its oldest byte
        probs = np.where(seen > 0, (counts + kinds * shorter) / np.maximum(seen + kinds, 1), shorter)
        scores.append(score(probs, k))
    return scores


def ngram_verdict(summary: pd.DataFrame, baselines: dict[str, float]) -> str:
    """Which variants the count models beat, strongest model (lowest bpb) first: those not better than it, bpb
    compared as printed; each weaker model then names the variants not better than it either (fewer or the same)."""
    printed = printed_bpb(summary)
    lines = []
    for name, bar in sorted(baselines.items(), key=lambda item: item[1]):
        behind = list(summary["variant"][printed >= float(SUMMARY_FORMATS["test bpb"].format(bar))])
        if not lines and len(behind) == len(summary):
            lines.append(f"No variant is better than the {name} model: at this training budget none predicts better than "
                         f"counts of the previous {NGRAMS.index(name)} bytes, so the comparison shows how fast each "
                         "variant learns early on, which a longer training may change.")
        elif not lines:
            lines.append(f"Not better than the {name} model: {spoken_list(behind)}." if behind else f"Every variant beats the {name} model.")
        elif behind:
            lines.append(f"Not better than the {name} model either: {spoken_list(behind)}.")
        if not behind:
            break
    return " ".join(lines)


def read_summaries(variants_dir: Path, variants: list[str]) -> dict[str, dict]:
    """Each variant's train.json, eval.json and profile.json, read once: {variant: {"train", "eval", "profile"}}."""
    return {v: {stage: read_json(Path(variants_dir) / v / f"{stage}.json") for stage in ("train", "eval", "profile")}
            for v in variants}


def measured(rows: pd.DataFrame, scope: str) -> pd.DataFrame:
    """The profile rows of `scope` that ran."""
    return rows[(rows.scope == scope) & (rows.status == "ok")]


def collect(variants_dir: Path, summaries: dict[str, dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-variant summary, learning curves and profile rows, from each variant's stage outputs."""
    summary, curves, profiles = [], [], []
    for v, outputs in summaries.items():
        d = Path(variants_dir) / v
        train, evaluation, prof = outputs["train"], outputs["eval"], outputs["profile"]
        rows = pd.read_csv(d / "profile.csv")
        # The profile's largest T for every variant (its lengths are the params file's): a variant that ran out of
        # memory there shows "—", not a figure at a smaller T in the same column.
        attn = measured(rows, "attention")[lambda d: d["T"] == rows["T"].max()]
        largest = attn.iloc[0] if len(attn) else None
        reference = measured(rows, "reference").set_index("T")["tokens_per_s"]  # mha's layer
        summary.append({
            "variant": v,
            "params (M)": train["params_non_embedding"] / 1e6,
            "test bpb": evaluation["test_bpb"],
            "val bpb (end)": train["val_bpb_final"],
            "train tok/s": train["tokens_per_s"],
            "MFU %": None if train.get("mfu") is None else 100 * train["mfu"],
            "attn tok/s @ max T": None if largest is None else largest["tokens_per_s"],
            "x sdpa @ max T": largest["tokens_per_s"] / reference[largest["T"]] if largest is not None and largest["T"] in reference else None,
            "attn MiB @ max T": None if largest is None else largest["memory_bytes"] / 2**20,
            "time exp (attn)": prof.get("attention_time_exponent"),
            "spec exp": REGISTRY[parse_entry(v)[0]].compute_exponent,
            "memory exp (attn)": prof.get("attention_memory_exponent"),
            "time exp (model)": prof.get("model_time_exponent"),
        })
        curves.append(pd.read_csv(d / "curve.csv").assign(variant=v))
        profiles.append(rows)
    return pd.DataFrame(summary), pd.concat(curves, ignore_index=True), pd.concat(profiles, ignore_index=True)


def variant_of(summary: pd.DataFrame) -> pd.Series:
    """Each row's variant: `mha` for the params entries `mha` and `mha-seed1` alike."""
    return summary["variant"].map(lambda entry: parse_entry(entry)[0])


def by_variant(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per variant, what the best variant and the fronts compare: a variant with several runs (params entries
    `<variant>-seed<N>`) by the means of their test bpb and speeds, so that no run is ranked against its own seeds;
    `runs`, how many runs each has."""
    grouped = summary.set_index(variant_of(summary).rename("kind"))[["test bpb", "train tok/s", "attn tok/s @ max T"]].groupby(
        level="kind", sort=False)
    return grouped.mean().assign(runs=grouped.size()).rename_axis("variant").reset_index()


def routing_summary(summaries: dict[str, dict]) -> pd.DataFrame:
    """For the variants that route by sampling in training (eval.json has test_bpb_sampled): test bpb and cluster
    sizes with the spec's argmax routing and with training's sampled routing."""
    rows = []
    for v, outputs in summaries.items():
        evaluation = outputs["eval"]
        if "test_bpb_sampled" not in evaluation:
            continue
        argmax, sampled = evaluation["routing"]["argmax"], evaluation["routing"]["sampled"]
        rows.append({
            "variant": v,
            "test bpb (argmax)": evaluation["test_bpb"],
            "test bpb (sampled)": evaluation["test_bpb_sampled"],
            "largest cluster % (argmax)": 100 * argmax["max_cluster_frac"],
            "largest cluster % (sampled)": 100 * sampled["max_cluster_frac"],
            "empty clusters (argmax)": argmax["empty_clusters"],
            "empty clusters (sampled)": sampled["empty_clusters"],
        })
    return pd.DataFrame(rows)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def entry_palette(frame: pd.DataFrame) -> dict[str, tuple[float, float, float]]:
    """A colour for each of `frame`'s entries (its `variant` column), the same for a variant's seeded entries
    (`<variant>-seed<N>`), so that a figure's runs of one variant read as one family: the learning curves and the
    throughput figure tell the entries apart by marker or dash; in the time and memory figures a variant's profiles,
    the same layer timed in each, are lines of one look."""
    variant = dict(zip(frame["variant"], variant_of(frame)))  # entry -> variant, in the order entries first appear
    variants = list(dict.fromkeys(variant.values()))
    colours = dict(zip(variants, sns.color_palette("deep" if len(variants) <= 10 else "husl", len(variants))))  # deep has 10, then repeats
    return {entry: colours[kind] for entry, kind in variant.items()}


def learning_curves_figure(curves: pd.DataFrame, path: Path, title: str) -> None:
    """Validation bpb against training tokens, one line per variant."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    # A dash pattern and marker per variant too: curves of variants with the same function (cka, fastcka) lie on each other.
    sns.lineplot(curves.assign(mtokens=curves["tokens"] / 1e6), x="mtokens", y="val_bpb", hue="variant", style="variant", markers=True,
                 palette=entry_palette(curves), ax=ax)
    ax.set(xlabel="training tokens (millions)", ylabel="validation bits/byte", title=title)
    legend_beside(ax)
    _save(fig, path)


def figures(summary: pd.DataFrame, curves: pd.DataFrame, profiles: pd.DataFrame, variant_means: pd.DataFrame, front: list[str],
            out_dir: Path) -> list[Path]:
    """The four figures; `variant_means`: by_variant's rows, `front`: those on the Pareto front of test bpb against
    training tok/s."""
    sns.set_theme(style="whitegrid", context="notebook")
    paths = {name: out_dir / "figures" / f"{name}.png" for name in FIGURES}

    learning_curves_figure(curves, paths["learning_curves"], FIGURES["learning_curves"])

    fig, ax = plt.subplots(figsize=(6.5, 4))
    # A legend, not labels beside the points: variants of nearly equal speed and bpb would print their names over each other.
    sns.scatterplot(summary, x="train tok/s", y="test bpb", hue="variant", style="variant", s=80, palette=entry_palette(summary), ax=ax)
    means = variant_means.set_index("variant")
    several = means[means["runs"] > 1]  # variants with seed entries
    if len(several):  # the points the best variant and the fronts compare them by
        ax.scatter(several["train tok/s"], several["test bpb"], s=140, facecolors="none", edgecolors="0.2", label="mean of a variant's runs")
    if len(front) > 1:  # along the front, faster means worse bpb: a line from the best bpb to the fastest
        on_front = means.loc[front].sort_values("train tok/s")
        ax.plot(on_front["train tok/s"], on_front["test bpb"], color="0.6", linestyle="--", zorder=0, label="Pareto front")
    ax.set(xlabel="training tokens/s", ylabel="test bits/byte (lower is better)", title=FIGURES["bpb_vs_throughput"])
    legend_beside(ax)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 40k, 1.2M: full numbers ran into each other
    _save(fig, paths["bpb_vs_throughput"])

    ok = profiles[(profiles.status == "ok") & (profiles.scope != "reference")].assign(  # the reference: the table's ratio
        ms_per_seq=lambda d: d.seconds / d.batch * 1e3, mib_per_seq=lambda d: d.memory_bytes / d.batch / 2**20
    )
    for name, column, label in [("time_vs_T", "ms_per_seq", "ms per sequence"), ("memory_vs_T", "mib_per_seq", "MiB per sequence")]:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        sns.lineplot(ok, x="T", y=column, hue="variant", style="scope", marker="o", palette=entry_palette(ok), ax=ax)
        ax.set(xlabel="sequence length T", ylabel=label, title=FIGURES[name])
        log_length_axes(ax, ok["T"])
        _save(fig, paths[name])
    return list(paths.values())


def noisy_points(profiles: pd.DataFrame) -> list[str]:
    """The profile points whose timed repeats disagree (profile.NOISY_SPREAD): their ratios and exponents are unreliable."""
    spread = profiles["spread"] if "spread" in profiles else pd.Series(np.nan, index=profiles.index)
    noisy = profiles[(profiles.status == "ok") & (spread > NOISY_SPREAD)]
    return [f"{r.variant} {r.scope} T = {r.T} ({100 * r.spread:.1f}%)" for r in noisy.itertuples()]


def reference_spread(profiles: pd.DataFrame) -> str | None:
    """The same layer (the reference, mha's) timed in each variant's profile: how far its speed at the largest T moved
    from one profile process to the next, a bar for the attention speeds' differences. None with fewer than two."""
    at_largest = measured(profiles, "reference")[lambda d: d["T"] == profiles["T"].max()]["tokens_per_s"]
    if len(at_largest) < 2:
        return None
    low, high = at_largest.min(), at_largest.max()
    return (f"the attention layers' speeds vary by up to {high / low:.2f}x between processes on this machine (the "
            f"reference layer, the same code in each of the {len(at_largest)} profiles, ran at {low:,.0f} to {high:,.0f} "
            f"tok/s at T = {profiles['T'].max()})")


# One format per column, so a column reads alike at every magnitude.
SUMMARY_FORMATS = {
    "params (M)": "{:.3f}", "test bpb": "{:.3f}", "val bpb (end)": "{:.3f}", "train tok/s": "{:,.0f}", "MFU %": "{:.1f}",
    "attn tok/s @ max T": "{:,.0f}", "x sdpa @ max T": "{:.2f}", "attn MiB @ max T": "{:,.1f}",
    "time exp (attn)": "{:.2f}", "spec exp": "{:g}", "memory exp (attn)": "{:.2f}", "time exp (model)": "{:.2f}",
}
ROUTING_FORMATS = {
    "test bpb (argmax)": "{:.3f}", "test bpb (sampled)": "{:.3f}", "largest cluster % (argmax)": "{:.1f}",
    "largest cluster % (sampled)": "{:.1f}", "empty clusters (argmax)": "{:.2f}", "empty clusters (sampled)": "{:.2f}",
}


def printed_bpb(summary: pd.DataFrame) -> pd.Series:
    """Test bpb as the page prints it: a smaller difference is no evidence of better quality."""
    return summary["test bpb"].map(SUMMARY_FORMATS["test bpb"].format).astype(float)


def pareto_front(summary: pd.DataFrame, speed: str) -> dict[str, list[str]]:
    """Quality for its cost: per variant with a measured `speed`, the variants on the front that dominate it (at
    least as good in printed test bpb and in speed, better in one); [] for the front itself. Every variant off the
    front is dominated by one on it (dominance is a strict partial order), so naming those suffices. Keys by printed
    bpb, best first, then by speed, fastest first."""
    timed = summary.assign(bpb=printed_bpb(summary)).dropna(subset=[speed]).sort_values(["bpb", speed], ascending=[True, False], kind="stable")
    points = dict(zip(timed["variant"], zip(timed["bpb"], timed[speed])))

    def beats(a, b):
        (bpb_a, speed_a), (bpb_b, speed_b) = points[a], points[b]
        return bpb_a <= bpb_b and speed_a >= speed_b and (bpb_a, speed_a) != (bpb_b, speed_b)

    front = [v for v in points if not any(beats(u, v) for u in points)]
    return {v: [u for u in front if beats(u, v)] for v in points}


def seed_spread(summary: pd.DataFrame) -> str | None:
    """The variants trained with several seeds (params entries `<variant>-seed<N>` beside `<variant>`), best mean
    first: each one's printed test bpb over its seeds, the variants each one is ahead of in every seed (its worst run
    better than their best), and the pairs whose ranges overlap (no evidence for either). None where no variant has
    two runs."""
    runs = summary.assign(kind=variant_of(summary), bpb=printed_bpb(summary))
    seeded = runs.groupby("kind", sort=False)["bpb"].agg(["min", "max", "mean", "size"])
    seeded = seeded[seeded["size"] > 1].sort_values("mean", kind="stable")
    if seeded.empty:
        return None
    fmt = SUMMARY_FORMATS["test bpb"].format
    spans = [f"**{kind}** {fmt(row['min'])} to {fmt(row['max'])} over {int(row['size'])} seeds" for kind, row in seeded.iterrows()]
    ahead, overlap = [], []
    for i, a in enumerate(seeded.index):
        beaten = []
        for b in seeded.index[i + 1 :]:
            # b's best below a's worst would put b's mean below a's: best mean first, only a can be ahead.
            if seeded.loc[a, "max"] < seeded.loc[b, "min"]:
                beaten.append(b)
            else:
                overlap.append(f"{a} and {b}")
        if beaten:
            ahead.append(f"{a} of {spoken_list(beaten)}")
    verdicts = ([f"ahead in every seed: {'; '.join(ahead)}"] if ahead else []) + (
        [f"not told apart by their seeds: {'; '.join(overlap)}"] if overlap else [])
    return f"Test bpb over seeds, best mean first: {', '.join(spans)}" + "".join(f". {v[0].upper()}{v[1:]}" for v in verdicts) + "."


def noise_caveat(summary: pd.DataFrame, profiles: pd.DataFrame) -> str:
    """What the page measured of the noise its comparisons sit in, and what it did not: the seeds' spread
    (seed_spread), the training speeds of one variant's runs, and the attention speeds (reference_spread)."""
    attention = reference_spread(profiles)
    seeds = seed_spread(summary)
    if seeds is None:
        return ("This page does not measure the seeds' spread, nor that of the training speeds; "
                + (f"{attention}." if attention else "nor that of the attention speeds (it needs two profiles with the reference at the largest T)."))
    speeds = summary["train tok/s"].groupby(variant_of(summary), sort=False).agg(["min", "max", "size"])
    single = list(speeds.index[speeds["size"] == 1])
    speeds = speeds[speeds["size"] > 1]
    widest = (speeds["max"] / speeds["min"]).idxmax()
    low, high = speeds.loc[widest, "min"], speeds.loc[widest, "max"]
    parts = [seeds, f"The training speeds of one variant's runs, each in a process of its own, differ by up to {high / low:.2f}x "
                    f"({widest}: {low:,.0f} to {high:,.0f} tok/s), a bar for the training speeds' differences."]
    if single:
        parts.append(f"{'The other variants' if len(single) > 1 else 'The other variant'} ({', '.join(single)}) "
                     f"{'are one run each' if len(single) > 1 else 'is one run'}: this page does not measure "
                     f"{'their' if len(single) > 1 else 'its'} seeds' spread.")
    parts.append(f"{attention[0].upper()}{attention[1:]}." if attention else
                 "This page does not measure the spread of the attention speeds (it needs two profiles with the reference at the largest T).")
    return " ".join(parts)


def spoken_list(names: list[str]) -> str:
    """a; a and b; a, b and c."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def front_line(dominators: dict[str, list[str]], speed: str, variants: list[str]) -> str:
    """One cost axis's front (bold, best bpb first) and the variants off it, grouped by the front's variants that
    dominate them; the variants without a measured speed are named apart."""
    front = [v for v, by in dominators.items() if not by]
    untimed = [v for v in variants if v not in dominators]
    behind: dict[tuple[str, ...], list[str]] = {}
    for v, by in dominators.items():
        if by:
            behind.setdefault(tuple(by), []).append(v)
    if not front:
        placed = "no variant was timed there"
    elif len(dominators) == 1:
        placed = f"only **{front[0]}** was timed there"
    elif len(front) == 1:
        placed = f"**{front[0]}**, the best in test bpb and the fastest of the variants timed, so ahead of every other one"
    else:
        placed = f"**{', '.join(front)}**" + "".join(
            f"; {spoken_list(off)} behind {spoken_list(list(by))}" for by, off in behind.items())
    return f"- {speed}: {placed}" + (f"; not timed: {', '.join(untimed)}" if untimed and front else "") + "."


def markdown_table(df: pd.DataFrame, formats: dict[str, str]) -> str:
    def fmt(x, column):
        if x is None or (isinstance(x, float) and np.isnan(x)):
            return "—"
        return formats[column].format(x) if column in formats else str(x)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(x, c) for x, c in zip(row, df.columns)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def routing_section(routing: pd.DataFrame, seeds: list[int]) -> list[str]:
    """The lines on the sampled-routing variants: why their test bpb has two readings, and both (none if none)."""
    if routing.empty:
        return []
    return [
        f"{', '.join(routing['variant'])} route{'s' if len(routing) == 1 else ''} tokens by sampling in training: argmax(r + g) with Gumbel noise g draws "
        "the cluster from softmax(r), whatever tau. The table's test bpb is the spec's evaluation, the noiseless argmax "
        f"of r; scored as they trained (noise from {f'seed {seeds[0]}' if len(seeds) == 1 else 'the training seed of each run'}, a code "
        "length a decoder that shares the seed attains). "
        "Cluster sizes are counted in each sequence for each router, then averaged over routers, layers and test "
        "windows (so a count of empty clusters can be fractional):",
        "",
        markdown_table(routing, ROUTING_FORMATS),
        "",
    ]


def chosen_variants(params: Params, subset: list[str] | None) -> tuple[list[str], list[str]]:
    """The params file's variants in the report (all, or those in `subset`) and those left out; a clear error for a
    name in `subset` that the params file does not configure."""
    for name in subset or []:
        params.variant_options(name)
    variants = [v for v in params.variants if not subset or v in subset]
    return variants, [v for v in params.variants if v not in variants]


def report(params: Params, variants_dir: Path, data_dir: Path, out_dir: Path, subset: list[str] | None = None) -> dict:
    """Write comparison.md and figures/ under `out_dir`; return the summary table as records.

    `subset`: some of the params file's variants, for a report of the runs that finished; the page names the rest."""
    variants, left_out = chosen_variants(params, subset)
    summaries = read_summaries(variants_dir, variants)
    summary, curves, profiles = collect(variants_dir, summaries)
    baselines = dict(zip(NGRAMS, ngram_bpb(data_dir, len(NGRAMS) - 1)))
    out_dir = Path(out_dir)
    failed = [f"{r.variant} {r.scope} T = {r.T} ({r.status})" for r in profiles.itertuples() if r.scope != "reference" and r.status != "ok"]
    noisy = noisy_points(profiles)
    profiled_on = sorted({outputs["profile"]["device"] for outputs in summaries.values()})
    off = off_spec(dict(zip(summary["variant"], summary["time exp (attn)"])), dict(zip(summary["variant"], summary["spec exp"])))
    agreement = (f"which these attention time exponents miss by more than {SPEC_EXPONENT_TOLERANCE:g}: {'; '.join(off)}" if off
                 else f"which every fitted attention time exponent here meets within {SPEC_EXPONENT_TOLERANCE:g}")
    variant_means = by_variant(summary)
    bpb = printed_bpb(variant_means)
    best = variant_means[bpb == bpb.min()]  # all that tie as printed, so the page never calls a variant it ranks equal worse
    costs = {"train": ("train tok/s", f"Training tok/s (T = {params.model.seq_len})"),
             "attention": ("attn tok/s @ max T", f"Attention-layer tok/s at T = {profiles['T'].max()}")}
    fronts = {key: pareto_front(variant_means, column) for key, (column, _) in costs.items()}
    on_front = {key: [v for v, by in dominators.items() if not by] for key, dominators in fronts.items()}
    figure_paths = figures(summary, curves, profiles, variant_means, on_front["train"], out_dir)
    m, t = params.model, params.train
    manifest = read_json(Path(data_dir) / MANIFEST)
    devices = sorted({outputs["train"]["device"] for outputs in summaries.values()})
    # Every byte of the test split but the first is predicted when evaluate scores it whole (no evaluate.max_tokens).
    test_bytes = manifest["splits"]["test"]["bytes"]
    scored = sorted({outputs["eval"]["test_tokens"] for outputs in summaries.values()})
    routing = routing_summary(summaries)
    text = [
        f"# attnbench comparison: `{params.run.name}`",
        "",
        f"Data: `{params.data.source}`{f' ({params.data.path})' if params.data.path else ''}, {manifest['corpus_bytes_used']:,} bytes "
        f"(train {manifest['splits']['train']['bytes']:,} / val {manifest['splits']['val']['bytes']:,} / test {manifest['splits']['test']['bytes']:,}). "
        f"Model: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, T = {m.seq_len}. "
        f"Training: {t.steps if t.steps else f'{t.tokens:,} tokens'}{' steps' if t.steps else ''}, batch {t.batch_size} x {t.grad_accum}, "
        f"lr {t.lr:g}, on {', '.join(devices)}.",
        "",
        "Byte models of this corpus from counts (on the train split, scored on the test split; the unigram add-one "
        "smoothed, the longer ones Witten-Bell interpolated): "
        + ", ".join(f"{name} **{SUMMARY_FORMATS['test bpb'].format(value)} bpb**" for name, value in baselines.items()) + ". "
        f"Best variant{'s' if len(best) > 1 else ''}: **{', '.join(best['variant'])}** at {bpb.min():.3f} bpb"
        + (" (the mean of its runs). " if (best["runs"] > 1).any() else ". ")
        + ngram_verdict(summary, baselines)
        + (f" Test bpb predicts {' to '.join(f'{n:,}' for n in scored)} of the test split's {test_bytes:,} bytes "
           "(evaluate.max_tokens: evenly spaced windows)." if scored[0] < test_bytes - 1 else ""),
        "",
        "Quality for its cost, as Pareto fronts (a variant is off a front where another is at least as good in test "
        f"bpb, as printed, and in speed, and better in one; the bpb is the model's at T = {m.seq_len}, the speeds each "
        "at its own T, with the variant's auto options resolved there"
        + ("; a variant with several runs by their means" if (variant_means["runs"] > 1).any() else "") + "):",
        "",
        *(front_line(fronts[key], label, list(variant_means["variant"])) for key, (_, label) in costs.items()),
        "",
        f"Each row is one training run (`train.seed`: {t.seed}; a params entry `<variant>-seed<N>` trains its variant "
        "with seed N), timed in one process: a front decided by a difference smaller than another seed or another "
        "process would make is no evidence for one variant over another. "
        + noise_caveat(summary, profiles),
        "",
        markdown_table(summary, SUMMARY_FORMATS),
        "",
        *([f"Not in this report: {', '.join(left_out)} (of the params file's {len(params.variants)} entries).", ""] if left_out else []),
        *([f"Profile points that did not run: {', '.join(failed)}.", ""] if failed else []),
        *([f"Profile points whose timed runs (`profile.repeats`: {params.profile.repeats}) spread over "
           f"{100 * NOISY_SPREAD:.0f}% about their median (median absolute deviation: another load on the machine, or "
           "a step too short to time steadily), so that exponents and x sdpa drawn from them are unreliable (profile on "
           f"a quiet machine, or with more `profile.tokens_per_step`): {', '.join(noisy)}.", ""] if noisy else []),
        *([f"`profile.repeats` is {params.profile.repeats}: too few runs to tell a noisy timing.", ""]
          if params.profile.repeats < 3 else []),
        "Exponents are log-log slopes against T of time and memory per sequence over the profile's lengths "
        f"({', '.join(map(str, params.profile.seq_lens))}); profiled on {', '.join(profiled_on)}. "
        f"`spec exp`: the spec's compute-vs-T exponent (variants.md), {agreement}. "
        "x sdpa: the attention sub-layer's speed over mha's (the fused causal sdpa, default options) at the same shapes, "
        "measured in the same profile run (scope `reference` of profile.csv). "
        + " ".join(f"Memory (`{method}`): {MEMORY_METHODS[method]}." for method in sorted(set(profiles["memory_method"].dropna())))
        + (" CPU timings are for trends only: at these sizes the costs per token (projections, the framework's overhead) "
           "weigh more at short T and flatten the slopes; absolute speeds and the spec's exponents count on a GPU (the "
           "`benchmark` target fits them over 2K-32K)." if "cpu" in profiled_on else ""),
        "",
        *routing_section(routing, sorted({params.train_for(v).seed for v in routing.get("variant", [])})),
    ]
    for path in figure_paths:
        text += [f"## {FIGURES[path.stem]}", "", f"![{path.stem}](figures/{path.name})", ""]
    write_text(out_dir / "comparison.md", "\n".join(text))
    log.info("%d variants -> %s (best %s %.3f bpb; %s)", len(variants), out_dir / "comparison.md", ", ".join(best["variant"]), bpb.min(),
             ", ".join(f"{name} {value:.3f}" for name, value in baselines.items()))
    return {"variants": summary.to_dict(orient="records"), "ngram_bpb": baselines,
            "pareto_front": on_front,
            "files": [out_dir / "comparison.md", *figure_paths]}


def main(params: Params, variants_dir: Path, data_dir: Path, out_dir: Path, subset: list[str] | None = None) -> dict:
    from .tracking import stage_run

    chosen_variants(params, subset)  # before the MLflow run: a name that is not configured leaves no failed run
    with stage_run(params, "report") as tracker:
        result = report(params, variants_dir, data_dir, out_dir, subset)
        tracker.log_metrics({f"{name}_bpb": value for name, value in result["ngram_bpb"].items()}
                            | {f"test_bpb.{r['variant']}": r["test bpb"] for r in result["variants"]})
        tracker.set_tags({f"pareto_front.{key}": ", ".join(front) for key, front in result["pareto_front"].items() if front})
        for path in result["files"]:  # what this run wrote, not whatever else the folder holds
            tracker.log_artifact(path)
    return result
