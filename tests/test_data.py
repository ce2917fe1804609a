"""fetch / prepare / load_split against data the tests make themselves.

The enwik8 source is exercised end to end against a real HTTP server on
127.0.0.1 (a thread in this process) that serves zip archives built here, with
Range support and failure modes: a truncated first transfer (so the resume path
runs), a server that ignores Range, and 404. Never reads ../shared.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from attnbench import data
from attnbench.config import DataConfig, SplitFractions
from attnbench.data import DataError, fetch, prepare, safe_extract_member, split_sizes
from attnbench.splits import load_split
from attnbench.files import file_digest, read_json

MEMBER_BYTES = np.random.default_rng(0).integers(0, 256, 6000, dtype=np.uint8).tobytes()  # incompressible: ratio ~1
MEMBER_MD5 = hashlib.md5(MEMBER_BYTES).hexdigest()
WRONG_MD5 = "0" * 32


# ---------------------------------------------------------------- helpers


def make_zip(members: list[tuple[str | zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, payload in members:
            zf.writestr(name, payload)
    return buf.getvalue()


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16  # S_IFLNK | 0777
    return info


GOOD_ZIP = make_zip([("enwik8", MEMBER_BYTES)])


def corrupt_deflate_zip() -> bytes:
    """A zip whose member's deflate stream is damaged right after its header (zlib fails, not just the CRC)."""
    text = b"".join(b"line %d of some text\n" % i for i in range(400))
    raw = bytearray(make_zip([("enwik8", text)]))
    start = 30 + len(b"enwik8")  # local file header, then the name, then (no extra field) the data
    for i in range(start + 3, start + 9):
        raw[i] ^= 0x55
    return bytes(raw)


def leftovers(root: Path) -> list[str]:
    """Temporary or partial files anywhere under `root` (atomic_path's .tmp, download's .part)."""
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.join(folder, n) for n in names if n.endswith(".tmp") or n.endswith(".part")]
    return found


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


class Server:
    """What the handler serves (`files`: url path -> bytes, `modes`: url path -> mode) and what it saw."""

    def __init__(self, httpd: ThreadingHTTPServer):
        self.httpd = httpd
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.if_ranges: list[str | None] = []  # the If-Range header of each request
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def serve(self, path: str, body: bytes, mode: str = "normal") -> str:
        """Modes: normal (honours Range), truncate-once (first response stops half way), ignore-range, the
        combination truncate-once+ignore-range, busy-once (the first request gets 429), and range-from-zero (a range
        request is answered 206 from byte 0)."""
        self.files[path], self.modes[path] = body, mode
        return self.url(path)

    def hits(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]


