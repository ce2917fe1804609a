"""The spec's shared tests, parametrised over the registry: a registered variant joins them automatically.

Each variant is built with its default (`auto`) options; tests for a variant's
own degenerate cases live in tests/test_<variant>.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from attnbench.model import ByteLM, ModelConfig
from attnbench.variants import REGISTRY, build_attention

VARIANTS = list(REGISTRY)
PATHS = ["reference", "efficient"]
FP32_RTOL = 1e-4

# (batch, length, heads, head size): odd lengths are never a multiple of a block or chunk.
SHAPES = {
    "B2-T37-H2-D8": (2, 37, 2, 8),
    "B1-T1-H2-D8": (1, 1, 2, 8),
    "B3-T64-H4-D16": (3, 64, 4, 16),
    "B2-T130-H1-D32": (2, 130, 1, 32),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def run_layer(layer, x, path, seed=0, grad_weight=None):
    """Forward + backward of `layer` on `path` with a fixed RNG (for stochastic routers); returns output and grads."""
    layer.path = path
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = layer(x)
    w = grad_weight if grad_weight is not None else torch.ones_like(out)
    loss = (out.float() * w).sum()
    if layer.aux_loss is not None:
        loss = loss + layer.aux_loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in layer.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.detach().clone()
    return out.detach(), grads


def make_layer(name, T, H, D, device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = build_attention(name, H * D, H, T)
    with torch.no_grad():
        for parameter in layer.parameters():
            if not parameter.any():  # initialised to zero (sca's supernode gate): what it gates would add nothing
                parameter.uniform_(0.5, 1.0)
    return layer.to(device=device, dtype=dtype)


def future_changed(B: int, T: int, width: int, t: int):
    """Inputs x, and x with every position after t redrawn (3x larger), and a gradient weight on positions <= t only."""
    x = torch.randn(B, T, width)
    x_changed = x.clone()
    x_changed[:, t + 1 :] = torch.randn(B, T - t - 1, width) * 3
    weight = torch.zeros(B, T, width)
    weight[:, : t + 1] = torch.randn(B, t + 1, width)
    return x, x_changed, weight


def assert_prefix_unchanged(run_a, run_b, t: int, label: str) -> None:
    """Outputs at <= t and their input gradients bitwise equal between two runs of future_changed inputs."""
    (out_a, grads_a), (out_b, grads_b) = run_a, run_b
    assert torch.equal(out_a[:, : t + 1], out_b[:, : t + 1]), f"{label}: output at <= {t} depends on the future"
    assert torch.equal(grads_a["input"][:, : t + 1], grads_b["input"][:, : t + 1]), f"{label}: gradient leak"


def assert_sorted_forward_equals_reference(layer, B: int) -> None:
    """A routing layer's sorted path (eager Flex on CPU: forward only, no backward there) equals its reference
    on random q, k, v and x, both drawing the same routing noise."""
    H, D, T = layer.n_heads, layer.head_dim, layer.seq_len
    x = torch.randn(B, T, H * D)
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = layer.reference(q, k, v, x)
        torch.manual_seed(1)
        assert rel_err(layer.sorted_attention(q, k, v, x), expected) < FP32_RTOL


def assert_equals_mha(layer, path: str, label: str, B: int = 2) -> None:
    """`layer` (a degenerate case of its variant) computes mha with the same q/k/v/out weights: outputs and grads."""
    mha = make_layer("mha", layer.seq_len, layer.n_heads, layer.head_dim)
    mha.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(B, layer.seq_len, layer.n_heads * layer.head_dim)
    out, grads = run_layer(layer, x, path)
    out_mha, grads_mha = run_layer(mha, x, "efficient")
    assert rel_err(out, out_mha) < FP32_RTOL, f"{label} {path}: output rel err {rel_err(out, out_mha):.2e}"
    for key in grads_mha:
        assert rel_err(grads[key], grads_mha[key]) < FP32_RTOL, f"{label} {path}: grad of {key}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layer_is_causal(name, path, mode):
    """Changing inputs after position t leaves outputs at <= t and their input gradients bitwise equal; t at the
    first position, inside a block and on both sides of block edges (auto block at T = 45: 16)."""
    B, T, H, D = 2, 45, 2, 8
    layer = make_layer(name, T, H, D).train(mode == "train")
    for t in (0, 15, 16, 20, 31, 32):
        x, x_changed, weight = future_changed(B, T, H * D, t)
        runs = [run_layer(layer, inputs, path, grad_weight=weight) for inputs in (x, x_changed)]
        assert_prefix_unchanged(*runs, t, f"{name}/{path} t={t}")


@pytest.mark.parametrize("T", [1, 37, 256, 257, 1024, 8192])
@pytest.mark.parametrize("name", VARIANTS)
def test_auto_options_resolve_to_the_spec_values(name, T):
    """The spec's `auto` values, from integer arithmetic here: blocks the smallest power of two >= sqrt(T), at least
    16; C = ceil(sqrt(T)); lookback 1; rank 16; balance 0.01. (Both paths read the same property, so the shared
    tests would pass with a wrong one.)"""
    block = 16
    while block * block < T:
        block *= 2
    clusters = next(c for c in range(1, T + 1) if c * c >= T)
    expected = {"block": block, "clusters": clusters, "lookback": 1, "rank": 16, "balance": 0.01, "chunk": 64}
    layer = build_attention(name, 32, 2, T)
    resolved = {key: getattr(layer, key) for key in expected if hasattr(layer, key)}
    assert resolved == {key: expected[key] for key in resolved}, resolved
    assert name not in {"ca", "cka", "fastcka", "sca"} or "block" in resolved
    assert name not in {"lca", "sca"} or {"clusters", "balance"} <= resolved.keys()
    # What train logs: every option, the auto ones resolved here, the others as given (la's kernel is chosen per call).
    given = layer.options.model_dump()
    assert layer.resolved_options == {key: expected[key] if key in resolved else value for key, value in given.items()}, layer.resolved_options


def test_the_registry_files_each_variant_once_under_its_file_name():
    """A variant is its file plus the line in variants/__init__.py that imports it: @register files the class under
    the name the params file uses (here each file's own), and a second class under a taken name is refused."""
    from attnbench.variants.base import register

    assert VARIANTS == ["mha", "la", "ca", "lca", "cka", "fastcka", "sca"]
    assert all(REGISTRY[name].__module__ == f"attnbench.variants.{name}" for name in VARIANTS)
    with pytest.raises(ValueError, match="variant 'ca' is registered twice: BlockClusterAttention and Copy"):
        register("ca")(type("Copy", (REGISTRY["ca"],), {}))
    assert REGISTRY["ca"].__name__ == "BlockClusterAttention"


def test_each_variant_declares_the_spec_tables_compute_exponent():
    """The report and the benchmark hold fitted time exponents against these (variants.md: compute vs T); a class
    without one is refused when it registers, not found out by a KeyError in a report."""
    from attnbench.variants.base import Attention, register

    assert {name: REGISTRY[name].compute_exponent for name in VARIANTS} == {
        "mha": 2, "la": 1, "ca": 1.5, "lca": 1.5, "cka": 1.5, "fastcka": 1.5, "sca": 1.5}
    with pytest.raises(TypeError, match="variant 'new': New declares no compute_exponent"):
        register("new")(type("New", (Attention,), {}))
    with pytest.raises(TypeError, match="variant 'new': New declares no compute_exponent"):  # not mha's 2, inherited
        register("new")(type("New", (REGISTRY["mha"],), {}))
    assert "new" not in REGISTRY


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", VARIANTS)
def test_reference_equals_efficient(name, shape):
    B, T, H, D = shape
    layer = make_layer(name, T, H, D).train()
    x = torch.randn(B, T, H * D)
    out_ref, grads_ref = run_layer(layer, x, "reference")
    out_eff, grads_eff = run_layer(layer, x, "efficient")
    assert rel_err(out_eff, out_ref) < FP32_RTOL, f"{name}: output rel err {rel_err(out_eff, out_ref):.2e}"
    assert grads_ref.keys() == grads_eff.keys(), f"{name}: the paths reach different parameters"
    for key in grads_ref:
        err = rel_err(grads_eff[key], grads_ref[key])
        assert err < FP32_RTOL, f"{name}: grad of {key} rel err {err:.2e}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", VARIANTS)
