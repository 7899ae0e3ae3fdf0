"""The local (cube) kernels in Triton's interpreter against the float64 dense reference.

Forward (``out``, ``affinity``, ``lse``) to 1e-4 and gradients of ``q``, ``k``, ``v``
(through ``out`` and ``affinity``) to 1e-3, in float32, for every configuration of each
kernel's list (forced), query boxes and key boxes several per axis (windows spanning
boxes), clip and shift, causal, both causal affinities, labels, and the version-2
additions inside the kernels: grouped key/value heads, fewer query frames than key
frames, dilation, and their combinations. Shapes are tiny (the interpreter is slow) and
their sides are no multiple of a box.
"""
from __future__ import annotations

import pytest
import torch

from sst_triton import Pattern
from sst_triton.kernels import capture_grids, local_bwd, local_fwd
from sst_triton.kernels.backward import attention_backward
from sst_triton.kernels.launch import GRID_LIMITS
from sst_triton.reference import reference_attention
from sst_triton.triton_path import forward


def _inputs(B, N, N_kv, T_q, T, H, W, D, num_obj):
    q = torch.randn(B, N, T_q, H, W, D)
    k = torch.randn(B, N_kv, T, H, W, D)
    v = torch.randn(B, N_kv, T, H, W, D)
    labels = torch.randint(-1, num_obj, (B, T, H, W)) if num_obj else None
    return q, k, v, labels


def check(shape, pattern, num_obj=2, causal_affinity=True, config=None, config_dq=None, config_dkdv=None,
          backward=True):
    """Run the local kernels on ``shape = (B, N, N_kv, T_q, T, H, W, D)`` and compare with the
    float64 reference (which repeats K/V heads and masks the dense map: no shared trick)."""
    q, k, v, labels = _inputs(*shape, num_obj)
    D = shape[-1]
    obj = num_obj or None
    out, aff, lse, arg = forward(q, k, v, pattern, None, labels, obj, causal_affinity, dilation=pattern.dilation,
                                 config=config)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*leaves, pattern, None, labels, obj, causal_affinity, return_lse=True)
    ref_out, ref_aff, ref_lse = ref if num_obj else (ref[0], None, ref[1])
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=1e-4, rtol=1e-4)
    if num_obj:
        torch.testing.assert_close(aff.double(), ref_aff.detach(), atol=1e-4, rtol=1e-4)
        # some affinity is non-zero: the case exercises the object path
        assert (aff > 0).any()
    if not backward:
        return
    g_out = torch.randn_like(out)
    g_aff = torch.randn_like(aff) if num_obj else None
    grads = attention_backward(g_out, q, k, v, out, lse, pattern, D ** -0.5, g_aff, aff, arg,
                               dilation=pattern.dilation, config_dq=config_dq, config_dkdv=config_dkdv)
    loss = (ref_out * g_out.double()).sum() + ((ref_aff * g_aff.double()).sum() if num_obj else 0)
    expected = torch.autograd.grad(loss, leaves)
    for name, got, want in zip("qkv", grads, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-3, msg=lambda m: f"d{name}: {m}")


# (B, N, N_kv, T_q, T, H, W, D), pattern: one case per configuration index, each mixing options
CONFIG_CASES = [
    ((1, 2, 1, 2, 3, 6, 9, 8), Pattern.local((3, 5, 3))),
    ((1, 1, 1, 3, 3, 5, 9, 8), Pattern.local((3, 3, 5), boundary="shift", causal=True)),
    ((1, 2, 1, 2, 3, 7, 6, 8), Pattern.local((3, 3, 3), dilation=(1, 2, 1))),
    ((1, 1, 1, 2, 3, 9, 5, 8), Pattern.local((3, 5, 5), boundary="shift")),
    ((1, 2, 1, 2, 4, 5, 7, 8), Pattern.local((3, 3, 3), causal=True, dilation=(2, 1, 2))),
    ((1, 1, 1, 2, 3, 9, 9, 8), Pattern.local((7, 5, 5))),
]


@pytest.mark.parametrize("index", range(len(local_fwd.CONFIGS)))
def test_forward_every_config(index):
    shape, pattern = CONFIG_CASES[index % len(CONFIG_CASES)]
    check(shape, pattern, config=local_fwd.CONFIGS[index], backward=False)


