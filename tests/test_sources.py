"""The code each stage runs, as the orchestrators declare it: import closures and the variants' manifests."""

from __future__ import annotations

import shutil

import pytest

from attnbench.files import read_json
from attnbench.sources import ROOT, stage_sources, variant_sources, write_manifest


def test_a_variant_runs_what_it_imports_and_nothing_of_the_others():
    # lca imports its Triton kernels only under `if torch.cuda.is_available()`; sca imports lca.
    assert {"src/attnbench/variants/lca.py", "src/attnbench/variants/fused_band.py", "src/attnbench/variants/routing.py"} <= set(variant_sources("lca"))
    assert {"src/attnbench/variants/lca.py", "src/attnbench/variants/fused_supernodes.py"} <= set(variant_sources("sca"))
    assert "src/attnbench/variants/sca.py" not in variant_sources("lca")
    assert variant_sources("mha") == ["src/attnbench/variants/base.py", "src/attnbench/variants/mha.py"]
    assert variant_sources("lca-seed2") == variant_sources("lca")  # a seeded entry runs its variant's code


def test_a_stage_runs_its_modules_but_not_every_variant():
    train = stage_sources("train")
    assert {"src/attnbench/train.py", "src/attnbench/model.py", "src/attnbench/config.py"} <= set(train)
    # Not the registry nor what it imports: adding a variant there re-runs no other variant's stages.
    assert not any(path.startswith("src/attnbench/variants/") for path in train)
    # The splits' reader, not the download code: editing that re-runs fetch and prepare, not every variant's stages.
    for stage in ("train", "evaluate", "report"):
        assert "src/attnbench/splits.py" in stage_sources(stage) and "src/attnbench/data.py" not in stage_sources(stage)
    assert {"src/attnbench/variants/__init__.py", "src/attnbench/variants/sca.py"} <= set(stage_sources("benchmark"))  # every variant
    assert "src/attnbench/sample/gcide-sample.txt.gz" in stage_sources("fetch")  # the default corpus it copies
    assert "src/attnbench/tracking.py" in stage_sources("profile")  # imported only inside profile.main
    assert all((ROOT / path).is_file() for path in train)


def test_unknown_stage_or_variant_is_a_clear_error():
    with pytest.raises(ValueError, match=r"stage 'fit': not one of fetch, prepare"):
        stage_sources("fit")
    with pytest.raises(ValueError, match=r"unknown variant 'gpt'; allowed: mha, la"):
        variant_sources("gpt")


def test_manifest_digests_the_files_and_changes_with_them(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)  # the project root, as the orchestrators run the stage
    out = tmp_path / "results" / "sources.json"
    first, written = write_manifest("la", out)
    assert written and read_json(out) == first and sorted(first["files"]) == variant_sources("la")
    stamp = out.stat().st_mtime_ns
    assert write_manifest("la", out) == (first, False) and out.stat().st_mtime_ns == stamp  # same code: left as it is
    other, _ = write_manifest("mha", tmp_path / "mha.json")
    (tmp_path / "src" / "attnbench" / "variants" / "la.py").write_text("# an edit\n", "utf-8")
    changed, written = write_manifest("la", out)
    assert written and read_json(out) == changed
    assert {path for path in changed["files"] if changed["files"][path] != first["files"][path]} == {"src/attnbench/variants/la.py"}
    assert write_manifest("mha", tmp_path / "mha.json") == (other, False)


def test_manifest_outside_the_project_root_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"src/attnbench/variants/base.py: not under .*; run the sources stage in the project root"):
        write_manifest("mha", tmp_path / "sources.json")
    assert not (tmp_path / "sources.json").exists()
