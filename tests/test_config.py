"""The params schema: the repo's params.yaml validates, and bad input fails with one clear line.

Every bad input must raise ConfigError whose message is a single line that
names the key path and the bad value and/or what is allowed.

Kinds of bad input:
- The table BAD: wrong types (a string or a float for an int, a string for a bool, a bool for a number, in a
  list of numbers and in a variant's options, a section or a variant's options that are not a mapping); out of
  range (model sizes, dropout, split fractions, the archive ratio, the training recipe: lr, min_lr_ratio,
  warmup, weight decay, betas, grad clip, threads); cross-field rules (d_model not divisible by n_heads, splits
  not summing to 1, source local without path, both or neither of train.steps and train.tokens); unknown keys
  (top level, nested, a variant's); variants (unknown names, empty, each variant's options); enumerations and
  patterns (data.source, data.md5, train.device, run.name, the benchmark's modes, parts and sizes); sequence
  lengths (profile and benchmark: decreasing, repeated, not positive, too short).
- Union options named by their field, not pydantic's union branch (+1 new: lca.clusters).
- Hypothesis: any int <= 0 for each size key (SIZE_KEYS) names that key.
- Files (7): not a mapping (list, string, number), missing, invalid YAML (3 shapes).
- Asking for a variant the params file does not configure (1).

Plus the CLI (a subprocess in a temporary cwd): a bad params file, and a good
one asked for a variant it lacks, make `python -m attnbench train` exit 2 with
exactly one stderr line and create nothing (no results/).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbench.config import ConfigError, Params, load_params, parse_params
from attnbench.variants import REGISTRY, parse_entry

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
DELETE = object()


@pytest.fixture(scope="module")
def base() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def mutate(raw: dict, key: str, value) -> dict:
    """A deep copy of `raw` with the dotted `key` set to `value` (or removed, with DELETE)."""
    raw = copy.deepcopy(raw)
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return raw


def config_error(raw) -> str:
    with pytest.raises(ConfigError) as err:
        parse_params(raw, source="bad.yaml")
    message = str(err.value)
    assert "\n" not in message and message.strip() == message, repr(message)
    assert message.startswith("bad.yaml: "), message
    return message


# ---------------------------------------------------------------- the good file


def test_repo_params_file_validates():
    params = load_params(PARAMS)
    assert isinstance(params, Params)
    raw = yaml.safe_load(PARAMS.read_text())
    assert params.run.name == raw["run"]["name"]
    assert set(params.variants) == set(raw["variants"])
    assert {parse_entry(name)[0] for name in params.variants} == set(REGISTRY), "the default runs every variant"
    assert params.model.d_model % params.model.n_heads == 0
    assert params.results_dir == Path("results") / params.run.name
    for name in params.variants:
        model = params.model_for(name)
        assert model.variant == parse_entry(name)[0]


def test_defaults_validate_and_are_frozen():
    params = parse_params({})
    with pytest.raises(Exception):
        params.model.d_model = 3  # frozen: a validated config cannot drift


# ---------------------------------------------------------------- the table of bad inputs

ALLOWED_VARIANTS = ", ".join(REGISTRY)

BAD = [
    # (id, dotted key, value, substrings the one-line message must contain); a case whose message names another
    # key's value sets that value itself, so that editing params.yaml cannot break it.
    ("str-for-int", "model.d_model", "big", ["model.d_model", "'big'", "valid integer"]),
    ("float-for-int", "model.d_model", 1.5, ["model.d_model", "1.5", "valid integer"]),
    ("str-for-bool", "train.compile", "maybe", ["train.compile", "'maybe'", "boolean"]),
    # pydantic read true as 1: `steps: true` (or YAML's yes) trained one step (a user's check, stop 48).
    ("bool-for-int", "train.steps", True, ["train.steps = True", "a number, not a boolean"]),
    ("bool-for-float", "train.lr", False, ["train.lr = False", "a number, not a boolean"]),
    ("bool-for-auto-int", "train.threads", True, ["train.threads = True", "a number, not a boolean"]),
    ("bool-in-a-list-of-ints", "profile.seq_lens", [True, 64], ["profile.seq_lens = [True, 64]", "a number, not a boolean"]),
    ("bool-for-a-variants-float", "variants", {"lca": {"tau_start": True}}, ["variants.lca.tau_start = True", "a number, not a boolean"]),
    ("section-not-mapping", "model", 5, ["model = 5", "dictionary"]),
    ("zero-layers", "model.n_layers", 0, ["model.n_layers = 0", "greater than 0"]),
    ("negative-batch", "train.batch_size", -1, ["train.batch_size = -1", "greater than 0"]),
    ("dropout-one", "model.dropout", 1.5, ["model.dropout = 1.5", "less than 1"]),
    ("split-zero", "data.splits.train", 0, ["data.splits.train = 0", "greater than 0"]),
    ("archive-ratio", "data.max_archive_ratio", 1, ["data.max_archive_ratio = 1", "greater than 1"]),
    ("heads-divide", "model", {"d_model": 66, "n_heads": 4}, ["model", "d_model=66", "n_heads=4", "divisible"]),
    ("unknown-top-key", "bogus", 1, ["bogus: unknown key; allowed: run, data, model, train,"]),
    ("unknown-nested-key", "train.foo", 1, ["train.foo: unknown key; allowed: steps, tokens, batch_size,"]),
    ("misspelt-key", "train.stepz", 1, ["train.stepz: unknown key (did you mean 'steps'?); allowed: steps,"]),
    ("unknown-variant", "variants", {"xyz": {}}, ["variants", "'xyz'", f"allowed: {ALLOWED_VARIANTS}"]),
    ("unknown-seeded-variant", "variants", {"gpt-seed1": {}}, ["variants", "'gpt-seed1'", f"allowed: {ALLOWED_VARIANTS}", "<variant>-seed<N>"]),
    ("seed-not-a-number", "variants", {"mha-seedx": {}}, ["variants", "'mha-seedx'", "<variant>-seed<N>"]),
    ("seed-leading-zero", "variants", {"mha-seed01": {}}, ["variants", "'mha-seed01'", "<variant>-seed<N>"]),
    ("seeded-entry-repeats-a-seed", "variants", {"mha": {}, "mha-seed0": {}}, ["variants.mha-seed0: seed 0 is mha's too (train.seed: 0)"]),
    ("entry-name-with-a-space", "variants", {"la-seed2": {}, "la-seed2 ": {}}, ["'la-seed2 '", "<variant>-seed<N>"]),
    ("seeded-entry-other-options", "variants", {"ca": {"block": 8}, "ca-seed1": {}}, [
        "variants.ca-seed1: options {'block': 'auto', 'lookback': 'auto'} differ from ca's {'block': 8, 'lookback': 'auto'}", "copy its options"]),
    ("seeded-entry-without-its-variant", "variants", {"mha": {}, "la-seed2": {}}, [
        "variants.la-seed2: trains la with another seed, but la is not in variants; add it, with the same options"]),
    ("seed-too-large", "variants", {"mha": {}, "mha-seed9223372036854775808": {}}, ["variants.mha-seed9223372036854775808: seed 9223372036854775808 is too large; allowed: 0 to 2**63 - 1"]),
    ("train-seed-negative", "train.seed", -1, ["train.seed = -1", "greater than or equal to 0"]),
    ("seeded-variant-option", "variants", {"ca-seed1": {"blok": 1}}, ["variants.ca-seed1.blok: unknown key (did you mean 'block'?); allowed: block, lookback"]),
    ("no-variants", "variants", {}, ["variants", "must map variant names"]),
    ("unknown-variant-option", "variants", {"lca": {"clusterz": 1}}, ["variants.lca.clusterz: unknown key (did you mean 'clusters'?); allowed: clusters, router,"]),
    ("variant-options-not-mapping", "variants", {"la": 5}, ["variants.la = 5:", "dictionary"]),
    ("ca-block-zero", "variants", {"ca": {"block": 0}}, ["variants.ca.block = 0", "integer >= 1 or 'auto'"]),
    ("ca-block-str", "variants", {"ca": {"block": "big"}}, ["variants.ca.block = 'big'", "integer", "'auto'"]),
    ("la-chunk-str", "variants", {"la": {"chunk": "big"}}, ["variants.la.chunk = 'big'", "integer >= 1 or 'auto'"]),
    ("mha-kernel-unknown", "variants", {"mha": {"kernels": ["fast"]}}, ["variants.mha.kernels.0 = 'fast'", "'cudnn'", "'flash'"]),
    ("mha-kernels-empty", "variants", {"mha": {"kernels": []}}, ["variants.mha.kernels = []", "at least 1"]),
    ("la-chunk-zero", "variants", {"la": {"chunk": 0}}, ["variants.la.chunk = 0", "integer >= 1 or 'auto'"]),
    ("la-kernel-unknown", "variants", {"la": {"kernel": "cuda"}}, ["variants.la.kernel = 'cuda'", "'auto', 'fla' or 'torch'"]),
    ("la-eps-negative", "variants", {"la": {"eps": -1}}, ["variants.la.eps = -1", "greater than 0"]),
    ("lca-balance-str", "variants", {"lca": {"balance": "x"}}, ["variants.lca.balance = 'x'", "number", "'auto'"]),
    ("lca-router", "variants", {"lca": {"router": "x"}}, ["variants.lca.router = 'x'", "'head' or 'shared'"]),
    ("cka-rank-negative", "variants", {"cka": {"rank": -1}}, ["variants.cka.rank = -1", "integer >= 0 or 'auto'"]),
    ("splits-sum", "data.splits", {"train": 0.9, "val": 0.05, "test": 0.1}, ["data.splits", "must be 1", "1.05"]),
    ("local-without-path", "data", {"source": "local"}, ["data", "source=local", "data.path"]),
    ("bad-source", "data.source", "ftp", ["data.source = 'ftp'", "'enwik8', 'local' or 'sample'"]),
    ("bad-md5", "data.md5", "xyz", ["data.md5 = 'xyz'", "pattern"]),
    ("steps-and-tokens", "train", {"steps": 150, "tokens": 1000}, ["train", "exactly one of train.steps and train.tokens", "steps=150", "tokens=1000"]),
    ("neither-steps-nor-tokens", "train.steps", DELETE, ["train", "exactly one of train.steps and train.tokens"]),
    ("bad-device", "train.device", "tpu", ["train.device = 'tpu'", "'auto', 'cpu' or 'cuda'"]),
    ("threads-zero", "train.threads", 0, ["train.threads = 0", "integer >= 1 or 'auto'"]),
    ("threads-str", "train.threads", "all", ["train.threads = 'all'", "integer >= 1 or 'auto'"]),
    ("seq-lens-decreasing", "profile.seq_lens", [64, 32], ["profile.seq_lens = [64, 32]", "strictly increasing"]),
    ("seq-lens-repeated", "profile.seq_lens", [64, 64], ["profile.seq_lens = [64, 64]", "strictly increasing"]),
    ("seq-lens-not-positive", "profile.seq_lens", [0, 64], ["profile.seq_lens = [0, 64]", "positive"]),
    ("seq-lens-too-short", "profile.seq_lens", [64], ["profile.seq_lens = [64]", "at least 2"]),
    ("benchmark-seq-lens-decreasing", "benchmark.seq_lens", [8192, 2048], ["benchmark.seq_lens = [8192, 2048]", "strictly increasing"]),
    ("benchmark-mode-unknown", "benchmark.modes", ["fast"], ["benchmark.modes.0 = 'fast'", "'eager', 'compiled' or 'graphs'"]),
    ("benchmark-part-unknown", "benchmark.parts", ["kernels"], ["benchmark.parts.0 = 'kernels'", "'attention' or 'train'"]),
    ("benchmark-size-format", "benchmark.train_sizes", ["768"], ["benchmark.train_sizes.0 = '768'", "pattern"]),
    ("benchmark-size-zero-width", "benchmark.train_sizes", ["0x12"], ["benchmark.train_sizes.0 = '0x12'", "pattern"]),
    ("benchmark-size-zero-layers", "benchmark.train_sizes", ["768x0"], ["benchmark.train_sizes.0 = '768x0'", "pattern"]),
    ("benchmark-size-heads", "benchmark.train_sizes", ["700x12"], ["benchmark", "train_sizes '700x12'", "not a multiple of head_dim 64"]),
    ("lr-zero", "train.lr", 0, ["train.lr = 0", "greater than 0"]),
    ("lr-negative", "train.lr", -0.001, ["train.lr = -0.001", "greater than 0"]),
    ("min-lr-ratio-above-one", "train.min_lr_ratio", 1.5, ["train.min_lr_ratio = 1.5", "less than or equal to 1"]),
    ("warmup-negative", "train.warmup_steps", -1, ["train.warmup_steps = -1", "greater than or equal to 0"]),
    ("weight-decay-negative", "train.weight_decay", -0.1, ["train.weight_decay = -0.1", "greater than or equal to 0"]),
    ("beta1-one", "train.beta1", 1.0, ["train.beta1 = 1.0", "less than 1"]),
    ("beta2-zero", "train.beta2", 0, ["train.beta2 = 0", "greater than 0"]),
    ("grad-clip-zero", "train.grad_clip", 0, ["train.grad_clip = 0", "greater than 0"]),
    ("run-name-slash", "run.name", "a/b", ["run.name = 'a/b'", "pattern"]),
    ("tracking-uri-no-scheme", "tracking.uri", "htp//127.0.0.1:5055", ["tracking.uri = 'htp//127.0.0.1:5055'", "sqlite:///<file>, http(s)://<host>:<port>"]),
    ("tracking-uri-file-store", "tracking.uri", "./mlruns", ["tracking.uri = './mlruns'", "MLflow tracking URI"]),
    ("tracking-uri-sqlite-form", "tracking.uri", "sqlite:mlflow.db", ["tracking.uri = 'sqlite:mlflow.db'", "sqlite:///<file>"]),
    ("tracking-uri-sqlite-two-slashes", "tracking.uri", "sqlite://mlflow.db", ["tracking.uri = 'sqlite://mlflow.db'", "sqlite:///<file>"]),
    ("run-name-dots", "run.name", "../x", ["run.name = '../x'", "pattern"]),
]


@pytest.mark.parametrize("key, value, expected", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_one_clear_line(base, key, value, expected):
    message = config_error(mutate(base, key, value))
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


@pytest.mark.parametrize("variant, option", [("ca", "block"), ("lca", "balance"), ("lca", "clusters")])
def test_union_options_name_the_field_not_the_union_branch(base, variant, option):
    message = config_error(mutate(base, "variants", {variant: {option: "nonsense"}}))
    assert f"variants.{variant}.{option} = 'nonsense':" in message
    assert f"{option}.int" not in message and f"{option}.float" not in message and "literal[" not in message


SIZE_KEYS = [
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "model.seq_len",
    "model.mlp_ratio",
    "train.steps",
    "train.batch_size",
    "train.grad_accum",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.log_every",
    "evaluate.batch_size",
    "profile.tokens_per_step",
    "profile.repeats",
    "benchmark.tokens",
    "benchmark.repeats",
    "data.max_bytes",
]


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(SIZE_KEYS), value=st.integers(max_value=0))
def test_any_nonpositive_size_names_its_key(key, value):
    raw = mutate(yaml.safe_load(PARAMS.read_text()), key, value)
    message = config_error(raw)
    assert f"{key} = {value}:" in message, message
    assert "greater than 0" in message


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_params_file_must_be_a_mapping(tmp_path, text, kind):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: must be a mapping of sections, got {kind}"


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "nope.yaml")
    assert str(err.value) == f"{tmp_path / 'nope.yaml'}: no such params file"


@pytest.mark.parametrize("text", ["a: b: c\n", "model: {d_model: [\n", "run:\n  name: x\n\tbad: tab\n"])
def test_invalid_yaml(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not valid YAML (") and "\n" not in message


def test_asking_for_an_unconfigured_variant(base):
    params = parse_params(mutate(base, "variants", {"mha": {}, "la": {}}))
    with pytest.raises(ConfigError) as err:
        params.variant_options("ca")
    assert str(err.value) == "variant 'ca' is not in this params file's variants; present: mha, la"


# ---------------------------------------------------------------- the CLI


def run_cli(cwd: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "ATTNBENCH_DEBUG"}
    return subprocess.Popen(
        [sys.executable, "-m", "attnbench", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_cli_config_errors_exit_2_with_one_line_and_create_nothing(tmp_path, base):
    """Two bad invocations, run side by side (each pays the torch import once)."""
    cases = {}
    for name, raw, args in [  # a bad file; a good file asked for a variant it lacks
        ("bad", mutate(base, "model.n_layers", 0), ["train", "--params", "bad.yaml", "--variant", "mha"]),
        ("unconfigured", mutate(base, "variants", {"mha": {}, "la": {}}), ["train", "--params", "good.yaml", "--variant", "ca"]),
    ]:
        cwd = tmp_path / name
        cwd.mkdir()
        (cwd / args[2]).write_text(yaml.safe_dump(raw))
        cases[name] = (cwd, args[2], run_cli(cwd, *args))
    expected = {"bad": "model.n_layers = 0", "unconfigured": "variant 'ca'"}
    for name, (cwd, params_file, proc) in cases.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, proc.returncode, err)
        lines = err.splitlines()
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith("attnbench train: error: "), lines[0]
        assert expected[name] in lines[0], lines[0]
        assert not (cwd / "results").exists(), name
        assert [p.name for p in cwd.iterdir()] == [params_file], name  # no results/, mlflow.db or mlruns/ either


def test_dump_keeps_each_variants_own_options():
    """Snakemake's rule params come from this dump: losing an option would hide its changes from the DAG."""
    params = parse_params({"train": {"steps": 1}, "variants": {"la": {"chunk": 8}, "mha": {}}})
    assert params.model_dump()["variants"] == {"la": {"chunk": 8, "eps": 1e-6, "kernel": "auto"}, "mha": {"kernels": ["cudnn", "flash", "efficient", "math"]}}


