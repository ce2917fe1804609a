"""The benchmark's tables from fixture rows (the measuring itself needs a GPU)."""

from pathlib import Path

import pytest
import torch

from attnbench.benchmark import exponents, fit_range, limit_terms, markdown, row_label, tracked_metrics
from attnbench.config import parse_params
from attnbench.files import read_json
from attnbench.variants import build_attention


def attention_rows(lengths=(2048, 8192, 32768)):
    rows = []
    for label, per_token_ms in [("sdpa", lambda T: T / 2048), ("mha (compiled)", lambda T: T / 1024),
                                ("ca (compiled)", lambda T: (T / 2048) ** 0.5 / 4)]:
        for T in lengths:
            batch = max(1, 65536 // T)
            ms = per_token_ms(T) * batch * T / 1000
            rows.append({"kind": "attention", "variant": label.split()[0], "label": label, "T": T, "batch": batch,
                         "ms": ms, "mtok_per_s": batch * T / ms / 1e3, "status": "ok", "mode": "compiled" if "compiled" in label else "eager"})
    return rows


def test_a_row_is_named_by_its_variant_and_its_mode_unless_eager():
    """The tables tell a variant's compiled and graphs rows apart by the label alone (the CSV has a mode column)."""
    assert row_label("ca", "eager") == "ca"
    assert row_label("ca", "compiled") == "ca (compiled)"
    assert row_label("sca", "graphs") == "sca (graphs)"


def test_exponents_are_the_per_sequence_slopes():
    slopes = exponents(attention_rows())
    assert abs(slopes["sdpa"] - 2.0) < 1e-9  # time per token ~ T: per sequence ~ T^2
    assert abs(slopes["ca (compiled)"] - 1.5) < 1e-9


def test_exponents_fit_2k_to_32k_where_measured_else_every_length_and_say_which():
    """The issues' range when the run holds two lengths in it (a point past it does not bend the fit); a run past 32K
    fits its own lengths, and the table's header and the MLflow metric name the range."""
    mixed = [r for r in attention_rows((2048, 8192, 32768, 131072))
             if not (r["label"] == "ca (compiled)" and r["T"] == 131072)] + [
        r | {"ms": 1e6} for r in attention_rows((131072,)) if r["label"] == "ca (compiled)"]  # far off the curve
    assert fit_range(mixed) == (2048, 32768) and abs(exponents(mixed)["ca (compiled)"] - 1.5) < 1e-9
    long = attention_rows((32768, 65536, 131072, 262144))
    assert fit_range(long) == (32768, 262144)
    assert abs(exponents(long)["ca (compiled)"] - 1.5) < 1e-9 and abs(exponents(long)["sdpa"] - 2.0) < 1e-9
    params = parse_params({"variants": {"mha": {}, "ca": {}}})
    text = markdown(long, [], "H100", params.benchmark, params)
    assert ("| time exponent (32K-256K) | spec | x sdpa at 8K | x sdpa at 32K | x sdpa at 256K | x mha at 8K | x mha at 32K "
            "| x mha at 256K |") in text
    ca_row = next(line for line in text.splitlines() if line.startswith("| ca (compiled)"))
    # ca's time per token over sdpa's: (T/2K)^0.5 / 4 over T/2K, so x sdpa 4 sqrt(T/2K): 16 at 32K, 4 sqrt(128) at 256K.
    assert ca_row.endswith(f"| 1.50 | 1.5 | — | 16.00 | {4 * 128**0.5:.2f} | — | 32.00 | {8 * 128**0.5:.2f} |"), ca_row
    header = next(i for i, line in enumerate(text.splitlines()) if line.startswith("| variant | "))
    assert [line.count("|") for line in text.splitlines()[header : header + 3]] == [ca_row.count("|")] * 3
    assert "| time exponent (2K-32K) |" in markdown(attention_rows(), [], "H100", params.benchmark, params)
    assert "attention.ca.compiled.time_exponent_32K-256K" in tracked_metrics(long, [])[None]
    assert "attention.ca.compiled.time_exponent" in tracked_metrics(attention_rows(), [])[None]


def test_markdown_shows_ratios_to_sdpa_and_to_mha_and_the_training_baseline():
    params = parse_params({"variants": {"mha": {}, "ca": {}}})
    training = [
        {"variant": "plain GPT (mha, flash)", "model": "d512 L8 H8", "batch": 64, "ms": 40.0, "mtok_per_s": 1.6, "mfu": 0.30,
         "peak_gib": 12.34, "compiled": True, "status": "ok"},
        {"variant": "ca", "model": "d512 L8 H8", "batch": 64, "status": "oom"},
    ]
    text = markdown(attention_rows(), training, "H100", params.benchmark, params)
    ca_row = next(line for line in text.splitlines() if line.startswith("| ca (compiled)"))
    cells = [c.strip() for c in ca_row.strip("|").split("|")]
    # ca per token: 1/4 of sdpa's at 2K, sqrt(4)/4 / 4 = 1/8 at 8K, sqrt(16)/4 / 16 = 1/16 at 32K; mha (compiled), its
    # bar in the x mha columns, runs at half sdpa's speed. The exponent, the spec's, x sdpa and x mha at 8K and 32K:
    assert cells[-6:] == ["1.50", "1.5", "8.00", "16.00", "16.00", "32.00"], ca_row
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")][-2:] for line in text.splitlines()
            if line.startswith("| sdpa |") or line.startswith("| mha (compiled) |")}
    assert rows == {"sdpa": ["—", "—"], "mha (compiled)": ["1.00", "1.00"]}, rows  # the references have no mha row
    assert "every fitted row within 0.25 of it" in text
    # A table's delimiter row has a cell for each header cell, or Markdown renders no table.
    header = next(i for i, line in enumerate(text.splitlines()) if line.startswith("| variant | ") and "time exponent" in line)
    assert [line.count("|") for line in text.splitlines()[header : header + 3]] == [ca_row.count("|")] * 3
    assert "| plain GPT (mha, flash) | d512 L8 H8 | 40.0 | 1.600 | 30.0% | 12.3 | True |" in text
    assert "| ca | d512 L8 H8 | oom" in text


