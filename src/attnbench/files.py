"""Atomic output files: a stage's outputs are complete or absent, never half-written."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no process could have that id)
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of `path` (`.name.<pid>.tmp`) whose writer is no longer running.

    A writer killed outright (kill -9, OOM killer, power loss) cannot run its cleanup, so the next
    write of the same path removes what it left. A live writer's file (another process writing the
    same path right now) is kept. Pids are those of this host: a folder shared with another host could
    lose a live writer's file there, which only matters if both write the same output at once.
    """
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return
    for entry in entries:
        pid = entry.name.removeprefix(prefix).removesuffix(".tmp")
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and pid.isascii() and pid.isdigit():
            if int(pid) != os.getpid() and not _running(int(pid)):
                Path(entry.path).unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it into place, on error delete it.

    Temporary files of `path` left by writers that died without cleaning up are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
