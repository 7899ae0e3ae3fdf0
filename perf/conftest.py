"""perf/: pytest-benchmark runs; a side-by-side table of times, ratios and memory at the end."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# the benchmark files import their helpers (cases, baselines) as top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (table, row, column) -> figure; filled by the benchmarks, printed at the end
_RESULTS: dict = {}


@pytest.fixture(scope="session")
def perf_results() -> dict:
    return _RESULTS


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    forward = {k[1:]: v for k, v in _RESULTS.items() if k[0] == "forward"}
    if forward:
        tr = terminalreporter
        tr.section("CPU forward: sst_triton vs dense SDPA+mask vs compiled FlexAttention")
        tr.write_line(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times = min over rounds")
        tr.write_line(
            f"{'case':<22}{'sst s':>8}{'sdpa s':>8}{'flex s':>8}{'flex/sst':>9}{'sdpa/sst':>9}"
            f"{'sst MB':>8}{'sdpa MB':>9}{'flex MB':>9}{'sst/sdpa mem':>13}"
        )
        for case in sorted({c for c, _ in forward}, key=lambda c: (c[1], c[0])):
            row = {impl: forward.get((case, impl)) for impl in ("sst", "sdpa", "flex")}
            t = {i: (r["time"] if r else float("nan")) for i, r in row.items()}
            m = {i: (r.get("call_mb", float("nan")) if r else float("nan")) for i, r in row.items()}
            # SDPA's memory is its call plus the (S, S) bool mask it needs
            sdpa_mem = m["sdpa"] + (row["sdpa"] or {}).get("mask_mb", 0.0)
            tr.write_line(
                f"{case[0] + ' H=W=' + str(case[1]):<22}{t['sst']:>8.3f}{t['sdpa']:>8.3f}{t['flex']:>8.3f}"
                f"{t['flex'] / t['sst']:>9.1f}{t['sdpa'] / t['sst']:>9.1f}"
                f"{m['sst']:>8.0f}{sdpa_mem:>9.0f}{m['flex']:>9.0f}{m['sst'] / sdpa_mem:>13.3f}"
            )
        tr.write_line("MB: resident memory the call adds over its inputs (fresh process, after a warm-up);")
        tr.write_line("    sdpa MB includes its (S, S) bool mask. See perf/peak_memory.py.")
    scaling = {k[1:]: v for k, v in _RESULTS.items() if k[0] == "scaling"}
    if scaling:
        tr = terminalreporter
        tr.section("sst_triton CPU forward: cost against S = T*H*W")
        for pattern in sorted({p for p, _ in scaling}):
            pts = sorted((s, t) for (p, s), t in scaling.items() if p == pattern)
            line = "  ".join(f"S={s}: {t * 1e3:.0f} ms ({t / s * 1e6:.2f} us/query)" for s, t in pts)
            tr.write_line(f"{pattern:<12}{line}")
            if len(pts) > 1:
                import math

                (s0, t0), (s1, t1) = pts[0], pts[-1]
                tr.write_line(f"{'':<12}time ~ S^{math.log(t1 / t0) / math.log(s1 / s0):.2f} from S={s0} to S={s1}")