@pytest.mark.parametrize("T", [1, 37, 300])
def test_mean_keys_count_the_pairs_of_each_definition(T):
    """Against pairs counted on dense masks built from variants.md's formulas (b = 16, lookback 2, C = 5 balanced:
    cluster t mod 5): mha all s <= t; ca blocks i - 2 .. i; cka and fastcka their own block; lca its cluster; sca
    lca's plus C x C supernode pairs at each of the ceil(T / b) steps; la none."""
    positions = torch.arange(T)
    causal = positions[:, None] >= positions[None, :]
    block, cluster = positions // 16, positions % 5

    def mean(allowed):
        return (allowed & causal).sum().item() / T

    expected = {"mha": mean(causal), "la": 0.0, "ca": mean(block[None, :] >= block[:, None] - 2),
                "cka": mean(block[None, :] == block[:, None]), "fastcka": mean(block[None, :] == block[:, None]),
                "lca": mean(cluster[None, :] == cluster[:, None]),
                "sca": mean(cluster[None, :] == cluster[:, None]) + -(-T // 16) * 25 / T}
    options = {"ca": dict(block=16, lookback=2), "cka": dict(block=16), "fastcka": dict(block=16), "lca": dict(clusters=5),
               "sca": dict(clusters=5, block=16)}
    got = {v: build_attention(v, 16, 2, T, options.get(v)).mean_keys() for v in expected}
    assert got == pytest.approx(expected), got


def test_rows_are_set_against_their_limit():
    """The limit's two terms from the device's peaks (mha at 8K: its pairs; ca: the memory floor, whose exponent is
    1 although its pairs grow), the share reached, the MLflow metric; no section where the peaks are unknown."""
    params = parse_params({"variants": {"mha": {}, "ca": {}}})
    floor_ms = 1e3 * 11 * 65536 * 8 * 64 * 2 / 3.35e12
    assert limit_terms("mha", 8192, 8, 8, 64, None, 989e12, 3.35e12) == pytest.approx(
        {"floor_ms": floor_ms, "pairs_ms": 1e3 * 14 * 64 * 4096.5 * 65536 * 8 / 989e12})
    assert limit_terms("sdpa", 8192, 8, 8, 64, None, 989e12, 3.35e12) == limit_terms("mha", 8192, 8, 8, 64, None, 989e12, 3.35e12)
    assert limit_terms("ca", 8192, 8, 8, 64, None, None, 3.35e12) == {}
    rows = attention_rows()
    text = markdown(rows, [], "H100", params.benchmark, params)
    assert "Against the limit" not in text and not any("of_limit" in k for k in tracked_metrics(rows, [])[8192])
    for r in rows:
        r.update(limit_terms(r["variant"], r["T"], r["batch"], 8, 64, None, 989e12, 3.35e12))
    text = markdown(rows, [], "H100", params.benchmark, params)
    limit_rows = {line.split("|")[1].strip(): line for line in text.splitlines() if " ms (" in line}
    ca_8k = next(r for r in rows if r["label"] == "ca (compiled)" and r["T"] == 8192)
    assert ca_8k["pairs_ms"] < floor_ms
    ca_row, mha_row = limit_rows["ca (compiled)"], limit_rows["mha (compiled)"]
    assert f"| {floor_ms:.3f} ms (memory), {100 * floor_ms / ca_8k['ms']:.0f}% |" in ca_row and ca_row.endswith("| 1.00 |"), ca_row
    assert mha_row.count("ms (pairs)") == 3 and mha_row.endswith("| 2.00 |"), mha_row
    assert tracked_metrics(rows, [])[8192]["attention.ca.compiled.of_limit"] == pytest.approx(floor_ms / ca_8k["ms"])


def test_markdown_names_the_exponents_off_the_spec():
    """variants.md's tolerance is 0.25: ca at 1.24 is off its 1.5, mha at 1.76 within its 2 (sdpa, mha's kernel: 2)."""
    params = parse_params({"variants": {"mha": {}, "ca": {}}})
    rows = attention_rows()
    for label, exponent in (("ca (graphs)", 1.24), ("mha (graphs)", 1.76)):
        rows += [{"kind": "attention", "variant": label.split()[0], "label": label, "T": T, "batch": 65536 // T,
                  "ms": (T / 2048) ** exponent * 2048 / T, "mtok_per_s": 1.0, "status": "ok", "mode": "graphs"} for T in (2048, 8192, 32768)]
    text = markdown(rows, [], "H100", params.benchmark, params)
    spec = {line.split("|")[1].strip(): line.split("|")[-6].strip() for line in text.splitlines() if line.startswith("| ") and "variant" not in line}
    assert spec == {"sdpa": "2", "mha (compiled)": "2", "ca (compiled)": "1.5", "ca (graphs)": "1.5", "mha (graphs)": "2"}, spec
    assert "off it by more than 0.25: ca (graphs) 1.24, spec 1.5)." in text, text


def test_markdown_shows_only_the_parts_that_ran():
    params = parse_params({"variants": {"ca": {}}})
    attention_only = markdown(attention_rows(), [], "H100", params.benchmark, params)
    assert "## Attention" in attention_only and "Training step" not in attention_only and "MFU" not in attention_only
    training = [{"variant": "ca", "model": "d512 L8 H8", "batch": 64, "ms": 40.0, "mtok_per_s": 1.6, "mfu": 0.3, "peak_gib": 9.0, "compiled": True, "status": "ok"}]
    training_only = markdown([], training, "H100", params.benchmark, params)
    assert "## Attention" not in training_only and f"{64 * params.model.seq_len:,} tokens per step" in training_only


def test_a_failed_point_keeps_the_cause_on_one_line_and_logs_the_traceback(monkeypatch, caplog):
    """A compile error's cause sits at the end of a long message (Inductor wraps the subprocess's traceback):
    the row's status keeps the start and the end on one line, the log gets the whole traceback."""
    import torch

    from attnbench.benchmark import run_point

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    message = "SubprocException: An exception occurred in a subprocess:\n" + "  File x.py, line 1\n" * 40 + "ValueError: the real cause"

    def build():
        raise RuntimeError(message)

    with caplog.at_level("WARNING", logger="attnbench.benchmark"):
        row = run_point("attention", "sca", 8192, 8, build, warmup=1, repeats=1)
    assert row["status"].startswith("error: RuntimeError: SubprocException") and row["status"].endswith("ValueError: the real cause")
    assert "\n" not in row["status"] and len(row["status"]) < 250
    assert "Traceback" in caplog.text and caplog.text.count("File x.py") == 40


def test_a_point_keeps_its_median_and_the_spread_of_its_samples(monkeypatch, tmp_path):
    """The figure is the median sample; the fastest and slowest go to the CSV, so a reader can tell a difference
    between two rows from the noise of one."""
    import torch

    from attnbench import benchmark

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2**30)
    monkeypatch.setattr(benchmark, "time_samples", lambda step, warmup, repeats, warmup_seconds, sample_seconds: [2.5, 2.0, 4.0, 2.0, 3.0])
    row = benchmark.run_point("attention", "ca", 8192, 8, lambda: None, warmup=1, repeats=5)
    assert (row["ms"], row["ms_min"], row["ms_max"], row["peak_gib"]) == (2.5, 2.0, 4.0, 1.0)
    assert row["mtok_per_s"] == 8 * 8192 / 2.5 / 1e3
    benchmark.write_csv(tmp_path / "rows.csv", [row], benchmark.ATTENTION_FIELDS)
    assert (tmp_path / "rows.csv").read_text().splitlines()[1] == "attention,ca,,8192,8,2.5,2.0,4.0,5,26.2144,,,1.0,ok"


def test_a_point_warms_up_for_its_calls_and_then_for_its_device_time(monkeypatch):
    """After `warmup` calls, untimed chains of CHAIN calls follow until the device has spent `warmup_seconds` in them;
    then `repeats` timed chains. CUDA's events are stood in for by a clock of 25 ms per call."""
    import torch

    from attnbench import benchmark

    calls = []

    class Event:
        def __init__(self, enable_timing):
            self.at = None

        def record(self):
            self.at = len(calls)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 25.0 * (end.at - self.at)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    samples = benchmark.time_samples(lambda: calls.append(1), warmup=3, repeats=5, warmup_seconds=1.0)
    assert samples == [25.0] * 5
    # 3 calls, then 1 s of warm-up at 25 ms a call in chains of CHAIN (4): 40 calls, 10 chains; then 5 chains timed.
    assert len(calls) == 3 + 40 + 5 * benchmark.CHAIN
    calls.clear()
    benchmark.time_samples(lambda: calls.append(1), warmup=3, repeats=5, warmup_seconds=0.0)
    assert len(calls) == 3 + 5 * benchmark.CHAIN


def test_a_point_samples_until_its_samples_span_sample_seconds(monkeypatch):
    """`repeats` samples at least, then more until they span `sample_seconds` of device time: at 25 ms a call, a
    sample of CHAIN (4) calls spans 0.1 s, so 2 s takes 20 samples where 5 were asked for; 0.3 s keeps the 5."""
    import torch

    from attnbench import benchmark

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(benchmark, "chain_ms", lambda step: 25.0)
    assert len(benchmark.time_samples(lambda: None, warmup=0, repeats=5, sample_seconds=2.0)) == 20
    assert len(benchmark.time_samples(lambda: None, warmup=0, repeats=5, sample_seconds=0.3)) == 5


def test_references_named_as_variants_run_once(monkeypatch, tmp_path):
    """`--variants sdpa sca` measured sdpa twice (once as the reference that every ratio uses, once as named)."""
    import torch

    from attnbench import benchmark

    measured = []
    monkeypatch.chdir(tmp_path)  # the run's MLflow store (sqlite:///mlflow.db) lands here
    monkeypatch.setattr(benchmark, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(benchmark, "device_name", lambda: "fake-gpu")
    monkeypatch.setattr(benchmark, "benchmark", lambda params, names, *args: (measured.extend(names), ([], []))[1])
    benchmark.main(parse_params({"benchmark": {"parts": ["attention"]}, "variants": {"sca": {}}}), tmp_path, variants=["sdpa", "sca"])
    assert measured == [*benchmark.REFERENCES, "sca"]


def test_a_run_cut_short_keeps_the_training_rows_it_measured(monkeypatch, tmp_path):
    """The training rows were written once all of them were measured, so a run stopped by its time limit during the
    last variant kept none (stop 48 on the H200: 7 of 8 rows measured, an empty train CSV). The plain GPT, the
    floor mha must beat, runs first, once."""
    import csv

    import pytest
    import torch

    from attnbench import benchmark

    measured = []

    def measure(params, names, part, *args):
        if len(measured) == 2:
            raise KeyboardInterrupt  # the time limit's SIGINT, during the third training run
        measured.extend(names)
        return [], [{"kind": "train", "variant": name, "model": "d64 L1 H1", "T": 128, "batch": 512, "ms": 1.0,
                     "mtok_per_s": 1.0, "mfu": None, "peak_gib": 0.1, "compiled": True, "status": "ok"} for name in names]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(benchmark, "device_name", lambda: "fake-gpu")
    monkeypatch.setattr(benchmark, "benchmark", measure)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(parse_params({"benchmark": {"parts": ["train"]}, "variants": {"mha": {}, "la": {}}}), tmp_path / "out")
    assert measured == [benchmark.PLAIN_GPT[0], "mha"]
    with open(tmp_path / "out" / "fake-gpu-train.csv") as f:
        assert [row["variant"] for row in csv.DictReader(f)] == measured
    assert "| mha | d64 L1 H1 |" in (tmp_path / "out" / "fake-gpu.md").read_text()
    assert not (tmp_path / "out" / "benchmark.json").exists()  # the declared output: the front ends run it again


def test_training_rows_run_the_baseline_first_and_the_table_groups_them_by_size(monkeypatch, tmp_path):
    """The plain GPT's label runs the baseline (mha on the flash kernel); each run measures its sizes in turn, and the
    table lists the params' size first, then the others' baseline and mha."""
    import torch

    from attnbench import benchmark

    measured = []

    def run_point(kind, label, T, batch, build, **settings):
        measured.append(label)
        return {"kind": kind, "variant": label, "T": T, "batch": batch, "ms": 1.0, "mtok_per_s": 1.0, "peak_gib": 0.1, "status": "ok"}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(benchmark, "device_name", lambda: "fake-gpu")
    monkeypatch.setattr(benchmark, "peak_flops", lambda device: None)
    monkeypatch.setattr(benchmark, "peak_bandwidth", lambda device: None)
    monkeypatch.setattr(benchmark, "run_point", run_point)
    params = parse_params({"model": {"d_model": 64, "n_layers": 1}, "variants": {"mha": {}, "la": {}},
                           "benchmark": {"parts": ["train"], "train_sizes": ["128x2"], "head_dim": 32}})
    benchmark.main(params, tmp_path / "out")
    plain = benchmark.PLAIN_GPT[0]
    assert measured == [plain, plain, "mha", "mha", "la"]
    rows = [line.split(" | ")[:2] for line in (tmp_path / "out" / "fake-gpu.md").read_text().splitlines() if line.startswith("| ") and "ms/step" not in line]
    assert rows == [["| " + plain, "d64 L1 H2"], ["| mha", "d64 L1 H2"], ["| la", "d64 L1 H2"], ["| " + plain, "d128 L2 H4"], ["| mha", "d128 L2 H4"]], rows


def test_an_unknown_variant_is_refused_before_any_work(tmp_path):
    """A misspelt --variants name used to become an error row per length, after the references had run."""
    import pytest

    from attnbench import benchmark
    from attnbench.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown 'mhaa' .*; allowed: sdpa, sdpa-flash, mha, sca$"):
        benchmark.main(parse_params({"variants": {"mha": {}, "sca": {}}}), tmp_path, variants=["mhaa", "sca"])
    # A registered variant the params file does not configure: its rows would have no options (the training rows
    # used to fail after every attention row had run).
    with pytest.raises(ConfigError, match=r"unknown 'cka' .*; allowed: sdpa, sdpa-flash, mha, la$"):
        benchmark.main(parse_params({"variants": {"mha": {}, "la": {}}}), tmp_path, variants=["cka"])
    assert list(tmp_path.iterdir()) == []


def test_an_entry_with_its_own_seed_is_not_benchmarked_again():
    """mha-seed1 trains mha again: its layer and untrained model are mha's, so the benchmark neither runs it by
    default nor takes it by name."""
    import pytest

    from attnbench.benchmark import benchmarked
    from attnbench.config import ConfigError

    params = parse_params({"variants": {"mha": {}, "mha-seed1": {}, "la": {}, "la-seed2": {}}})
    assert benchmarked(params, None) == ["mha", "la"]
    assert benchmarked(params, ["sdpa", "mha"]) == ["mha"]
    with pytest.raises(ConfigError, match=r"unknown 'mha-seed1' \(not a reference row nor one of the params file's variants without a "
                                          r"seed of its own\); allowed: sdpa, sdpa-flash, mha, la$"):
        benchmarked(params, ["mha-seed1"])


def test_the_params_file_says_what_is_measured_and_each_flag_overrides_its_key(tmp_path, monkeypatch, capsys):
    """The front ends' benchmark target runs the command without flags, so a preset's benchmark section must reach
    the measuring; a flag replaces one key, and a bad flag is one line, exit 2, before any work. Without --out the
    command writes where the target does, reports/benchmarks/<run.name>, never over the committed device pages."""
    from attnbench import benchmark, cli
    from tests.tiny import write_params

    received, outs = [], []
    monkeypatch.setattr(benchmark, "main", lambda params, out, variants, settings, trace: outs.append(out) or received.append(settings) or "")
    path, _ = write_params(tmp_path, {"run": {"name": "probe"}, "benchmark": {"seq_lens": [2048, 8192], "repeats": 5, "modes": ["graphs"]}})
    assert cli.main(["benchmark", "--params", str(path), "--out", str(tmp_path / "out")]) == 0
    assert cli.main(["benchmark", "--params", str(path), "--modes", "eager", "compiled", "--train-sizes", "768x12"]) == 0
    assert outs == [tmp_path / "out", Path("reports/benchmarks/probe")]
    from_file, overridden = received
    assert (from_file.seq_lens, from_file.repeats, from_file.modes, from_file.train_models) == ([2048, 8192], 5, ["graphs"], [])
    assert (overridden.seq_lens, overridden.repeats, overridden.modes, overridden.train_models) == ([2048, 8192], 5, ["eager", "compiled"], [(768, 12)])
    capsys.readouterr()
    assert cli.main(["benchmark", "--params", str(path), "--modes", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "benchmark.modes.0 = 'fast': Input should be 'eager', 'compiled' or 'graphs'" in err, err
    assert len(received) == 2


def test_a_run_is_logged_to_mlflow_with_the_tables_figures_and_files(monkeypatch, tmp_path):
    """The benchmark is one MLflow run like every stage: its settings as params, each attention row's Mtok/s and
    ratios to sdpa and to mha as curves over T, the fitted exponents, the training rows' MFU, and the files it wrote (not the
    others in its folder, which reports/benchmarks fills with earlier runs' pages)."""
    import torch
    from mlflow.tracking import MlflowClient

    from attnbench import benchmark

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    training = [{"kind": "train", "variant": "plain GPT (mha, flash)", "model": "d512 L8 H8", "T": 128, "batch": 512, "ms": 40.0,
                 "mtok_per_s": 1.6, "mfu": 0.30, "peak_gib": 12.3, "compiled": True, "status": "ok"}]

    def measured(params, names, part, *args):
        if part == "train":  # one call per training run
            return [], training if names == [benchmark.PLAIN_GPT[0]] else []
        return [r for r in attention_rows() if r["variant"] in names], []

    monkeypatch.setattr(benchmark, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(benchmark, "device_name", lambda: "fake-gpu")
    monkeypatch.setattr(benchmark, "benchmark", measured)
    params = parse_params({"benchmark": {"repeats": 3}, "tracking": {"uri": uri}, "variants": {"mha": {}, "ca": {"block": 64}}})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fake-gpu-stop1-attention.csv").write_text("an earlier run's rows, kept beside")
    (tmp_path / "out" / "fake-gpu-kernels.md").write_text("an earlier traced run's kernels: this run has no --trace")
    benchmark.main(params, tmp_path / "out")

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(params.experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "benchmark" and run.data.tags["device"] == "fake-gpu"
    assert run.data.params["benchmark.repeats"] == "3" and run.data.params["variant_options.ca.block"] == "64"
    curve = client.get_metric_history(run.info.run_id, "attention.ca.compiled.x_sdpa")
    assert {m.step: round(m.value, 6) for m in curve} == {2048: 4.0, 8192: 8.0, 32768: 16.0}
    curve = client.get_metric_history(run.info.run_id, "attention.ca.compiled.x_mha")
    assert {m.step: round(m.value, 6) for m in curve} == {2048: 8.0, 8192: 16.0, 32768: 32.0}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "attention.sdpa.eager.mtok_per_s")] == [2048, 8192, 32768]
    assert abs(run.data.metrics["attention.ca.compiled.time_exponent"] - 1.5) < 1e-9
    assert run.data.metrics["train.d512_L8_H8.plain_GPT_mha_flash.mfu"] == 0.30
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"fake-gpu.md", "fake-gpu.png", "fake-gpu-attention.csv", "fake-gpu-train.csv"}, files
    summary = read_json(tmp_path / "out" / "benchmark.json")  # the pipeline's output: this run's files and figures
    assert summary["device"] == "fake-gpu" and set(summary["files"]) == files
    assert summary["metrics"]["train.d512_L8_H8.plain_GPT_mha_flash.mfu"] == 0.30
    assert round(summary["metrics_by_T"]["8192"]["attention.ca.compiled.x_sdpa"], 6) == 8.0
    # Only the lengths: the metrics without a step (exponents, MFU) are "metrics", not a "None" length.
    assert set(summary["metrics_by_T"]) == {"2048", "8192", "32768"}, list(summary["metrics_by_T"])