class Handler(BaseHTTPRequestHandler):
    server_version = "attnbench-test/1"
    protocol_version = "HTTP/1.0"  # one request per connection; closing it ends the body

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        state: Server = self.server.state
        rng = self.headers.get("Range")
        with state.lock:
            state.requests.append((self.path, rng))
            state.if_ranges.append(self.headers.get("If-Range"))
            attempt = len(state.hits(self.path))
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404, "no such file")
            return
        mode = state.modes[self.path]
        etag = f'"{hashlib.md5(body).hexdigest()[:16]}"'
        if self.headers.get("If-Range", etag) != etag:  # the client's part is of another file: send the whole one
            rng = None
        if "busy-once" in mode and attempt == 1:
            self.send_error(429, "too many requests")
            return
        start = 0
        if rng and "ignore-range" not in mode:
            start = 0 if "range-from-zero" in mode else int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("ETag", etag)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(payload)))  # what a whole response would carry
        self.end_headers()
        if "truncate-once" in mode and attempt == 1:
            self.wfile.write(payload[: len(payload) // 2 + 123])  # then hang up: fewer bytes than announced
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state = Server(httpd)
    httpd.state = state
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def fast_and_direct(monkeypatch):
    """No proxy between requests and 127.0.0.1, no real sleeping between retries, small read chunks
    (so a truncated transfer leaves a partial file to resume from)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    sleeps: list[float] = []
    monkeypatch.setattr(data.time, "sleep", sleeps.append)
    monkeypatch.setattr(data, "CHUNK", 1024)
    return sleeps


def enwik8_cfg(url: str, md5: str | None = MEMBER_MD5, **kw) -> DataConfig:
    return DataConfig(source="enwik8", url=url, md5=md5, **kw)


# ---------------------------------------------------------------- enwik8 over HTTP


def test_good_archive_gives_exactly_the_member(server, tmp_path):
    url = server.serve("/enwik8.zip", GOOD_ZIP)
    corpus = tmp_path / "data" / "corpus.bin"
    summary = fetch(enwik8_cfg(url), corpus, tmp_path / "data" / "download")
    assert corpus.read_bytes() == MEMBER_BYTES
    assert summary == {"source": "enwik8", "origin": url, "bytes": len(MEMBER_BYTES), "md5": MEMBER_MD5}
    assert server.hits("/enwik8.zip") == [None]
    assert leftovers(tmp_path) == []


def test_existing_archive_is_not_downloaded_again(server, tmp_path):
    url = server.serve("/enwik8.zip", GOOD_ZIP)
    fetch(enwik8_cfg(url), tmp_path / "a.bin", tmp_path / "dl")
    fetch(enwik8_cfg(url), tmp_path / "b.bin", tmp_path / "dl")
    assert len(server.hits("/enwik8.zip")) == 1
    assert (tmp_path / "b.bin").read_bytes() == MEMBER_BYTES


def test_checksum_mismatch_keeps_nothing_and_a_rerun_downloads_again(server, tmp_path):
    url = server.serve("/enwik8.zip", GOOD_ZIP)
    corpus, dl = tmp_path / "data" / "corpus.bin", tmp_path / "data" / "download"
    with pytest.raises(DataError, match="checksum mismatch") as err:
        fetch(enwik8_cfg(url, md5=WRONG_MD5), corpus, dl)
    assert MEMBER_MD5 in str(err.value) and WRONG_MD5 in str(err.value)
    assert "removed" in str(err.value)
    assert not corpus.exists()
    assert files_under(dl) == []  # the bad download is gone: the next run must fetch it again
    assert leftovers(tmp_path) == []

    fetch(enwik8_cfg(url), corpus, dl)
    assert len(server.hits("/enwik8.zip")) == 2
    assert corpus.read_bytes() == MEMBER_BYTES
    assert leftovers(tmp_path) == []


def test_truncated_transfer_resumes_with_range(server, tmp_path, fast_and_direct):
    url = server.serve("/enwik8.zip", GOOD_ZIP, mode="truncate-once")
    corpus = tmp_path / "corpus.bin"
    fetch(enwik8_cfg(url), corpus, tmp_path / "dl")
    hits = server.hits("/enwik8.zip")
    assert len(hits) == 2
    assert hits[0] is None
    assert hits[1] is not None and hits[1].startswith("bytes=")
    offset = int(hits[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset < len(GOOD_ZIP)  # resumed from the partial file, not from zero
    assert corpus.read_bytes() == MEMBER_BYTES
    assert (tmp_path / "dl" / "enwik8.zip").read_bytes() == GOOD_ZIP
    assert len(fast_and_direct) == 1  # one back-off between the two attempts
    assert leftovers(tmp_path) == []


def test_a_resume_names_the_file_it_began_with(server, tmp_path):
    url = server.serve("/enwik8.zip", GOOD_ZIP, mode="truncate-once")
    fetch(enwik8_cfg(url), tmp_path / "corpus.bin", tmp_path / "dl")
    first, resumed = server.if_ranges
    assert first is None and resumed == f'"{hashlib.md5(GOOD_ZIP).hexdigest()[:16]}"'  # the ETag of the first answer
    assert leftovers(tmp_path) == []


def test_a_part_of_a_file_the_server_has_since_changed_is_not_resumed(server, tmp_path):
    """The part file and its validator are from an older archive; If-Range gets the whole new one, not its tail."""
    new_zip = make_zip([("enwik8", MEMBER_BYTES[::-1])])
    url = server.serve("/enwik8.zip", new_zip)
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "enwik8.zip.part").write_bytes(GOOD_ZIP[:1000])
    (dl / "enwik8.zip.validator.part").write_text('"an-older-etag"')
    fetch(enwik8_cfg(url, md5=hashlib.md5(MEMBER_BYTES[::-1]).hexdigest()), tmp_path / "corpus.bin", dl)
    assert server.hits("/enwik8.zip") == ["bytes=1000-"] and server.if_ranges == ['"an-older-etag"']
    assert (dl / "enwik8.zip").read_bytes() == new_zip
    assert leftovers(tmp_path) == []


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    url = server.serve("/enwik8.zip", GOOD_ZIP, mode="truncate-once+ignore-range")
    corpus = tmp_path / "corpus.bin"
    fetch(enwik8_cfg(url), corpus, tmp_path / "dl")
    hits = server.hits("/enwik8.zip")
    assert len(hits) == 2 and hits[1] is not None  # it asked for a range, got the whole file (200)
    assert (tmp_path / "dl" / "enwik8.zip").read_bytes() == GOOD_ZIP  # not partial + whole appended
    assert corpus.read_bytes() == MEMBER_BYTES
    assert leftovers(tmp_path) == []


def test_download_resumes_from_a_partial_file_left_by_an_earlier_run(server, tmp_path):
    url = server.serve("/enwik8.zip", GOOD_ZIP)
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "enwik8.zip.part").write_bytes(GOOD_ZIP[:1000])
    fetch(enwik8_cfg(url), tmp_path / "corpus.bin", dl)
    assert server.hits("/enwik8.zip") == ["bytes=1000-"]
    assert (tmp_path / "corpus.bin").read_bytes() == MEMBER_BYTES
    assert leftovers(tmp_path) == []


def test_a_part_file_longer_than_the_servers_file_is_dropped_and_the_download_restarts(server, tmp_path):
    """The server answers the range with 416 and its size: not the part file's, so the part is not the file."""
    url = server.serve("/enwik8.zip", GOOD_ZIP)
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "enwik8.zip.part").write_bytes(GOOD_ZIP + b"bytes of another file")
    fetch(enwik8_cfg(url), tmp_path / "corpus.bin", dl)
    assert server.hits("/enwik8.zip") == [f"bytes={len(GOOD_ZIP) + 21}-", None]
    assert (dl / "enwik8.zip").read_bytes() == GOOD_ZIP
    assert leftovers(tmp_path) == []


def test_a_range_answered_from_another_byte_restarts_cleanly(server, tmp_path):
    url = server.serve("/enwik8.zip", GOOD_ZIP, mode="range-from-zero")
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "enwik8.zip.part").write_bytes(GOOD_ZIP[:1000])
    fetch(enwik8_cfg(url), tmp_path / "corpus.bin", dl)
    assert server.hits("/enwik8.zip") == ["bytes=1000-", None]
    assert (dl / "enwik8.zip").read_bytes() == GOOD_ZIP  # not the first 1000 bytes twice
    assert leftovers(tmp_path) == []