def test_output_goes_through_the_output_projection(name, path):
    """Every variant is "a drop-in replacement for the attention sub-layer": out = W_o concat_h(o_h) (base.Attention's
    proj), so the output is linear in W_o (doubling it doubles the output) and W_o gets a gradient."""
    B, T, H, D = 2, 21, 2, 8
    layer = make_layer(name, T, H, D).train()
    x = torch.randn(B, T, H * D)
    out, grads = run_layer(layer, x, path)
    proj_grad = grads.get("proj.weight")
    assert proj_grad is not None and proj_grad.abs().sum() > 0, f"{name}/{path}: no gradient reaches W_o"
    with torch.no_grad():
        layer.proj.weight.mul_(2)
    doubled, _ = run_layer(layer, x, path)
    assert rel_err(doubled, 2 * out) < FP32_RTOL, f"{name}/{path}: output is not linear in W_o"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", VARIANTS)
def test_finite_at_large_magnitudes(name, path, dtype):
    B, T, H, D = 2, 40, 2, 16
    layer = make_layer(name, T, H, D, dtype=dtype).train()
    with torch.no_grad():
        layer.qkv.weight.mul_(10)
    x = (torch.randn(B, T, H * D) * 100).to(dtype)
    out, grads = run_layer(layer, x, path)
    assert torch.isfinite(out).all(), f"{name}/{path}: non-finite output"
    for key, g in grads.items():
        assert torch.isfinite(g).all(), f"{name}/{path}: non-finite grad of {key}"


