"""Downloads against a real HTTP server on 127.0.0.1: checksums, resume, servers that ignore Range,
interruptions, unreachable hosts, and the registry. No test contacts any other address."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from metabench.datasets.base import DatasetError
from metabench.datasets.download import MANUAL, SOURCES, RemoteFile, download, file_digest

LOCAL = "127.0.0.1"


@pytest.fixture(autouse=True)
def local_network_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxies, and any connection to an address other than 127.0.0.1 fails the test."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    real = socket.create_connection

    def guarded(address, *args, **kwargs):  # type: ignore[no-untyped-def]
        assert address[0] == LOCAL, f"test tried to contact {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


@contextmanager
def serve(files: dict[str, bytes], *, honour_range: bool = True, cut_after: int | None = None,
          stall: threading.Event | None = None) -> Iterator[tuple[str, list[tuple[str, str | None, int]]]]:
    """Serve ``files`` (URL path -> bytes) on 127.0.0.1; yield the base URL and the request log.

    The log holds ``(path, Range header or None, body bytes sent)`` per request. ``honour_range=False``
    answers every request with the whole file (200); ``cut_after`` sends only that many body bytes (with the
    full Content-Length) and drops the connection; ``stall`` holds the body until the event is set.
    """
    log: list[tuple[str, str | None, int]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = files.get(self.path)
            requested = self.headers.get("Range")
            if data is None:
                self.send_error(404)
                log.append((self.path, requested, 0))
                return
            start, status = 0, 200
            if requested and honour_range:
                match = re.fullmatch(r"bytes=(\d+)-", requested)
                assert match, requested
                start, status = int(match[1]), 206
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    log.append((self.path, requested, 0))
                    return
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if stall is not None:
                stall.wait(10)
            sent = body if cut_after is None else body[:cut_after]
            self.wfile.write(sent)
            log.append((self.path, requested, len(sent)))

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer((LOCAL, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://{LOCAL}:{server.server_address[1]}", log
    finally:
        if stall is not None:
            stall.set()
        server.shutdown()
        server.server_close()


def payload(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic, non-repeating bytes."""
    out, block = bytearray(), seed.to_bytes(4, "little")
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def toy(base: str, name: str, data: bytes, **kw: object) -> dict[str, list[RemoteFile]]:
    return {"toy": [RemoteFile(f"{base}/{name}", name, sha256=hashlib.sha256(data).hexdigest(), **kw)]}


DATA = payload(200_003)  # odd size: exercises partial chunks


def test_download_places_verified_files(tmp_path: Path) -> None:
    other = payload(1234, seed=1)
    with serve({"/a.bin": DATA, "/b.bin": other}) as (base, log):
        sources = {"toy": [RemoteFile(f"{base}/a.bin", "a.bin", sha256=hashlib.sha256(DATA).hexdigest()),
                           RemoteFile(f"{base}/b.bin", "b.bin", md5=hashlib.md5(other).hexdigest(), size=1234)]}
        paths = download("toy", tmp_path / "root", sources=sources)
    assert paths == [tmp_path / "root" / "a.bin", tmp_path / "root" / "b.bin"]
    assert paths[0].read_bytes() == DATA and paths[1].read_bytes() == other
    assert log == [("/a.bin", None, len(DATA)), ("/b.bin", None, 1234)]
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["a.bin", "b.bin"]  # no .part left


def test_resume_requests_only_the_remaining_bytes(tmp_path: Path) -> None:
    half = len(DATA) // 2
    (tmp_path / "toy.bin.part").write_bytes(DATA[:half])
    with serve({"/toy.bin": DATA}) as (base, log):
        [path] = download("toy", tmp_path, sources=toy(base, "toy.bin", DATA))
    assert log == [("/toy.bin", f"bytes={half}-", len(DATA) - half)]
    assert path.read_bytes() == DATA
    assert not (tmp_path / "toy.bin.part").exists()


def test_server_ignoring_range_restarts_from_scratch(tmp_path: Path) -> None:
    half = len(DATA) // 2
    (tmp_path / "toy.bin.part").write_bytes(b"\xff" * half)  # garbage: appending to it would fail the checksum
    with serve({"/toy.bin": DATA}, honour_range=False) as (base, log):
        [path] = download("toy", tmp_path, sources=toy(base, "toy.bin", DATA))
    assert log == [("/toy.bin", f"bytes={half}-", len(DATA))]  # asked for the rest, got (and took) the whole
    assert path.read_bytes() == DATA


def test_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    wrong = "0" * 64
    with serve({"/toy.bin": DATA}) as (base, _):
        sources = {"toy": [RemoteFile(f"{base}/toy.bin", "toy.bin", sha256=wrong)]}
        with pytest.raises(DatasetError) as info:
            download("toy", tmp_path, sources=sources)
    message = str(info.value)
    assert "toy.bin" in message and wrong in message and hashlib.sha256(DATA).hexdigest() in message
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part


