"""Safe extraction of zip and tar (gz / bz2 / xz) archives.

Every entry is checked before a single byte is written: names that would land outside the target (``..``,
absolute paths, drive letters, backslashes), links and device files are refused, so a malicious archive
extracts nothing at all. Files are written by this module from the entries' bytes (never through
``extractall``), into a temporary sibling folder that is renamed into place, so readers see either no
target or a complete one.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from .base import DatasetError

_COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class _Entry:
    """One archive member after checking: its safe relative path, whether it is a folder, how to read it."""

    parts: tuple[str, ...]
    is_dir: bool
    open: Callable[[], IO[bytes]] | None  # None for folders


def _safe_parts(archive: Path, name: str, is_dir: bool) -> tuple[str, ...]:
    """The path components of entry ``name``, or DatasetError if it could land outside the target.

    A folder entry naming the root itself (``./``, as ``tar -C dir .`` writes) gives ``()``.
    """

    def refuse(reason: str) -> DatasetError:
        return DatasetError(f"{archive}: refusing entry {name!r}: {reason}; nothing was extracted")

    if not name or "\x00" in name:
        raise refuse("empty name or NUL byte")
    # Backslashes are separators on Windows and a classic way to smuggle "..\\" past POSIX checks.
    if "\\" in name:
        raise refuse("backslash in the name")
    if name.startswith("/"):
        raise refuse("absolute path")
    if PureWindowsPath(name).drive or (len(name) >= 2 and name[1] == ":"):
        raise refuse("drive letter or UNC prefix")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise refuse("'..' component (would escape the target folder)")
    if not parts and not is_dir:
        raise refuse("file name resolves to the target folder itself")
    return parts


def _zip_entries(archive: Path, zf: zipfile.ZipFile) -> list[_Entry]:
    entries = []
    for info in zf.infolist():
        # The upper 16 bits of external_attr hold a Unix st_mode when the archive was made on Unix;
        # zipfile itself ignores them and would write a symlink's target text as a regular file.
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        is_dir = info.is_dir() or stat.S_ISDIR(mode)
        parts = _safe_parts(archive, info.filename, is_dir)
        if stat.S_ISLNK(mode):
            raise DatasetError(f"{archive}: refusing entry {info.filename!r}: symbolic link; nothing was extracted")
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise DatasetError(f"{archive}: refusing entry {info.filename!r}: special file (mode {oct(mode)}); "
                               f"nothing was extracted")
        if not parts:
            continue
        entries.append(_Entry(parts, is_dir, None if is_dir else (lambda info=info: zf.open(info))))
    return entries


def _tar_entries(archive: Path, tf: tarfile.TarFile) -> list[_Entry]:
    entries = []
    for member in tf.getmembers():
        parts = _safe_parts(archive, member.name, member.isdir())
        if member.issym() or member.islnk():
            what = "symbolic link" if member.issym() else "hard link"
            raise DatasetError(f"{archive}: refusing entry {member.name!r}: {what} to {member.linkname!r}; "
                               f"nothing was extracted")
        if not (member.isreg() or member.isdir()):
            raise DatasetError(f"{archive}: refusing entry {member.name!r}: device, fifo or other special file "
                               f"(tar type {member.type!r}); nothing was extracted")

        def opener(member: tarfile.TarInfo = member) -> IO[bytes]:
            handle = tf.extractfile(member)
            assert handle is not None  # regular members always have data
            return handle

        if not parts:
            continue
        entries.append(_Entry(parts, member.isdir(), None if member.isdir() else opener))
    return entries


def _check_layout(archive: Path, entries: list[_Entry]) -> None:
    """Refuse duplicate files and a file that is also used as a folder (ambiguous, or an overwrite trick)."""
    files: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    for entry in entries:
        dirs.update(entry.parts[:k] for k in range(1, len(entry.parts)))
        if entry.is_dir:
            dirs.add(entry.parts)
        elif entry.parts in files:
            raise DatasetError(f"{archive}: refusing entry {'/'.join(entry.parts)!r}: duplicate file name; "
                               f"nothing was extracted")
        else:
            files.add(entry.parts)
    clash = files & dirs
    if clash:
        name = "/".join(sorted(clash)[0])
        raise DatasetError(f"{archive}: refusing entry {name!r}: both a file and a folder; nothing was extracted")


def _write(entries: list[_Entry], root: Path) -> list[tuple[str, ...]]:
    written = []
    for entry in entries:
        path = root.joinpath(*entry.parts)
        if entry.is_dir:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        assert entry.open is not None
        # "xb": never follow or overwrite anything already there (the checks above make that impossible).
        with entry.open() as source, open(path, "xb") as sink:
            shutil.copyfileobj(source, sink, _COPY_BLOCK)
        written.append(entry.parts)
    return written


def safe_extract(archive: Path, target: Path) -> list[Path]:
    """Extract the zip or tar archive ``archive`` into the new folder ``target``; return the files written.

    All entries are checked first; one unsafe entry (escaping path, link, device file, duplicate) refuses
    the whole archive with nothing written. ``target`` must not exist (an empty folder is accepted): the
    archive is extracted beside it and renamed into place in one step.

    Raises:
        DatasetError: missing or unreadable archive, unsafe entry (naming archive and entry), or ``target``
            already holding files.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise DatasetError(f"archive {str(archive)!r} does not exist or is not a file")
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise DatasetError(f"cannot extract {archive} into {target}: it already exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".extracting"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the extracted folder should read like any other
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                entries = _zip_entries(archive, zf)
                _check_layout(archive, entries)
                written = _write(entries, tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                entries = _tar_entries(archive, tf)
                _check_layout(archive, entries)
                written = _write(entries, tmp)
        else:
            raise DatasetError(f"{archive}: not a zip or tar (gz/bz2/xz) archive")
        os.rename(tmp, target)  # atomic; replaces an empty folder, fails on a non-empty one
    except DatasetError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError,
            RuntimeError) as err:
        # Damaged data surfaces as any of these (RuntimeError: zipfile's answer to encrypted entries).
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"cannot extract {archive} into {target}: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [target.joinpath(*parts) for parts in written]
