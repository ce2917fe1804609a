"""train: one variant's byte-level LM, AdamW with warmup + cosine decay, resumable.

Read top to bottom: batches, schedule, checkpoint, then `train`, the loop.
Batches, and the random noise of the model (dropout, lca's Gumbel noise), come
from generators seeded by (seed, step, micro-step), and the checkpoint holds the
model and optimizer state, so a run resumed from its last checkpoint ends with
the same weights as one that was never interrupted.

With `train.nproc` > 1 the stage runs as that many DistributedDataParallel
processes (distributed.py): each takes its share of every step's global batch,
which is the batch a single process would draw, so the result is the same
training up to float rounding (and a checkpoint resumes with any nproc). One
exception: where a micro-batch's rows are split over processes (grad_accum not
a multiple of nproc), each share draws its own noise, so a model with noise
(dropout, lca's routing) trains on other draws than in one process.
Rank 0 alone evaluates, logs to MLflow and writes checkpoints and outputs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .config import Params, TrainConfig
from .evaluate import bits_per_byte
from .files import atomic_path, read_json, write_json
from .gpu_slots import gpu_slots
from .model import ByteLM, save_model
from .runtime import autocast, byte_windows, job_cpu_threads, one_line, peak_flops, resolve_device, use_cpu_threads
from .splits import MANIFEST, load_split

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"  # resume state; not a declared output, so orchestrators keep it across failures
CURVE_FIELDS = ["step", "tokens", "lr", "train_loss", "val_bpb", "tokens_per_s", "elapsed_s"]


class TrainingDiverged(RuntimeError):
    pass


def get_batch(data: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int, micro: int, device: torch.device):
    """Random windows of `data`: x (B, T) and next-byte targets y (B, T), determined by (seed, step, micro)."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(data) - seq_len, size=batch_size)  # the last start whose window fits included
    window = byte_windows(data, starts, seq_len + 1, device)
    return window[:, :-1], window[:, 1:]


