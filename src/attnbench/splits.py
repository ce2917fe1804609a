"""The prepared splits on disk: train/val/test .bin files of bytes and the manifest that vouches for them.

data.prepare writes them; train, evaluate and report read them through this module alone, so that none of them
depends on the download and archive code in data.py (each stage depends on the modules it imports, sources.py):
under DVC an edit there re-runs fetch and prepare only; Snakemake re-runs whatever follows a stage that ran.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import file_digest, read_json

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"  # written last by prepare: its presence means the split is complete


class DataError(RuntimeError):
    """Bad or unverifiable data; the message says what and where."""


def load_split(data_dir: Path, name: str, verify: bool = True) -> np.ndarray:
    """Memory-map split `name`; with `verify`, refuse it unless its size and sha256 match the manifest."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / MANIFEST
    if not manifest_path.exists():
        raise DataError(f"{data_dir}: no {MANIFEST}; run the prepare stage first")
    entry = read_json(manifest_path)["splits"][name]
    path = data_dir / entry["file"]
    if not path.exists():
        raise DataError(f"{path} is missing, though {MANIFEST} lists it; re-run prepare")
    if verify:
        if path.stat().st_size != entry["bytes"] or file_digest(path) != entry["sha256"]:
            raise DataError(f"{path} does not match its manifest checksum (altered or truncated); re-run prepare")
    return np.memmap(path, dtype=np.uint8, mode="r")

