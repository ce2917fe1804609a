"""train and evaluate on tiny data: outputs, resume after an interruption, divergence, budgets."""

from __future__ import annotations

import csv
import logging
import math
import warnings

import numpy as np
import pytest
import torch

from attnbench import data, evaluate as evaluate_mod, train as train_mod
from attnbench.config import parse_params
from attnbench.evaluate import evaluate, window_starts
from attnbench.files import read_json
from attnbench.model import ByteLM, ModelConfig
from tests.tiny import TINY, merge, write_params


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A tiny params file and its prepared data, in a fresh working directory."""
    monkeypatch.chdir(tmp_path)

    def make(overrides=None):
        _, params = write_params(tmp_path, overrides)
        prepared = tmp_path / "prepared"
        if not (prepared / "manifest.json").exists():
            corpus = tmp_path / "corpus.bin"
            data.fetch(params.data, corpus, tmp_path / "download")
            data.prepare(corpus, prepared, params.data.max_bytes, params.data.splits)
        return params, prepared

    return make


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def interrupt_at(monkeypatch, step):
    """Make train() raise KeyboardInterrupt when it asks for the batch of `step`; returns the real get_batch."""
    real_get_batch = train_mod.get_batch

    def get_batch(data_, seq_len, batch_size, seed, step_, micro, device):
        if step_ == step:
            raise KeyboardInterrupt
        return real_get_batch(data_, seq_len, batch_size, seed, step_, micro, device)

    monkeypatch.setattr(train_mod, "get_batch", get_batch)
    return real_get_batch


class Recorder:
    """A stand-in for the stage's MLflow tracker: keeps each log point's metrics in `logged` by step, and the
    params and tags."""

    def __init__(self, logged: dict):
        self.logged, self.params, self.tags = logged, {}, {}

    def log_params(self, params):
        self.params.update(params)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_metrics(self, metrics, step=None):
        self.logged[step] = metrics


def test_train_writes_its_outputs_and_learns(tiny, tmp_path):
    params, prepared = tiny()
    summary = train_mod.train(params, "mha", prepared, tmp_path / "mha")
    for name in ("model.pt", "curve.csv", "train.json"):
        assert (tmp_path / "mha" / name).exists(), name
    assert not (tmp_path / "mha" / train_mod.CHECKPOINT).exists(), "a finished run leaves no resume checkpoint"
    with open(tmp_path / "mha" / "curve.csv") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["step"]) for r in curve] == [4, 8, 12]
    assert float(curve[-1]["val_bpb"]) < 8.0, "worse than a uniform byte model after training"
    assert read_json(tmp_path / "mha" / "train.json") == summary
    assert summary["tokens"] == 12 * 4 * 32


def test_a_seeded_entry_trains_and_scores_as_its_variant_would_with_that_train_seed(tiny, tmp_path):
    """lca-seed5 in a file whose train.seed is 0 gives the weights lca gives with train.seed 5 (initialisation,
    batches and the Gumbel noise all follow the seed), and not those of lca with seed 0; its sampled-routing score
    is drawn with that seed too; train.json and the resume key carry its seed."""
    params, prepared = tiny({"variants": {"lca": {}, "lca-seed5": {}}})
    seed5, _ = tiny({"train": {"seed": 5}, "variants": {"lca": {}}})
    runs = {"lca": (params, "lca"), "lca-seed5": (params, "lca-seed5"), "lca with seed 5": (seed5, "lca")}
    scores = {}
    for name, (run_params, entry) in runs.items():
        train_mod.train(run_params, entry, prepared, tmp_path / name)
        scores[name] = {k: v for k, v in evaluate(run_params, entry, prepared, tmp_path / name / "model.pt").items() if k.startswith("test_bpb")}
    trained = {name: weights(tmp_path / name / "model.pt") for name in runs}
    assert trained["lca-seed5"].keys() == trained["lca with seed 5"].keys()
    assert all(torch.equal(trained["lca-seed5"][k], trained["lca with seed 5"][k]) for k in trained["lca-seed5"])
    assert not torch.equal(trained["lca"]["tok_emb.weight"], trained["lca-seed5"]["tok_emb.weight"])
    assert scores["lca-seed5"] == scores["lca with seed 5"] != scores["lca"], scores
    manifest = read_json(prepared / "manifest.json")
    assert train_mod.fingerprint(params, "lca-seed5", manifest) == train_mod.fingerprint(seed5, "lca", manifest)
    assert {k: read_json(tmp_path / "lca-seed5" / "train.json")[k] for k in ("variant", "seed")} == {"variant": "lca-seed5", "seed": 5}


def test_resume_after_interruption_equals_uninterrupted_run(tiny, tmp_path, monkeypatch):
    """Bitwise, with noise in the model (dropout, lca's Gumbel routing): the noise of a step does not depend on
    what the process drew before. The resumed run is its own MLflow run, with the params and where it resumed."""
    params, prepared = tiny({"model": {"dropout": 0.2}, "variants": {"lca": {}}})
    train_mod.train(params, "lca", prepared, tmp_path / "clean")

    real_get_batch = interrupt_at(monkeypatch, 6)  # after the checkpoint at step 4, before the one at 8
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(params, "lca", prepared, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / train_mod.CHECKPOINT, weights_only=True)["step"] == 4
    assert not (tmp_path / "resumed" / "model.pt").exists(), "an interrupted run must not write its final outputs"
    # The time before the interruption, made unmistakable: a resumed run's train_seconds and elapsed_s count on from it.
    ckpt = torch.load(tmp_path / "resumed" / train_mod.CHECKPOINT, weights_only=True)
    torch.save({**ckpt, "elapsed_s": 1000.0}, tmp_path / "resumed" / train_mod.CHECKPOINT)

    monkeypatch.setattr(train_mod, "get_batch", real_get_batch)
    torch.manual_seed(12345)  # the global generator as a fresh process might leave it: not what the clean run had
    recorder = Recorder({})
    summary = train_mod.train(params, "lca", prepared, tmp_path / "resumed", recorder)
    assert recorder.params["variant"] == "lca" and recorder.params["train"] == params.train.model_dump()
    assert recorder.params["model"] == params.model.model_dump()
    assert recorder.params["variant_options"] == params.variant_options("lca")
    assert recorder.params["world_size"] == 1
    # The options as the layers ran them at T = 32: ceil(sqrt(32)) = 6 clusters, the auto balance 0.01.
    resolved = {"clusters": 6, "router": "head", "tau_start": 1.0, "tau_end": 0.1, "balance": 0.01}
    assert recorder.params["resolved_options"] == summary["resolved_options"] == resolved, recorder.params
    with open(tmp_path / "resumed" / "curve.csv") as f:
        elapsed = [float(r["elapsed_s"]) for r in csv.DictReader(f)]
    assert summary["train_seconds"] > 1000.0 and all(e > 1000.0 for e in elapsed[1:]), "resume restarted the clock"
    assert elapsed == sorted(elapsed) and summary["train_seconds"] == elapsed[-1]
    assert recorder.tags == {"resumed_from_step": "4", "compiled": "False"}
    assert sorted(recorder.logged) == [6, 8, 10, 12]
    clean, resumed = weights(tmp_path / "clean" / "model.pt"), weights(tmp_path / "resumed" / "model.pt")
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), f"{key} differs after resume"
    assert summary["val_bpb_final"] == read_json(tmp_path / "clean" / "train.json")["val_bpb_final"]
    assert (tmp_path / "clean" / "curve.csv").read_text().count("\n") == (tmp_path / "resumed" / "curve.csv").read_text().count("\n")


def test_a_train_split_shorter_than_one_window_is_named_with_the_settings_to_change(tiny, tmp_path):
    """It failed in numpy ("high <= 0") after the data stages; a split of exactly seq_len + 1 bytes is enough."""
    params, prepared = tiny({"data": {"max_bytes": 40}})  # train split: 36 bytes
    with pytest.raises(ValueError, match=r"the train split has 36 bytes, too few for one window of model.seq_len = 40 .*"
                                         r"raise data.max_bytes or lower model.seq_len"):
        train_mod.train(parse_params(merge(TINY, {"model": {"seq_len": 40}})), "mha", prepared, tmp_path / "long")
    x, y = train_mod.get_batch(np.arange(36, dtype=np.uint8), 35, 8, 0, 0, 0, torch.device("cpu"))
    assert (x[:, 0] == 0).all() and (y[:, -1] == 35).all(), "the one window that fits"


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = parse_params(merge(TINY, {"train": {"lr": 1.0, "min_lr_ratio": 0.1, "warmup_steps": 4}})).train
    lrs = [train_mod.lr_at(step, 14, cfg) for step in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # warmup: step + 1 of 4
    assert lrs[4] == 1.0 and lrs[9] == pytest.approx(0.55)  # cosine from 1.0 to 0.1 over the 10 steps after warmup
    assert lrs[13] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])), "decreasing after warmup"


def test_a_checkpoint_resumes_only_on_the_same_data():
    """The fingerprint holds the prepared splits' digests: other data (same recipe) starts from step 0."""
    params = parse_params(TINY)
    one = {"splits": {name: {"bytes": 1000, "file": f"{name}.bin", "sha256": "a" * 64} for name in ("train", "val", "test")}}
    other = {"splits": {**one["splits"], "train": {"bytes": 1000, "file": "train.bin", "sha256": "b" * 64}}}
    assert train_mod.fingerprint(params, "mha", one) == train_mod.fingerprint(params, "mha", {"splits": dict(one["splits"])})
    assert train_mod.fingerprint(params, "mha", one) != train_mod.fingerprint(params, "mha", other)


def test_checkpoint_of_another_configuration_is_not_resumed(tiny, tmp_path, monkeypatch):
    params, prepared = tiny()
    real_get_batch = interrupt_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(params, "mha", prepared, tmp_path / "mha")
    monkeypatch.setattr(train_mod, "get_batch", real_get_batch)
    other, _ = tiny({"train": {"lr": 1e-3}})
    summary = train_mod.train(other, "mha", prepared, tmp_path / "mha")
    assert summary["steps"] == 12
    fresh = train_mod.train(other, "mha", prepared, tmp_path / "fresh")
    assert summary["val_bpb_final"] == fresh["val_bpb_final"], "started from the foreign checkpoint instead of step 0"


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny, tmp_path, monkeypatch):
    params, prepared = tiny()
    real_get_batch = train_mod.get_batch

    def poisoned(*args):
        x, y = real_get_batch(*args)
        if args[4] == 5:
            with torch.no_grad():
                next(iter(model_holder)).tok_emb.weight.fill_(float("nan"))
        return x, y

    model_holder = []
    real_make_optimizer = train_mod.make_optimizer
    monkeypatch.setattr(train_mod, "make_optimizer", lambda model, *a: model_holder.append(model) or real_make_optimizer(model, *a))
    monkeypatch.setattr(train_mod, "get_batch", poisoned)
    with pytest.raises(train_mod.TrainingDiverged, match="step 5"):
        train_mod.train(params, "mha", prepared, tmp_path / "mha")
    assert torch.load(tmp_path / "mha" / train_mod.CHECKPOINT, weights_only=True)["step"] == 4
    assert not (tmp_path / "mha" / "model.pt").exists()


