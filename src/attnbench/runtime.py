"""Device choice, host-to-device batches, precision (bf16 autocast on CUDA, plain fp32 on CPU), CPU threads and peak FLOP/s."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def job_cpu_threads(setting: int | str) -> int:
    """The CPU threads of one stage job (train.threads): the setting, or for auto every core the job may use: the
    orchestrator's grant in OMP_NUM_THREADS (Snakemake sets it to the job's threads), else this process's affinity."""
    if setting != "auto":
        return int(setting)
    granted = os.environ.get("OMP_NUM_THREADS", "")
    return int(granted) if granted.isdigit() and int(granted) > 0 else len(os.sched_getaffinity(0))


def use_cpu_threads(setting: int | str) -> int:
    """Give torch this process's share of the job's CPU threads (torchrun's LOCAL_WORLD_SIZE processes split them),
    so that a stage computes with the same threads under either front end; return the share."""
    share = max(1, job_cpu_threads(setting) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(share)
    return share


def byte_windows(data: np.ndarray, starts: np.ndarray, length: int, device: torch.device) -> torch.Tensor:
    """The windows data[s : s + length] for s in `starts`, (len(starts), length) int64 on `device`: gathered by one
    numpy index, sent as the bytes they are (a uint8 copy, an eighth of int64's) and widened on the device. To CUDA
    through pinned memory, a copy that does not wait for the device's queue (from pageable memory it would, a host
    sync per batch)."""
    rows = torch.from_numpy(data[np.asarray(starts)[:, None] + np.arange(length)])
    rows = rows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else rows.to(device)
    return rows.long()


def one_line(message: str, keep: int = 100) -> str:
    """A message on one line, its start and its end where it is long: a compile error wrapped by Inductor names
    its cause in the last line of the inner traceback."""
    words = " ".join(message.split())
    return words if len(words) <= 2 * keep + 5 else f"{words[:keep]} ... {words[-keep:]}"


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Dense bf16 tensor-core peak by device name (datasheet), for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# Memory bandwidth peak in bytes/s by device name (datasheet; the first match counts, so the PCIe and NVL H100s come
# before the SXM one, and an A100 takes its fastest model's: a peak too high only makes the benchmark's limit lower).
PEAK_MEMORY_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.039e12}


def device_peak(device: torch.device, peaks: dict[str, float]) -> float | None:
    """The first of `peaks` whose key is in the device's name, or None (CPUs, devices not listed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in peaks.items() if k in name), None)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (CPUs)."""
    return device_peak(device, PEAK_BF16_FLOPS)


def peak_bandwidth(device: torch.device) -> float | None:
    """The device's memory bandwidth peak in bytes/s, or None where unknown (CPUs)."""
    return device_peak(device, PEAK_MEMORY_BANDWIDTH)
