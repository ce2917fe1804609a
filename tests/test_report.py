"""report from fixture metrics: the table holds every variant's figures, the figures are written."""

from __future__ import annotations

import csv
import math
import re

import matplotlib.colors
import matplotlib.lines
import pandas as pd
import pytest

from attnbench import data
from attnbench import report as report_mod
from attnbench.config import ConfigError
from attnbench.files import read_json, write_json
from attnbench.profile import FIELDS, fit_exponent
from attnbench.plots import length_label, log_length_axes
from attnbench.report import FIGURES, SUMMARY_FORMATS, markdown_table, ngram_bpb, report
from attnbench.splits import load_split
from tests.test_docs import markdown_rows
from tests.tiny import english_like, write_params

FIXTURE = {
    # variant: (test bpb, train tokens/s, attention time per sequence ~ T^exponent, val bpb at the end). The best
    # test bpb is not the first row nor the best val bpb: the page must name it by test bpb.
    "mha": (2.75, 1000.0, 2.0, 2.80),
    "la": (2.25, 3000.0, 1.0, 2.90),
}


def write_variant(folder, variant, bpb, tokens_per_s, exponent, val_bpb=None, out_of_memory_at=None, reference_out_of_memory_at=None,
                  noisy_at=None):
    folder.mkdir(parents=True)
    val_bpb = bpb + 0.01 if val_bpb is None else val_bpb
    write_json(folder / "train.json", {"variant": variant, "params_non_embedding": 12345, "val_bpb_final": val_bpb,
                                       "tokens_per_s": tokens_per_s, "device": "cpu", "steps": 10, "tokens": 1000})
    write_json(folder / "eval.json", {"variant": variant, "test_bpb": bpb, "test_tokens": 999})
    with open(folder / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "tokens", "lr", "train_loss", "val_bpb", "tokens_per_s", "elapsed_s"])
        writer.writeheader()
        for step in (5, 10):
            writer.writerow({"step": step, "tokens": step * 100, "lr": 1e-3, "train_loss": 2.0, "val_bpb": bpb + 1 / step,
                             "tokens_per_s": tokens_per_s, "elapsed_s": step})
    rows = []
    for scope, scope_exponent in (("attention", exponent), ("reference", 2.0), ("model", exponent)):  # reference: mha's layer
        for T in (64, 128, 256, 512):
            batch = 1024 // T
            if (T == out_of_memory_at and scope != "model") or (T == reference_out_of_memory_at and scope == "reference"):
                rows.append({"variant": variant, "scope": scope, "T": T, "batch": batch, "status": "oom"})
                continue
            seconds = batch * 1e-6 * T**scope_exponent
            rows.append({"variant": variant, "scope": scope, "T": T, "batch": batch, "seconds": seconds,
                         "spread": 0.6 if (scope, T) == ("attention", noisy_at) else 0.1, "tokens_per_s": batch * T / seconds, "memory_bytes": batch * T * 1000, "memory_method": "saved_activations",
                         "status": "ok"})
    with open(folder / "profile.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    ok = [r for r in rows if r["scope"] == "attention" and r["status"] == "ok"]
    write_json(folder / "profile.json", {"variant": variant, "device": "cpu",
                                         "attention_time_exponent": fit_exponent([r["T"] for r in ok], [r["seconds"] / r["batch"] for r in ok])})


def prepared_params(tmp_path, monkeypatch, overrides: dict):
    """A tiny params file with `overrides` and its prepared data in tmp_path/prepared, tmp_path the working directory."""
    monkeypatch.chdir(tmp_path)
    _, params = write_params(tmp_path, overrides)
    data.fetch(params.data, tmp_path / "corpus.bin", tmp_path / "download")
    data.prepare(tmp_path / "corpus.bin", tmp_path / "prepared", params.data.max_bytes, params.data.splits)
    return params


def test_report_from_fixture_metrics(tmp_path, monkeypatch):
    params = prepared_params(tmp_path, monkeypatch, {"variants": {v: {} for v in FIXTURE}, "profile": {"repeats": 3}, "train": {"seed": 3}})
    for variant, figures in FIXTURE.items():
        write_variant(tmp_path / "variants" / variant, variant, *figures, out_of_memory_at=512 if variant == "mha" else None,
                      noisy_at=128 if variant == "la" else None)
    # What each line figure is given to plot (a PNG cannot be read back): seaborn's lineplot, recorded and still drawn.
    plotted = []
    real_lineplot = report_mod.sns.lineplot
    monkeypatch.setattr(report_mod.sns, "lineplot", lambda data, **kw: plotted.append((kw["ax"], data, kw["y"])) or real_lineplot(data, **kw))

    legends = {}  # each figure's legend entries, by title
    real_legend_beside = report_mod.legend_beside
    monkeypatch.setattr(report_mod, "legend_beside", lambda ax: real_legend_beside(ax) or legends.update(
        {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()]}))

    result = report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")

    # The throughput figure names its points in a legend (labels beside them overlapped where two nearly coincide).
    assert legends[FIGURES["bpb_vs_throughput"]] == list(FIXTURE), legends
    text = (tmp_path / "out" / "comparison.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "variant" not in line}
    assert set(rows) == set(FIXTURE)
    assert "| 2.750 |" in rows["mha"] and "| 2.250 |" in rows["la"], "test bpb missing from the table"
    assert "| 2.00 |" in rows["mha"] and "| 1.00 |" in rows["la"], "fitted time exponents missing from the table"
    header, table = markdown_rows(text, "| variant | params (M)")
    ratio = {v: cells[header.index("x sdpa @ max T")] for v, cells in table.items()}
    # At the profile's largest T, 512: 512^2 / 512^1 for la; mha ran out of memory there, which the page says
    # (not a figure of mha's at 256 in a column of 512's).
    assert ratio == {"mha": "—", "la": "512.00"}, ratio
    columns = {name: {v: cells[header.index(name)] for v, cells in table.items()} for name in ("val bpb (end)", "attn MiB @ max T")}
    # val bpb (end) is train.json's last validation figure, not eval's test bpb (the fixture's differ).
    assert columns["val bpb (end)"] == {"mha": "2.800", "la": "2.900"}, columns
    # la's attention at T = 512: batch 2 x 512 x 1000 bytes = 1,024,000 bytes, in MiB (2**20 bytes).
    assert columns["attn MiB @ max T"] == {"mha": "—", "la": "1.0"}, columns
    # Each figure plots its own quantity per sequence: ms from the profile's seconds, MiB from its memory_bytes.
    y = {ax.get_title(): (frame, column) for ax, frame, column in plotted}
    assert set(y) == {FIGURES[name] for name in ("learning_curves", "time_vs_T", "memory_vs_T")}, set(y)
    frame, column = y[FIGURES["learning_curves"]]
    assert column == "val_bpb"
    frame, column = y[FIGURES["time_vs_T"]]
    assert list(frame[column]) == pytest.approx(list(frame.seconds / frame.batch * 1e3)), column
    frame, column = y[FIGURES["memory_vs_T"]]
    assert list(frame[column]) == pytest.approx(list(frame["T"] * 1000 / 2**20)), column
    assert "Profile points that did not run: mha attention T = 512 (oom)." in text
    # The one point above 10% spread (every other is at 10%, which passes).
    assert re.search(r"^Profile points whose timed runs \(`profile.repeats`: 3\) spread over 10% about their median .*: "
                     r"la attention T = 128 \(60.0%\)\.$", text, re.M), text
    assert "too few runs" not in text
    assert "Best variant: **la** at 2.250 bpb" in text
    # la is better and faster in training; at the largest T only la was timed (mha ran out of memory there).
    assert "- Training tok/s (T = 32): **la**, the best in test bpb and the fastest of the variants timed, so ahead of every other one.\n" in text, text
    assert "- Attention-layer tok/s at T = 512: only **la** was timed there; not timed: mha.\n" in text, text
    assert "Each row is one training run (`train.seed`: 3; a params entry `<variant>-seed<N>` trains its variant with seed N)" in text, text
    assert result["pareto_front"] == {"train": ["la"], "attention": ["la"]}
    unigram, bigram, _ = ngram_bpb(tmp_path / "prepared", 2)
    assert f"unigram **{unigram:.3f} bpb**, bigram **{bigram:.3f} bpb**" in text
    for name in ("learning_curves", "bpb_vs_throughput", "time_vs_T", "memory_vs_T"):
        png = tmp_path / "out" / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(figures/{name}.png)" in text
    assert [r["variant"] for r in result["variants"]] == list(FIXTURE)
    assert {v: cells[header.index("spec exp")] for v, cells in table.items()} == {"mha": "2", "la": "1"}
    assert "which every fitted attention time exponent here meets within 0.25." in text


def test_the_pareto_front_keeps_what_no_other_variant_dominates():
    """Dominated: another at least as good in test bpb as printed (3 decimals, as the table's format rounds, halves
    up from 3.4445) and in speed, better in one. An exact twin dominates neither way; a variant not timed at that
    speed is left out; a variant is named with the front's variants that dominate it only, not the others (d also
    beats h)."""
    from attnbench.report import pareto_front

    points = {"b": (3.2, 300.0), "a": (3.0, 100.0), "c": (3.1, 200.0), "d": (3.2, 150.0), "e": (2.9996, 90.0),
              "f": (2.9, float("nan")), "g": (3.1, 200.0), "h": (3.3, 140.0), "x": (3.4445, 1000.0), "y": (3.4448, 2000.0),
              "p": (3.501, 2500.0), "q": (3.504, 2600.0)}
    summary = pd.DataFrame([{"variant": v, "test bpb": bpb, "speed": speed} for v, (bpb, speed) in points.items()])

    # By printed bpb, best first, then the faster: a (3.000, 100) before e (3.000, 90), which only the printed bpb
    # puts behind a; x and y both print 3.445, so the faster y dominates x; p and q differ in the third decimal only.
    assert list(pareto_front(summary, "speed").items()) == [
        ("a", []), ("e", ["a"]), ("c", []), ("g", []), ("b", []), ("d", ["c", "g", "b"]), ("h", ["c", "g", "b"]),
        ("y", []), ("x", ["y"]), ("p", []), ("q", [])]


def test_each_front_is_one_line_naming_what_dominates_the_rest():
    from attnbench.report import front_line

    assert front_line({"ca": [], "mha": ["ca"], "la": ["ca"]}, "Speed", ["mha", "la", "ca"]) == (
        "- Speed: **ca**, the best in test bpb and the fastest of the variants timed, so ahead of every other one.")
    assert front_line({"ca": [], "la": [], "lca": ["ca"], "sca": ["ca", "la"], "cka": ["ca"]}, "Speed", ["ca", "la", "lca", "sca", "cka", "mha"]) == (
        "- Speed: **ca, la**; lca and cka behind ca; sca behind ca and la; not timed: mha.")
    # Groups in the order of their best dominated variant's bpb (the keys' order), not by their dominators.
    assert front_line({"ca": [], "la": [], "sca": ["la"], "lca": ["ca"]}, "Speed", ["ca", "la", "lca", "sca"]) == (
        "- Speed: **ca, la**; sca behind la; lca behind ca.")
    assert front_line({"ca": [], "la": []}, "Speed", ["ca", "la"]) == "- Speed: **ca, la**."
    assert front_line({"la": []}, "Speed", ["mha", "la"]) == "- Speed: only **la** was timed there; not timed: mha."
    assert front_line({}, "Speed", ["mha", "la"]) == "- Speed: no variant was timed there."


def test_variants_that_tie_as_printed_are_all_best(tmp_path, monkeypatch):
    """mha 3.4496 and la 3.4504 both print 3.450: the page names both best, and la, faster, on the front alone."""
    params = prepared_params(tmp_path, monkeypatch, {"variants": {"mha": {}, "la": {}}})
    for variant, bpb, speed in (("mha", 3.4496, 1000.0), ("la", 3.4504, 2000.0)):
        write_variant(tmp_path / "variants" / variant, variant, bpb, speed, 1.0)

    report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")

    text = (tmp_path / "out" / "comparison.md").read_text()
    assert "Best variants: **mha, la** at 3.450 bpb." in text, text
    assert "- Training tok/s (T = 32): **la**, the best in test bpb and the fastest" in text, text


def test_the_throughput_figure_draws_the_front_where_it_has_two_variants(tmp_path, monkeypatch):
    """mha is slower and worse than la and la2, which trade bpb for speed: the front is la2 - la, drawn as a line
    from the faster to the better, with its own legend entry."""
    params = prepared_params(tmp_path, monkeypatch, {"variants": {"mha": {}, "la": {}, "ca": {}}})
    for variant, bpb, speed in (("mha", 2.75, 1000.0), ("la", 2.25, 3000.0), ("ca", 2.00, 2000.0)):
        write_variant(tmp_path / "variants" / variant, variant, bpb, speed, 1.0)
    lines = {}
    real_legend_beside = report_mod.legend_beside
    monkeypatch.setattr(report_mod, "legend_beside", lambda ax: real_legend_beside(ax) or lines.update(
        {ax.get_title(): ([t.get_text() for t in ax.get_legend().get_texts()], [line.get_xydata().tolist() for line in ax.get_lines() if len(line.get_xdata())])}))

    result = report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")

    assert result["pareto_front"]["train"] == ["ca", "la"]
    legend, drawn = lines[FIGURES["bpb_vs_throughput"]]
    assert legend == ["mha", "la", "ca", "Pareto front"], legend
    assert drawn == [[[2000.0, 2.0], [3000.0, 2.25]]], drawn  # (seaborn's legend handles are lines without points)
    assert "- Training tok/s (T = 32): **ca, la**; mha behind ca and la.\n" in (tmp_path / "out" / "comparison.md").read_text()


@pytest.mark.parametrize("repeats", [1, 2])
def test_the_page_names_the_time_exponents_off_the_spec(tmp_path, monkeypatch, repeats):
    """variants.md's tolerance is 0.25: la at 1.30 misses its 1, mha at 1.80 meets its 2. profile.repeats 1 measures
    no spread, and 2 too few to tell one noisy run, which the page says."""
    params = prepared_params(tmp_path, monkeypatch, {"variants": {v: {} for v in FIXTURE}, "profile": {"repeats": repeats}})
    for variant, exponent in (("mha", 1.8), ("la", 1.3)):
        write_variant(tmp_path / "variants" / variant, variant, *FIXTURE[variant][:2], exponent)

    report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")

    text = (tmp_path / "out" / "comparison.md").read_text()
    assert "which these attention time exponents miss by more than 0.25: la 1.30, spec 1." in text, text
    assert f"`profile.repeats` is {repeats}: too few runs to tell a noisy timing." in text


def test_an_exponent_not_fitted_is_not_judged_against_the_spec():
    """None (the benchmark's) and NaN (a report column's) mean no fit: neither in the misses nor counted as a meet."""
    from attnbench.profile import off_spec

    assert off_spec({"a": float("nan"), "b": None, "c": 1.3, "d": 1.2}, {"a": 1, "b": 1, "c": 1, "d": 1}) == ["c 1.30, spec 1"]


def test_an_exponent_at_the_tolerance_meets_the_spec():
    """Within the tolerance includes 0.25 itself: 1.25 and 0.75 meet a spec of 1 (exact in binary), 1.5 misses it."""
    from attnbench.profile import off_spec

    assert off_spec({"a": 1.25, "b": 0.75, "c": 1.5}, {"a": 1, "b": 1, "c": 1}) == ["c 1.50, spec 1"]


def test_the_reference_layers_spread_between_profiles_bounds_the_speed_differences():
    """The reference is the same layer in every variant's profile: its range at the largest T, over the profiles where
    it ran there, is the page's bar for attention speeds; a smaller T's rows and a failed point do not count, and
    where fewer than two ran at the largest T there is no bar (not one drawn at a smaller T)."""
    from attnbench.report import reference_spread

    rows = [("mha", 512, 100.0, "ok"), ("la", 512, 150.0, "ok"), ("ca", 512, 120.0, "ok"), ("lca", 512, None, "oom"),
            ("sca", 256, 1000.0, "ok"), ("ca", 256, 10.0, "ok"), ("mha", 512, 999.0, "ok")]
    profiles = pd.DataFrame([{"variant": v, "scope": "reference" if i < 6 else "attention", "T": T, "tokens_per_s": speed,
                              "status": status} for i, (v, T, speed, status) in enumerate(rows)])
    assert reference_spread(profiles) == (
        "the attention layers' speeds vary by up to 1.50x between processes on this machine (the reference layer, the "
        "same code in each of the 3 profiles, ran at 100 to 150 tok/s at T = 512)")
    assert reference_spread(profiles[profiles.variant.isin(["mha", "lca"])]) is None
    assert reference_spread(profiles[profiles.variant.isin(["lca", "sca", "ca"]) & (profiles["T"] < 512) | (profiles.variant == "lca")]) is None


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_page_says_how_memory_was_measured_and_what_cpu_timings_show(tmp_path, monkeypatch, device):
    params = prepared_params(tmp_path, monkeypatch, {"variants": {v: {} for v in FIXTURE}})
    for variant, figures in FIXTURE.items():
        folder = tmp_path / "variants" / variant
        write_variant(folder, variant, *figures)
        write_json(folder / "profile.json", read_json(folder / "profile.json") | {"device": device})

    report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")

    text = (tmp_path / "out" / "comparison.md").read_text()
    assert "Memory (`saved_activations`): the peak of the bytes autograd holds for the backward pass" in text, text
    assert ("CPU timings are for trends only" in text) == (device == "cpu"), text
    # The fixture's reference: 1e6 / T in both profiles.
    assert ("This page does not measure the seeds' spread, nor that of the training speeds; the attention layers' speeds "
            "vary by up to 1.00x between processes on this machine (the reference layer, the same code in each of the 2 "
            "profiles, ran at 1,953 to 1,953 tok/s at T = 512).") in text, text


def test_each_memory_method_in_the_profiles_is_explained(tmp_path, monkeypatch):
    """Profiles from a CPU and from a GPU in one report: both ways of measuring memory are said."""
    params = prepared_params(tmp_path, monkeypatch, {"variants": {v: {} for v in FIXTURE}})
    for variant, figures in FIXTURE.items():
        write_variant(tmp_path / "variants" / variant, variant, *figures)
    table = tmp_path / "variants" / "la" / "profile.csv"
    table.write_text(table.read_text().replace("saved_activations", "cuda_peak"))

    report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")

    text = (tmp_path / "out" / "comparison.md").read_text()
    assert "Memory (`cuda_peak`): the CUDA allocator's peak" in text and "Memory (`saved_activations`): the peak of the bytes" in text, text


def test_a_front_no_variant_was_timed_on_is_said_and_not_tagged(tmp_path, monkeypatch):
    """Both variants ran out of memory at the largest T: no attention front, in words, and no empty tag in MLflow."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    params = prepared_params(tmp_path, monkeypatch, {"variants": {v: {} for v in FIXTURE}, "tracking": {"uri": uri}})
    for variant, figures in FIXTURE.items():
        write_variant(tmp_path / "variants" / variant, variant, *figures, out_of_memory_at=512)

    report_mod.main(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")

    assert "- Attention-layer tok/s at T = 512: no variant was timed there.\n" in (tmp_path / "out" / "comparison.md").read_text()
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(params.experiment).experiment_id])
    assert run.data.tags["pareto_front.train"] == "la" and "pareto_front.attention" not in run.data.tags, run.data.tags


def test_a_profile_without_a_spread_column_has_no_noisy_points():
    """A profile.csv written before the spread column names no point noisy, and is not an error."""
    from attnbench.report import noisy_points

    profiles = pd.DataFrame({"variant": ["mha"], "scope": ["attention"], "T": [64], "status": ["ok"]})
    assert noisy_points(profiles) == []


def test_fit_exponent_is_the_log_log_slope_over_the_usable_points():
    lengths = [64, 128, 256, 512]
    assert fit_exponent(lengths, [3e-6 * T**1.5 for T in lengths]) == pytest.approx(1.5)
    assert fit_exponent(lengths, [2.0, 4.0, None, 0.0]) == pytest.approx(1.0)  # a point that did not run is left out
    assert fit_exponent(lengths, [5.0, None, None, None]) is None


def test_no_ratio_where_the_reference_did_not_run_at_the_largest_t(tmp_path, monkeypatch):
    """The likely case on a GPU: la runs at the largest T where mha's layer (the reference) runs out of memory. Its
    x sdpa cell is '—', not a ratio to the reference at a smaller T."""
    params = prepared_params(tmp_path, monkeypatch, {"variants": {"mha": None, "la": {}}})
    write_variant(tmp_path / "variants" / "la", "la", *FIXTURE["la"], reference_out_of_memory_at=512)

    report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")

    header, table = markdown_rows((tmp_path / "out" / "comparison.md").read_text(), "| variant | params (M)")
    assert table["la"][header.index("x sdpa @ max T")] == "—"
    assert table["la"][header.index("attn tok/s @ max T")] != "—"


def test_the_report_run_logs_the_files_it_wrote_and_nothing_else_in_the_folder(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from attnbench import report as report_mod

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    params = prepared_params(tmp_path, monkeypatch, {"variants": {v: {} for v in FIXTURE}, "tracking": {"uri": uri}})
    for variant, figures in FIXTURE.items():
        write_variant(tmp_path / "variants" / variant, variant, *figures)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("a page someone keeps beside the report")

    report_mod.main(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(params.experiment).experiment_id])
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"comparison.md", "learning_curves.png", "bpb_vs_throughput.png", "time_vs_T.png", "memory_vs_T.png"}, files
    assert run.data.tags["pareto_front.train"] == "la" and run.data.tags["pareto_front.attention"] == "la", run.data.tags
    assert {"unigram_bpb", "bigram_bpb", "trigram_bpb", "test_bpb.mha", "test_bpb.la"} <= set(run.data.metrics), run.data.metrics


def test_sampled_routing_variants_get_both_readings_in_their_own_table(tmp_path, monkeypatch):
    params = prepared_params(tmp_path, monkeypatch, {"variants": {"la": None, "lca": {}}})
    write_variant(tmp_path / "variants" / "mha", "mha", *FIXTURE["mha"])
    write_variant(tmp_path / "variants" / "lca", "lca", 3.205, 2000.0, 1.0)
    write_json(tmp_path / "variants" / "lca" / "eval.json", {
        "variant": "lca", "test_bpb": 3.205, "test_tokens": 999, "test_bpb_sampled": 3.0225,
        "routing": {"argmax": {"max_cluster_frac": 0.1765, "empty_clusters": 5.105, "pair_frac": 0.085},
                    "sampled": {"max_cluster_frac": 0.0913, "empty_clusters": 0.065, "pair_frac": 0.045}}})

    report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")

    text = (tmp_path / "out" / "comparison.md").read_text()
    assert "| lca | 3.205 | 3.022 | 17.6 | 9.1 | 5.11 | 0.07 |" in text
    assert "lca routes tokens by sampling in training" in text and f"seed {params.train.seed}" in text
    assert text.count("| mha |") == 1, "mha does not sample its routing: no row of its own in the routing table"


def test_seed_spread_gives_each_seeded_variants_range_and_which_ranges_lie_apart():
    from attnbench.report import seed_spread

    def spread(bpb: dict[str, float]) -> str | None:
        return seed_spread(pd.DataFrame({"variant": list(bpb), "test bpb": list(bpb.values())}))

    assert spread({"mha": 2.385, "la": 2.5, "ca": 2.426}) is None, "one run per variant: no spread to give"
    assert spread({"mha": 2.385, "mha-seed1": 2.391, "ca": 2.426, "ca-seed1": 2.4304, "la": 2.5}) == (
        "Test bpb over seeds, best mean first: **mha** 2.385 to 2.391 over 2 seeds, **ca** 2.426 to 2.430 over 2 seeds. "
        "Ahead in every seed: mha of ca.")
    # Ranges apart in the raw figures but meeting as printed (2.390 both) overlap; a variant whose only entries are
    # seeded ones is grouped too; three seeds are counted as three.
    assert spread({"ca": 2.3901, "ca-seed1": 2.37, "mha-seed1": 2.3904, "mha-seed2": 2.41, "mha-seed3": 2.40}) == (
        "Test bpb over seeds, best mean first: **ca** 2.370 to 2.390 over 2 seeds, **mha** 2.390 to 2.410 over 3 seeds. "
        "Not told apart by their seeds: ca and mha.")
    # A third variant, listed last but best by its mean, comes first, with the variants it is ahead of named together.
    assert spread({"ca": 2.3904, "ca-seed1": 2.37, "mha-seed1": 2.3896, "mha-seed2": 2.41, "la-seed3": 2.2, "la-seed4": 2.21}) == (
        "Test bpb over seeds, best mean first: **la** 2.200 to 2.210 over 2 seeds, **ca** 2.370 to 2.390 over 2 seeds, "
        "**mha** 2.390 to 2.410 over 2 seeds. Ahead in every seed: la of ca and mha. Not told apart by their seeds: ca "
        "and mha.")
    # Each variant names those it is ahead of, in one clause per variant.
    assert spread({"mha": 2.30, "mha-seed1": 2.31, "ca": 2.40, "ca-seed1": 2.41, "la": 2.50, "la-seed1": 2.52}) == (
        "Test bpb over seeds, best mean first: **mha** 2.300 to 2.310 over 2 seeds, **ca** 2.400 to 2.410 over 2 seeds, "
        "**la** 2.500 to 2.520 over 2 seeds. Ahead in every seed: mha of ca and la; ca of la.")


def test_where_every_variant_has_seeds_the_page_names_no_single_run_and_its_widest_training_speed_gap():
    from attnbench.report import noise_caveat

    summary = pd.DataFrame({"variant": ["mha", "mha-seed1", "ca", "ca-seed1", "ca-seed2"], "test bpb": [2.4, 2.41, 2.5, 2.52, 2.51],
                            "train tok/s": [100.0, 110.0, 200.0, 200.0, 190.0]})
    profiles = pd.DataFrame(columns=["variant", "scope", "T", "tokens_per_s", "status"])
    assert noise_caveat(summary, profiles) == (
        "Test bpb over seeds, best mean first: **mha** 2.400 to 2.410 over 2 seeds, **ca** 2.500 to 2.520 over 3 seeds. Ahead "
        "in every seed: mha of ca. The training speeds of one variant's runs, each in a process of its own, differ by up to 1.10x (mha: 100 "
        "to 110 tok/s), a bar for the training speeds' differences. This page does not measure the spread of the attention "
        "speeds (it needs two profiles with the reference at the largest T).")


def test_by_variant_takes_a_variant_with_several_runs_by_their_means():
    from attnbench.report import by_variant

    summary = pd.DataFrame({"variant": ["ca", "mha", "ca-seed1", "ca-seed2"], "test bpb": [2.5, 2.4, 2.7, 2.9],
                            "train tok/s": [100.0, 50.0, 200.0, 300.0], "attn tok/s @ max T": [1.0, 2.0, None, 3.0], "MFU %": None})
    assert by_variant(summary).to_dict(orient="list") == {
        "variant": ["ca", "mha"], "test bpb": [pytest.approx(2.7), 2.4], "train tok/s": [200.0, 50.0], "attn tok/s @ max T": [2.0, 2.0],
        "runs": [3, 1]}


@pytest.mark.parametrize("bpbs", [(3.205, 3.1), (2.6, 2.8)], ids=["mha-best", "lca-best-by-its-mean"])
def test_a_page_with_seeded_entries_gives_their_spread_and_their_seeds(tmp_path, monkeypatch, bpbs):
    """Each entry is a row of its own; the spread replaces the sentence that says it is not measured; the best
    variant, the fronts and the throughput figure's front take lca by its runs' mean; the sampled routing of lca's
    two runs is seeded by each one's training seed."""
    params = prepared_params(tmp_path, monkeypatch, {"variants": {"la": None, "lca": {}, "lca-seed7": {}}})
    write_variant(tmp_path / "variants" / "mha", "mha", *FIXTURE["mha"])  # 2.75 bpb, 1000 tok/s
    for entry, bpb, speed in (("lca", bpbs[0], 2000.0), ("lca-seed7", bpbs[1], 2500.0)):
        write_variant(tmp_path / "variants" / entry, entry, bpb, speed, 1.0)
        write_json(tmp_path / "variants" / entry / "eval.json", {
            "variant": entry, "test_bpb": bpb, "test_tokens": 999, "test_bpb_sampled": 3.0,
            "routing": {mode: {"max_cluster_frac": 0.1, "empty_clusters": 1.0} for mode in ("argmax", "sampled")}})
    lca_mean = sum(bpbs) / 2

    drawn = {}  # the throughput figure's legend, lines drawn (seaborn adds empty ones for its legend) and last scatter
    colours = {}  # each figure's legend entries' colours
    real_legend_beside = report_mod.legend_beside

    def record(ax):
        real_legend_beside(ax)
        legend = ax.get_legend()
        colours[ax.get_title()] = {t.get_text(): matplotlib.colors.to_hex(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles)
                                   if isinstance(h, matplotlib.lines.Line2D)}
        drawn.setdefault(ax.get_title(), (
            [t.get_text() for t in legend.get_texts()], [xy for line in ax.lines if (xy := line.get_xydata().tolist())],
            ax.collections[-1].get_offsets().tolist()))

    monkeypatch.setattr(report_mod, "legend_beside", record)

    report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")

    text = (tmp_path / "out" / "comparison.md").read_text()
    header, table = markdown_rows(text, "| variant | params (M)")
    assert list(table) == ["mha", "lca", "lca-seed7"]
    assert table["lca-seed7"][header.index("spec exp")] == "1.5", "lca's spec exponent"
    legend, lines, means = drawn[FIGURES["bpb_vs_throughput"]]
    assert means == [[2250.0, pytest.approx(lca_mean)]], means
    curve = colours[FIGURES["learning_curves"]]
    assert curve["lca"] == curve["lca-seed7"] != curve["mha"], f"lca's two runs in lca's colour: {curve}"
    assert ("Test bpb over seeds, best mean first: **lca** {:.3f} to {:.3f} over 2 seeds. The training speeds of one variant's runs, each in a "
            "process of its own, differ by up to 1.25x (lca: 2,000 to 2,500 tok/s), a bar for the training speeds' differences. "
            "The other variant (mha) is one run: this page does not measure its seeds' spread. The attention layers' speeds "
            ).format(min(bpbs), max(bpbs)) in text, text
    assert "; a variant with several runs by their means):" in text, text
    if lca_mean > 2.75:  # mha best; lca faster: both on the training front, its line from mha to lca's mean
        assert legend == ["mha", "lca", "lca-seed7", "mean of a variant's runs", "Pareto front"], legend
        assert lines == [[[1000.0, 2.75], [2250.0, pytest.approx(lca_mean)]]], lines
        assert "Best variant: **mha** at 2.750 bpb. " in text, text
        assert "- Training tok/s (T = 32): **mha, lca**.\n" in text, text
    else:  # lca's mean (2.700) beats mha, though one of its runs (2.800) does not
        assert "Best variant: **lca** at 2.700 bpb (the mean of its runs). " in text, text
        assert "- Training tok/s (T = 32): **lca**, the best in test bpb and the fastest" in text, text
    assert "scored as they trained (noise from the training seed of each run," in text, text


def test_report_names_a_missing_variant_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, params = write_params(tmp_path, {"variants": {v: {} for v in FIXTURE}})
    write_variant(tmp_path / "variants" / "mha", "mha", *FIXTURE["mha"])
    with pytest.raises(FileNotFoundError, match="la"):
        report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")
    assert not (tmp_path / "out" / "comparison.md").exists()


def test_the_unigram_bpb_of_a_two_byte_corpus(tmp_path):
    split = data.SplitFractions(train=0.5, val=0.25, test=0.25)
    (tmp_path / "corpus.bin").write_bytes(b"ab" * 400)
    data.prepare(tmp_path / "corpus.bin", tmp_path / "prepared", 10**6, split)
    # Two equally frequent bytes, add-one smoothing over 256: a little above 1 bit.
    assert ngram_bpb(tmp_path / "prepared", 0) == [pytest.approx(-math.log2(201 / 656), rel=1e-9)]


def test_the_unigram_bpb_scores_the_test_split_with_the_train_splits_frequencies(tmp_path):
    """Val and test differ here (val all 'c', which train never has; test all 'a'): the figure is the test split's
    code length under train's counts, not val's nor test's own."""
    split = data.SplitFractions(train=0.5, val=0.25, test=0.25)
    (tmp_path / "corpus.bin").write_bytes(b"ab" * 200 + b"c" * 200 + b"a" * 200)
    data.prepare(tmp_path / "corpus.bin", tmp_path / "prepared", 10**6, split)
    # 'a': 200 of train's 400 bytes, add-one smoothed over 256 byte values.
    assert ngram_bpb(tmp_path / "prepared", 0) == [pytest.approx(-math.log2(201 / 656), rel=1e-9)]


def naive_witten_bell_bpb(train: bytes, test: bytes, order: int) -> float:
    """The reference: Witten-Bell interpolation written out with dictionaries, one test byte at a time."""
    from collections import Counter

    unigram = Counter(train)

    def prob(context: bytes, x: int) -> float:
        if not context:
            return (unigram[x] + 1) / (len(train) + 256)
        follows = Counter(train[i + len(context)] for i in range(len(train) - len(context)) if train[i : i + len(context)] == context)
        shorter = prob(context[1:], x)
        seen, kinds = sum(follows.values()), len(follows)
        return (follows[x] + kinds * shorter) / (seen + kinds) if seen else shorter

    return -sum(math.log2(prob(test[t - order : t], test[t])) for t in range(order, len(test))) / (len(test) - order)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_ngram_bpb_equals_the_naive_witten_bell_model(tmp_path, order):
    """Counted in chunks smaller than the split (a window across a chunk's edge counts once), against the naive model;
    the test split holds a byte ('!') and contexts train never has."""
    corpus = english_like(2400, seed=1) + b"!x!" + english_like(600, seed=2)
    split = data.SplitFractions(train=0.75, val=0.05, test=0.2)
    (tmp_path / "corpus.bin").write_bytes(corpus)
    data.prepare(tmp_path / "corpus.bin", tmp_path / "prepared", 10**6, split)
    train, test = (bytes(load_split(tmp_path / "prepared", name, verify=False)) for name in ("train", "test"))
    assert b"!" in test and b"!" not in train
    assert ngram_bpb(tmp_path / "prepared", order, chunk=97)[order] == pytest.approx(naive_witten_bell_bpb(train, test, order), rel=1e-12)


def test_a_longer_context_predicts_a_periodic_text_almost_surely(tmp_path):
    split = data.SplitFractions(train=0.5, val=0.25, test=0.25)
    (tmp_path / "corpus.bin").write_bytes(b"abc" * 400)
    data.prepare(tmp_path / "corpus.bin", tmp_path / "prepared", 10**6, split)
    unigram, bigram = ngram_bpb(tmp_path / "prepared", 1)
    # Three bytes of 600 each, add-one smoothed over 256; after one byte of context the next is all but certain.
    assert unigram == pytest.approx(-math.log2(201 / 856), rel=1e-9) and bigram < 0.01, (unigram, bigram)


@pytest.mark.parametrize("bpb,verdict", [
    ({"mha": 3.6, "ca": 3.4}, "No variant is better than the trigram model: at this training budget none predicts better "
                              "than counts of the previous 2 bytes, so the comparison shows how fast each variant learns "
                              "early on, which a longer training may change. Not better than the bigram model either: mha."),
    # Both print 3.000: mha is not better than the trigram, though its raw bpb (2.9996) is below the raw bar (3.0004).
    ({"mha": 2.9996, "ca": 2.9}, "Not better than the trigram model: mha."),
    ({"mha": 2.9994, "ca": 2.9}, "Every variant beats the trigram model."),  # 2.999 against 3.000
    ({"mha": 4.7, "ca": 3.6}, "No variant is better than the trigram model: at this training budget none predicts better "
                              "than counts of the previous 2 bytes, so the comparison shows how fast each variant learns "
                              "early on, which a longer training may change. Not better than the bigram model either: "
                              "mha and ca. Not better than the unigram model either: mha."),
])
def test_the_count_models_name_the_variants_they_beat(bpb, verdict):
    from attnbench.report import ngram_verdict

    summary = pd.DataFrame({"variant": list(bpb), "test bpb": list(bpb.values())})
    assert ngram_verdict(summary, {"unigram": 4.6, "bigram": 3.5, "trigram": 3.0004}) == verdict


def test_the_count_models_are_judged_strongest_first_whatever_their_order():
    """A text where the trigram model is worse than the bigram one (short, or unlike its train split): the bigram is
    the bar the variants are first held to, and the trigram names no one again."""
    from attnbench.report import ngram_verdict

    summary = pd.DataFrame({"variant": ["mha", "ca"], "test bpb": [3.0, 2.8]})
    assert ngram_verdict(summary, {"unigram": 4.6, "bigram": 2.9, "trigram": 3.1}) == (
        "Not better than the bigram model: mha.")


def test_a_test_split_scored_in_part_is_said_so(tmp_path, monkeypatch):
    """With evaluate.max_tokens the test bpb covers part of the split, while the unigram line speaks of the whole:
    the page says how much was scored (a user's check found nothing said); scored whole, it says nothing."""
    params = prepared_params(tmp_path, monkeypatch, {"variants": {v: {} for v in FIXTURE}})
    for variant, figures in FIXTURE.items():
        write_variant(tmp_path / "variants" / variant, variant, *figures)
    test_bytes = read_json(tmp_path / "prepared" / "manifest.json")["splits"]["test"]["bytes"]
    for scored, said in ((test_bytes // 2, True), (test_bytes - 1, False)):
        for variant, (bpb, *_) in FIXTURE.items():
            write_json(tmp_path / "variants" / variant / "eval.json", {"variant": variant, "test_bpb": bpb, "test_tokens": scored})
        report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out")
        text = (tmp_path / "out" / "comparison.md").read_text()
        assert (f"Test bpb predicts {scored:,} of the test split's {test_bytes:,} bytes" in text) == said, text[:600]


def test_report_of_a_subset_names_the_variants_left_out(tmp_path, monkeypatch):
    """A report of the runs that finished (report --variants): only those in the table, the others named on the page."""
    params = prepared_params(tmp_path, monkeypatch, {"variants": {v: {} for v in [*FIXTURE, "ca"]}})
    write_variant(tmp_path / "variants" / "mha", "mha", *FIXTURE["mha"])  # la's and ca's stages never finished

    result = report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out", subset=["mha"])

    assert [r["variant"] for r in result["variants"]] == ["mha"]
    assert "Not in this report: la, ca (of the params file's 3 entries)." in (tmp_path / "out" / "comparison.md").read_text()
    with pytest.raises(ConfigError, match="'cka' is not in this params file's variants; present: mha, la, ca"):
        report(params, tmp_path / "variants", tmp_path / "prepared", tmp_path / "out2", subset=["mha", "cka"])


def test_each_column_keeps_one_format_at_every_magnitude():
    table = pd.DataFrame([{"variant": "ca", "train tok/s": 950.4, "MFU %": 30.71, "attn MiB @ max T": 970.63, "test bpb": 1.7019},
                          {"variant": "mha", "train tok/s": 536168.2, "MFU %": None, "attn MiB @ max T": 1161.21, "test bpb": 1.9}])
    rows = markdown_table(table, SUMMARY_FORMATS).splitlines()[2:]
    assert rows == ["| ca | 950 | 30.7 | 970.6 | 1.702 |", "| mha | 536,168 | — | 1,161.2 | 1.900 |"]


def test_length_axes_tick_the_measured_lengths():
    """The figures' x ticks are the profiled lengths, labelled as the tables name them, not matplotlib's decades."""
    import matplotlib.pyplot as plt

    lengths = [512, 2048, 8192, 32768, 2048]
    fig, ax = plt.subplots()
    ax.plot(lengths, [1, 2, 3, 4, 2], label="a")
    log_length_axes(ax, lengths)
    assert list(ax.get_xticks()) == [512, 2048, 8192, 32768]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["512", "2K", "8K", "32K"]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    minor = ax.yaxis.get_minor_formatter()
    assert (minor(2, 0), minor(3, 0), minor(0.5, 0)) == ("2", "", "0.5")  # 2 and 5 labelled within few decades
    ax.set_ylim(1e-3, 1e3)
    assert minor(2, 0) == ""  # six decades: the powers of ten alone
    plt.close(fig)


def test_length_labels_abbreviate_whole_multiples_of_1024_only():
    """1024 reads 1K, as the tables name it; a length that is no whole multiple of 1024 keeps its digits."""
    assert [length_label(t) for t in (512, 1000, 1024, 1536, 4096)] == ["512", "1000", "1K", "1536", "4K"]


def test_length_axes_label_minor_ticks_over_three_decades_and_put_the_legend_beside_the_plot():
    """2 and 5 are labelled while the y axis spans up to three decades (not beyond), and the legend sits to the right
    of the axes, where it hides no line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([512, 2048], [1, 2], label="a")
    log_length_axes(ax, [512, 2048])
    minor = ax.yaxis.get_minor_formatter()
    ax.set_ylim(1, 1000)
    assert minor(2, 0) == "2"
    ax.set_ylim(1, 10_000)
    assert minor(2, 0) == ""
    legend = ax.get_legend()
    assert legend is not None
    anchor = legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.x0 == pytest.approx(1.02) and anchor.y0 == pytest.approx(1)
    plt.close(fig)


def test_the_report_stage_writes_to_reports_run_name_by_default(tmp_path, monkeypatch):
    """Without --out the page goes to reports/<run.name> (the front ends' declared output), not under results/."""
    from pathlib import Path

    from attnbench import cli

    monkeypatch.chdir(tmp_path)
    path, params = write_params(tmp_path)
    received = []
    monkeypatch.setattr(report_mod, "main", lambda params, variants_dir, data_dir, out_dir, subset: received.append(out_dir))
    assert cli.main(["report", "--params", str(path)]) == 0
    assert received == [Path("reports") / params.run.name]


def test_a_variants_seeded_entries_share_its_colour_and_the_variants_differ():
    from attnbench.report import entry_palette

    palette = entry_palette(pd.DataFrame({"variant": ["mha", "ca", "mha-seed1", "ca-seed2", "ca", "la-seed1"]}))
    assert list(palette) == ["mha", "ca", "mha-seed1", "ca-seed2", "la-seed1"]
    assert palette["mha"] == palette["mha-seed1"] and palette["ca"] == palette["ca-seed2"]
    assert len({palette["mha"], palette["ca"], palette["la-seed1"]}) == 3
    every = entry_palette(pd.DataFrame({"variant": ["mha", "la", "ca", "lca", "cka", "fastcka", "sca"]}))
    assert len(set(every.values())) == 7