def test_each_log_point_records_its_windows_largest_gradient_norm(tiny, tmp_path, monkeypatch):
    """grad_norm_max at a log point is the largest pre-clipping gradient norm of the steps since the last one."""
    params, prepared = tiny()
    norms, real_clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args, **kw: norms.append(real_clip(*args, **kw)) or norms[-1])
    logged = {}
    train_mod.train(params, "mha", prepared, tmp_path / "mha", Recorder(logged))
    assert sorted(logged) == [2, 4, 6, 8, 10, 12] and len(norms) == 12
    for step, metrics in logged.items():
        assert metrics["grad_norm_max"] == max(float(n) for n in norms[step - 2 : step])


SHORT = {"train": {"steps": 4, "log_every": 2, "eval_every": 4, "checkpoint_every": 4}}


def test_the_world_size_logged_is_the_processes_that_ran_not_train_nproc(tiny, tmp_path):
    """world_size is what ran: train.nproc 2 trained in this one process (as under a torchrun started by hand with
    another count) logs 1."""
    params, prepared = tiny(merge(SHORT, {"train": {"nproc": 2, "grad_accum": 2}}))
    recorder = Recorder({})
    train_mod.train(params, "mha", prepared, tmp_path / "mha", recorder)
    assert recorder.params["world_size"] == 1


