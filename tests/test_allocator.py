"""``metabench.core.allocator.retain_freed_memory``: after it, a convolution's forward and backward run again and again
stop page-faulting (before it, each run faults thousands of pages in). Each case runs in its own interpreter: the
setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A grouped convolution's forward and backward on 4 MiB activations (the pattern of a meta-step: tensors of several
# sizes allocated and freed in turn), 8 times; the minor page faults of each of the last 5
PROBE = """
import json, resource, sys, torch
import torch.nn.functional as F
from metabench.core.allocator import retain_freed_memory
torch.set_num_threads(1)
if sys.argv[1].startswith("run:"):  # as a training process sets itself up from its configuration
    from metabench.run.config import resolve
    from metabench.run.runner import configure_process
    overrides = [sys.argv[1][4:]] if len(sys.argv[1]) > 4 else []
    configure_process(resolve("synthetic-5w1s", "maml", None, overrides=overrides))
    accepted = None
else:
    accepted = retain_freed_memory() if sys.argv[1] == "retain" else None
x = torch.rand(5, 256, 28, 28, requires_grad=True)
w = torch.rand(256, 8, 3, 3, requires_grad=True)
faults = []
for i in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = F.conv2d(x, w, padding=1, groups=32)
    torch.autograd.grad((torch.relu(y) * y).sum(), (x, w))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"accepted": accepted, "faults": faults[3:]}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_stops_page_faults() -> None:
    default, retained = _probe("default"), _probe("retain")
    assert retained["accepted"] is True
    # by default glibc hands large blocks back to the kernel (munmap, heap trim): every step faults pages in again
    assert sum(default["faults"]) >= 5000
    assert 5 * sum(retained["faults"]) < sum(default["faults"])  # kept in the heap: (almost) nothing to fault in


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_run_keeps_freed_memory_unless_its_configuration_says_not() -> None:
    configured, turned_off = _probe("run:"), _probe("run:trainer.retain_memory=false")
    assert sum(turned_off["faults"]) >= 5000
    assert 5 * sum(configured["faults"]) < sum(turned_off["faults"])
