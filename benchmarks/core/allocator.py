"""Keep freed CPU memory in the process (glibc ``mallopt``): no page faults on the training step's fresh tensors.

Why: a meta-step on the CPU allocates and frees tens of large activation and gradient tensors (a MAML Omniglot
5w1s step: [5, 2048, 14, 14] float32 = 8 MB each). glibc serves blocks above its mmap threshold with a fresh
``mmap`` and trims the heap's free top back to the kernel, so every step faults its working set in again, page by
page, zero-filled (20,000-30,000 minor faults per step measured; docs/performance.md has the timings).
:func:`retain_freed_memory` turns both off for the process: large blocks come from the heap and freed memory stays
there for the next step. The cost is that the process's resident memory stays at its peak.

This is a process-wide allocator setting, like ``torch.set_num_threads``: whoever starts a training or
benchmark process decides (``metabench bench speed --retain-memory``); nothing turns it on by importing metabench.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc malloc.h parameter numbers
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest threshold, ~2 GiB of free heap top kept


def retain_freed_memory() -> bool:
    """Make glibc serve every block from the heap (no ``mmap``) and never trim it; True when glibc accepted the
    settings, False where there is no glibc (macOS, musl), where the call changes nothing."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM), (M_TOP_PAD, 64 * 2**20)))
