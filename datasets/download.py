"""Downloads of the public datasets, checked against the publishers' checksums.

``SOURCES`` maps a dataset name to its files. :func:`download` fetches each missing file with ``urllib``
into ``<file>.part`` (resuming a partial one with an HTTP Range request), verifies its checksum and only
then renames it into place, so ``root`` never holds a torn or unverified file. Datasets without a stable
public source (mini-ImageNet) have instructions instead of URLs.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

from .base import DatasetError

log = logging.getLogger(__name__)

_CHUNK = 1 << 16
_HEX = {"md5": 32, "sha256": 64}


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: where it is served, its name under the data root, its published checksum.

    Give ``md5`` or ``sha256`` (``sha256`` is used when both are given); ``size`` in bytes if known.
    """

    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if self.md5 is None and self.sha256 is None:
            raise DatasetError(f"{self.filename}: a RemoteFile needs an md5 or a sha256 checksum")
        for algorithm in ("md5", "sha256"):
            value = getattr(self, algorithm)
            if value is not None and not re.fullmatch(f"[0-9a-f]{{{_HEX[algorithm]}}}", value):
                raise DatasetError(f"{self.filename}: {algorithm} must be {_HEX[algorithm]} lowercase hex digits, "
                                   f"got {value!r}")
        if not self.filename or Path(self.filename).name != self.filename or self.filename in (".", ".."):
            raise DatasetError(f"RemoteFile filename must be a plain file name, got {self.filename!r}")

    @property
    def checksum(self) -> tuple[str, str]:
        """``(algorithm, hex digest)`` to verify against."""
        return ("sha256", self.sha256) if self.sha256 is not None else ("md5", self.md5)  # type: ignore[return-value]


_OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"

# Publisher checksums, as torchvision's Omniglot dataset pins them. Not those of the repacked copies in
# shared/data, which hold the same images in differently packed zips.
SOURCES: dict[str, list[RemoteFile]] = {
    "omniglot": [
        RemoteFile(f"{_OMNIGLOT_URL}/images_background.zip", "images_background.zip",
                   md5="68d2efa1b9178cc56df9314c21c6e718"),
        RemoteFile(f"{_OMNIGLOT_URL}/images_evaluation.zip", "images_evaluation.zip",
                   md5="6b91aef0f799c5bb55b94e3f2daec811"),
    ],
}

# Datasets that cannot be fetched with a verified checksum; ``{root}`` is filled in with the target folder.
MANUAL: dict[str, str] = {
    "mini-imagenet": (
        "mini-imagenet cannot be downloaded automatically: no stable public source serves it with published "
        "checksums. The images.zip commonly shared for the Ravi & Larochelle split sits on Google Drive behind "
        "a confirmation page; torchmeta fetches a different format (pickled arrays, mini-imagenet.tar.gz from "
        "renmengye/few-shot-ssl-public, md5-pinned) from Google Drive, and learn2learn fetches pickles "
        "(mini-imagenet-cache-{{train,validation,test}}.pkl) from Dropbox, Google Drive or Zenodo without "
        "checksums; neither is the layout read here. Obtain the files by hand and put them in {root}/ (in the "
        "usual layout that is <data root>/mini-imagenet/):\n"
        "  {root}/images.zip  holding images/<wnid><8-digit index>.jpg: the 60,000 ImageNet (ILSVRC-2012) "
        "images named by the csvs, commonly shared already resized to 84x84 (the images.zip above), or built "
        "yourself from ImageNet, which is for non-commercial research use only\n"
        "  {root}/train.csv, {root}/val.csv, {root}/test.csv  the Ravi & Larochelle (ICLR 2017) split, "
        "lines 'filename,label' (64/16/20 classes x 600 images), from github.com/twitter/meta-learning-lstm, "
        "folder data/miniImagenet/"
    ),
}


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of ``path``'s bytes with ``algorithm`` (``"md5"`` or ``"sha256"``)."""
    with open(path, "rb") as handle:
        # usedforsecurity=False: md5 here only detects corruption, and FIPS builds refuse it otherwise.
        return hashlib.file_digest(handle, lambda: hashlib.new(algorithm, usedforsecurity=False)).hexdigest()


def _manual_hint(files: Sequence[RemoteFile], root: Path) -> str:
    lines = [f"  {root / f.filename}  from {f.url}  ({' '.join(f.checksum)})" for f in files]
    return "download the files on a machine with internet access and put them at:\n" + "\n".join(lines)