def test_each_checkpoint_but_the_last_is_logged_with_its_step(tiny, tmp_path, caplog):
    """After a Ctrl-C the log's last checkpoint line says where the next run resumes; the last step's checkpoint is
    removed when the run ends, so it is not announced."""
    params, prepared = tiny(merge(SHORT, {"train": {"checkpoint_every": 2}}))
    with caplog.at_level(logging.INFO, logger="attnbench"):
        train_mod.train(params, "mha", prepared, tmp_path / "mha")
    lines = [r.getMessage() for r in caplog.records if "checkpoint ->" in r.getMessage()]
    assert lines == [f"step 2/4  checkpoint -> {tmp_path / 'mha' / train_mod.CHECKPOINT}"], lines


def test_gradient_accumulation_averages_the_micro_batches(tiny, tmp_path, monkeypatch):
    """Two micro-batches of the same rows give the gradient of one: each micro-batch's loss is divided by their
    number. AdamW would hide a gradient twice too large, so the logged pre-clipping norms are compared."""
    real_get_batch = train_mod.get_batch
    monkeypatch.setattr(train_mod, "get_batch", lambda data_, T, B, seed, step, micro, device: real_get_batch(data_, T, B, seed, step, 0, device))
    norms = {}
    for accum in (1, 2):
        params, prepared = tiny(merge(SHORT, {"train": {"grad_accum": accum}}))
        logged = {}
        train_mod.train(params, "mha", prepared, tmp_path / f"accum{accum}", Recorder(logged))
        norms[accum] = [logged[step]["grad_norm_max"] for step in sorted(logged)]
    assert len(norms[1]) == 2 and norms[2] == pytest.approx(norms[1], rel=1e-4)