def test_unreachable_host_fails_fast_and_says_where_files_go(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: connecting is refused at once
        probe.bind((LOCAL, 0))
        port = probe.getsockname()[1]
    sources = {"toy": [RemoteFile(f"http://{LOCAL}:{port}/x.zip", "x.zip", md5="0" * 32),
                       RemoteFile(f"http://{LOCAL}:{port}/y.zip", "y.zip", md5="1" * 32)]}
    start = time.perf_counter()
    with pytest.raises(DatasetError) as info:
        download("toy", tmp_path, sources=sources, timeout=1.0)
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "could not be reached" in message
    assert str(tmp_path / "x.zip") in message and str(tmp_path / "y.zip") in message
    assert not (tmp_path / "x.zip.part").exists()


def test_interrupted_transfer_keeps_part_and_next_run_resumes(tmp_path: Path) -> None:
    cut = 50_000
    with serve({"/toy.bin": DATA}, cut_after=cut) as (base, _):
        with pytest.raises(DatasetError, match="resumes"):
            download("toy", tmp_path, sources=toy(base, "toy.bin", DATA))
    assert (tmp_path / "toy.bin.part").read_bytes() == DATA[:cut]
    assert not (tmp_path / "toy.bin").exists()
    with serve({"/toy.bin": DATA}) as (base, log):
        [path] = download("toy", tmp_path, sources=toy(base, "toy.bin", DATA))
    assert log == [("/toy.bin", f"bytes={cut}-", len(DATA) - cut)]
    assert path.read_bytes() == DATA


def test_stalled_server_times_out(tmp_path: Path) -> None:
    with serve({"/toy.bin": DATA}, stall=threading.Event()) as (base, _):
        start = time.perf_counter()
        with pytest.raises(DatasetError, match="interrupted"):
            download("toy", tmp_path, sources=toy(base, "toy.bin", DATA), timeout=0.3)
        assert time.perf_counter() - start < 2.0


def test_http_error_names_the_status_and_where_files_go(tmp_path: Path) -> None:
    with serve({}) as (base, _):
        with pytest.raises(DatasetError, match="HTTP 404") as info:
            download("toy", tmp_path, sources=toy(base, "gone.bin", DATA))
    assert str(tmp_path / "gone.bin") in str(info.value)


def test_present_file_is_not_downloaded_again(tmp_path: Path) -> None:
    (tmp_path / "toy.bin").write_bytes(DATA)
    with serve({"/toy.bin": DATA}) as (base, log):
        assert download("toy", tmp_path, sources=toy(base, "toy.bin", DATA)) == [tmp_path / "toy.bin"]
    assert log == []


def test_present_file_with_wrong_checksum_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "toy.bin").write_bytes(b"stale")
    with serve({"/toy.bin": DATA}) as (base, log):
        [path] = download("toy", tmp_path, sources=toy(base, "toy.bin", DATA))
    assert path.read_bytes() == DATA and len(log) == 1


def test_complete_part_is_verified_without_transfer(tmp_path: Path) -> None:
    (tmp_path / "toy.bin.part").write_bytes(DATA)
    with serve({"/toy.bin": DATA}) as (base, log):  # size known: no request at all
        download("toy", tmp_path, sources=toy(base, "toy.bin", DATA, size=len(DATA)))
    assert log == []
    (tmp_path / "toy.bin").unlink()
    (tmp_path / "toy.bin.part").write_bytes(DATA)
    with serve({"/toy.bin": DATA}) as (base, log):  # size unknown: the server answers 416, nothing to send
        [path] = download("toy", tmp_path, sources=toy(base, "toy.bin", DATA))
    assert log == [("/toy.bin", f"bytes={len(DATA)}-", 0)]
    assert path.read_bytes() == DATA


def test_mini_imagenet_explains_how_to_obtain_it(tmp_path: Path) -> None:
    root = tmp_path / "mini-imagenet"
    with pytest.raises(DatasetError) as info:
        download("mini-imagenet", root)
    message = str(info.value)
    for needle in ("images.zip", "train.csv", "val.csv", "test.csv", "twitter/meta-learning-lstm", str(root)):
        assert needle in message
    assert not root.exists()  # nothing created, nothing contacted


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="omniglot.*mini-imagenet|mini-imagenet.*omniglot"):
        download("cifar-fs", tmp_path)


def test_registry_pins_the_publisher_checksums() -> None:
    assert set(SOURCES) == {"omniglot"} and set(MANUAL) == {"mini-imagenet"}
    pinned = {f.filename: (f.url, f.checksum) for f in SOURCES["omniglot"]}
    base = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
    assert pinned == {
        "images_background.zip": (f"{base}/images_background.zip", ("md5", "68d2efa1b9178cc56df9314c21c6e718")),
        "images_evaluation.zip": (f"{base}/images_evaluation.zip", ("md5", "6b91aef0f799c5bb55b94e3f2daec811")),
    }


def test_remote_file_rejects_bad_entries() -> None:
    with pytest.raises(DatasetError, match="md5 or a sha256"):
        RemoteFile("http://127.0.0.1/x", "x")
    with pytest.raises(DatasetError, match="sha256 must be 64"):
        RemoteFile("http://127.0.0.1/x", "x", sha256="abc")
    with pytest.raises(DatasetError, match="plain file name"):
        RemoteFile("http://127.0.0.1/x", "../x", md5="0" * 32)


def test_file_digest_matches_hashlib(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(DATA)
    assert file_digest(tmp_path / "f", "md5") == hashlib.md5(DATA).hexdigest()
    assert file_digest(tmp_path / "f", "sha256") == hashlib.sha256(DATA).hexdigest()
