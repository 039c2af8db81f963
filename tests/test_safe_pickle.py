"""The restricted unpickler: loads numpy arrays and plain containers, refuses anything that could run code."""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from metabench.datasets.base import DatasetError
from metabench.datasets.safe_pickle import RestrictedUnpickler, safe_load

REPO = Path(__file__).resolve().parents[1]


def _legit() -> dict:
    rng = np.random.default_rng(0)
    return {
        "image_data": rng.integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8),
        "class_dict": {"n01": [0, 2, 4], "n02": [1, 3]},
        "floats": np.linspace(0.0, 1.0, 7, dtype=np.float32).reshape(7, 1),
        "fortran": np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
        "scalar": np.int64(7),
        "set": {1, 2}, "frozen": frozenset({"a"}), "complex": 1 + 2j, "bytes": b"\x00\xff",
        "ordered": collections.OrderedDict(b=1, a=2), "nested": [(1, 2.5, None, True), "text"],
    }


def _assert_same(loaded: object, expected: dict) -> None:
    assert isinstance(loaded, dict) and loaded.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
            np.testing.assert_array_equal(loaded[key], value)
        else:
            assert loaded[key] == value and type(loaded[key]) is type(value), key


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_loads_numpy_dict_every_protocol(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / f"legit-{protocol}.pkl"
    path.write_bytes(pickle.dumps(_legit(), protocol=protocol))
    _assert_same(safe_load(path), _legit())
    with open(path, "rb") as handle:  # a file object works as well as a path
        _assert_same(safe_load(handle), _legit())


@pytest.mark.parametrize("protocol", [0, 2])
def test_loads_numpy1_pickles_without_deprecation_warnings(tmp_path: Path, protocol: int) -> None:
    # numpy 1.x wrote the module as numpy.core.multiarray; protocols 0-2 spell globals as text lines, so
    # renaming the module in the bytes gives exactly what numpy 1.x would have written.
    data = pickle.dumps(_legit(), protocol=protocol)
    if b"numpy._core." in data:
        data = data.replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in data and b"numpy._core" not in data
    path = tmp_path / "numpy1.pkl"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2's numpy.core shim warns on access; we must not touch it
        _assert_same(safe_load(path), _legit())


def test_both_numpy_spellings_resolve_to_installed_numpy() -> None:
    unpickler = RestrictedUnpickler(io.BytesIO(b""), "probe")
    for name, module_suffix in (("_reconstruct", "multiarray"), ("scalar", "multiarray"), ("_frombuffer", "numeric")):
        old = unpickler.find_class(f"numpy.core.{module_suffix}", name)
        new = unpickler.find_class(f"numpy._core.{module_suffix}", name)
        assert old is new and callable(old)
    assert unpickler.find_class("__builtin__", "set") is builtins.set


class _SystemPayload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # noqa: ANN204 - the classic pickle exploit
        return (os.system, (self.command,))


class _EvalPayload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # noqa: ANN204
        return (eval, (f"__import__('os').system({self.command!r})",))


class _PopenPayload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # noqa: ANN204
        return (subprocess.Popen, (["sh", "-c", self.command],))


@pytest.mark.parametrize(("payload", "refused"), [
    (_SystemPayload, f"{os.system.__module__}.system"),
    (_EvalPayload, "builtins.eval"),
    (_PopenPayload, "subprocess.Popen"),
])
def test_refuses_code_running_payloads(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                       payload: type, refused: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    # Hidden inside an otherwise legit learn2learn-style dict, so refusal cannot depend on position.
    path.write_bytes(pickle.dumps({"image_data": np.zeros((1, 2, 2, 3), np.uint8),
                                   "class_dict": {"n01": [0]}, "x": payload(f"echo pwned; touch {marker}")}))
    with pytest.raises(DatasetError) as info:
        safe_load(path)
    assert refused in str(info.value) and str(path) in str(info.value)
    assert not marker.exists() and "pwned" not in capfd.readouterr().out


@pytest.mark.parametrize(("stream", "refused"), [
    (b"cos\nsystem\n(S'echo pwned'\ntR.", "os.system"),                 # protocol 0, hand-written
    (b"cbuiltins\ngetattr\n(cbuiltins\nint\nS'real'\ntR.", "builtins.getattr"),
    (b"c__builtin__\neval\n(S'1+1'\ntR.", "__builtin__.eval"),
    (b"cnumpy\nload\n(S'x.npy'\ntR.", "numpy.load"),                   # numpy, but not an allowed name
])
def test_refuses_hand_written_globals(tmp_path: Path, stream: bytes, refused: str) -> None:
    path = tmp_path / "crafted.pkl"
    path.write_bytes(stream)
    with pytest.raises(DatasetError, match=refused.replace(".", r"\.")):
        safe_load(path)


def test_codecs_encode_is_limited_to_latin1(tmp_path: Path) -> None:
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(DatasetError, match="not a readable pickle"):
        safe_load(path)
    path.write_bytes(b"c_codecs\nencode\n(Vab\xff\nVlatin1\ntR.")  # what protocol <= 2 writes for bytes
    assert safe_load(path) == b"ab\xff"


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"this is not a pickle")
    with pytest.raises(DatasetError, match="garbage.pkl.*not a readable pickle"):
        safe_load(garbage)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pickle.dumps(_legit())[:100])
    with pytest.raises(DatasetError, match="truncated.pkl"):
        safe_load(truncated)
    with pytest.raises(DatasetError, match="no such pickle file"):
        safe_load(tmp_path / "absent.pkl")


def test_no_plain_pickle_load_in_the_package() -> None:
    offenders = [f"{path.relative_to(REPO)}:{number}"
                 for folder in ("benchmarks", "datasets", "models") for path in sorted((REPO / folder).rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), start=1)
                 if "pickle.load(" in line or "pickle.loads(" in line]
    assert offenders == [], f"use metabench.datasets.safe_pickle.safe_load instead: {offenders}"