@pytest.mark.parametrize("name", VARIANTS)
def test_whole_model_is_causal(name):
    cfg = ModelConfig(variant=name, d_model=32, n_layers=2, n_heads=2, seq_len=48)
    torch.manual_seed(0)
    model = ByteLM(cfg).eval()
    idx = torch.randint(0, 256, (2, 48))
    changed = idx.clone()
    t = 30
    changed[:, t + 1 :] = torch.randint(0, 256, (2, 48 - t - 1))
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1]), f"{name}: model logits at <= {t} depend on the future"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "autocast"])
@pytest.mark.parametrize("T", [1, 77, 256])
@pytest.mark.parametrize("name", VARIANTS)
def test_gpu_bf16_efficient_matches_fp32_reference(name, T, precision):
    """bf16 efficient path vs fp32 reference on the same (bf16-representable) weights and inputs,
    within a few times the error of sdpa itself in bf16. Shared inputs keep routing variants' discrete
    cluster choices identical, so the comparison measures the kernels, not a flipped argmax. `bf16`: the layer's
    weights and input in bf16; `autocast`: fp32 weights under bf16 autocast, as training runs the layer."""
    B, H, D = 2, 4, 64
    x = torch.randn(B, T, H * D, device="cuda").bfloat16()

    def pair(variant):
        layer16 = make_layer(variant, T, H, D, device="cuda", dtype=torch.bfloat16).train()
        layer32 = make_layer(variant, T, H, D, device="cuda").train()
        layer32.load_state_dict({k: v.float() for k, v in layer16.state_dict().items()})
        if precision == "bf16":
            return run_layer(layer32, x.float(), "reference"), run_layer(layer16, x, "efficient")
        # A learned router's logits are bf16 under autocast, so its near-ties round apart from fp32's: its reference
        # runs under autocast too, to take the same clusters (lca and sca differed by 3e-2 at T = 256 on a CPU).
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=layer32.noisy_routing):
            reference = run_layer(layer32, x.float(), "reference")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return reference, run_layer(layer32, x.float(), "efficient")

    (out_ref, grads_ref), (out_eff, grads_eff) = pair(name)
    (sdpa_ref, _), (sdpa_bf16, _) = pair("mha")
    tol = 4 * rel_err(sdpa_bf16, sdpa_ref) + 1e-3

    assert rel_err(out_eff, out_ref) < tol, f"{name}: bf16 output rel err {rel_err(out_eff, out_ref):.2e} > {tol:.2e}"
    for key in grads_ref:
        err = rel_err(grads_eff[key], grads_ref[key])
        assert err < 4 * tol, f"{name}: bf16 grad of {key} rel err {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", VARIANTS)