def test_a_seeded_entry_is_its_variant_trained_with_its_own_seed(base):
    """`<variant>-seed<N>` is another entry of `variants`, so both front ends run it as they run any: the same model
    and options as its variant (its own copy of them), train.seed N in training and in what training logs."""
    params = parse_params(mutate(mutate(base, "train.seed", 3), "variants", {"ca": {"block": 8}, "ca-seed0": {"block": 8}, "mha": {}, "mha-seed12": {}}))
    assert parse_entry("ca") == ("ca", None) and parse_entry("ca-seed0") == ("ca", 0) and parse_entry("mha-seed12") == ("mha", 12)
    assert params.model_for("ca-seed0").variant == "ca" and params.model_for("ca-seed0").variant_options["block"] == 8
    assert params.model_for("mha-seed12").variant == "mha"
    assert [params.train_for(v).seed for v in params.variants] == [3, 0, 3, 12]
    assert params.train_for("mha-seed12").model_dump() == params.train.model_dump() | {"seed": 12}
    assert params.logged("mha-seed12", "train", "evaluate")["train"]["seed"] == 12
    assert params.logged("ca", "train")["train"]["seed"] == 3
    with pytest.raises(ConfigError, match=r"variant 'la-seed1' is not in this params file's variants"):
        params.train_for("la-seed1")


def test_a_registered_name_that_looks_seeded_is_that_variant(monkeypatch):
    monkeypatch.setitem(REGISTRY, "mix-seed2", REGISTRY["mha"])
    assert parse_entry("mix-seed2") == ("mix-seed2", None)
    assert parse_entry("mix-seed2-seed3") == ("mix-seed2", 3)
