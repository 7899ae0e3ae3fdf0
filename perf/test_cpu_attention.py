"""CPU forward of each pattern: sst_triton's PyTorch path vs dense SDPA + bool mask vs compiled
FlexAttention, side by side, with the peak memory of each.

    pytest perf/ --benchmark-only

B=1, N=8, T=4, H=W in (32, 64), D=32, fp32 (the shapes of issue 2). Times are the min over
a few rounds (the machine may be shared). Memory is measured in a fresh process per case
(perf/peak_memory.py) and stored in each benchmark's ``extra_info``.
"""
from __future__ import annotations

import pytest
import torch

from cases import CASES, IMPLS, make_inputs, prepare
from peak_memory import measure
from sst_triton import Pattern, sparse_attention

SIZES = (32, 64)
# the dense baselines take seconds per call at 64x64: fewer rounds there
ROUNDS = {"sst": 5, "sdpa": 2, "flex": 2}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern_name", list(CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, perf_results, impl, pattern_name, size):
    benchmark.group = f"forward {pattern_name} T=4 H=W={size}"
    q, k, v = make_inputs(size)
    pattern = CASES[pattern_name]
    fn = prepare(impl, pattern, q)
    with torch.no_grad():
        out = benchmark.pedantic(fn, args=(q, k, v), rounds=ROUNDS[impl], warmup_rounds=1, iterations=1)
        # every contender computes the same attention (a wrong mask_mod would make the race meaningless)
        if impl != "sst":
            torch.testing.assert_close(out, sparse_attention(q, k, v, pattern), atol=2e-4, rtol=1e-3)
    mem = measure(impl, pattern_name, size)
    if impl == "sdpa":
        mem["mask_mb"] = (q.shape[2] * size * size) ** 2 / 2**20
    benchmark.extra_info.update(mem)
    perf_results[("forward", (pattern_name, size), impl)] = dict(time=benchmark.stats.stats.min, **mem)


SCALING = [(4, 16), (4, 32), (4, 64), (8, 64)]


@pytest.mark.parametrize("T,size", SCALING, ids=[f"T{t}-HW{s}" for t, s in SCALING])
@pytest.mark.parametrize("pattern_name", list(CASES))
def test_scaling(benchmark, perf_results, pattern_name, T, size):
    """How the PyTorch path's cost grows with S = T*H*W (grid, local: ~S; strided (1,8,8): ~S^2/64)."""
    S = T * size * size
    benchmark.group = f"scaling {pattern_name}"
    q, k, v = make_inputs(size, T=T)
    with torch.no_grad():
        benchmark.pedantic(sparse_attention, args=(q, k, v, CASES[pattern_name]), rounds=2, warmup_rounds=1)
    benchmark.extra_info["S"] = S
    perf_results[("scaling", pattern_name, S)] = benchmark.stats.stats.min
