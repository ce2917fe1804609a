"""fetch (download, verify, extract) and prepare (split into uint8 arrays plus a manifest).

Sources: `enwik8` (the official zip, md5 of the extracted file checked against
the published value), `local` (a text, .gz or .zip file), `sample` (a 1 MB
slice of GCIDE shipped with the package). Nothing final is written unless it is
complete and verified; an interrupted download resumes from its partial file.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import stat
import time
import zipfile
import zlib
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np
import requests
from tqdm import tqdm

from .config import DataConfig, SplitFractions
from .files import atomic_path, file_digest, write_json
from .splits import MANIFEST, SPLITS, DataError

log = logging.getLogger(__name__)

CHUNK = 1 << 20


# ---------------------------------------------------------------- download


def download(url: str, dest: Path, retries: int = 5, timeout: float = 30.0, backoff: float = 1.0) -> Path:
    """Download `url` to `dest`, resuming from `dest.part` with an HTTP Range request after an interruption.

    The resume sends the part's validator (the ETag or Last-Modified of the response that began it) as If-Range, so
    a server whose file changed since sends the whole new file instead of the rest of it. A server that ignores
    Range, or answers it from another byte, gets a clean restart; a part file longer than the server's file is
    dropped. Raises DataError after `retries` failed attempts, at once on a client error (4xx) other than a timeout
    (408) or too many requests (429).
    """
    part = dest.with_name(dest.name + ".part")
    validator = dest.with_name(dest.name + ".validator.part")

    def drop_part():
        part.unlink(missing_ok=True)
        validator.unlink(missing_ok=True)

    def complete():
        part.rename(dest)
        validator.unlink(missing_ok=True)
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, retries + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        if have and validator.exists():
            headers["If-Range"] = validator.read_text()
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
                if resp.status_code == 416:  # no byte from `have` on: complete if the server's file is `have` long
                    size = resp.headers.get("Content-Range", "").rpartition("/")[2]
                    if size == str(have):
                        return complete()
                    drop_part()
                    raise DataError(f"the server's file is {size or 'of unknown size'} bytes, the partial download {have}")
                resp.raise_for_status()
                resumed = resp.status_code == 206
                if resumed and not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                    drop_part()
                    raise DataError(f"asked for bytes from {have}, the server sent {resp.headers.get('Content-Range')!r}")
                if have and not resumed:
                    log.info("server sent the whole file for a range request (changed or no ranges); restarting %s", url)
                    have = 0
                remaining = int(resp.headers.get("Content-Length", 0)) or None
                total = have + remaining if remaining is not None else None
                with open(part, "ab" if resumed else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, mininterval=1.0
                ) as bar:
                    if not resumed:  # after the old part is emptied: a new validator never names old bytes
                        write_validator(validator, resp.headers)
                    for block in resp.iter_content(CHUNK):
                        f.write(block)
                        bar.update(len(block))
            got = part.stat().st_size
            if total is not None and got != total:
                raise DataError(f"short transfer: {got} of {total} bytes")
            return complete()
        except (requests.RequestException, DataError) as err:
            if isinstance(err, requests.HTTPError) and err.response is not None and err.response.status_code < 500 \
                    and err.response.status_code not in (408, 429):
                raise DataError(f"download of {url} failed: {err}") from None
            log.warning("download attempt %d/%d of %s failed: %s", attempt, retries, url, err)
            if attempt == retries:
                raise DataError(f"download of {url} failed after {retries} attempts: {err}") from None
            time.sleep(backoff * attempt)
    raise AssertionError("unreachable")


def write_validator(path: Path, headers) -> None:
    """Keep what identifies the server's file for a later If-Range: a strong ETag, else Last-Modified (RFC 9110
    allows no weak ETag there); without either, a resume cannot tell a changed file and only the md5 catches it."""
    etag = headers.get("ETag", "")
    value = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified", "")
    if value:
        path.write_text(value)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- archives


def safe_extract_member(archive: Path, member: str | None, dest: Path, max_ratio: float, expected_md5: str | None = None) -> str:
    """Extract one regular file from a zip to `dest` (atomically); return its md5.

    Refuses: a non-zip file, a missing member, members whose path escapes the
    target (zip-slip: absolute or '..'), symlinks, and compression ratios above
    `max_ratio` (zip bombs) — checked on the declared sizes and again while inflating —
    and, with `expected_md5`, content that does not match it.
    """
    if not zipfile.is_zipfile(archive):
        raise DataError(f"{archive} is not a zip archive")
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
                raise DataError(f"{archive}: member {info.filename!r} escapes the target folder; refused")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DataError(f"{archive}: member {info.filename!r} is a symlink; refused")
        files = [i for i in infos if not i.is_dir()]
        if member is None:
            if len(files) != 1:
                raise DataError(f"{archive}: holds {len(files)} files; name the one to use (data.member)")
            info = files[0]
        else:
            matches = [i for i in files if i.filename == member]
            if not matches:
                raise DataError(f"{archive}: no member {member!r}; it holds {', '.join(i.filename for i in files) or 'nothing'}")
            info = matches[0]
        # The member's compressed size as declared, but never more than the archive holds: a lying central
        # directory cannot buy a larger budget.
        compressed = max(1, min(info.compress_size, archive.stat().st_size))
        if info.file_size > max_ratio * compressed:
            raise DataError(
                f"{archive}: member {info.filename!r} inflates {info.file_size / compressed:.0f}x "
                f"(limit data.max_archive_ratio = {max_ratio:g}); refused as a possible zip bomb"
            )
        try:
            with zf.open(info) as src:
                return stream_to_file(src, dest, expected_md5, max_bytes=int(max_ratio * compressed))
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # damaged data: bad CRC, bad deflate stream, cut short
            raise DataError(f"{archive}: member {info.filename!r} is corrupt ({err}); refused") from None
        except (RuntimeError, NotImplementedError) as err:  # zipfile's words for encrypted and unknown compression
            raise DataError(f"{archive}: member {info.filename!r} cannot be read ({err}); refused") from None


def stream_to_file(src, dest: Path, expected_md5: str | None = None, max_bytes: int | None = None) -> str:
    """Copy a binary stream to `dest` atomically and return its md5; a wrong md5 or too many bytes keep nothing."""
    md5 = hashlib.md5()
    written = 0
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        while block := src.read(CHUNK):
            written += len(block)
            if max_bytes is not None and written > max_bytes:  # the archive's declared size lied
                raise DataError(f"{dest.name}: inflates past {max_bytes} bytes (data.max_archive_ratio); refused")
            md5.update(block)
            out.write(block)
        if expected_md5 and md5.hexdigest() != expected_md5:
            raise DataError(f"checksum mismatch for {dest.name}: md5 {md5.hexdigest()}, expected {expected_md5}; nothing kept")
    return md5.hexdigest()


# ---------------------------------------------------------------- stages


def missing_local_source(cfg: DataConfig) -> str | None:
    """What is wrong with a local source whose file is not there; None where it is, or for another source."""
    if cfg.source == "local" and not Path(cfg.path).is_file():
        return f"data.path = {cfg.path!r}: no such file"
    return None


def fetch(cfg: DataConfig, corpus: Path, download_dir: Path) -> dict:
    """Produce the raw corpus file `corpus` from the configured source; return a summary."""
    corpus = Path(corpus)
    if cfg.source == "enwik8":
        archive = download_dir / Path(cfg.url).name
        if not archive.exists():
            download(cfg.url, archive)
        try:
            md5 = safe_extract_member(archive, cfg.member, corpus, cfg.max_archive_ratio, expected_md5=cfg.md5)
        except (DataError, zipfile.BadZipFile) as err:
            archive.unlink(missing_ok=True)  # a bad archive must not be reused by the next try
            raise DataError(f"{cfg.url}: {err}; the download was removed, re-run to fetch it again") from None
        origin = cfg.url
    elif cfg.source == "local":
        if missing := missing_local_source(cfg):
            raise DataError(missing)
        path = Path(cfg.path)
        if path.suffix == ".zip":
            md5 = safe_extract_member(path, None if cfg.member == "enwik8" else cfg.member, corpus, cfg.max_archive_ratio)
        else:
            with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as src:
                md5 = stream_to_file(src, corpus)
        origin = str(path)
    else:
        sample = resources.files("attnbench") / "sample" / "gcide-sample.txt.gz"
        with resources.as_file(sample) as path, gzip.open(path, "rb") as src:
            md5 = stream_to_file(src, corpus)
        origin = "attnbench sample (GCIDE slice, GPL)"
    size = corpus.stat().st_size
    if size == 0:
        corpus.unlink()
        raise DataError(f"the corpus from {origin} is empty")
    return {"source": cfg.source, "origin": origin, "bytes": size, "md5": md5}


def split_sizes(n: int, fractions: SplitFractions) -> dict[str, int]:
    train = int(n * fractions.train)
    val = int(n * fractions.val)
    return {"train": train, "val": val, "test": n - train - val}


def prepare(corpus: Path, out_dir: Path, max_bytes: int, fractions: SplitFractions, min_split_bytes: int = 2) -> dict:
    """Split the first `max_bytes` of `corpus` into train/val/test .bin files plus manifest.json; return the manifest."""
    data = np.fromfile(corpus, dtype=np.uint8, count=max_bytes)
    sizes = split_sizes(len(data), fractions)
    if min(sizes.values()) < min_split_bytes:
        raise DataError(f"{corpus}: {len(data)} bytes are too few to split into {sizes}")
    out_dir = Path(out_dir)
    # An earlier split's manifest must not outlive the files it describes if this run dies half way.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    manifest = {"corpus": str(corpus), "corpus_bytes_used": int(len(data)), "fractions": fractions.model_dump(), "splits": {}}
    start = 0
    for name in SPLITS:
        part = data[start : start + sizes[name]]
        start += sizes[name]
        path = out_dir / f"{name}.bin"
        with atomic_path(path) as tmp:
            part.tofile(tmp)
        manifest["splits"][name] = {"file": path.name, "bytes": int(len(part)), "sha256": file_digest(path)}
    write_json(out_dir / MANIFEST, manifest)  # written last: its presence means the split is complete
    return manifest