def test_gradients_are_clipped_to_grad_clip(tiny, tmp_path, monkeypatch):
    """After clip_grad_norm_ the step's gradient norm is at most train.grad_clip, while the logged (pre-clipping)
    norm shows there was something to clip."""
    params, prepared = tiny(merge(SHORT, {"train": {"grad_clip": 0.01}}))
    clipped, real_clip = [], torch.nn.utils.clip_grad_norm_

    def clip(parameters, *args, **kwargs):
        parameters = list(parameters)
        norm = real_clip(parameters, *args, **kwargs)
        clipped.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])).item())
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    logged = {}
    train_mod.train(params, "mha", prepared, tmp_path / "mha", Recorder(logged))
    assert len(clipped) == 4 and all(norm <= 0.01 + 1e-6 for norm in clipped), clipped
    assert all(metrics["grad_norm_max"] > 0.01 for metrics in logged.values())


def test_logged_train_loss_is_the_mean_over_the_window(tiny, tmp_path, monkeypatch):
    """train_loss at a log point is the mean of the losses of its window's steps (and of each step's micro-batches),
    not their sum: compared with the losses the model's forward returned in training."""
    params, prepared = tiny(merge(SHORT, {"train": {"grad_accum": 2}}))
    losses, real_forward = [], ByteLM.forward

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training and loss is not None:
            losses.append(loss.item())
        return logits, loss

    monkeypatch.setattr(ByteLM, "forward", forward)
    logged = {}
    train_mod.train(params, "mha", prepared, tmp_path / "mha", Recorder(logged))
    assert sorted(logged) == [2, 4] and len(losses) == 8  # 2 steps x 2 micro-batches per window
    for window, step in enumerate([2, 4]):
        assert logged[step]["train_loss"] == pytest.approx(np.mean(losses[4 * window : 4 * window + 4]), rel=1e-5)