def test_too_many_requests_is_retried(server, tmp_path, fast_and_direct):
    url = server.serve("/enwik8.zip", GOOD_ZIP, mode="busy-once")
    fetch(enwik8_cfg(url), tmp_path / "corpus.bin", tmp_path / "dl")
    assert server.hits("/enwik8.zip") == [None, None] and fast_and_direct == [1.0]
    assert (tmp_path / "corpus.bin").read_bytes() == MEMBER_BYTES


def test_404_fails_at_once_with_a_clear_error(server, tmp_path, fast_and_direct):
    url = server.url("/missing/enwik8.zip")
    corpus = tmp_path / "corpus.bin"
    started = time.monotonic()
    with pytest.raises(DataError, match="404") as err:
        fetch(enwik8_cfg(url), corpus, tmp_path / "dl")
    assert time.monotonic() - started < 5
    assert url in str(err.value)
    assert len(server.hits("/missing/enwik8.zip")) == 1  # a client error is not retried
    assert fast_and_direct == []
    assert not corpus.exists()
    assert leftovers(tmp_path) == []


def test_persistent_failure_gives_up_after_the_retries(tmp_path, fast_and_direct):
    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as dead:  # bind a port, then free it: connection refused
        port = dead.server_address[1]
    with pytest.raises(DataError, match="after 3 attempts"):
        data.download(f"http://127.0.0.1:{port}/enwik8.zip", tmp_path / "enwik8.zip", retries=3, timeout=2)
    assert fast_and_direct == [1.0, 2.0]  # backed off between attempts, not after the last
    assert not (tmp_path / "enwik8.zip").exists()


def patched_zip(offsets: dict[str, tuple[int, int]]) -> bytes:
    """GOOD_ZIP with 2-byte fields overwritten: {field: (offset in the local header, value)}; the central directory's
    copy of each field sits 2 bytes further on."""
    body = bytearray(GOOD_ZIP)
    local, central = body.index(b"PK\x03\x04"), body.index(b"PK\x01\x02")
    for offset, value in offsets.values():
        body[local + offset : local + offset + 2] = value.to_bytes(2, "little")
        body[central + offset + 2 : central + offset + 4] = value.to_bytes(2, "little")
    return bytes(body)


