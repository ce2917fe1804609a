"""The README's GPU table is read from the committed reports, not typed: each figure equals its source's."""

import csv
import re

from attnbench.benchmark import exponents, row_label
from tests.tiny import REPO


def markdown_rows(text: str, header_start: str) -> tuple[list[str], dict[str, list[str]]]:
    """The markdown table whose header starts with `header_start`: its column names and its rows by first cell,
    both without the first column."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split("|")]

    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows[cells(line)[0]] = cells(line)[1:]
    return cells(lines[start])[1:], rows


def test_the_readme_gpu_table_matches_the_committed_reports():
    _, readme = markdown_rows((REPO / "README.md").read_text(), "| variant | test bpb | attention Mtok/s")
    _, quality = markdown_rows((REPO / "reports/gpu-gcide/comparison.md").read_text(), "| variant | params (M) | test bpb")
    pages = REPO / "reports/benchmarks/gpu-gcide"
    rows = list(csv.DictReader((pages / "NVIDIA-H200-attention.csv").read_text().splitlines()))
    attention = {(r["variant"], int(r["T"])): float(r["mtok_per_s"]) for r in rows}
    slopes = {label.split()[0]: slope for label, slope in exponents([
        r | {"T": int(r["T"]), "ms": float(r["ms"]), "batch": int(r["batch"]), "label": row_label(r["variant"], r["mode"])} for r in rows
    ]).items()}
    mfu = {r["variant"]: float(r["mfu"]) for r in csv.DictReader((pages / "NVIDIA-H200-train.csv").read_text().splitlines())}
    assert set(readme) == {"sdpa (reference)", *quality}, sorted(readme)
    for variant, (bpb, speeds, ratios, slope, training) in readme.items():
        name = variant.split()[0]
        if name in quality:
            assert re.sub(r"[*]|\s*\(.*\)", "", bpb) == quality[name][1], variant
        got = [float(x) for x in speeds.split("/")]
        assert got == [round(attention[name, T], 1) for T in (2048, 8192, 32768)], variant
        assert [float(x) for x in ratios.split("/")] == [round(attention[name, T] / attention["sdpa", T], 2) for T in (8192, 32768)], variant
        assert float(slope) == round(slopes[name], 2), variant
        expected_mfu = mfu["plain GPT (mha, flash)" if name == "sdpa" else name]
        assert training.startswith(f"{100 * expected_mfu:.1f}%"), variant
