"""Tiny configurations and data for stage tests: seconds on a CPU, nothing read from ../shared."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import yaml

from attnbench.config import Params, parse_params

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "run": {"name": "tiny"},
    "data": {"source": "local", "path": "corpus.txt"},
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32},
    "train": {"steps": 12, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 4, "eval_batches": 2,
              "checkpoint_every": 4, "log_every": 2},
    "evaluate": {"max_tokens": 2048, "batch_size": 8},
    "profile": {"seq_lens": [16, 32], "tokens_per_step": 128, "warmup": 0, "repeats": 1},
    "variants": {"mha": {}, "la": {}},
}


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge `overrides` into a copy of `base` (a None value deletes the key)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def english_like(n: int, seed: int = 0) -> bytes:
    """n bytes of word-like text with a skewed byte distribution (so an LM can beat uniform)."""
    rng = np.random.default_rng(seed)
    words = [b"the", b"cat", b"sat", b"on", b"a", b"mat", b"and", b"dog", b"ran", b"to", b"its", b"home"]
    out = bytearray()
    while len(out) < n:
        out += words[rng.integers(len(words))] + (b". " if rng.random() < 0.1 else b" ")
    return bytes(out[:n])


def write_params(folder: Path, overrides: dict | None = None, name: str = "params.yaml") -> tuple[Path, Params]:
    """A tiny params file in `folder` (with its corpus beside it); returns its path and the parsed params."""
    raw = merge(TINY, overrides or {})
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    if not corpus.exists():
        corpus.write_bytes(english_like(60_000))
    params = parse_params(raw)
    path = folder / name
    # Every key written out, defaults included, as in the shipped params.yaml (DVC reads params keys from the file).
    path.write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    return path, params
