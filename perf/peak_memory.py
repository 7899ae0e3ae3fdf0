"""Peak resident memory of one attention call, measured in a fresh process.

``python perf/peak_memory.py IMPL PATTERN SIZE`` prints one JSON line:
``peak_mb`` (the process's resident high-water mark while the call runs, Python and
torch included), ``call_mb`` (that peak minus the resident size just before the call:
what the call adds on top of its inputs and set-up, e.g. SDPA's bool mask) and
``lifetime_peak_mb`` (the process's high-water mark over everything, set-up included:
building the dense mask, compiling FlexAttention).

Linux only: ``/proc/self/clear_refs`` resets the high-water mark after set-up (inputs,
masks, compilation and a warm-up call), and a small ``MALLOC_MMAP_THRESHOLD_`` (set by
:func:`measure`) makes freed tensors leave the process, so the warm-up does not hide
the measured call's memory.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, IMPLS, make_inputs, prepare  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(impl: str, pattern_name: str, size: int) -> None:
    torch.manual_seed(0)
    q, k, v = make_inputs(size)
    fn = prepare(impl, CASES[pattern_name], q)
    with torch.no_grad():
        # the warm-up compiles FlexAttention and pages in the code of the kernels each call
        # uses (hundreds of MB of libtorch text count as resident): neither is the call's memory
        fn(q, k, v)
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        fn(q, k, v)
        peak = _status_kb("VmHWM")
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak / 1024, "call_mb": (peak - before) / 1024, "lifetime_peak_mb": lifetime}))


def measure(impl: str, pattern_name: str, size: int, timeout: float = 600) -> dict:
    """Run :func:`main` in a fresh interpreter and return its figures (MB)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(
        [sys.executable, __file__, impl, pattern_name, str(size)],
        env=env, capture_output=True, text=True, timeout=timeout, check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    assert sys.argv[1] in IMPLS, f"impl must be one of {IMPLS}, got {sys.argv[1]!r}"
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