BAD_ARCHIVES = {
    "zip-slip": (make_zip([("enwik8", MEMBER_BYTES), ("../evil", b"pwned")]), "escapes the target"),
    "absolute": (make_zip([("/tmp/attnbench-evil", b"pwned"), ("enwik8", MEMBER_BYTES)]), "escapes the target"),
    "backslash": (make_zip([("..\\evil", b"pwned"), ("enwik8", MEMBER_BYTES)]), "escapes the target"),
    "symlink": (make_zip([(symlink_info("enwik8"), b"/etc/passwd")]), "symlink"),
    "no-member": (make_zip([("enwik9", MEMBER_BYTES)]), "no member 'enwik8'"),
    "zip-bomb": (make_zip([("enwik8", bytes(10_000_000))]), "zip bomb"),
    "not-a-zip": (b"<html>this is an error page, not an archive</html>" * 20, "not a zip archive"),
    "bad-crc": (GOOD_ZIP[:200] + bytes(200) + GOOD_ZIP[400:], "corrupt.*CRC"),
    "bad-deflate": (corrupt_deflate_zip(), "corrupt"),
    "encrypted": (patched_zip({"flags": (6, 1)}), "cannot be read.*encrypted"),
    "unknown-compression": (patched_zip({"method": (8, 99)}), "cannot be read.*compression method"),
}


@pytest.mark.parametrize("kind", list(BAD_ARCHIVES))
def test_bad_archives_are_refused_and_nothing_is_written(server, tmp_path, kind):
    body, problem = BAD_ARCHIVES[kind]
    url = server.serve("/enwik8.zip", body)
    out = tmp_path / "out"
    corpus, dl = out / "data" / "corpus.bin", out / "data" / "download"
    with pytest.raises(DataError, match=problem) as err:
        fetch(enwik8_cfg(url, md5=None), corpus, dl)
    assert "\n" not in str(err.value)
    assert files_under(out) == []  # no corpus, no archive kept, no temporary file, no escaped member
    assert not (tmp_path / "evil").exists() and not Path("/tmp/attnbench-evil").exists()
    assert leftovers(tmp_path) == []


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(BAD_ARCHIVES["zip-bomb"][0])
    with pytest.raises(DataError, match=r"max_archive_ratio = 20.*zip bomb"):
        safe_extract_member(archive, "enwik8", tmp_path / "out" / "corpus.bin", max_ratio=20)
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []


def test_a_compressed_size_the_archive_cannot_hold_buys_no_larger_budget(tmp_path):
    """A central directory that declares 1 MB compressed for a 4 MB member (ratio 4, under the limit) in an archive
    of a few KB: the budget is the archive's size, so the member is refused (it was extracted whole)."""
    body = bytearray(make_zip([("enwik8", bytes(4_000_000))]))
    central = body.index(b"PK\x01\x02")
    body[central + 20 : central + 24] = (1_000_000).to_bytes(4, "little")  # the declared compressed size
    archive = tmp_path / "liar.zip"
    archive.write_bytes(bytes(body))
    assert zipfile.ZipFile(archive).getinfo("enwik8").compress_size == 1_000_000 and len(body) < 10_000
    with pytest.raises(DataError, match="zip bomb"):
        safe_extract_member(archive, "enwik8", tmp_path / "corpus.bin", max_ratio=20)
    assert not (tmp_path / "corpus.bin").exists()


def test_member_within_the_ratio_is_extracted(tmp_path):
    payload = b"abcdefgh" * 2000  # compresses well, but a higher limit lets it through
    archive = tmp_path / "ok.zip"
    archive.write_bytes(make_zip([("enwik8", payload)]))
    md5 = safe_extract_member(archive, "enwik8", tmp_path / "corpus.bin", max_ratio=1000)
    assert (tmp_path / "corpus.bin").read_bytes() == payload
    assert md5 == hashlib.md5(payload).hexdigest()
    with pytest.raises(DataError, match="zip bomb"):
        safe_extract_member(archive, "enwik8", tmp_path / "again.bin", max_ratio=20)
    assert not (tmp_path / "again.bin").exists()