def test_gpu_whole_model_is_causal_at_training_length(name, mode):
    """The GPU kernels (Flex block masks, tile lists) at the GPU preset's T, in fp32: changing bytes after t
    leaves the logits at <= t equal up to float rounding (a changed sequence may be tiled differently),
    while the logits after t do change. fp32 without TF32, because in bf16 or TF32 a rounding difference can flip
    a learned router's argmax in a later layer, which moves a prefix logit without any leak (with TF32 on, lca's and
    sca's prefix logits moved by 4e-4, and by 0.2 after a flip, on the H200: reports/benchmarks/NVIDIA-H200.md,
    "Stop 29"; tests/conftest.py restores the flags that an in-process stage turns on)."""
    T, t = 1024, 600
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(variant=name, d_model=128, n_layers=2, n_heads=2, seq_len=T)).cuda().train(mode == "train")
    idx = torch.randint(0, 256, (2, T), device="cuda")
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, 256, (2, T - t - 1), device="cuda")
    logits = []
    for tokens in (idx, changed):
        torch.manual_seed(1)  # the same router noise in train mode
        with torch.no_grad():
            logits.append(model(tokens)[0])
    prefix = (logits[0][:, : t + 1] - logits[1][:, : t + 1]).abs().max().item()
    suffix = (logits[0][:, t + 1 :] - logits[1][:, t + 1 :]).abs().max().item()
    assert prefix < 1e-4, f"{name}: logits at <= {t} moved by {prefix:.3g} when only later bytes changed"
    assert suffix > 1e-2, f"{name}: later logits barely moved ({suffix:.3g}); the check is blind"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checked where FlexAttention is never called: on a CPU machine")
def test_importing_the_model_leaves_flex_attention_unimported():
    """Every stage process imports the variants; torch's FlexAttention module takes ~1 s to import and only the CUDA
    paths call it, so flex.py imports it on first use."""
    code = "import sys, attnbench.model; print('torch.nn.attention.flex_attention' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("variant", VARIANTS)
def test_profile_measures_the_same_memory_on_every_run(variant, tmp_path):
    """The profile stage's memory is the bytes saved for the backward, which for lca and sca depend on their random
    clusters: two runs of one params file give the same bytes at every point (the profile's seed), the second of an
    entry that trains the variant with another seed (its profile is the variant's)."""
    from attnbench import profile as profile_mod
    from tests.tiny import write_params

    entries = [variant, f"{variant}-seed1"]
    _, params = write_params(tmp_path, {"profile": {"seq_lens": [16, 256], "tokens_per_step": 512}, "variants": dict.fromkeys(entries, {})})
    runs = []
    for entry in entries:
        rows, _ = profile_mod.profile(params, entry)
        runs.append([(r["scope"], r["T"], r["memory_bytes"]) for r in rows])
    assert runs[0] == runs[1]


def test_saved_activations_release_what_a_dropped_branch_saved():
    """The CPU memory measure counts a tensor saved for backward while it is alive: five branches whose outputs
    (saved by exp for its backward) are dropped one after another hold one branch's bytes at a time, and nothing is
    held once the graph is gone. Packing the tensor itself made each node hold itself (a cycle): 5x the peak."""
    from attnbench.profile import SavedActivations

    x = torch.randn(1000, 1000, requires_grad=True)
    size = x.numel() * x.element_size()
    with SavedActivations() as saved:
        for _ in range(5):
            x.exp()
    assert saved.bytes == size and saved.held == 0