def test_lca_temperature_anneals_with_training_progress(tiny, tmp_path):
    """train tells the model its progress (step / steps) before each step; lca's tau follows
    tau_start * (tau_end / tau_start) ** progress, logged as attn.tau at each eval point."""
    params, prepared = tiny(merge(SHORT, {"train": {"eval_every": 2}, "variants": {"lca": {"tau_start": 2.0, "tau_end": 0.5}}}))
    logged = {}
    train_mod.train(params, "lca", prepared, tmp_path / "lca", Recorder(logged))
    taus = {step: logged[step]["attn.tau"] for step in (2, 4)}
    for step, tau in taus.items():  # read after step `step`, whose index step - 1 set the progress (step - 1) / 4
        assert tau == pytest.approx(2.0 * (0.5 / 2.0) ** ((step - 1) / 4), rel=1e-6), step
    assert taus[4] < taus[2]


def test_routing_stats_are_the_training_batchs_and_the_val_pass_is_logged_apart(tiny, tmp_path, monkeypatch):
    """attn.* at an eval point are the last training batch's routing, read before the val pass routes anew
    (argmax, no noise); the val pass's own, averaged over its bytes, are val_attn.*."""
    params, prepared = tiny({"variants": {"lca": {}}})
    logged, before_val, val_stats = {}, [], []
    real_bits_per_byte = train_mod.bits_per_byte

    def recording(model, *args, **kwargs):
        before_val.append({k: v.item() for k, v in model.attention_stats().items()})
        result = real_bits_per_byte(model, *args, **kwargs)
        val_stats.append(result["attention"])
        return result

    monkeypatch.setattr(train_mod, "bits_per_byte", recording)
    train_mod.train(params, "lca", prepared, tmp_path / "lca", Recorder(logged))
    assert len(before_val) == 3 and "tau" in before_val[0] and "tau" not in val_stats[0]
    for stats, val, step in zip(before_val, val_stats, [4, 8, 12]):
        assert {k[len("attn."):]: v for k, v in logged[step].items() if k.startswith("attn.")} == stats
        assert {k[len("val_attn."):]: v for k, v in logged[step].items() if k.startswith("val_attn.")} == val


def test_token_budget_sets_the_steps_and_counts_every_micro_batch(tiny, tmp_path):
    """A step is batch_size x grad_accum sequences of T bytes: in the step count, the summary and the curve."""
    params, prepared = tiny({"train": {"steps": None, "tokens": 8 * 4 * 2 * 32, "grad_accum": 2, "eval_every": 4}})
    summary = train_mod.train(params, "mha", prepared, tmp_path / "mha")
    assert summary["steps"] == 8 and summary["tokens"] == 8 * 4 * 2 * 32
    with open(tmp_path / "mha" / "curve.csv") as f:
        curve = list(csv.DictReader(f))
    assert [(int(r["step"]), int(r["tokens"])) for r in curve] == [(4, 4 * 4 * 2 * 32), (8, 8 * 4 * 2 * 32)]


def test_evaluate_scores_every_test_byte_once(tiny, tmp_path):
    params, prepared = tiny({"evaluate": {"max_tokens": None}})
    train_mod.train(params, "mha", prepared, tmp_path / "mha")
    n_test = read_json(prepared / "manifest.json")["splits"]["test"]["bytes"]
    metrics = evaluate(params, "mha", prepared, tmp_path / "mha" / "model.pt")
    assert metrics["test_tokens"] == n_test - 1
    assert 0 < metrics["test_bpb"] < 8