# ---------------------------------------------------------------- local and sample sources


@pytest.mark.parametrize("form", ["plain", "gz", "zip"])
def test_local_source_gives_the_same_bytes(tmp_path, form):
    src = tmp_path / "in"
    src.mkdir()
    text = b"The quick brown fox jumps over the lazy dog.\n" * 200
    if form == "plain":
        path = src / "corpus.txt"
        path.write_bytes(text)
    elif form == "gz":
        path = src / "corpus.txt.gz"
        path.write_bytes(gzip.compress(text))
    else:
        path = src / "corpus.zip"
        path.write_bytes(make_zip([("corpus.txt", text)], compression=zipfile.ZIP_STORED))
    corpus = tmp_path / "out" / "corpus.bin"
    summary = fetch(DataConfig(source="local", path=str(path)), corpus, tmp_path / "out" / "download")
    assert corpus.read_bytes() == text
    assert summary["bytes"] == len(text) and summary["md5"] == hashlib.md5(text).hexdigest()
    assert summary["origin"] == str(path)
    assert leftovers(tmp_path) == []


def test_local_zip_with_symlink_or_slip_is_refused(tmp_path):
    for i, members in enumerate([[(symlink_info("corpus.txt"), b"/etc/passwd")], [("../../evil", b"pwned")]]):
        path = tmp_path / f"bad{i}.zip"
        path.write_bytes(make_zip(members))
        with pytest.raises(DataError, match="symlink|escapes"):
            fetch(DataConfig(source="local", path=str(path)), tmp_path / "out" / "corpus.bin", tmp_path / "dl")
    assert files_under(tmp_path / "out") == []
    assert leftovers(tmp_path) == []


def test_local_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=r"data\.path = .*nope\.txt.*no such file"):
        fetch(DataConfig(source="local", path=str(missing)), tmp_path / "corpus.bin", tmp_path / "dl")
    assert not (tmp_path / "corpus.bin").exists()


def test_check_warns_of_a_missing_local_corpus(tmp_path, monkeypatch, capsys):
    """`check` validates the params; a local source that is not there gets a warning naming it (only fetch needs it,
    and a corpus already fetched needs no source), not Snakemake's MissingInputException alone (a user's check)."""
    from attnbench import cli
    from tests.tiny import write_params

    monkeypatch.chdir(tmp_path)
    path, _ = write_params(tmp_path)
    assert cli.main(["check", "--params", str(path)]) == 0
    assert "no such file" not in capsys.readouterr().err
    (tmp_path / "corpus.txt").unlink()
    assert cli.main(["check", "--params", str(path)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"attnbench check: .*params\.yaml: data\.path = 'corpus\.txt': no such file; the fetch stage reads it", err), err


def test_check_warns_of_a_local_corpus_that_is_a_folder_and_not_of_another_source(tmp_path, monkeypatch, capsys):
    """A folder at data.path is no corpus either; a source other than local (sample, enwik8) reads no data.path, so
    `check` says nothing of it."""
    from attnbench import cli
    from tests.tiny import write_params

    monkeypatch.chdir(tmp_path)
    path, _ = write_params(tmp_path, {"data": {"path": "texts"}})
    (tmp_path / "texts").mkdir()
    assert cli.main(["check", "--params", str(path)]) == 0
    assert "data.path = 'texts': no such file" in capsys.readouterr().err
    path, _ = write_params(tmp_path, {"data": {"source": "sample", "path": None}})
    assert cli.main(["check", "--params", str(path)]) == 0
    assert "no such file" not in capsys.readouterr().err


def test_the_cli_keeps_urllib3s_retry_warnings_off(tmp_path, monkeypatch, capsys):
    """urllib3 warns at each retry of a store that is away ("Retrying ..."); tracking's one warning says it instead."""
    import logging

    from attnbench import cli
    from tests.tiny import write_params

    monkeypatch.chdir(tmp_path)
    path, _ = write_params(tmp_path)
    assert cli.main(["check", "--params", str(path)]) == 0
    logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=1)) after connection broken")
    assert "Retrying" not in capsys.readouterr().err


def test_local_empty_file_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        fetch(DataConfig(source="local", path=str(empty)), tmp_path / "out" / "corpus.bin", tmp_path / "dl")
    assert files_under(tmp_path / "out") == []


