"""evaluate: bits-per-byte of a trained model on the test split.

The split is cut into consecutive windows of seq_len predicted bytes (each
window's inputs start one byte earlier), so every byte after the first is
scored exactly once; a shorter last window covers the tail. With
`evaluate.max_tokens` an evenly spaced subset of windows is scored instead.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from .config import Params
from .files import write_json
from .model import ByteLM, load_model
from .runtime import autocast, byte_windows, resolve_device, use_cpu_threads
from .splits import load_split

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10


def window_starts(n_bytes: int, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Start offsets of the scored windows over a split of `n_bytes` bytes."""
    starts = np.arange(0, n_bytes - 1, seq_len)
    if max_tokens is not None and len(starts) * seq_len > max_tokens:
        keep = max(1, max_tokens // seq_len)
        starts = starts[np.linspace(0, len(starts) - 1, keep).round().astype(int)]
    return starts


@torch.no_grad()
def bits_per_byte(model: ByteLM, data: np.ndarray, batch_size: int, max_tokens: int | None = None, progress: str | None = None) -> dict:
    """Mean cross-entropy in bits per byte over the windows of `data`; returns bpb, the bytes scored and the
    attention layers' diagnostics (`ByteLM.attention_stats`, e.g. cluster sizes) averaged over the bytes.
    `progress`: the label of a progress line every PROGRESS_EVERY_S seconds (none without it)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq_len = model.cfg.seq_len
    starts = window_starts(len(data), seq_len, max_tokens).tolist()  # python ints: results stay plain floats (checkpoints load weights-only)
    # Sums stay on the device (fp64: millions of bytes), read at a progress line and at the end: no host sync per batch.
    total_nats, total_tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    stat_sums: dict[str, torch.Tensor] = {}
    t0 = last_report = time.perf_counter()
    # Full-length windows batch together; the one short tail window goes alone.
    full = [s for s in starts if s + seq_len + 1 <= len(data)]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in starts if s + seq_len + 1 > len(data)]
    for i, batch in enumerate(batches):
        length = min(seq_len, len(data) - 1 - batch[0])
        window = byte_windows(data, batch, length + 1, device)
        with autocast(device):
            _, loss = model(window[:, :-1], window[:, 1:])
        n = window.shape[0] * length
        total_nats += loss.double() * n
        total_tokens += n
        for key, value in model.attention_stats().items():
            stat_sums[key] = stat_sums.get(key, 0.0) + value.double() * n
        if progress and time.perf_counter() - last_report > PROGRESS_EVERY_S:
            last_report = time.perf_counter()
            log.info("%s: %d/%d batches, %.4f bpb so far", progress, i + 1, len(batches), total_nats.item() / total_tokens / math.log(2))
    model.train(was_training)
    return {
        "bpb": total_nats.item() / max(total_tokens, 1) / math.log(2),
        "tokens": total_tokens,
        "seconds": time.perf_counter() - t0,
        "attention": {key: total.item() / max(total_tokens, 1) for key, total in stat_sums.items()},
    }


def evaluate(params: Params, variant: str, data_dir: Path, model_path: Path) -> dict:
    device = resolve_device(params.train.device)
    model = load_model(model_path, device, expected=params.model_for(variant))
    test = load_split(data_dir, "test")
    batch_size, max_tokens = params.evaluate.batch_size, params.evaluate.max_tokens
    routed = " (argmax routing)" if model.noisy_routing else ""
    result = bits_per_byte(model, test, batch_size, max_tokens, progress=f"evaluate {variant}{routed}")
    metrics = {"variant": variant, "test_bpb": result["bpb"], "test_tokens": result["tokens"], "seconds": result["seconds"], "device": str(device)}
    if model.noisy_routing:  # test_bpb is the spec's argmax routing; also score the model as it trained
        torch.manual_seed(params.train_for(variant).seed)
        with model.sampled_routing():
            sampled = bits_per_byte(model, test, batch_size, max_tokens, progress=f"evaluate {variant} (sampled routing)")
        metrics |= {
            "test_bpb_sampled": sampled["bpb"],
            "routing": {"argmax": result["attention"], "sampled": sampled["attention"]},
            "seconds": result["seconds"] + sampled["seconds"],
        }
    return metrics


def main(params: Params, variant: str, data_dir: Path, out_dir: Path) -> dict:
    from .tracking import stage_run

    use_cpu_threads(params.train.threads)
    with stage_run(params, "evaluate", variant) as tracker:
        # The params file's model, train and variant options too (in the pipeline, those that trained the model):
        # evaluate runs of two configurations are told apart by them.
        tracker.log_params(params.logged(variant, "evaluate", "train"))
        metrics = evaluate(params, variant, data_dir, out_dir / "model.pt")
        write_json(out_dir / "eval.json", metrics)
        routing = {f"routing.{mode}.{k}": v for mode, stats in metrics.get("routing", {}).items() for k, v in stats.items()}
        tracker.log_metrics({k: metrics[k] for k in ("test_bpb", "test_bpb_sampled", "test_tokens") if k in metrics} | routing)
        tracker.log_artifact(out_dir / "eval.json")
    sampled = f" (sampled routing {metrics['test_bpb_sampled']:.4f})" if "test_bpb_sampled" in metrics else ""
    log.info("evaluate %s: test %.4f bpb%s over %d bytes in %.1fs", variant, metrics["test_bpb"], sampled, metrics["test_tokens"], metrics["seconds"])
    return metrics