def _transfer(remote: RemoteFile, part: Path, offset: int, timeout: float, files: Sequence[RemoteFile],
              root: Path) -> None:
    """Fetch ``remote`` into ``part``, continuing after its first ``offset`` bytes when the server allows."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urlopen(Request(remote.url, headers=headers), timeout=timeout)
    except HTTPError as err:
        if err.code == 416 and offset:  # nothing left to send: the .part is complete, the checksum decides
            return
        raise DatasetError(f"{remote.url}: the server answered HTTP {err.code} {err.reason}; "
                           f"{_manual_hint(files, root)}") from err
    except (URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        host = urlsplit(remote.url).netloc
        raise DatasetError(f"the host {host} could not be reached to download {remote.filename} ({reason}); "
                           f"{_manual_hint(files, root)}") from err
    with response:
        content_range = response.headers.get("Content-Range", "")
        resumed = bool(offset) and response.status == 206 and content_range.startswith(f"bytes {offset}-")
        if offset and response.status == 206 and not resumed:
            # A range we did not ask for: start over rather than guess how the pieces fit.
            response.close()
            part.unlink(missing_ok=True)
            return _transfer(remote, part, 0, timeout, files, root)
        start = offset if resumed else 0  # a 200 answer to a Range request is the whole file: restart
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        total = start + expected if expected is not None else remote.size
        received = 0
        with open(part, "ab" if resumed else "wb") as sink, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=remote.filename, leave=False, disable=None) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    sink.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:
                raise DatasetError(f"{remote.filename}: transfer from {remote.url} interrupted after "
                                   f"{start + received} bytes ({err}); the partial download is kept at {part} "
                                   f"and the next run resumes it") from err
            sink.flush()
            os.fsync(sink.fileno())
        if expected is not None and received != expected:
            raise DatasetError(f"{remote.filename}: transfer from {remote.url} ended after {start + received} of "
                               f"{start + expected} bytes; the partial download is kept at {part} and the next "
                               f"run resumes it")


def _fetch(remote: RemoteFile, root: Path, timeout: float, files: Sequence[RemoteFile]) -> Path:
    dest = root / remote.filename
    algorithm, expected = remote.checksum
    if dest.is_file():
        actual = file_digest(dest, algorithm)
        if actual == expected:
            return dest
        log.warning("%s: %s %s does not match the published %s; downloading it again", dest, algorithm, actual,
                    expected)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if remote.size is not None and offset > remote.size:  # longer than the real file: cannot be a prefix
        part.unlink()
        offset = 0
    if remote.size is None or offset != remote.size:  # a .part of the known full size needs no request
        _transfer(remote, part, offset, timeout, files, root)
    actual = file_digest(part, algorithm)
    if actual != expected:
        part.unlink(missing_ok=True)
        raise DatasetError(f"{remote.filename}: checksum mismatch for {remote.url}: expected {algorithm} "
                           f"{expected}, got {actual}; the download was deleted (run again to retry)")
    os.replace(part, dest)  # atomic: dest is absent or the whole verified file
    return dest


def download(name: str, root: Path, *, timeout: float = 10.0,
             sources: Mapping[str, Sequence[RemoteFile]] | None = None) -> list[Path]:
    """Fetch dataset ``name``'s files into the folder ``root`` (e.g. ``<data root>/omniglot``); return their paths.

    Files already present with the right checksum are not fetched again; a ``<file>.part`` left by an
    interrupted run is resumed. ``timeout`` (seconds) bounds connecting and each read, so an offline machine
    fails within seconds. ``sources`` replaces :data:`SOURCES` (tests point it at a local server).

    Raises:
        DatasetError: unknown name; a dataset that must be obtained by hand (the message says how and where);
            host unreachable or HTTP error (the message lists where to put each file by hand); interrupted
            transfer; checksum mismatch (naming the file, the expected and the actual sums).
    """
    registry = SOURCES if sources is None else sources
    root = Path(root)
    if name not in registry:
        if name in MANUAL:
            raise DatasetError(MANUAL[name].format(root=root))
        raise DatasetError(f"no download for dataset {name!r}; known: {', '.join(sorted({*registry, *MANUAL}))}")
    files = registry[name]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(f"{name}: cannot create the download folder {root}: {err}") from err
    return [_fetch(remote, root, timeout, files) for remote in files]
