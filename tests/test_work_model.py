"""The work model of every kernel equals what the kernel issues, and meets issue 11's bounds.

Each kernel module models the work its kernels issue (``work_forward`` / ``work_backward``,
:mod:`sst_triton.kernels.work`); :mod:`sst_triton.kernels.instrument` counts it by running
the kernel in Triton's interpreter with the builder instrumented. Here the two are held
equal at small shapes (several configurations and options), and the E/L targets of
issue 11 are asserted at the issue's shape (T, H, W = 4, 24, 40, D = 32, 3 objects, the
interpreter's configuration ``CONFIGS[0]``) from the validated model: the interpreter would
need minutes there.

Generic over :data:`sst_triton.kernels.FORWARD` / :data:`~sst_triton.kernels.BACKWARD`: a
new pattern is covered by registering it.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from sst_triton.kernels import BACKWARD, FORWARD, _common, instrument
from sst_triton.kernels.launch import Problem
from sst_triton.kernels.work import Work
from sst_triton.patterns import Pattern

PATTERNS = {
    "local": [Pattern.local((3, 5, 5)), Pattern.local((3, 3, 5), boundary="shift", causal=True)],
    "strided": [Pattern.strided((2, 2, 3)), Pattern.strided((1, 3, 2), causal=True)],
    "grid": [Pattern.grid(), Pattern.grid(causal=True)],
}
# small, with no side a multiple of a tile, one frame fewer than a full window for (3, 5, 5)
SHAPE = dict(T=3, H=7, W=10, D=24)


def _module(launcher):
    return sys.modules[launcher.__module__]


def _problems(kind: str) -> list[tuple[str, Problem]]:
    """Options each model must follow: objects or none, causal, shift; a plain batch of two
    heads; version 2: grouped key/value heads and fewer query frames than key frames."""
    T, H, W, D = SHAPE["T"], SHAPE["H"], SHAPE["W"], SHAPE["D"]
    first, second = PATTERNS[kind]
    return [
        ("objects", Problem(1, 1, 1, T, T, H, W, D, first, num_obj=3)),
        ("plain-B2", Problem(2, 1, 1, 2, 2, 5, W, 16, first)),
        ("causal-objects", Problem(1, 1, 1, T, T, H, W, D, second, num_obj=2)),
        ("gqa-streaming", Problem(1, 2, 1, 1, T, H, W, D, second, num_obj=2)),
    ]


def _cases(table, config_lists):
    cases = []
    for kind, launcher in table.items():
        module = _module(launcher)
        lists = [getattr(module, name) for name in config_lists]
        n = max(len(c) for c in lists)
        for label, problem in _problems(kind):
            # every configuration once over the options, the first with every option
            for i in range(n):
                if i > 0 and label != "objects":
                    continue
                configs = tuple(c[i % len(c)] for c in lists)
                cases.append(pytest.param(module, problem, configs, id=f"{kind}-{label}-config{i}"))
    return cases


def _asdict(work: Work) -> dict:
    return dict(exp=work.exp, dot_flops=work.dot_flops, load_bytes=work.load_bytes,
                distinct_bytes=work.distinct_bytes, programs=work.programs, store_bytes=work.store_bytes)


def _model(module, name):
    fn = getattr(module, name, None)
    if fn is None:
        pytest.fail(f"{module.__name__} has no {name}(): the work model of issue 11 is missing")
    return fn


@pytest.mark.parametrize("module,problem,configs", _cases(FORWARD, ["CONFIGS"]))
def test_forward_model_equals_the_instrumented_count(module, problem, configs):
    (config,) = configs
    counted = instrument.count_problem_forward(problem, config)
    modelled = _model(module, "work_forward")(problem, config)
    assert _asdict(modelled) == _asdict(counted)


@pytest.mark.parametrize("module,problem,configs", _cases(BACKWARD, ["CONFIGS_DQ", "CONFIGS_DKDV"]))
def test_backward_model_equals_the_instrumented_count(module, problem, configs):
    config_dq, config_dkdv = configs
    counted = instrument.count_problem_backward(problem, config_dq, config_dkdv)
    modelled = _model(module, "work_backward")(problem, config_dq, config_dkdv)
    assert [_asdict(w) for w in modelled] == [_asdict(w) for w in counted]


@pytest.mark.parametrize("problem,causal_affinity,dtype", [
    (Problem(1, 2, 1, 2, 3, 17, 18, 8, Pattern.grid(), num_obj=3), False, torch.bfloat16),
    (Problem(1, 2, 1, 1, 3, 7, 10, 24, Pattern.grid(causal=True), num_obj=2), True, torch.float32),
    (Problem(2, 1, 1, 2, 2, 5, 10, 16, Pattern.grid(causal=True)), False, torch.float16),
], ids=["gqa-streaming-objects-bf16", "causal-streaming-fp32", "plain-B2-fp16"])
def test_grid_single_pass_model_equals_the_instrumented_count(problem, causal_affinity, dtype):
    """grid's single-pass kernel (its BH/BW configurations) beyond the generic cases above:
    same-frame labels (causal_affinity=False), 16-bit elements, several tiles per axis with
    the last part-filled (its batched 3-D products counted as 2 * batch * M * N * K)."""
    from sst_triton.kernels import grid_fwd

    for config in grid_fwd.TILE_CONFIGS:
        counted = instrument.count_problem_forward(problem, config, dtype, causal_affinity)
        modelled = grid_fwd.work_forward(problem, config, dtype.itemsize, causal_affinity, dtype == torch.float16)
        assert _asdict(modelled) == _asdict(counted)


# ---------------------------------------------------------------------------------------
# Issue 11's targets, at its shape, under the interpreter's configuration
# ---------------------------------------------------------------------------------------

ISSUE_PATTERNS = [
    ("local", Pattern.local((7, 5, 5)), 2.6, 3.0),
    ("local", Pattern.local((3, 7, 7)), 2.6, 3.0),
    ("strided", Pattern.strided((1, 4, 4)), 1.25, 1.25),
    ("grid", Pattern.grid(), 2.0, 2.0),
]
MAX_L = 6.0


def _issue_problem(pattern):
    return Problem(1, 1, 1, 4, 4, 24, 40, 32, pattern, num_obj=3)


@pytest.mark.parametrize("kind,pattern,e_fwd,e_bwd", ISSUE_PATTERNS,
                         ids=["local-7-5-5", "local-3-7-7", "strided-1-4-4", "grid"])
def test_issue_11_bounds_at_the_issue_shape(kind, pattern, e_fwd, e_bwd):
    p = _issue_problem(pattern)
    fwd_module, bwd_module = _module(FORWARD[kind]), _module(BACKWARD[kind])
    fwd = _model(fwd_module, "work_forward")(p, fwd_module.CONFIGS[0])
    bwd = _model(bwd_module, "work_backward")(p, bwd_module.CONFIGS_DQ[0], bwd_module.CONFIGS_DKDV[0])
    # (dQ, dK/dV) kernels, or one fused dQ + dK/dV kernel
    names = ("dq", "dkdv") if len(bwd) == 2 else ("dq+dkdv",)
    useful = instrument.useful_pairs(p)
    report = {name: (w.exp / useful, w.reuse) for name, w in (("fwd", fwd), *zip(names, bwd))}
    assert report["fwd"][0] <= e_fwd, report
    assert all(report[name][0] <= e_bwd for name in names), report
    assert all(l <= MAX_L for _, l in report.values()), report


# ---------------------------------------------------------------------------------------
# The counter itself
# ---------------------------------------------------------------------------------------


@triton.jit
def _probe(A, B, C, M, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    a = tl.load(A + offs[:, None] * BLOCK + offs[None, :], mask=offs[:, None] < N, other=0.0)
    b = tl.load(B + offs[:, None] * BLOCK + offs[None, :])
    c = tl.dot(a, b)
    c = tl.exp(c) + tl.exp2(tl.max(c, axis=1))[:, None]
    tl.store(C + pid * BLOCK * BLOCK + offs[:, None] * BLOCK + offs[None, :], c)
    tl.store(M + pid * BLOCK + offs, tl.max(c, axis=1), mask=offs < N)


def test_counter_applies_the_counting_rules_to_a_known_kernel():
    a, b, c, m = torch.randn(16, 16), torch.randn(16, 16), torch.empty(3, 16, 16), torch.empty(3, 16)
    with instrument.instrumented() as launches:
        _common.interpreted(_probe)[(3,)](a, b, c, m, 10, BLOCK=16)
    assert [launch.name for launch in launches] == ["_probe"]
    work = launches[0].work
    assert work.programs == 3
    assert work.exp == 3 * (16 * 16 + 16)  # every lane of exp, and exp2 of a [16] vector
    assert work.dot_flops == 3 * 2 * 16 * 16 * 16
    assert work.load_bytes == 3 * (10 * 16 + 16 * 16) * 4  # masked rows of A are not read
    assert work.distinct_bytes == (10 * 16 + 16 * 16) * 4  # each program reads the same bytes
    # every lane of the unmasked store, the 10 unmasked lanes of the masked one, every program
    assert work.store_bytes == 3 * (16 * 16 + 10) * 4
    # and the kernel still computed the right thing
    ref = torch.exp(a[:10] @ b)
    assert torch.allclose(c[1, :10], ref + torch.exp2((a[:10] @ b).max(1).values)[:, None], rtol=1e-4)


def test_counter_books_a_fused_backward_as_one_kernel():
    """grid's backward computes dQ, dK and dV in one kernel per axis: one Work, both launches."""
    p = Problem(1, 1, 1, 2, 2, 3, 4, 16, Pattern.grid(), num_obj=2)
    (fused,) = instrument.count_problem_backward(p)
    assert fused.programs == p.T * p.H + p.T_q * p.W  # a row pass and a column pass, one line each
    assert fused.exp > 0 and fused.store_bytes > 0


def test_counter_books_dq_and_dkdv_kernels_apart():
    p = Problem(1, 1, 1, 2, 2, 5, 6, 16, Pattern.strided((1, 2, 2)), num_obj=2)
    dq, dkdv = instrument.count_problem_backward(p)
    assert dq.programs > 0 and dkdv.programs > 0
    assert dq.exp > 0 and dkdv.exp > 0
    # dK/dV multiplies more (dV and dK from the same P): two launches were not merged
    assert dq != dkdv


@pytest.mark.parametrize("pattern", [
    Pattern.local((3, 5, 5)), Pattern.local((3, 3, 5), boundary="shift", causal=True),
    Pattern.local((3, 3, 3), dilation=(1, 2, 3)), Pattern.strided((2, 2, 3), causal=True),
    Pattern.grid(), Pattern.grid(causal=True),
], ids=str)
@pytest.mark.parametrize("T_q", [3, 1])
def test_useful_pairs_closed_form_equals_the_dense_mask(pattern, T_q):
    p = Problem(2, 2, 1, T_q, 3, 7, 9, 16, pattern)
    assert instrument.useful_pairs(p) == instrument.useful_pairs_dense(p)
