"""Strided kernels (forward, dQ, dK/dV) in Triton's interpreter against the float64 reference.

Every configuration of each list runs once (forced), on classes larger than one block so that
the backward has several query and key blocks per class; then the options one by one and
combined: causal, causal_affinity on/off, labels, grouped key/value heads, fewer query frames
than key frames (absolute frames for residues and causality), a class with no query frame.
"""
from __future__ import annotations

import pytest
import torch

from sst_triton import triton_path
from sst_triton.kernels import capture_grids, strided_bwd, strided_fwd
from sst_triton.kernels.backward import attention_backward
from sst_triton.kernels.launch import Problem
from sst_triton.patterns import Pattern
from sst_triton.reference import reference_attention

SCALE = 0.3


def make(B, N, N_kv, T_q, T, H, W, D, num_obj):
    q = torch.randn(B, N, T_q, H, W, D)
    k, v = (torch.randn(B, N_kv, T, H, W, D) for _ in range(2))
    labels = torch.randint(-1, num_obj, (B, T, H, W)) if num_obj else None
    return q, k, v, labels


def run_and_check(q, k, v, labels, num_obj, pattern, causal_affinity=True, config=None, config_dq=None,
                  config_dkdv=None, backward=True):
    """Forward and backward of the kernels against the float64 reference (autograd for the
    gradients, through out and affinity); returns the kernels' gradients."""
    O = num_obj or None
    out, aff, lse, arg = triton_path.forward(q, k, v, pattern, SCALE, labels, O, causal_affinity, config=config)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    expected = reference_attention(qd, kd, vd, pattern, SCALE, labels, O, causal_affinity, return_lse=True)
    ref_out, ref_lse = expected[0], expected[-1]
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    go = torch.randn_like(out)
    loss = (ref_out * go.double()).sum()
    ga = None
    if num_obj:
        ref_aff = expected[1]
        torch.testing.assert_close(aff.double(), ref_aff, atol=1e-4, rtol=1e-4)
        # the argmax names a key of that object (absolute cell index), -1 exactly where no key was eligible
        B, T = labels.shape[:2]
        flat = labels.reshape(B, 1, 1, -1).expand(-1, arg.shape[1], num_obj, -1)
        found = arg.reshape(*arg.shape[:3], -1) >= 0
        key_label = flat.gather(-1, arg.reshape(*arg.shape[:3], -1).clamp(min=0).long())
        objects = torch.arange(num_obj).view(1, 1, -1, 1)
        assert bool(((key_label == objects) | ~found).all())
        assert torch.equal(found, aff.reshape(found.shape) > 0)
        ga = torch.randn_like(aff)
        loss = loss + (ref_aff * ga.double()).sum()
    if not backward:
        return None
    loss.backward()
    dq, dk, dv = attention_backward(go, q, k, v, out, lse, pattern, SCALE, ga, aff, arg,
                                    config_dq=config_dq, config_dkdv=config_dkdv)
    for name, got, want in (("dq", dq, qd.grad), ("dk", dk, kd.grad), ("dv", dv, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    return dq, dk, dv


# classes of 180 cells: two query blocks of 128 and several key blocks at every configuration
BIG = dict(B=1, N=1, N_kv=1, T_q=3, T=3, H=10, W=12, D=16, num_obj=2)
BIG_PATTERN = Pattern.strided((1, 1, 2))


def _ids(config):
    return "-".join(f"{v}" for v in config.kwargs.values()) + f"-w{config.num_warps}"


@pytest.mark.parametrize("config", strided_fwd.CONFIGS, ids=_ids)
def test_forward_every_config(config):
    q, k, v, labels = make(**BIG)
    run_and_check(q, k, v, labels, BIG["num_obj"], BIG_PATTERN, config=config, backward=False)


@pytest.mark.parametrize(
    "config_dq,config_dkdv", list(zip(strided_bwd.CONFIGS_DQ, strided_bwd.CONFIGS_DKDV)),
    ids=[f"dq{_ids(a)}_dkdv{_ids(b)}" for a, b in zip(strided_bwd.CONFIGS_DQ, strided_bwd.CONFIGS_DKDV)],
)
def test_backward_every_config(config_dq, config_dkdv):
    q, k, v, labels = make(**{**BIG, "T_q": 2})
    run_and_check(q, k, v, labels, BIG["num_obj"], Pattern.strided((1, 1, 2), causal=True),
                  config=strided_fwd.CONFIGS[-1], config_dq=config_dq, config_dkdv=config_dkdv)


def test_config_lists_have_distinct_entries_and_the_interpreter_runs_a_large_block():
    for configs in (strided_fwd.CONFIGS, strided_bwd.CONFIGS_DQ, strided_bwd.CONFIGS_DKDV):
        texts = [(tuple(c.kwargs.items()), c.num_warps, c.num_stages) for c in configs]
        assert len(set(texts)) == len(texts)
    assert strided_fwd.configs_for(32)[0].kwargs["BLOCK_M"] >= 64


CASES = {
    # name: (sizes, pattern, causal_affinity); few programs each (B*N*classes*blocks): the interpreter is slow
    "plain": (dict(B=2, N=1, N_kv=1, T_q=3, T=3, H=4, W=5, D=16, num_obj=0), Pattern.strided((1, 2, 2)), True),
    "labels-causal": (dict(B=1, N=1, N_kv=1, T_q=4, T=4, H=4, W=5, D=16, num_obj=3),
                      Pattern.strided((2, 1, 2), causal=True), True),
    "labels-no-causal-affinity": (dict(B=1, N=1, N_kv=1, T_q=3, T=3, H=5, W=4, D=16, num_obj=2),
                                  Pattern.strided((1, 2, 2)), False),
    "gqa": (dict(B=1, N=2, N_kv=1, T_q=3, T=3, H=4, W=5, D=16, num_obj=2), Pattern.strided((1, 1, 2)), True),
    "mqa-causal": (dict(B=1, N=3, N_kv=1, T_q=2, T=2, H=4, W=4, D=16, num_obj=0),
                   Pattern.strided((1, 2, 1), causal=True), True),
    "tq-lt-t": (dict(B=1, N=1, N_kv=1, T_q=2, T=4, H=4, W=5, D=16, num_obj=2), Pattern.strided((2, 1, 2)), True),
    "tq-1-causal": (dict(B=1, N=1, N_kv=1, T_q=1, T=3, H=4, W=4, D=16, num_obj=2),
                    Pattern.strided((1, 2, 2), causal=True), False),
    "gqa-tq-causal-labels": (dict(B=1, N=4, N_kv=2, T_q=2, T=3, H=4, W=5, D=16, num_obj=3),
                             Pattern.strided((2, 1, 2), causal=True), True),
    "stride-past-axes": (dict(B=1, N=1, N_kv=1, T_q=2, T=3, H=2, W=3, D=24, num_obj=2),
                         Pattern.strided((5, 1, 7)), True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_options(name):
    sizes, pattern, causal_affinity = CASES[name]
    q, k, v, labels = make(**sizes)
    run_and_check(q, k, v, labels, sizes["num_obj"], pattern, causal_affinity)


def test_classes_without_query_frames_get_zero_key_gradients():
    """stride 3 in time, 4 frames, only the last one a query frame: the keys of classes t = 1, 2
    (mod 3) are read by no query."""
    q, k, v, labels = make(B=1, N=2, N_kv=1, T_q=1, T=4, H=2, W=4, D=16, num_obj=2)
    pattern = Pattern.strided((3, 1, 2))
    dq, dk, dv = run_and_check(q, k, v, labels, 2, pattern)
    assert torch.count_nonzero(dk[:, :, 1:3]) == 0 and torch.count_nonzero(dv[:, :, 1:3]) == 0
    assert torch.count_nonzero(dk[:, :, 0]) > 0 and torch.count_nonzero(dk[:, :, 3]) > 0


def test_grouped_backward_is_deterministic():
    q, k, v, labels = make(B=1, N=4, N_kv=1, T_q=2, T=3, H=4, W=4, D=16, num_obj=2)
    pattern = Pattern.strided((1, 1, 2))
    out, aff, lse, arg = triton_path.forward(q, k, v, pattern, SCALE, labels, 2)
    go, ga = torch.randn_like(out), torch.randn_like(aff)
    first = attention_backward(go, q, k, v, out, lse, pattern, SCALE, ga, aff, arg)
    second = attention_backward(go, q, k, v, out, lse, pattern, SCALE, ga, aff, arg)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_grids_are_one_axis():
    q, k, v, labels = make(B=2, N=4, N_kv=2, T_q=2, T=3, H=8, W=8, D=16, num_obj=0)
    pattern = Pattern.strided((1, 4, 4))
    with capture_grids(launch=False) as grids:
        out, _, lse, _ = triton_path.forward(q, k, v, pattern)
        attention_backward(out, q, k, v, out, lse, pattern, SCALE)
    names = [name for name, _ in grids]
    assert names == ["strided_fwd", "strided_bwd_dq", "strided_bwd_dkdv"]
    for name, grid in grids:
        assert len(grid) == 1, (name, grid)
    # (B*N) * classes * blocks: 8 heads, 16 classes, one block of the 2*2*2 query cells per class
    assert grids[0][1] == (8 * 16,) and grids[1][1] == (8 * 16,)
    assert grids[2][1] == (2 * 2 * 16,)  # dK/dV per key/value head


@pytest.mark.parametrize("causal", [False, True])
def test_work_targets_at_the_issue_shape(causal):
    """Issue 11 shape (T, H, W = 4, 24, 40, D = 32, 3 objects, stride (1, 4, 4)) at the
    interpreter's configurations: softmax elements per useful pair E <= 1.25 and loads per
    distinct byte L <= 6 for every strided kernel (the models are exact, see
    sst_triton.kernels.instrument and tests/test_work_model.py)."""
    pattern = Pattern.strided((1, 4, 4), causal=causal)
    p = Problem(1, 8, 8, 4, 4, 24, 40, 32, pattern, 3)
    plane = 6 * 10
    useful = 8 * 16 * (sum((t + 1) * plane * plane for t in range(4)) if causal else (4 * plane) ** 2)
    fwd = strided_fwd.work_forward(p, strided_fwd.configs_for(32)[0])
    dq, dkdv = strided_bwd.work_backward(p, strided_bwd.configs_for("dq", 32)[0], strided_bwd.configs_for("dkdv", 32)[0])
    for work in (fwd, dq, dkdv):
        assert work.reuse <= 6.0
        # causal pads up to a whole frame plane per block: E may exceed 1.25 there
        assert work.exp / useful <= (1.25 if not causal else 2.0)