def test_sample_source_gives_a_nonempty_corpus(tmp_path):
    corpus = tmp_path / "corpus.bin"
    summary = fetch(DataConfig(source="sample"), corpus, tmp_path / "dl")
    assert summary["bytes"] == corpus.stat().st_size > 100_000
    assert summary["md5"] == file_digest(corpus, "md5")
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- prepare / load_split

FRACTIONS = SplitFractions(train=0.9, val=0.05, test=0.05)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.bin"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 10_007, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize("max_bytes", [10_007, 100_000_000, 5_001, 100])
def test_prepare_splits_and_manifest(corpus, tmp_path, max_bytes):
    out = tmp_path / "prepared"
    manifest = prepare(corpus, out, max_bytes, FRACTIONS)
    used = min(max_bytes, corpus.stat().st_size)
    sizes = split_sizes(used, FRACTIONS)
    assert sizes["train"] == int(used * 0.9) and sizes["val"] == int(used * 0.05)
    assert sum(sizes.values()) == used
    assert manifest["corpus_bytes_used"] == used
    assert read_json(out / "manifest.json") == manifest
    joined = b""
    for name in ("train", "val", "test"):
        path = out / f"{name}.bin"
        entry = manifest["splits"][name]
        assert entry["file"] == path.name
        assert entry["bytes"] == sizes[name] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        loaded = load_split(out, name)
        assert loaded.dtype == np.uint8 and loaded.tobytes() == path.read_bytes()
        joined += path.read_bytes()
    assert joined == corpus.read_bytes()[:max_bytes]
    assert leftovers(tmp_path) == []


def test_split_sizes_exact():
    assert split_sizes(1000, FRACTIONS) == {"train": 900, "val": 50, "test": 50}
    assert split_sizes(10_007, FRACTIONS) == {"train": 9006, "val": 500, "test": 501}
    assert split_sizes(100_000_000, FRACTIONS) == {"train": 90_000_000, "val": 5_000_000, "test": 5_000_000}


def test_too_small_corpus_is_refused(tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 30)  # val would get int(30 * 0.05) = 1 byte
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match="too few"):
        prepare(small, out, 1000, FRACTIONS)
    assert not (out / "manifest.json").exists()
    assert leftovers(tmp_path) == []


def test_load_split_refuses_an_altered_file(corpus, tmp_path):
    out = tmp_path / "prepared"
    prepare(corpus, out, 10_000, FRACTIONS)
    load_split(out, "val")  # fine before
    path = out / "val.bin"
    raw = bytearray(path.read_bytes())
    raw[17] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="manifest checksum"):
        load_split(out, "val")
    load_split(out, "val", verify=False)  # the check is what refuses it
    load_split(out, "train")  # the others are untouched


def test_load_split_refuses_a_truncated_file_and_a_missing_manifest(corpus, tmp_path):
    out = tmp_path / "prepared"
    prepare(corpus, out, 10_000, FRACTIONS)
    path = out / "test.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match="manifest checksum"):
        load_split(out, "test")
    with pytest.raises(DataError, match="no manifest.json; run the prepare stage"):
        load_split(tmp_path / "nowhere", "train")


def test_load_split_refuses_a_deleted_split_file_as_data_error(corpus, tmp_path):
    """A split file gone after prepare (manifest still there) is the one-line DataError, not a FileNotFoundError traceback."""
    out = tmp_path / "prepared"
    prepare(corpus, out, 10_000, FRACTIONS)
    (out / "val.bin").unlink()
    with pytest.raises(DataError, match=r"val\.bin is missing, though manifest\.json lists it; re-run prepare"):
        load_split(out, "val")


def test_a_loaded_split_is_read_only(corpus, tmp_path):
    """The memory map cannot write back: no stage can alter the bytes the manifest vouches for."""
    out = tmp_path / "prepared"
    prepare(corpus, out, 10_000, FRACTIONS)
    split = load_split(out, "train")
    assert not split.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        split[0] = 1


def test_file_digest_hashes_a_file_longer_than_one_chunk_whole(tmp_path):
    """A split larger than one read (1 MiB by default) is vouched for by the digest of all its bytes, not the first chunk's."""
    raw = bytes(range(256)) * 5
    path = tmp_path / "x.bin"
    path.write_bytes(raw)
    assert file_digest(path, chunk=100) == hashlib.sha256(raw).hexdigest()
    assert file_digest(path, "md5", chunk=7) == hashlib.md5(raw).hexdigest()
