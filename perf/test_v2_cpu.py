"""CPU cost of the version-2 additions, side by side in one run (pytest-benchmark):

- streaming: one step of a streaming model, the newest frame's queries (``T_q = 1``) against
  ``T = 4`` cached key/value frames, against recomputing all four frames (``T_q = T = 4``);
- grouped heads: ``N_kv = N / 4`` key/value heads against ``N_kv = N`` (same queries).

    pytest perf/test_v2_cpu.py --benchmark-only

B=1, N=8, T=4, H=W=64, D=32, fp32, the patterns of perf/cases.py. Times are the min over a few
rounds (the machine may be shared); the ratios are printed at the end of the run.
``SST_PERF_THREADS=1`` runs this file single-threaded: on a machine shared by many processes,
multi-threaded CPU ops wait on descheduled threads and their times say more about the load
than about the code.

The streaming ratio is also measured a second way, robust to a shared machine: the step and the
recompute alternate for ``INTERLEAVED_ROUNDS`` rounds (so both see the same load), each timed by
the CPU time of the calling thread (time a descheduled thread waits does not count; with one
thread that is all of the op's work), min over rounds.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from cases import CASES
from sst_triton import sparse_attention

B, N, T, SIZE, D = 1, 8, 4, 64, 32
ROUNDS = 5
INTERLEAVED_ROUNDS = 15
_TIMES: dict = {}
if os.environ.get("SST_PERF_THREADS"):
    torch.set_num_threads(int(os.environ["SST_PERF_THREADS"]))


def _inputs(n_kv: int = N):
    q = torch.randn(B, N, T, SIZE, SIZE, D)
    k, v = (torch.randn(B, n_kv, T, SIZE, SIZE, D) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("mode", ["recompute_T4", "step_Tq1"])
@pytest.mark.parametrize("pattern_name", list(CASES))
def test_streaming_step(benchmark, pattern_name, mode):
    benchmark.group = f"v2 streaming {pattern_name}: T_q=1 vs T=4 cached frames"
    q, k, v = _inputs()
    queries = q if mode == "recompute_T4" else q[:, :, -1:]
    with torch.no_grad():
        out = benchmark.pedantic(sparse_attention, args=(queries, k, v, CASES[pattern_name]), rounds=ROUNDS,
                                 warmup_rounds=1, iterations=1)
    assert out.shape[2] == queries.shape[2]
    _TIMES[("stream", pattern_name, mode)] = benchmark.stats.stats.min
    if mode == "step_Tq1" and torch.get_num_threads() == 1:
        _TIMES[("interleaved", pattern_name)] = _interleaved(q, k, v, CASES[pattern_name])


def _interleaved(q, k, v, pattern) -> tuple[float, float]:
    """Min thread CPU time of the step (T_q = 1) and of the recompute (T_q = T), called alternately."""
    best = [float("inf"), float("inf")]
    with torch.no_grad():
        for _ in range(INTERLEAVED_ROUNDS):
            for i, queries in enumerate((q[:, :, -1:], q)):
                t0 = time.thread_time()
                sparse_attention(queries, k, v, pattern)
                best[i] = min(best[i], time.thread_time() - t0)
    return best[0], best[1]


@pytest.mark.parametrize("mode", ["full_heads_Nkv8", "gqa_Nkv2"])
@pytest.mark.parametrize("pattern_name", list(CASES))
def test_gqa(benchmark, pattern_name, mode):
    benchmark.group = f"v2 GQA {pattern_name}: N_kv=N/4 vs N_kv=N (N=8)"
    q, k, v = _inputs(N if mode == "full_heads_Nkv8" else N // 4)
    with torch.no_grad():
        benchmark.pedantic(sparse_attention, args=(q, k, v, CASES[pattern_name]), rounds=ROUNDS,
                           warmup_rounds=1, iterations=1)
    benchmark.extra_info["kv_mb"] = 2 * k.numel() * k.element_size() / 2**20
    _TIMES[("gqa", pattern_name, mode)] = benchmark.stats.stats.min


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    """Print the side-by-side ratios once every benchmark of this file has run (a fixture, not a
    test, so that ``--benchmark-only`` does not skip it)."""
    yield
    if not _TIMES:
        return
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    # the teardown of a test runs under output capture: write past it, to the terminal
    with capture.global_and_fixture_disabled():
        _write_report(tr, request.config.getoption("benchmark_timer", None))


def _write_report(tr, timer) -> None:
    tr.write_line("")
    tr.write_line(f"v2 CPU figures: B={B} N={N} T={T} H=W={SIZE} D={D} fp32, {torch.get_num_threads()} threads, "
                  f"min over {ROUNDS} rounds, timer {getattr(timer, '__name__', timer) or 'default'}")
    for pattern_name in CASES:
        full, step = (_TIMES.get(("stream", pattern_name, m)) for m in ("recompute_T4", "step_Tq1"))
        heads, gqa = (_TIMES.get(("gqa", pattern_name, m)) for m in ("full_heads_Nkv8", "gqa_Nkv2"))
        if full and step:
            tr.write_line(f"  {pattern_name:<11} streaming step T_q=1: {step:.3f} s, recompute T=4: {full:.3f} s, "
                          f"step / recompute = {step / full:.2f}")
        if ("interleaved", pattern_name) in _TIMES:
            step, full = _TIMES[("interleaved", pattern_name)]
            tr.write_line(f"  {pattern_name:<11} interleaved, thread CPU time, min of {INTERLEAVED_ROUNDS}: step "
                          f"{step:.3f} s, recompute {full:.3f} s, step / recompute = {step / full:.2f}")
        if heads and gqa:
            kv = 2 * B * T * SIZE * SIZE * D * 4 / 2**20
            tr.write_line(f"  {pattern_name:<11} GQA N_kv=2: {gqa:.3f} s, N_kv=8: {heads:.3f} s, "
                          f"GQA / full heads = {gqa / heads:.2f} (K+V {kv * 2:.0f} MB vs {kv * N:.0f} MB)")