@pytest.mark.parametrize("index", range(max(len(local_bwd.CONFIGS_DQ), len(local_bwd.CONFIGS_DKDV))))
def test_backward_every_config(index):
    shape, pattern = CONFIG_CASES[(index + 1) % len(CONFIG_CASES)]
    check(shape, pattern, config_dq=local_bwd.CONFIGS_DQ[index % len(local_bwd.CONFIGS_DQ)],
          config_dkdv=local_bwd.CONFIGS_DKDV[index % len(local_bwd.CONFIGS_DKDV)])


@pytest.mark.parametrize("shape,pattern,causal_affinity", [
    # several query and key boxes per axis, windows spanning boxes, both boundaries
    ((1, 1, 1, 3, 3, 7, 9, 8), Pattern.local((3, 5, 5)), True),
    ((1, 1, 1, 2, 3, 7, 9, 8), Pattern.local((3, 5, 5), boundary="shift"), False),
    # kernel larger than every axis; head dim padded (40 -> 64)
    ((1, 1, 1, 3, 3, 3, 4, 40), Pattern.local((5, 7, 9), boundary="shift", causal=True), True),
    # GQA (4 query heads on 2 kv heads) with streaming queries (T_q = 1)
    ((1, 4, 2, 1, 3, 5, 6, 8), Pattern.local((3, 3, 3)), True),
    ((1, 3, 1, 2, 4, 4, 5, 8), Pattern.local((3, 3, 3), boundary="shift", causal=True), False),
    # dilation on every axis, with shift, causal, GQA and T_q < T together
    ((1, 2, 1, 2, 4, 5, 7, 8), Pattern.local((3, 3, 3), boundary="shift", causal=True, dilation=(2, 2, 3)), True),
    # dilation larger than an axis (empty residues), and dilated clip windows across boxes
    ((1, 1, 1, 2, 2, 3, 6, 8), Pattern.local((3, 3, 3), dilation=(3, 4, 2)), False),
], ids=["clip-boxes", "shift-boxes", "kernel-past-axes-D40", "gqa-streaming", "mqa-causal-shift",
        "dilation-all", "dilation-past-axes"])
def test_forward_and_backward(shape, pattern, causal_affinity):
    check(shape, pattern, causal_affinity=causal_affinity)


def test_without_labels():
    check((1, 2, 1, 2, 3, 4, 6, 8), Pattern.local((3, 3, 5), dilation=(1, 2, 1)), num_obj=0)