def test_evaluate_scores_noisy_routing_by_the_argmax_and_as_trained(tiny, tmp_path, monkeypatch, caplog):
    """lca: test_bpb is the spec's argmax routing; test_bpb_sampled routes by training's draw, seeded, so it
    repeats; both give their cluster statistics, and each pass's progress lines say which it is. mha has neither."""
    params, prepared = tiny({"variants": {"lca": {}}})
    for variant in ("lca", "mha"):
        train_mod.train(params, variant, prepared, tmp_path / variant)
    monkeypatch.setattr(evaluate_mod, "PROGRESS_EVERY_S", -1)  # a progress line after every batch
    with caplog.at_level(logging.INFO, logger="attnbench.evaluate"):
        first = evaluate(params, "lca", prepared, tmp_path / "lca" / "model.pt")
    assert {r.getMessage().split(":")[0] for r in caplog.records if r.name == "attnbench.evaluate"} == {"evaluate lca (argmax routing)", "evaluate lca (sampled routing)"}
    again = evaluate(params, "lca", prepared, tmp_path / "lca" / "model.pt")
    assert first["test_bpb_sampled"] == again["test_bpb_sampled"] and first["test_bpb"] == again["test_bpb"]
    assert first["test_bpb_sampled"] != first["test_bpb"]
    assert set(first["routing"]) == {"argmax", "sampled"}
    assert set(first["routing"]["sampled"]) == {"max_cluster_frac", "empty_clusters", "pair_frac"}
    plain = evaluate(params, "mha", prepared, tmp_path / "mha" / "model.pt")
    assert "test_bpb_sampled" not in plain and "routing" not in plain


def test_bits_per_byte_of_a_uniform_model_is_8():
    """Nats are converted to bits: a model whose logits are all 0 (uniform over 256 bytes) scores exactly 8 bpb."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(variant="mha", d_model=32, n_layers=1, n_heads=2, seq_len=32))
    with torch.no_grad():
        model.head.weight.zero_()
    data_ = np.random.default_rng(0).integers(0, 256, 200).astype(np.uint8)
    assert evaluate_mod.bits_per_byte(model, data_, 4)["bpb"] == pytest.approx(8.0, abs=1e-5)


def test_bits_per_byte_weights_routing_stats_by_the_bytes_of_each_batch(monkeypatch):
    """The attention stats of a pass are the mean over its bytes: a full window (32 bytes) and a tail window
    (10 bytes) count 32 : 10, from the stats each forward left."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(variant="lca", d_model=32, n_layers=1, n_heads=2, seq_len=32))
    per_batch, real_stats = [], model.attention_stats
    monkeypatch.setattr(model, "attention_stats", lambda: per_batch.append(real_stats()) or per_batch[-1])
    data_ = np.random.default_rng(0).integers(0, 256, 32 + 1 + 10).astype(np.uint8)
    result = evaluate_mod.bits_per_byte(model, data_, 4)
    assert result["tokens"] == 42 and len(per_batch) == 2
    full, tail = per_batch
    assert set(result["attention"]) == {"max_cluster_frac", "empty_clusters", "pair_frac"}
    for key, value in result["attention"].items():
        assert value == pytest.approx((full[key].item() * 32 + tail[key].item() * 10) / 42, rel=1e-6), key


def test_window_starts_cover_the_split_and_subsample_evenly():
    starts = window_starts(1000, 64)
    assert starts[0] == 0 and all(b - a == 64 for a, b in zip(starts, starts[1:])) and starts[-1] + 64 >= 999
    subset = window_starts(1000, 64, max_tokens=256)
    assert len(subset) == 4 and subset[0] == 0 and subset[-1] == starts[-1]