def test_saved_activations_leave_out_the_resident_weights_and_input():
    """As the CUDA peak is taken above what was allocated before the step, the CPU measure leaves out the weights and
    the input, which a linear layer saves for its backward (its weight as a transposed view): only what the step
    made counts, here the product that exp saves."""
    from attnbench.profile import SavedActivations

    x = torch.randn(64, 32, requires_grad=True)
    linear = torch.nn.Linear(32, 16)
    for resident, expected in [((), 64 * 32 * 4 + 16 * 32 * 4 + 64 * 16 * 4), ((x, *linear.parameters()), 64 * 16 * 4)]:
        with SavedActivations(resident) as saved:
            linear(x).exp().sum().backward()
        assert saved.bytes == expected


def test_profile_reference_is_mhas_layer_at_the_variants_shapes(tmp_path):
    """The profile's reference scope, the bar of the report's x sdpa column, is mha's sub-layer with default options at
    the same T and batch: for la its memory at every T is what mha's own attention scope saves there."""
    from attnbench import profile as profile_mod
    from tests.tiny import write_params

    _, params = write_params(tmp_path, {"profile": {"seq_lens": [16, 64], "tokens_per_step": 256, "whole_model": False},
                                        "variants": {"la": {}, "mha": {}}})
    la_rows, _ = profile_mod.profile(params, "la")
    mha_rows, _ = profile_mod.profile(params, "mha")
    reference = [(r["T"], r["batch"], r["memory_bytes"]) for r in la_rows if r["scope"] == "reference"]
    assert reference == [(r["T"], r["batch"], r["memory_bytes"]) for r in mha_rows if r["scope"] == "attention"]
    assert reference != [(r["T"], r["batch"], r["memory_bytes"]) for r in la_rows if r["scope"] == "attention"]


def test_profile_counts_the_points_whose_repeats_disagree(tmp_path, monkeypatch):
    """profile.json's noisy_points: the points whose spread is over 10% (one at 0.5 here; 0.1 itself is not)."""
    from attnbench import profile as profile_mod
    from tests.tiny import write_params

    _, params = write_params(tmp_path, {"profile": {"seq_lens": [16, 32], "tokens_per_step": 128, "whole_model": False},
                                        "variants": {"mha": {}}})
    spreads = iter([0.5, 0.1, 0.0, 0.05])  # attention at 16 and 32, then the reference at 16 and 32
    monkeypatch.setattr(profile_mod, "measure", lambda *args: profile_mod.Measurement(1.0, next(spreads), 0, "fixture"))
    rows, summary = profile_mod.profile(params, "mha")
    assert [r["spread"] for r in rows] == [0.5, 0.1, 0.0, 0.05]
    assert summary["noisy_points"] == 1


def test_a_point_out_of_memory_has_no_spread_and_is_not_counted_noisy(tmp_path, monkeypatch):
    """An oom row's measurement fields, spread among them, are empty (None), and noisy_points counts only ok points."""
    from attnbench import profile as profile_mod
    from tests.tiny import write_params

    _, params = write_params(tmp_path, {"profile": {"seq_lens": [16, 32], "tokens_per_step": 128, "whole_model": False},
                                        "variants": {"mha": {}}})
    spreads = iter([0.5, None, 0.0, 0.05])  # attention at 16 and 32 (out of memory), then the reference at 16 and 32

    def measure(*args):
        spread = next(spreads)
        if spread is None:
            raise torch.OutOfMemoryError("fixture")
        return profile_mod.Measurement(1.0, spread, 0, "fixture")

    monkeypatch.setattr(profile_mod, "measure", measure)
    rows, summary = profile_mod.profile(params, "mha")
    assert [(r["T"], r["status"], r["spread"]) for r in rows] == [(16, "ok", 0.5), (32, "oom", None), (16, "ok", 0.0), (32, "ok", 0.05)]
    assert summary["noisy_points"] == 1


