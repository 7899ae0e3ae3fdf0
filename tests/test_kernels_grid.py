"""The grid kernels (``sst_triton.kernels.grid_fwd`` / ``grid_bwd``) in Triton's interpreter.

Every configuration of every list, forced, against the float64 dense reference (out,
affinity, lse; gradients through all three); several query tiles and key blocks per axis;
causal, causal affinity on and off, labels or none; version 2 inside the kernels (grouped
key/value heads, fewer query frames than key frames) alone and combined, and the plain-call
equivalences they must keep; launch grids within CUDA's limits at sizes the interpreter
could not run.
"""
from __future__ import annotations

import pytest
import torch

from sst_triton import Pattern, triton_path
from sst_triton.kernels import grid_bwd, grid_fwd
from sst_triton.kernels.backward import attention_backward
from sst_triton.kernels.launch import GRID_LIMITS, capture_grids
from sst_triton.reference import reference_attention

O = 3


def _inputs(B, N, N_kv, T_q, T, H, W, D, labels=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, T_q, H, W, D, generator=gen)
    k = torch.randn(B, N_kv, T, H, W, D, generator=gen)
    v = torch.randn(B, N_kv, T, H, W, D, generator=gen)
    lab = torch.randint(-1, O, (B, T, H, W), generator=gen) if labels else None
    return q, k, v, lab


def _forward(q, k, v, pattern, lab, causal_affinity, config):
    return triton_path.forward(q, k, v, pattern, None, lab, O if lab is not None else None, causal_affinity,
                               config=config)


def _check_forward(shape, causal, causal_affinity, labels, config):
    q, k, v, lab = _inputs(*shape, labels=labels)
    pattern = Pattern.grid(causal=causal)
    out, aff, lse, arg = _forward(q, k, v, pattern, lab, causal_affinity, config)
    ref = reference_attention(q, k, v, pattern, None, lab, O if labels else None, causal_affinity, return_lse=True)
    torch.testing.assert_close(out.double(), ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref[-1], rtol=1e-4, atol=1e-4)
    if labels:
        torch.testing.assert_close(aff.double(), ref[1], rtol=1e-4, atol=1e-4)
        # the case exercises affinities: some found, and the argmax is where they were found
        assert (aff > 0).any() and ((arg >= 0) == (aff > 0)).all()
    else:
        assert aff is None and arg is None
    return out, aff, lse, arg


# (B, N, N_kv, T_q, T, H, W, D)
CONFIG_CASES = [
    # 16-wide tiles: 2 query tiles and 2 key blocks along both the row (W=18) and the column (H=17)
    (0, (1, 1, 1, 1, 2, 17, 18, 8)),
    # wider tiles: W=40 is two key blocks of 32 along the row; W=36 two query tiles of 32
    (1, (1, 2, 1, 2, 3, 5, 40, 16)),
    (2, (1, 1, 1, 2, 2, 3, 40, 8)),
    (3, (1, 1, 1, 1, 3, 4, 36, 24)),
    # the single pass on 16 x 16 tiles: 2 tiles and 2 key blocks along both axes, the last
    # tile part-filled on each (H=17, W=18), GQA, one query frame fewer
    (4, (1, 2, 1, 2, 3, 17, 18, 8)),
]


@pytest.mark.parametrize("index,shape", CONFIG_CASES, ids=[f"config{i}" for i, _ in CONFIG_CASES])
def test_forward_every_config(index, shape):
    _check_forward(shape, causal=False, causal_affinity=False, labels=True, config=grid_fwd.CONFIGS[index])


OPTION_CASES = [
    # causal, causal_affinity, labels, (B, N, N_kv, T_q, T, H, W, D)
    (False, True, True, (2, 1, 1, 3, 3, 4, 5, 8)),
    (True, True, True, (1, 2, 2, 3, 3, 3, 5, 8)),
    (True, False, True, (1, 1, 1, 3, 3, 5, 3, 8)),
    (False, True, False, (1, 1, 1, 2, 2, 3, 4, 20)),
    # GQA (group 2 and MQA), fewer query frames, both, with the other options
    (False, False, True, (1, 4, 2, 3, 3, 3, 4, 8)),
    (False, True, True, (1, 3, 1, 1, 4, 3, 4, 8)),
    (True, True, True, (1, 4, 2, 2, 4, 3, 4, 8)),
    (True, False, False, (2, 2, 1, 2, 3, 4, 3, 8)),
    # one row / one column: a pass without keys of its own axis
    (False, False, True, (1, 1, 1, 2, 3, 1, 5, 8)),
    (True, False, True, (1, 1, 1, 2, 3, 5, 1, 8)),
]