def test_evaluate_refuses_a_model_of_another_size(tiny, tmp_path):
    params, prepared = tiny()
    train_mod.train(params, "mha", prepared, tmp_path / "mha")
    bigger, _ = tiny({"model": {"d_model": 64}})
    with pytest.raises(ValueError, match="different model"):
        evaluate(bigger, "mha", prepared, tmp_path / "mha" / "model.pt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_training_steps_make_no_host_sync(tiny, tmp_path):
    """Between two log points a step must not wait for the GPU: the host queues the next step while the GPU runs
    this one. CUDA's sync debug mode warns at every synchronizing call; a run of 8 steps must warn exactly as often
    as a run of 4 (the syncs of logging, evaluation and saving, once per run), so no step adds one."""

    def syncs(steps: int) -> int:
        overrides = {"train": {"steps": steps, "log_every": steps, "eval_every": steps, "checkpoint_every": steps, "device": "cuda"}}
        params, prepared = tiny(overrides)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_mod.train(params, "mha", prepared, tmp_path / f"mha{steps}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(4)  # warm-up: first-use syncs (allocations, cuDNN plans) happen once per process
    assert syncs(8) == syncs(4) > 0


@pytest.mark.parametrize("compiler", ["fails", "passes through"])
def test_train_compile_probes_once_and_falls_back_to_eager_where_it_fails(tiny, tmp_path, monkeypatch, caplog, compiler):
    """train.compile with a compiler that fails (one warning line, training goes on eagerly) or one that returns the
    model as it is (`compiled` true): either way the weights are the eager run's bitwise, so the probe step leaves no
    gradient or noise behind. The compiler is asked with the model's own options (lca's Inductor settings)."""
    params, prepared = tiny({"model": {"dropout": 0.2}, "variants": {"lca": {}}})
    eager = train_mod.train(params, "lca", prepared, tmp_path / "eager")
    asked = []

    def compile_stand_in(module, options=None):
        asked.append(options)

        def fail(*args, **kwargs):
            raise RuntimeError("BackendCompilerFailed: inductor\nraised on\nseveral lines")

        return fail if compiler == "fails" else module

    monkeypatch.setattr(torch, "compile", compile_stand_in)
    compiling = params.model_copy(update={"train": params.train.model_copy(update={"compile": True})})
    recorder = Recorder({})
    with caplog.at_level(logging.WARNING, logger="attnbench.train"):
        summary = train_mod.train(compiling, "lca", prepared, tmp_path / "compiling", recorder)
    assert asked == [{"comprehensive_padding": False}] and not eager["compiled"]
    warnings_ = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    if compiler == "fails":
        assert warnings_ == ["torch.compile failed (RuntimeError: BackendCompilerFailed: inductor raised on several lines); training eagerly"]
    assert summary["compiled"] is (compiler != "fails") and recorder.tags["compiled"] == str(compiler != "fails")
    clean, compiled = weights(tmp_path / "eager" / "model.pt"), weights(tmp_path / "compiling" / "model.pt")
    assert all(torch.equal(clean[key], compiled[key]) for key in clean)


def test_where_another_process_could_not_compile_this_one_trains_eagerly_too(tiny, tmp_path, monkeypatch):
    """Under DDP the probe's outcome is agreed over the processes (a max of 'failed'): a rank whose compile worked
    trains eagerly where another's failed, so all run alike and train.json's `compiled` holds for every one."""
    params, prepared = tiny({"train": {"compile": True}})
    real_max, calls = train_mod.distributed.max_over_ranks_, []

    def another_rank_failed(tensor):  # the first reduction is the probe's; the loop's (bad_step) pass through
        calls.append(tensor.item())
        return torch.ones_like(tensor) if len(calls) == 1 else real_max(tensor)

    monkeypatch.setattr(train_mod.distributed, "max_over_ranks_", another_rank_failed)
    monkeypatch.setattr(train_mod, "compiled_or_eager", lambda ddp, model, probe: (lambda *a: pytest.fail("compiled ran"), True))
    summary = train_mod.train(params, "mha", prepared, tmp_path / "mha")
    assert calls[0] == 0 and summary["compiled"] is False  # this rank compiled (0 = not failed), another did not
