"""safe_extract: good zip / tar round trips, and malicious archives refused with nothing written."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from metabench.datasets.archive import safe_extract
from metabench.datasets.base import DatasetError

GOOD = {"images/a/1.png": b"one", "images/a/2.png": b"two" * 1000, "images/b/3.png": b"", "README": b"hi"}


def make_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def tar_member(name: str, data: bytes = b"", type_: bytes = tarfile.REGTYPE, linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = type_, linkname, len(data) if type_ == tarfile.REGTYPE else 0
    return info, (io.BytesIO(data) if type_ == tarfile.REGTYPE else None)


def make_tar(path: Path, members: list[tuple], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            tf.addfile(info, data)
    return path


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, so the mode bits below mean what they say
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def assert_nothing_extracted(tmp_path: Path, target: Path) -> None:
    assert not target.exists()
    leftovers = {p.name for p in target.parent.iterdir()} - {"bad.zip", "bad.tar.gz"}
    assert leftovers == set(), leftovers  # no temporary folder, no escaped file
    assert not (tmp_path / "evil.txt").exists()


def test_good_zip_round_trip(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "good.zip", [("images/", b""), *GOOD.items()])
    target = tmp_path / "out" / "good"
    written = safe_extract(archive, target)
    assert written == [target / name for name in GOOD]
    assert {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()} == GOOD
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good"]  # temporary folder renamed away


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz", "w"])
def test_good_tar_round_trip(tmp_path: Path, mode: str) -> None:
    # "." and "./images" are what `tar -C dir .` writes: the root entry is skipped, "./" prefixes dropped.
    members = [tar_member(".", type_=tarfile.DIRTYPE), tar_member("./images", type_=tarfile.DIRTYPE)]
    members += [tar_member(n, d) for n, d in GOOD.items()]
    archive = make_tar(tmp_path / "good.tar", members, mode)
    target = tmp_path / "good"
    assert safe_extract(archive, target) == [target / name for name in GOOD]
    assert {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()} == GOOD


def test_empty_target_folder_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    safe_extract(make_zip(tmp_path / "good.zip", list(GOOD.items())), tmp_path / "good")
    assert (tmp_path / "good" / "README").read_bytes() == b"hi"


@pytest.mark.parametrize("name,reason", [
    ("../evil.txt", "'..'"),
    ("images/../../evil.txt", "'..'"),
    ("/evil.txt", "absolute"),
    ("C:/evil.txt", "drive"),
    ("C:evil.txt", "drive"),
    ("..\\evil.txt", "backslash"),
    ("images\\..\\..\\evil.txt", "backslash"),
    (".", "target folder itself"),
])
def test_zip_escaping_entries_are_refused(tmp_path: Path, name: str, reason: str) -> None:
    # A good entry first: the bad one must stop the archive before anything is written.
    archive = make_zip(tmp_path / "bad.zip", [("images/ok.png", b"ok"), (zipfile.ZipInfo(name), b"evil")])
    assert name in zipfile.ZipFile(archive).namelist()  # the name was stored as given
    target = tmp_path / "sub" / "out"
    (tmp_path / "sub").mkdir()
    with pytest.raises(DatasetError, match=reason) as info:
        safe_extract(archive, target)
    assert str(archive) in str(info.value) and repr(name) in str(info.value)
    assert_nothing_extracted(tmp_path, target)


def test_zip_symlink_entry_is_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bad.zip", [("ok.png", b"ok"), (symlink_info("link"), b"/etc/passwd")])
    with pytest.raises(DatasetError, match="symbolic link") as info:
        safe_extract(archive, tmp_path / "out")
    assert "'link'" in str(info.value)
    assert_nothing_extracted(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("member,reason", [
    (tar_member("link", type_=tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
    (tar_member("inside", type_=tarfile.SYMTYPE, linkname="ok.png"), "symbolic link"),  # even pointing inside
    (tar_member("hard", type_=tarfile.LNKTYPE, linkname="ok.png"), "hard link"),
    (tar_member("dev", type_=tarfile.CHRTYPE), "device"),
    (tar_member("fifo", type_=tarfile.FIFOTYPE), "device, fifo"),
    (tar_member("../evil.txt", b"evil"), "'..'"),
    (tar_member("/evil.txt", b"evil"), "absolute"),
    (tar_member("ok.png", b"again"), "duplicate"),
])
def test_tar_unsafe_entries_are_refused(tmp_path: Path, member: tuple, reason: str) -> None:
    archive = make_tar(tmp_path / "bad.tar.gz", [tar_member("ok.png", b"ok"), member])
    target = tmp_path / "sub" / "out"
    (tmp_path / "sub").mkdir()
    with pytest.raises(DatasetError, match=reason) as info:
        safe_extract(archive, target)
    assert str(archive) in str(info.value) and repr(member[0].name) in str(info.value)
    assert_nothing_extracted(tmp_path, target)


def test_file_used_as_folder_is_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bad.zip", [("a", b"file"), ("a/b", b"under a file")])
    with pytest.raises(DatasetError, match="both a file and a folder"):
        safe_extract(archive, tmp_path / "out")
    assert_nothing_extracted(tmp_path, tmp_path / "out")


def test_existing_target_and_non_archives_are_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "good.zip", list(GOOD.items()))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    with pytest.raises(DatasetError, match="already exists"):
        safe_extract(archive, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep"]
    (tmp_path / "plain.txt").write_text("not an archive")
    with pytest.raises(DatasetError, match="not a zip or tar"):
        safe_extract(tmp_path / "plain.txt", tmp_path / "x")
    with pytest.raises(DatasetError, match="does not exist"):
        safe_extract(tmp_path / "missing.zip", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_corrupt_member_leaves_nothing(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bad.zip", [("a.bin", b"x" * 10_000)])
    raw = bytearray(archive.read_bytes())
    raw[40:60] = b"\0" * 20  # damage the compressed data of the only member (after its local header)
    archive.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="cannot extract"):
        safe_extract(archive, tmp_path / "out")
    assert_nothing_extracted(tmp_path, tmp_path / "out")