@pytest.mark.parametrize("causal,causal_affinity,labels,shape", OPTION_CASES)
def test_forward_options(causal, causal_affinity, labels, shape):
    _check_forward(shape, causal, causal_affinity, labels, config=None)


TILE_OPTION_CASES = [
    # causal, causal_affinity, labels, (B, N, N_kv, T_q, T, H, W, D)
    (True, False, True, (1, 2, 1, 2, 4, 18, 17, 8)),  # GQA, T_q < T, affinity in the frame too
    (False, True, True, (2, 1, 1, 3, 3, 5, 19, 20)),
    (True, True, False, (1, 3, 1, 1, 3, 20, 3, 8)),
    # one row / one column: no column keys / one row key
    (False, False, True, (1, 1, 1, 2, 3, 1, 5, 8)),
    (True, False, True, (1, 1, 1, 2, 3, 5, 1, 8)),
]


@pytest.mark.parametrize("causal,causal_affinity,labels,shape", TILE_OPTION_CASES)
def test_single_pass_options(causal, causal_affinity, labels, shape):
    """The single-pass kernel (a BH/BW configuration) against the float64 reference: every
    option, grouped heads, fewer query frames, H and W not multiples of the tile."""
    (tiles,) = grid_fwd.TILE_CONFIGS
    _check_forward(shape, causal, causal_affinity, labels, config=tiles)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_single_pass_half_precision(dtype):
    """16-bit inputs on the single pass: within two roundings of the dtype of the float64
    reference (relative to the largest |v|), affinities and argmax those of the two passes."""
    shape = (1, 2, 1, 2, 3, 17, 18, 8)
    q, k, v, lab = _inputs(*shape)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    pattern = Pattern.grid()
    out, aff, lse, arg = _forward(q, k, v, pattern, lab, False, grid_fwd.TILE_CONFIGS[0])
    ref = reference_attention(q.double(), k.double(), v.double(), pattern, None, lab, O, False, return_lse=True)
    assert out.dtype == dtype
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    err = ((out.double() - ref[0]).abs() / v.double().abs().max()).max().item()
    assert err <= 2 * u, err
    torch.testing.assert_close(lse.double(), ref[-1], rtol=1e-3, atol=1e-3)
    two_pass = _forward(q, k, v, pattern, lab, False, grid_fwd.CONFIGS[0])
    torch.testing.assert_close(aff, two_pass[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(arg, two_pass[3])


def test_launcher_dispatches_by_configuration_kind():
    """A BLOCK_M configuration runs the two passes, a BH/BW one the single pass (one program
    per tile of a query frame, grid on axis 0 within CUDA's limits at sizes the interpreter
    cannot run), and the interpreter's default is the first, a two-pass one."""
    pattern = Pattern.grid()
    (tiles,) = grid_fwd.TILE_CONFIGS
    assert "BLOCK_M" in grid_fwd.CONFIGS[0].kwargs
    q = torch.empty(1, 2, 3, 17, 40, 16)
    with capture_grids(launch=False) as seen:
        triton_path.forward(q, q, q, pattern, config=tiles)
    assert seen == [("grid_fwd_tiles", (2 * 3 * 3 * 2,))]  # cdiv(17,16) * cdiv(40,16) * T_q * B*N
    with capture_grids(launch=False) as seen:
        triton_path.forward(q, q, q, pattern)
    assert [name for name, _ in seen] == ["grid_fwd_rows", "grid_fwd_cols"]
    # cdiv(H, 16) * T_q = 68,750 tiles of one head; B*N = 65,536 heads of one tile
    for B, N, T, H, W in ((1, 1, 1, 1_100_000, 1), (2, 32_768, 1, 1, 2)):
        q = torch.empty(B, N, T, H, W, 16)
        with capture_grids(launch=False) as seen:
            triton_path.forward(q, q, q, pattern, config=tiles)
        ((name, grid),) = seen
        assert name == "grid_fwd_tiles" and len(grid) == 1 and 65_535 < grid[0] <= GRID_LIMITS[0]


def test_cuda_default_times_both_kinds_once_per_key(monkeypatch):
    """On CUDA with no configuration forced, the launcher autotunes each kind where its
    configurations are kept, times them once per autotuning key, then runs the faster one;
    where the single pass has no configuration (head dim 64) only the two passes run.
    The kernels are stand-ins here (no GPU): what is checked is the choice."""
    import triton.testing

    from sst_triton.kernels.launch import Problem

    calls = []
    monkeypatch.setattr(grid_fwd, "_launch_two_pass", lambda *a, **kw: calls.append("two_pass"))
    monkeypatch.setattr(grid_fwd, "_launch_tiles", lambda *a, **kw: calls.append("tiles"))
    speed = {"two_pass": 2.0, "tiles": 1.0}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: (fn(), speed[calls[-1]])[1])
    monkeypatch.setattr(grid_fwd, "_FASTEST_KIND", {})
    q = torch.empty(1, 1, 2, 3, 4, 32)
    meta = dict(BLOCK_D=32, CAUSAL=False, CAUSAL_AFF=True)
    p = Problem(1, 1, 1, 2, 2, 3, 4, 32, Pattern.grid())
    grid_fwd.launch_forward(p, (q,), (), 1.0, meta, interpret=False)
    # each kind tuned, then timed, then the faster one run
    assert calls == ["two_pass", "two_pass", "tiles", "tiles", "tiles"]
    calls.clear()
    grid_fwd.launch_forward(p, (q,), (), 1.0, meta, interpret=False)
    assert calls == ["tiles"]  # remembered for the key
    calls.clear()
    p64 = Problem(1, 1, 1, 2, 2, 3, 4, 64, Pattern.grid())
    grid_fwd.launch_forward(p64, (q,), (), 1.0, {**meta, "BLOCK_D": 64}, interpret=False)
    assert calls == ["two_pass", "two_pass", "two_pass"]


def test_single_pass_configurations_are_pruned_apart():
    """Each kind's autotuner sees only its own configurations, pruned per head dim by the one
    table (the single pass compiles spill-free at head dim 32 only)."""
    prune = grid_fwd.kind_pruner(grid_fwd.CONFIGS_BY_HEAD_DIM)
    for tuned, kind in ((grid_fwd.grid_fwd_rows_tuned, "BLOCK_M"), (grid_fwd.grid_fwd_cols_tuned, "BLOCK_M"),
                        (grid_fwd.grid_fwd_tiles_tuned, "BH")):
        assert tuned.configs and all(kind in c.kwargs for c in tuned.configs)
    assert len(prune(grid_fwd.TILE_CONFIGS, {}, BLOCK_D=32)) == 1
    assert prune(grid_fwd.TILE_CONFIGS, {}, BLOCK_D=64) == [] == prune(grid_fwd.TILE_CONFIGS, {}, BLOCK_D=128)
    assert len(prune(grid_fwd.TWO_PASS_CONFIGS, {}, BLOCK_D=64)) == 4


def test_version_2_equals_the_plain_call():
    """GQA = the plain call on repeated K/V heads; T_q < T = the last T_q frames of a full call."""
    B, N, N_kv, T_q, T, H, W, D = 1, 4, 2, 2, 3, 3, 5, 8
    q, k, v, lab = _inputs(B, N, N_kv, T_q, T, H, W, D)
    pattern = Pattern.grid(causal=True)
    got = _forward(q, k, v, pattern, lab, True, None)
    full_q = torch.cat([torch.randn(B, N, T - T_q, H, W, D), q], dim=2)
    k_full, v_full = (x.repeat_interleave(N // N_kv, dim=1) for x in (k, v))
    want = _forward(full_q, k_full, v_full, pattern, lab, True, None)
    for name, a, b in zip(("out", "affinity", "lse", "argmax"), got, want):
        torch.testing.assert_close(a, b[:, :, -T_q:] if name in ("out", "lse") else b[:, :, :, -T_q:],
                                   rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def _check_backward(shape, causal, causal_affinity, labels, config_dq=None, config_dkdv=None, with_lse=True):
    q, k, v, lab = _inputs(*shape, labels=labels)
    pattern = Pattern.grid(causal=causal)
    num = O if labels else None
    out, aff, lse, arg = _forward(q, k, v, pattern, lab, causal_affinity, None)
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(out.shape, generator=gen)
    g_aff = torch.randn(aff.shape, generator=gen) if labels else None
    g_lse = torch.randn(lse.shape, generator=gen) if with_lse else None
    scale = shape[-1] ** -0.5
    grads = attention_backward(g_out, q, k, v, out, lse, pattern, scale, g_aff, aff, arg, grad_lse=g_lse,
                               config_dq=config_dq, config_dkdv=config_dkdv)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*leaves, pattern, None, lab, num, causal_affinity, return_lse=True)
    loss = (ref[0] * g_out.double()).sum()
    if labels:
        loss = loss + (ref[1] * g_aff.double()).sum()
    if with_lse:
        loss = loss + (ref[-1] * g_lse.double()).sum()
    expected = torch.autograd.grad(loss, leaves)
    for name, got, want in zip("qkv", grads, expected):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3, msg=lambda m: f"d{name}: {m}")


BACKWARD_CONFIG_CASES = [
    # 2 key blocks and 2 query blocks per axis (dQ read back by the second key block), GQA, a
    # frame without queries
    (0, (1, 2, 1, 1, 2, 17, 18, 8)),
    (1, (1, 1, 1, 2, 2, 3, 36, 8)),  # a row in one key block, two query blocks
    (2, (1, 1, 1, 2, 2, 3, 36, 8)),  # two key blocks of 32 along the row
    (3, (1, 1, 1, 2, 2, 17, 5, 8)),  # two key blocks of 16 along the column
    (4, (1, 2, 1, 2, 3, 3, 36, 8)),
    (5, (1, 1, 1, 2, 2, 3, 40, 8)),
]


@pytest.mark.parametrize("index,shape", BACKWARD_CONFIG_CASES, ids=[f"config{i}" for i, _ in BACKWARD_CONFIG_CASES])
def test_backward_every_config(index, shape):
    _check_backward(shape, causal=False, causal_affinity=True, labels=True,
                    config_dq=grid_bwd.CONFIGS_DQ[index], config_dkdv=grid_bwd.CONFIGS_DKDV[index])


BACKWARD_OPTION_CASES = [
    (False, False, True, (1, 1, 1, 3, 3, 3, 4, 8)),
    (True, True, True, (1, 4, 2, 2, 3, 3, 4, 8)),
    (True, False, False, (2, 2, 1, 1, 3, 3, 2, 8)),
    (False, True, True, (1, 3, 1, 2, 4, 2, 3, 8)),
]


@pytest.mark.parametrize("causal,causal_affinity,labels,shape", BACKWARD_OPTION_CASES)
def test_backward_options(causal, causal_affinity, labels, shape):
    _check_backward(shape, causal, causal_affinity, labels)


def test_grids_fit_cuda_limits_at_sizes_the_interpreter_cannot_run():
    """T*H = 70,000 and B*N = 65,536: every launch is one axis below 2**31."""
    pattern = Pattern.grid()
    for B, N, T, H, W in ((1, 1, 2, 35_000, 1), (2, 32_768, 1, 1, 2)):
        q = torch.empty(B, N, T, H, W, 16)
        with capture_grids(launch=False) as seen:
            out, _, lse, _ = triton_path.forward(q, q, q, pattern)
            attention_backward(q, q, q, q, out, lse, pattern, 1.0)
        names = {name for name, _ in seen}
        assert names == {"grid_fwd_rows", "grid_fwd_cols", "grid_bwd_rows", "grid_bwd_cols"}
        for name, grid in seen:
            assert len(grid) == 1 and 0 < grid[0] <= GRID_LIMITS[0], (name, grid)
        # the folded grid really carries T*H (or B*N): more programs than an axis y could hold
        assert max(g[0] for _, g in seen) > 65_535


def test_work_model_meets_issue_11_at_its_shape():
    """E <= 2 and L <= 6 for every grid kernel at T, H, W = 4, 24, 40, D = 32, 3 objects,
    CONFIGS[0] (the model is held equal to the instrumented count in tests/test_work_model.py)."""
    from sst_triton.kernels.instrument import useful_pairs
    from sst_triton.kernels.launch import Problem

    for pattern in (Pattern.grid(), Pattern.grid(causal=True)):
        p = Problem(1, 1, 1, 4, 4, 24, 40, 32, pattern, num_obj=3)
        fwd = grid_fwd.work_forward(p, grid_fwd.CONFIGS[0])
        (bwd,) = grid_bwd.work_backward(p, grid_bwd.CONFIGS[0])  # dQ, dK, dV: one fused kernel per axis
        for work in (fwd, bwd):
            assert work.exp / useful_pairs(p) <= 2.0 and work.reuse <= 6.0


def test_autotuned_column_passes_restore_what_they_update_in_place():
    """On CUDA the autotuner runs each configuration several times: a column pass reads the
    row pass's state from the buffers it then overwrites (Lse, Aff, Arg, Out when float32
    makes it the partial, dQ / dK / dV which always hold theirs), so every benchmark run must
    restore them."""
    assert set(grid_fwd.grid_fwd_cols_tuned.restore_value) == {"Out", "Lse", "Aff", "Arg"}
    assert set(grid_bwd.grid_bwd_cols_tuned.restore_value) == {"DQ", "DK", "DV"}
    # the row passes only write (the backward's row pass reads back only what it stored itself
    # in the same run): nothing to restore
    for tuned in (grid_fwd.grid_fwd_rows_tuned, grid_bwd.grid_bwd_rows_tuned):
        assert not tuned.restore_value
    # the forward's partial is the output itself in float32 (the in-place case), a scaled
    # float16 scratch for bfloat16 (int8 exponents per 16 queries of a row), float32 for float16
    from sst_triton.kernels.launch import Problem

    p = Problem(1, 2, 2, 1, 1, 3, 35, 4, Pattern.grid())
    out = torch.empty(1, 2, 1, 3, 35, 4)
    assert grid_fwd._partial(out, p)[0] is out
    part, exps = grid_fwd._partial(out.bfloat16(), p)
    assert part.dtype == torch.float16 and exps.dtype == torch.int8 and exps.shape == (2, 3, 3)
    assert grid_fwd._partial(out.half(), p)[0].dtype == torch.float32
    # the backward's partial gradients are the gradients themselves, in every dtype: no scratch
    for kernel in (grid_bwd.grid_bwd_rows, grid_bwd.grid_bwd_cols):
        assert not [name for name in kernel.arg_names if name.startswith("Part")], kernel.fn.__name__


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_partial_is_exact_in_range_and_modelled(dtype):
    """A bfloat16 output's partial is float16 scaled per 16 queries of a row: values far past
    float16's range (|v| ~ 2**20 in some rows, ~2**-10 in others, W = 35: three groups, one
    partial) come out within two bfloat16 roundings of the float64 reference, and the bytes
    the column pass reads (partial, exponents) are what the work model says."""
    from sst_triton.kernels.instrument import count_forward
    from sst_triton.kernels.launch import Problem

    shape = (1, 2, 1, 2, 3, 3, 35, 8)
    q, k, v, lab = _inputs(*shape)
    scale_rows = torch.tensor([2.0 ** 20, 2.0 ** -10, 1.0]).view(1, 1, 1, 3, 1, 1)
    v = v * (scale_rows if dtype == torch.bfloat16 else 1.0)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    pattern = Pattern.grid()
    out, aff, lse, arg = _forward(q, k, v, pattern, lab, True, grid_fwd.CONFIGS[0])
    ref = reference_attention(q.double(), k.double(), v.double(), pattern, None, lab, O, True, return_lse=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # per query: the error relative to its own largest |v| reached, ~ u of the dtype (2**-8 / 2**-11)
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    reach = v.double().abs().amax(dim=(2, 4, 5), keepdim=True).amax(dim=3, keepdim=True)  # rows mix via columns
    err = ((out.double() - ref[0]).abs() / reach).max().item()
    assert err <= 2 * u, err
    p = Problem(*shape, pattern, O)
    counted = count_forward(q, k, v, pattern, lab, O, True, config=grid_fwd.CONFIGS[0])
    modelled = grid_fwd.work_forward(p, grid_fwd.CONFIGS[0], 2, True, dtype == torch.float16)
    assert counted == modelled


def test_fused_backward_takes_one_configuration():
    """dQ, dK and dV come from one kernel per axis: config_dq and config_dkdv both configure
    it, so two different ones are refused (naming both), the same one twice is taken."""
    q, k, v, lab = _inputs(1, 1, 1, 1, 1, 2, 3, 8)
    pattern = Pattern.grid()
    out, _, lse, _ = _forward(q, k, v, pattern, None, True, None)
    first, other = grid_bwd.CONFIGS[0], grid_bwd.CONFIGS[1]
    with pytest.raises(ValueError, match="config_dq and config_dkdv"):
        attention_backward(out, q, k, v, out, lse, pattern, 1.0, config_dq=first, config_dkdv=other)
    with capture_grids(launch=False) as seen:
        attention_backward(out, q, k, v, out, lse, pattern, 1.0, config_dq=first, config_dkdv=first)
    # one program per row (T * H) and per column of a query frame (T_q * W)
    assert seen == [("grid_bwd_rows", (2,)), ("grid_bwd_cols", (3,))]