def test_the_profile_stage_logs_its_noisy_points_to_mlflow(tmp_path, monkeypatch):
    """noisy_points is a metric of the profile's MLflow run beside the exponents, so that runs can be sorted by it."""
    from mlflow.tracking import MlflowClient

    from attnbench import profile as profile_mod
    from tests.tiny import write_params

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, params = write_params(tmp_path, {"profile": {"seq_lens": [16, 32], "tokens_per_step": 128, "whole_model": False},
                                        "variants": {"mha": {}}, "tracking": {"uri": uri}})
    spreads = iter([0.5, 0.1, 0.0, 0.05])
    monkeypatch.setattr(profile_mod, "measure", lambda *args: profile_mod.Measurement(1.0, next(spreads), 0, "fixture"))
    profile_mod.main(params, "mha", tmp_path / "mha")
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.metrics["noisy_points"] == 1


def test_profile_tokens_per_s_counts_every_sequence_of_the_batch(tmp_path):
    """A point's throughput is batch x T tokens per measured second, at every ok point of every scope."""
    from attnbench import profile as profile_mod
    from tests.tiny import write_params

    _, params = write_params(tmp_path, {"profile": {"seq_lens": [16, 32], "tokens_per_step": 128}, "variants": {"mha": {}}})
    rows, _ = profile_mod.profile(params, "mha")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6 and all(r["batch"] > 1 for r in ok)
    for r in ok:
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["T"] / r["seconds"], rel=1e-12), (r["scope"], r["T"])


def test_profile_batch_is_tokens_per_step_over_each_T(tmp_path):
    """The batch is tokens_per_step // T sequences at each T (at least one), so every point times the same tokens."""
    from attnbench import profile as profile_mod
    from tests.tiny import write_params

    _, params = write_params(tmp_path, {"profile": {"seq_lens": [16, 64, 256], "tokens_per_step": 128}, "variants": {"mha": {}}})
    rows, _ = profile_mod.profile(params, "mha")
    assert [(r["scope"], r["T"], r["batch"]) for r in rows] == [
        (scope, T, batch) for scope in ("attention", "reference", "model") for T, batch in ((16, 8), (64, 2), (256, 1))
    ]


def test_profile_time_is_the_median_of_the_repeats(monkeypatch):
    """One slow repeat (a stall, a GC pause) does not move the measured time: durations 100, 2 and 1 s give 2 s (the
    mean, the first and the fastest would each give another figure), nor the spread: the median absolute deviation,
    median(98, 0, 1) = 1, over the median, 0.5 (the range would give 49.5)."""
    from types import SimpleNamespace

    from attnbench import profile as profile_mod

    ticks = iter([0.0, 100.0, 200.0, 202.0, 300.0, 301.0])  # (start, end) of each timed repeat
    monkeypatch.setattr(profile_mod, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    measured = profile_mod.measure(lambda: None, torch.device("cpu"), warmup=0, repeats=3)
    assert (measured.seconds, measured.spread) == (2.0, 0.5)


def test_profile_warms_each_point_up_for_warmup_seconds(monkeypatch):
    """After `warmup` calls, untimed calls follow until they have taken `warmup_seconds`, then one for the memory and
    `repeats` timed ones: at 0.25 s a call and 1 s, 2 + 4 + 1 + 3 calls; with no seconds, 2 + 1 + 3."""
    from types import SimpleNamespace

    from attnbench import profile as profile_mod

    clock = [0.0]
    monkeypatch.setattr(profile_mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = []

    def step():
        calls.append(1)
        clock[0] += 0.25

    measured = profile_mod.measure(step, torch.device("cpu"), warmup=2, repeats=3, warmup_seconds=1.0)
    assert (len(calls), measured.seconds) == (10, 0.25)
    calls.clear()
    profile_mod.measure(step, torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 6