def seed_noise(seed: int, step: int, micro: int, share: int) -> None:
    """Seed torch's RNG (dropout, lca's Gumbel noise) for one micro-batch from (seed, step, micro, share):
    like the batch, the noise then does not depend on which process draws it nor on what it drew before."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, micro, share], spawn_key=(1,)).generate_state(1)[0]))


def total_steps(cfg: TrainConfig, seq_len: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, cfg.tokens // (cfg.batch_size * cfg.grad_accum * seq_len))


def lr_at(step: int, steps: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: ByteLM, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms, biases or embeddings' positions)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("pos_emb")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("pos_emb")]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def fingerprint(params: Params, variant: str, manifest: dict) -> str:
    """What a checkpoint must match to be resumed: model, variant options, training recipe and the data.
    Not nproc: any number of processes trains on the same global batches."""
    recipe = params.train_for(variant).model_dump(exclude={"eval_every", "eval_batches", "checkpoint_every", "log_every", "device", "compile", "nproc"})
    blob = json.dumps([params.model_for(variant).to_dict(), recipe, manifest["splits"]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_checkpoint(path: Path, model, optimizer, step: int, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,  # no RNG state: seed_noise seeds every micro-batch
            **state,
        },
        buffer,
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def compiled_or_eager(ddp: torch.nn.Module, model: ByteLM, probe: tuple[torch.Tensor, torch.Tensor]):
    """(forward, compiled): torch.compile of `ddp` where one forward and backward of the batch `probe` compiles and
    runs, else `ddp` itself with a one-line warning, the clean fallback for a variant or a machine that torch.compile
    cannot handle. The probe's gradients are dropped, and its noise too: the loop seeds every micro-batch's."""
    compiled = torch.compile(ddp, options=model.compile_options)
    x, y = probe
    try:
        with distributed.sync_gradients(ddp, sync=False):
            with autocast(x.device):
                _, loss = compiled(x, y)
            model.with_aux_loss(loss).backward()
    except torch.OutOfMemoryError:
        raise  # not compilation's fault: eager would run out too
    except Exception as err:
        log.warning("torch.compile failed (%s: %s); training eagerly", type(err).__name__, one_line(str(err)))
        return ddp, False
    finally:
        model.zero_grad(set_to_none=True)
    return compiled, True


def load_checkpoint(path: Path, expected_fingerprint: str, device: torch.device) -> dict | None:
    """The checkpoint at `path` if it is complete and from this configuration, else None (with the reason logged)."""
    if not path.exists():
        return None
    try:
        with zipfile.ZipFile(path) as zf:  # torch.load does not check the CRC-32s that torch.save stores
            damaged = zf.testzip()
        if damaged is not None:
            raise ValueError(f"CRC-32 mismatch in {damaged}")
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a torn, damaged or foreign file: never resume from it
        log.warning("ignoring unreadable checkpoint %s (%s); starting from step 0", path, err)
        return None
    if not isinstance(ckpt, dict) or ckpt.get("fingerprint") != expected_fingerprint:
        log.warning("checkpoint %s is from a different configuration; starting from step 0", path)
        return None
    return ckpt


def train(params: Params, variant: str, data_dir: Path, out_dir: Path, tracker=None) -> dict | None:
    """Train `variant`; write model.pt, train.json and curve.csv to `out_dir`; return the summary.
    In a data-parallel run (distributed.process_group) only rank 0 writes and returns it; the others return None."""
    cfg = params.train_for(variant)
    device = distributed.local_device(resolve_device(cfg.device))
    rank, world = distributed.rank(), distributed.world_size()
    shard = distributed.shard(cfg.grad_accum, cfg.batch_size, rank, world)  # this rank's (micro-batch, rows) of each step
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_json(Path(data_dir) / MANIFEST)
    train_data, val_data = load_split(data_dir, "train"), load_split(data_dir, "val")
    model_cfg = params.model_for(variant)
    T = model_cfg.seq_len
    if len(train_data) <= T:
        raise ValueError(f"the train split has {len(train_data):,} bytes, too few for one window of model.seq_len = {T} "
                         "(and its next byte): raise data.max_bytes or lower model.seq_len")
    steps = total_steps(cfg, T)
    val_tokens = cfg.eval_batches * cfg.batch_size * T

    torch.manual_seed(cfg.seed)  # the same on every rank
    model = ByteLM(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    key = fingerprint(params, variant, manifest)
    ckpt_path = out_dir / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path, key, device)
    # rates: tokens/s of each logging window, except the first of each process (compilation, warm-up), kept in
    # first_rates and used only where a run had no other window.
    start, curve, elapsed, rates, first_rates = 0, [], 0.0, [], []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, curve, elapsed, rates = ckpt["step"], ckpt["curve"], ckpt["elapsed_s"], ckpt["rates"]
        first_rates = ckpt.get("first_rates", [])  # absent from checkpoints of earlier versions, which kept every rate in `rates`
        log.info("resuming %s from step %d/%d (%s)", variant, start, steps, ckpt_path)
    ddp = distributed.wrap(model, device)  # DDP over the processes (after resuming: every rank holds the same state)
    model.train()
    forward, compiled, compile_seconds = ddp, False, 0.0
    if cfg.compile:  # probed on the first step's first micro-batch
        compile_start = time.perf_counter()
        model.set_progress(start / steps)
        micro, rows = shard[0]
        probe = [t[rows] for t in get_batch(train_data, T, cfg.batch_size, cfg.seed, start, micro, device)]
        forward, compiled = compiled_or_eager(ddp, model, probe)
        if distributed.max_over_ranks_(torch.tensor(int(not compiled), device=device)).item():
            forward, compiled = ddp, False  # where one process could not compile, every process trains eagerly, alike
        compile_seconds = time.perf_counter() - compile_start

    n_params = model.num_params()
    resolved_options = model.attention_layers[0].resolved_options  # "auto" as T = model.seq_len resolves it
    peak = peak_flops(device)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * T  # the global batch, over all processes
    log.info("train %s: %d steps x %d tokens, %.2fM non-embedding params, %s%s", variant, steps, tokens_per_step, n_params / 1e6, device,
             f" x {world} processes" if world > 1 else "")
    if tracker is not None:  # every run, a resumed one too: each is its own MLflow run
        # world_size: the processes that ran, which a hand-started torchrun decides whatever train.nproc says
        tracker.log_params(params.logged(variant, "train") | {"params_non_embedding": n_params, "world_size": world,
                                                               "resolved_options": resolved_options})
        tracker.set_tags({"resumed_from_step": str(start), "compiled": str(compiled)})

    bad_step = torch.tensor(-1, device=device)  # first step with a non-finite loss or gradient, found without a host sync
    loss_sum = torch.zeros((), device=device)
    grad_norm_max = torch.zeros((), device=device)  # the window's largest gradient norm before clipping: where a divergence shows first
    # Compilation is timed in the first window, as when it ran inside the loop; the MLflow calls above are not.
    window_start, window_steps, first_window = time.perf_counter() - compile_seconds, 0, True
    for step in range(start, steps):
        lr = lr_at(step, steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.set_progress(step / steps)
        for i, (micro, rows) in enumerate(shard):
            x, y = get_batch(train_data, T, cfg.batch_size, cfg.seed, step, micro, device)
            x, y = x[rows], y[rows]
            seed_noise(cfg.seed, step, micro, rows.start or 0)
            with distributed.sync_gradients(ddp, sync=i == len(shard) - 1):  # DDP averages the ranks' gradients once per step
                with autocast(device):
                    _, loss = forward(x, y)
                (model.with_aux_loss(loss) / len(shard)).backward()
            loss_sum += loss.detach() / len(shard)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        grad_norm_max = torch.maximum(grad_norm_max, grad_norm)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        # `step` as a Python scalar: a tensor made from it on the GPU is a copy that waits for the queue (a host sync).
        bad_step = torch.where((bad_step < 0) & ~finite, step, bad_step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_steps += 1

        done = step + 1
        at_eval = done % cfg.eval_every == 0 or done == steps
        at_ckpt = done % cfg.checkpoint_every == 0 or done == steps
        if done % cfg.log_every == 0 or at_eval or at_ckpt:
            distributed.mean_over_ranks_(loss_sum)  # the global batch's loss, from every rank's share
            if distributed.max_over_ranks_(bad_step).item() >= 0:
                raise TrainingDiverged(
                    f"non-finite loss or gradient at step {bad_step.item()} of {variant}; "
                    f"the last good checkpoint ({ckpt_path}, if any) is kept; lower train.lr or check the data"
                )
            seconds = time.perf_counter() - window_start
            elapsed += seconds
            train_loss = loss_sum.item() / window_steps
            tokens_per_s = window_steps * tokens_per_step / seconds
            (first_rates if first_window else rates).append(tokens_per_s)
            first_window = False
            if rank == 0:  # the one writer; the other ranks wait at the barrier below
                largest_grad_norm = grad_norm_max.item()
                log.info("step %d/%d  loss %.4f  grad norm max %.3g  lr %.2e  %.0f tok/s", done, steps, train_loss, largest_grad_norm, lr, tokens_per_s)
                # Not `tokens_per_s`: MLflow shows a key's value at its highest step, which would hide the run's median.
                metrics = {"train_loss": train_loss, "grad_norm_max": largest_grad_norm, "lr": lr, "tokens_per_s_window": tokens_per_s}
                if at_eval:
                    # The last training micro-batch's routing, read before the val pass routes anew (without noise).
                    metrics.update({f"attn.{k}": v.item() for k, v in model.attention_stats().items()})
                    val = bits_per_byte(model, val_data, cfg.batch_size, val_tokens)
                    metrics["val_bpb"] = val["bpb"]
                    metrics.update({f"val_attn.{k}": v for k, v in val["attention"].items()})
                    curve.append({"step": done, "tokens": done * tokens_per_step, "lr": lr, "train_loss": train_loss,
                                  "val_bpb": metrics["val_bpb"], "tokens_per_s": tokens_per_s, "elapsed_s": elapsed})
                    log.info("step %d/%d  val %.4f bpb", done, steps, metrics["val_bpb"])
                if tracker is not None:
                    tracker.log_metrics(metrics, step=done)
                if at_ckpt:
                    state = {"fingerprint": key, "curve": curve, "elapsed_s": elapsed, "rates": rates, "first_rates": first_rates}
                    save_checkpoint(ckpt_path, model, optimizer, done, state)
                    if done < steps:  # the step a stopped run resumes from (the last one's is removed at the end)
                        log.info("step %d/%d  checkpoint -> %s", done, steps, ckpt_path)
            distributed.barrier()
            loss_sum.zero_()
            grad_norm_max.zero_()
            window_start, window_steps = time.perf_counter(), 0

    if rank != 0:
        return None
    steady_tokens_per_s = float(np.median(rates or first_rates))
    summary = {
        "variant": variant,
        "seed": cfg.seed,
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "train_loss_final": curve[-1]["train_loss"],
        "val_bpb_final": curve[-1]["val_bpb"],
        "tokens_per_s": steady_tokens_per_s,
        "tokens_per_s_overall": steps * tokens_per_step / elapsed,  # warm-up windows included
        "mfu": None if peak is None else model.flops_per_token() * steady_tokens_per_s / (peak * world),
        "train_seconds": elapsed,  # in training steps: validation passes and checkpoints not counted
        "params_non_embedding": n_params,
        "resolved_options": resolved_options,
        "device": device.type if world == 1 else f"{device.type} x{world}",
        "nproc": world,
        "compiled": compiled,  # False where train.compile is off, or torch.compile failed and training fell back to eager
        "cpu_threads": torch.get_num_threads(),  # per process: CPU timings depend on it
    }
    save_model(model, out_dir / "model.pt")
    with atomic_path(out_dir / "curve.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        writer.writeheader()
        writer.writerows(curve)
    write_json(out_dir / "train.json", summary)
    # Finished: the next run of this stage (new code, say) must train afresh, not "resume" at the end.
    ckpt_path.unlink(missing_ok=True)
    return summary


def main(params: Params, variant: str, data_dir: Path, out_dir: Path, argv: list[str] | None = None) -> dict | None:
    """The train stage, on the GPU(s) of free slots (gpu_slots). With train.nproc > 1 outside torchrun it
    runs this same command (`argv`, default sys.argv[1:]) as nproc torchrun workers and waits for them."""
    nproc = params.train.nproc
    gpus = params.train.gpus(nproc)  # GPU slots: one per process
    use_cpu_threads(params.train.threads)
    if distributed.needs_launch(nproc):
        from .tracking import check_server, tracking_uri

        check_server(tracking_uri(params))  # here, in one line, rather than in every worker after they start
        with gpu_slots(gpus):  # held here for all the workers, which inherit CUDA_VISIBLE_DEVICES
            distributed.launch(nproc, sys.argv[1:] if argv is None else argv, job_cpu_threads(params.train.threads))
        return read_json(Path(out_dir) / "train.json")

    with gpu_slots(gpus), distributed.process_group(resolve_device(params.train.device)):
        if distributed.rank() != 0:
            return train(params, variant, data_dir, out_dir)
        from .tracking import stage_run

        with stage_run(params, "train", variant) as tracker:
            summary = train(params, variant, data_dir, out_dir, tracker)
            tracker.log_metrics({k: summary[k] for k in ("val_bpb_final", "tokens_per_s", "train_seconds")})
            tracker.log_artifact(out_dir / "train.json")
            tracker.log_artifact(out_dir / "curve.csv")
            if (out_dir / "sources.json").exists():  # the pipeline's sources stage: the code this run trained with
                tracker.log_artifact(out_dir / "sources.json")
            tracker.set_tags({"model_path": str((out_dir / "model.pt").resolve())})
    log.info(
        "train %s: %d steps, %.2fM tokens, val %.4f bpb, %.0f tok/s, %.1fs",
        variant, summary["steps"], summary["tokens"] / 1e6, summary["val_bpb_final"], summary["tokens_per_s"], summary["train_seconds"],
    )
    return summary
