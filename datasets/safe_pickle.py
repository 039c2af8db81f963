"""A restricted unpickler for data caches that hold only numpy arrays and plain containers.

``pickle.load`` runs whatever callable a file names, so a downloaded ``.pkl`` (e.g. learn2learn's
mini-ImageNet caches) could execute code. :func:`safe_load` resolves globals from a fixed allowlist
instead: numpy's array/scalar reconstruction functions, ``ndarray`` and ``dtype``, and builtin container
and scalar types. Anything else raises :class:`DatasetError` naming the refused ``module.name`` and the file.

Pickles written under numpy 1.x name ``numpy.core.*`` and under numpy 2 ``numpy._core.*``; both spellings map
to the installed numpy's objects, so either loads under either numpy without touching the deprecated
``numpy.core`` shim. Python 2 spellings (``__builtin__``) map to ``builtins``.
"""

from __future__ import annotations

import builtins
import collections
import importlib
import os
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np

from metabench.datasets.base import DatasetError

_BUILTIN_NAMES = ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                  "int", "float", "bool", "complex")


def _numpy_core_module(name: str) -> Any:
    """The installed numpy's ``_core.<name>`` (numpy 2) or ``core.<name>`` (numpy 1.x) module."""
    major = int(np.__version__.split(".")[0])
    return importlib.import_module(f"numpy._core.{name}" if major >= 2 else f"numpy.core.{name}")


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode``: pickle protocols 0-2 store ``bytes`` as ``encode(str, 'latin1')``.

    Only the latin-1 codec is admitted, so a pickle cannot make the codec registry import anything.
    """
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin-1", errors)


def _allowlist() -> dict[tuple[str, str], Any]:
    """Every ``(module, name)`` a numpy/container pickle may reference, mapped to the object to return."""
    multiarray = _numpy_core_module("multiarray")
    numeric = _numpy_core_module("numeric")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("collections", "OrderedDict"): collections.OrderedDict,  # a plain dict that some writers emit
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct  # ndarray, protocols 0-4
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar  # numpy scalars, e.g. np.int64(3)
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # ndarray, protocol 5
    for name in _BUILTIN_NAMES:
        allowed[("builtins", name)] = getattr(builtins, name)
        allowed[("__builtin__", name)] = getattr(builtins, name)  # Python 2 / protocol <= 2 spelling
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` whose ``find_class`` admits only the allowlist above."""

    def __init__(self, file: IO[bytes], source: str) -> None:
        # latin1 lets Python 2 numpy pickles (byte strings as ``str``) load; Python 3 pickles are unaffected.
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allowed = _allowlist()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError(f"{self._source}: refusing to unpickle {module}.{name}: only numpy arrays and "
                               f"plain containers are allowed (this file may run code if loaded with "
                               f"pickle.load)") from None


def safe_load(path_or_file: str | os.PathLike[str] | IO[bytes]) -> object:
    """Unpickle a file that should hold only numpy arrays, numpy scalars and builtin containers.

    Args:
        path_or_file: a path, or a binary file object (named in errors by its ``name`` attribute if any).

    Raises:
        DatasetError: the pickle references anything outside the allowlist (the message names
            ``module.name`` and the file), or the file is not a readable pickle.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        path = Path(path_or_file)
        try:
            with open(path, "rb") as handle:
                return _load(handle, str(path))
        except FileNotFoundError as exc:
            raise DatasetError(f"{path}: no such pickle file") from exc
    source = str(getattr(path_or_file, "name", None) or "<pickle stream>")
    return _load(path_or_file, source)


def _load(handle: IO[bytes], source: str) -> object:
    try:
        return RestrictedUnpickler(handle, source).load()
    except DatasetError:
        raise
    except Exception as exc:  # a malformed or truncated stream can raise almost anything
        raise DatasetError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from exc