def test_plain_calls_agree_with_version_2_defaults():
    """``dilation = 1``, ``N_kv = N`` and ``T_q = T`` are exactly the plain call; a GQA call
    equals the plain call on K/V heads repeated by hand."""
    q, k, v, labels = _inputs(1, 2, 1, 3, 3, 4, 5, 8, 2)
    pattern = Pattern.local((3, 3, 3))
    gqa = forward(q, k, v, pattern, None, labels, 2, True, dilation=(1, 1, 1))
    rep = forward(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), pattern, None, labels, 2, True)
    for a, b in zip(gqa, rep):
        assert torch.equal(a, b)
    # the last query frame alone equals the last frame of the full call
    last = forward(q[:, :, -1:], k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), pattern, None, labels, 2, True)
    torch.testing.assert_close(last[0], rep[0][:, :, -1:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(last[1], rep[1][:, :, :, -1:], atol=1e-6, rtol=1e-6)


def test_grids_fold_everything_into_axis_0():
    """Boxes, dilation residues and every batch-head share axis 0 (``T = 70,000`` frames put
    the old grids' axis 1 past CUDA's 65,535), within CUDA's limits; a dilation past an axis
    launches no empty residue."""
    B, N, N_kv, T, H, W, D = 2, 4, 2, 70_000, 2, 3, 16
    q = torch.zeros(1, 1, 1, 1, 1, D).expand(B, N, T, H, W, D)
    k = torch.zeros(1, 1, 1, 1, 1, D).expand(B, N_kv, T, H, W, D)
    pattern = Pattern.local(3, dilation=(3, 5, 1))
    with capture_grids(launch=False) as grids:
        forward(q, k, k, pattern, dilation=pattern.dilation)
        attention_backward(q, q, k, k, q, q[..., 0], pattern, 1.0, dilation=pattern.dilation)
    assert [name for name, _ in grids] == ["local_fwd", "local_bwd_dq", "local_bwd_dkdv"]
    for name, grid in grids:
        assert len(grid) == 1 and grid[0] <= GRID_LIMITS[0], (name, grid)
    # boxes x residues x heads, the residues of dh = 5 > H = 2 cut to 2
    t_boxes = -(-(-(-T // 3)) // local_fwd.CONFIGS[0].kwargs["TILE_T"])
    assert grids[0][1][0] == t_boxes * 1 * 1 * (3 * 2 * 1) * B * N
    assert grids[2][1][0] == t_boxes * 1 * 1 * (3 * 2 * 1) * B * N_kv


@pytest.mark.parametrize("kernel_size", [(7, 5, 5), (3, 7, 7)])
def test_issue_11_work_at_the_issue_shape(kernel_size):
    """E and L of the interpreter's configurations at T, H, W = 4, 24, 40, D = 32, 3 objects
    (the models equal the instrumented counts: tests/test_work_model.py)."""
    from sst_triton.kernels import instrument
    from sst_triton.kernels.launch import Problem

    p = Problem(1, 1, 1, 4, 4, 24, 40, 32, Pattern.local(kernel_size), num_obj=3)
    useful = instrument.useful_pairs(p)
    fwd = local_fwd.work_forward(p, local_fwd.CONFIGS[0])
    dq, dkdv = local_bwd.work_backward(p, local_bwd.CONFIGS_DQ[0], local_bwd.CONFIGS_DKDV[0])
    assert fwd.exp / useful <= 2.6
    assert dq.exp / useful <= 3.0 and dkdv.exp / useful <= 3.0
    assert max(w.reuse for w in (fwd, dq, dkdv)) <= 6.0


def _kept_at(tuned, configs, block_d):
    """The configs ``tuned``'s autotuner keeps at padded head dim ``block_d``."""
    return tuned.early_config_prune(list(configs), {}, BLOCK_D=block_d)


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_head_dim_128_configs_across_boxes(kind):
    """Every config the GPU may pick at D = 128 (100 pads to 128), forced, with several query
    and key boxes per axis of the largest boxes (4 x 4 x 8, 2 x 8 x 8) and windows across them."""
    shape, pattern = (1, 1, 1, 5, 5, 5, 9, 100), Pattern.local((3, 5, 5), boundary="shift")
    if kind == "fwd":
        kept = _kept_at(local_fwd.local_fwd_tuned, local_fwd.CONFIGS, 128)
        assert any(c.kwargs["BLOCK_M"] == 128 for c in kept)
        for config in kept:
            check(shape, pattern, config=config, backward=False)
    else:
        dqs = _kept_at(local_bwd.local_bwd_dq_tuned, local_bwd.CONFIGS_DQ, 128)
        dkdvs = _kept_at(local_bwd.local_bwd_dkdv_tuned, local_bwd.CONFIGS_DKDV, 128)
        for i in range(max(len(dqs), len(dkdvs))):
            check(shape, pattern, config_dq=dqs[i % len(dqs)], config_dkdv=dkdvs[i % len(dkdvs)])


def test_head_dim_128_boxes_are_large_enough_for_l2():
    """At D = 128 a box re-reads every key of its halo from L2, so the bytes a kernel loads
    per FLOP fall as 1 / (queries per box). At the video-diffusion shape (issue 11: T, H, W =
    30, 48, 80, 24 heads, local (19, 25, 25), bf16) the forward lists a box issuing at least
    110 MMA FLOPs per byte loaded (989 TFLOP/s of bf16 tensor cores over ~9 TB/s of H100
    L2), and the dQ kernel a box of at least 32 queries (the 16-query box loads twice the
    bytes); the interpreter's first configs stay as the issue-11 counts need them."""
    from sst_triton.kernels.launch import Problem

    p = Problem(1, 24, 24, 30, 30, 48, 80, 128, Pattern.local((19, 25, 25)))
    fwd = _kept_at(local_fwd.local_fwd_tuned, local_fwd.CONFIGS, 128)
    intensity = {}
    for config in fwd:
        w = local_fwd.work_forward(p, config, 2)
        intensity[config.kwargs["BLOCK_M"]] = w.dot_flops / w.load_bytes
    assert max(intensity.values()) >= 110, intensity
    assert intensity[32] < 40  # the 32-query box: L2-bound, why the big boxes are listed
    dq = _kept_at(local_bwd.local_bwd_dq_tuned, local_bwd.CONFIGS_DQ, 128)
    assert max(c.kwargs["BLOCK_M"] for c in dq) >= 32
    first = local_fwd.CONFIGS[0]
    assert (first.kwargs, first.num_warps, first.num_stages) == (
        {"TILE_T": 2, "TILE_H": 4, "TILE_W": 4, "BLOCK_M": 32, "BLOCK_N": 32}, 4, 2)
