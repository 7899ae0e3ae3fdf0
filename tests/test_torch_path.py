"""The PyTorch (CPU) path against the dense, masked float64 reference."""
import math

import pytest
import torch
from einops import rearrange

from sst_triton import Pattern, grid_attention, local_attention, sparse_attention, strided_attention
from sst_triton import torch_path
from sst_triton.patterns import dense_mask
from sst_triton.reference import reference_attention


def _id(p: Pattern) -> str:
    params = {"grid": "", "local": f"{p.kernel_size}{p.boundary}", "strided": f"{p.stride}"}[p.kind]
    return f"{p.kind}{params}{'-causal' if p.causal else ''}".replace(" ", "")

# (pattern, (B, N, T, H, W, D)): odd sizes, axes of length 1, kernels and strides longer
# than their axis, both boundaries, causal.
CASES = [
    (Pattern.grid(), (2, 2, 3, 5, 4, 8)),
    (Pattern.grid(causal=True), (1, 3, 4, 3, 5, 4)),
    (Pattern.grid(), (1, 2, 1, 1, 7, 4)),
    (Pattern.grid(causal=True), (1, 1, 5, 1, 1, 3)),
    (Pattern.local(3), (2, 2, 3, 5, 4, 8)),
    (Pattern.local((3, 5, 1), boundary="shift"), (1, 2, 3, 7, 4, 4)),
    (Pattern.local((5, 3, 3), causal=True), (1, 2, 4, 6, 5, 4)),
    (Pattern.local((3, 5, 7), boundary="shift", causal=True), (1, 1, 5, 4, 9, 4)),
    (Pattern.local(9), (1, 2, 2, 3, 5, 4)),
    (Pattern.local(9, boundary="shift"), (1, 2, 3, 11, 2, 4)),
    (Pattern.local((1, 3, 3)), (1, 1, 1, 1, 1, 4)),
    (Pattern.strided((1, 3, 2), causal=True), (2, 2, 3, 5, 4, 8)),
    (Pattern.strided(2), (1, 2, 5, 3, 7, 4)),
    (Pattern.strided((2, 8, 1)), (1, 2, 4, 5, 3, 4)),
    (Pattern.strided((3, 1, 5), causal=True), (1, 1, 7, 2, 6, 4)),
    (Pattern.strided(1), (1, 2, 2, 3, 3, 4)),
]


def _inputs(shape, dtype=torch.float32, fused=True):
    """q, k, v as non-contiguous views of one fused projection (as an nn module makes them)."""
    B, N, T, H, W, D = shape
    if not fused:
        return tuple(torch.randn(shape, dtype=dtype) for _ in range(3))
    qkv = torch.randn(B, T, H, W, 3 * N * D, dtype=dtype)
    q, k, v = rearrange(qkv, "b t h w (three n d) -> three b n t h w d", three=3, n=N)
    assert not q.is_contiguous() or T * H * W * N == 1
    return q, k, v


def _labels(B, T, H, W, num_objects):
    labels = torch.randint(-1, num_objects, (B, T, H, W))
    # object O-1 never occurs; object O-2 only in one cell of the last frame (absent from every history)
    labels[labels >= num_objects - 2] = 0
    labels[:, -1, 0, 0] = num_objects - 2
    return labels


def _grads(outputs, inputs, weights):
    loss = sum((o.double() * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("causal_affinity", [True, False])
@pytest.mark.parametrize("pattern,shape", CASES, ids=[f"{p.kind}{i}" for i, (p, _) in enumerate(CASES)])
def test_matches_reference_with_gradients(pattern, shape, causal_affinity):
    B, N, T, H, W, D = shape
    O = 4
    q, k, v = (x.detach().requires_grad_() for x in _inputs(shape, fused=False))
    labels = _labels(B, T, H, W, O)
    scale = 0.7
    out, aff = sparse_attention(q, k, v, pattern, scale, labels=labels, num_objects=O,
                                causal_affinity=causal_affinity)
    assert out.dtype == torch.float32 and aff.dtype == torch.float32
    assert aff.shape == (B, N, O, T, H, W)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_aff = reference_attention(qd, kd, vd, pattern, scale, labels, O, causal_affinity)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(aff.double(), ref_aff, atol=1e-4, rtol=1e-4)
    # the object absent from the video has no affinity anywhere; the one of the last frame only
    # reaches queries that may look at the last frame
    assert aff[:, :, O - 1].abs().max() == 0
    if causal_affinity:
        assert aff[:, :, O - 2].abs().max() == 0
    w = (torch.randn_like(ref_out), torch.randn_like(ref_aff))
    for g, rg in zip(_grads((out, aff), (q, k, v), w), _grads((ref_out, ref_aff), (qd, kd, vd), w)):
        torch.testing.assert_close(g.double(), rg, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("pattern,shape", CASES[::2], ids=[f"{p.kind}{i}" for i, (p, _) in enumerate(CASES[::2])])
def test_without_labels_matches_reference_on_fused_views(pattern, shape):
    q, k, v = (x.detach().requires_grad_() for x in _inputs(shape))
    out = sparse_attention(q, k, v, pattern)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(qd, kd, vd, pattern)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    w = (torch.randn_like(ref),)
    for g, rg in zip(_grads((out,), (q, k, v), w), _grads((ref,), (qd, kd, vd), w)):
        torch.testing.assert_close(g.double(), rg, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "pattern",
    [Pattern.grid(causal=True), Pattern.local((3, 3, 5), causal=True), Pattern.local(3, boundary="shift"),
     Pattern.strided((1, 2, 2)), Pattern.strided((1, 3, 1), causal=True)],
    ids=_id,
)
@pytest.mark.parametrize("with_labels", [False, True])
def test_many_small_chunks_match_reference(monkeypatch, pattern, with_labels):
    """With a tiny chunk budget every loop over queries runs many steps (and a strided
    class is split across steps): the result must not change."""
    monkeypatch.setattr(torch_path, "PAIRS_PER_CHUNK", 400)
    shape = (1, 2, 3, 9, 7, 4)
    q, k, v = _inputs(shape)
    labels = _labels(1, 3, 9, 7, 3) if with_labels else None
    res = sparse_attention(q, k, v, pattern, labels=labels, num_objects=3 if with_labels else None)
    ref = reference_attention(q, k, v, pattern, labels=labels, num_objects=3 if with_labels else None)
    for r, e in zip(res if with_labels else (res,), ref if with_labels else (ref,)):
        torch.testing.assert_close(r.double(), e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", [Pattern.grid(), Pattern.local(3), Pattern.strided((1, 2, 2))], ids=_id)
def test_half_precision_outputs_are_sane(dtype, pattern):
    q, k, v = _inputs((1, 2, 3, 5, 6, 16), dtype=dtype)
    labels = _labels(1, 3, 5, 6, 3)
    out, aff = sparse_attention(q, k, v, pattern, labels=labels, num_objects=3)
    assert out.dtype == dtype and aff.dtype == torch.float32
    ref_out, ref_aff = reference_attention(q, k, v, pattern, labels=labels, num_objects=3)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(aff.double(), ref_aff, atol=1e-4, rtol=1e-4)


def test_public_functions_build_the_pattern():
    q, k, v = _inputs((1, 2, 3, 4, 5, 8))
    torch.testing.assert_close(grid_attention(q, k, v, causal=True).double(),
                               reference_attention(q, k, v, Pattern.grid(causal=True)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(local_attention(q, k, v, (3, 1, 3), scale=1.0, boundary="shift").double(),
                               reference_attention(q, k, v, Pattern.local((3, 1, 3), "shift"), 1.0),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(strided_attention(q, k, v, (1, 2, 3)).double(),
                               reference_attention(q, k, v, Pattern.strided((1, 2, 3))), atol=1e-4, rtol=1e-4)


def test_pattern_sizes_match_the_spec():
    """|I_p| as SPEC.md states it: grid T+H+W-2, shift keeps min(k, L) per axis, strided ~ S/prod(stride)."""
    T, H, W = 3, 5, 4
    m = dense_mask(Pattern.grid(), T, H, W)
    assert (m.sum(1) == T + H + W - 2).all()
    m = dense_mask(Pattern.local((3, 7, 1), boundary="shift"), T, H, W)
    assert (m.sum(1) == 3 * 5 * 1).all()
    m = dense_mask(Pattern.local((3, 3, 3)), T, H, W)
    assert m.sum(1).max() == 27 and m.sum(1).min() == 8
    m = dense_mask(Pattern.strided((1, 2, 2)), T, H, W)
    assert m.sum(1).max() == 3 * 3 * 2
    assert (dense_mask(Pattern.local(3, causal=True), T, H, W) <= dense_mask(Pattern.local(3), T, H, W)).all()
    # dilation: with "shift" a query keeps min(k, ceil((L - r) / d)) keys per axis of its sub-sequence
    T, H, W = 3, 7, 6
    p = Pattern.local((1, 3, 5), boundary="shift", dilation=(1, 2, 3))
    m = dense_mask(p, T, H, W)
    y, x = torch.arange(H).repeat_interleave(W).repeat(T), torch.arange(W).repeat(T * H)
    per_y = torch.clamp(-(-(H - y % 2) // 2), max=3)
    per_x = torch.clamp(-(-(W - x % 3) // 3), max=5)
    assert torch.equal(m.sum(1), per_y * per_x)
    assert m.sum(1).max() == p.max_keys(T, H, W)
    # keys share the query's residue along every dilated axis
    q_idx, k_idx = m.nonzero(as_tuple=True)
    assert ((q_idx // W) % H % 2 == (k_idx // W) % H % 2).all() and (q_idx % W % 3 == k_idx % W % 3).all()


def test_affinity_gradient_reaches_the_argmax_key():
    """The gradient of an affinity flows only through the probability of the key that attained it."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 2, 1, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    labels = torch.tensor([[[[0, 0, 1]], [[1, 1, 1]]]])
    pattern = Pattern.local((3, 1, 3))
    _, aff = torch_path.sparse_attention(q, k, v, pattern, 1.0, labels, 2, True)
    # frame 1, x=1 over object 0: eligible keys are frame 0, x in {0, 1}; v does not enter probabilities
    (g_q, g_k) = torch.autograd.grad(aff[0, 0, 0, 1, 0, 1], (q, k))
    # by hand: the query's 6 keys in flat (t, x) order, the eligible ones being the first two
    probs = torch.softmax(k[0, 0].reshape(-1, 4) @ q[0, 0, 1, 0, 1], 0)
    winner = probs[:2].max()
    assert torch.allclose(aff[0, 0, 0, 1, 0, 1], winner)
    e_q, e_k = torch.autograd.grad(winner, (q, k))
    torch.testing.assert_close(g_q, e_q)
    torch.testing.assert_close(g_k, e_k)


@pytest.mark.parametrize(
    "pattern",
    [Pattern.grid(causal=True), Pattern.grid(), Pattern.local((3, 3, 1)), Pattern.local((3, 1, 3), "shift", True),
     Pattern.strided((1, 2, 1)), Pattern.strided((2, 1, 2), causal=True)],
    ids=_id,
)
def test_gradcheck_float64_through_out_and_affinity(pattern):
    torch.manual_seed(3)
    shape = (1, 1, 3, 2, 3, 2)
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    labels = torch.randint(-1, 2, (1, 3, 2, 3))
    causal_affinity = not pattern.causal

    def fn(q, k, v):
        out, aff = torch_path.sparse_attention(q, k, v, pattern, 0.9, labels, 2, causal_affinity)
        return out, aff

    assert fn(q, k, v)[1].dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch_path.sparse_attention(q, k, v, pattern, 0.9), (q, k, v), fast_mode=True
    )


# ------------------------------------------------------------------ the local path's tiles and steps

# (pattern, N_kv, G, T_q, T, H, W): few query frames against more key frames, with every option the
# local path serves: clip and shift, causal, dilation, GQA, windows larger than the video, odd sizes
STREAMING_LOCAL = [
    (Pattern.local(7), 2, 1, 1, 4, 9, 11),
    (Pattern.local((3, 5, 5), causal=True), 1, 3, 1, 4, 7, 6),
    (Pattern.local((5, 3, 7), boundary="shift"), 2, 2, 2, 5, 6, 9),
    (Pattern.local((3, 3, 3), boundary="shift", causal=True), 1, 2, 2, 3, 5, 5),
    (Pattern.local((3, 5, 3), dilation=(2, 2, 3)), 1, 2, 1, 4, 9, 8),
    (Pattern.local((5, 3, 3), boundary="shift", dilation=(1, 3, 2)), 2, 1, 2, 6, 7, 7),
    (Pattern.local(9), 1, 2, 1, 2, 3, 5),
    (Pattern.local((1, 3, 3)), 2, 1, 3, 3, 1, 4),
]


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("causal_affinity", [True, False])
@pytest.mark.parametrize("pattern,n_kv,group,T_q,T,H,W", STREAMING_LOCAL,
                         ids=[f"{_id(c[0])}-dil{c[0].dilation}-Tq{c[3]}of{c[4]}-G{c[2]}" for c in STREAMING_LOCAL])
def test_local_few_query_frames_match_reference_with_gradients(pattern, n_kv, group, T_q, T, H, W, causal_affinity,
                                                                with_lse):
    """T_q < T on the local path (tiles of the query frames only, key halos of every frame) with
    labels, lse and GQA: the float64 reference to 1e-4 forward and 1e-3 in every gradient."""
    torch.manual_seed(T_q * 100 + H * 10 + W)
    B, D, O = 2, 8, 3
    q = torch.randn(B, n_kv * group, T_q, H, W, D, requires_grad=True)
    k, v = (torch.randn(B, n_kv, T, H, W, D, requires_grad=True) for _ in range(2))
    labels = _labels(B, T, H, W, O)
    res = sparse_attention(q, k, v, pattern, 0.6, labels=labels, num_objects=O, causal_affinity=causal_affinity,
                           return_lse=with_lse)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(qd, kd, vd, pattern, 0.6, labels, O, causal_affinity, return_lse=with_lse)
    assert res[0].shape == (B, n_kv * group, T_q, H, W, D) and res[1].shape == (B, n_kv * group, O, T_q, H, W)
    for r, e in zip(res, ref):
        torch.testing.assert_close(r.double(), e, atol=1e-4, rtol=1e-4)
    w = tuple(torch.randn_like(e) for e in ref)
    for g, rg in zip(_grads(res, (q, k, v), w), _grads(ref, (qd, kd, vd), w)):
        torch.testing.assert_close(g.double(), rg, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("T_q", [1, 2, 4])
def test_local_tiles_and_steps_do_not_change_the_result(monkeypatch, T_q):
    """Every tile shape the cost model may pick, with key/value heads split over several halo
    chunks and rows of tiles over several steps, and the gathering path (``None``: no tile fits
    the halo budget), gives the reference's answer (outputs, affinities, lse), with and without
    autograd (in-place buffers vs functional ops)."""
    torch.manual_seed(T_q)
    B, N, N_kv, T, H, W, D, O = 2, 4, 2, 4, 7, 9, 4, 3
    pattern = Pattern.local((5, 3, 5), boundary="shift")
    q = torch.randn(B, N, T_q, H, W, D)
    k, v = (torch.randn(B, N_kv, T, H, W, D) for _ in range(2))
    labels = _labels(B, T, H, W, O)
    ref = reference_attention(q.double(), k.double(), v.double(), pattern, 0.8, labels, O, return_lse=True)
    # one key/value head per halo chunk (4 chunks of B * N_kv) and a step per x tile
    monkeypatch.setattr(torch_path, "HALO_BYTES", 1)
    monkeypatch.setattr(torch_path, "PAIRS_PER_STEP", 1)
    for tiles in [(1, 1, 1), (1, 2, 4), (2, 4, 2), (4, 8, 16), (1, 7, 9), None]:
        monkeypatch.setattr(torch_path, "_local_tiles", lambda *args, tiles=tiles: tiles)
        for grad in (False, True):
            ins = [x.clone().requires_grad_(grad) for x in (q, k, v)]
            res = torch_path.sparse_attention(*ins, pattern, 0.8, labels, O, True, return_lse=True)
            for r, e in zip(res, ref):
                torch.testing.assert_close(r.double(), e, atol=1e-5, rtol=1e-5, msg=f"tiles {tiles} grad {grad}")


def test_local_cost_model_keeps_the_halo_waste_small():
    """One query frame against 4 cached frames (window 7 spans all of them) and a recompute of the
    4 frames: the recompute's tiles take every frame (their halo is shared by 4x the queries), and
    both keep a tile's halo within 2.5x the 196 keys a query attends (bigger tiles waste pairs).
    No tile exceeds the pair budget of one matmul."""
    p = Pattern.local(7)
    step = torch_path._local_tiles(p, (1, 64, 64), (4, 64, 64), 1, 32)
    full = torch_path._local_tiles(p, (4, 64, 64), (4, 64, 64), 1, 32)
    assert full[0] == 4
    for tiles in (step, full):
        halo = math.prod(min(t + 6, L) for t, L in zip(tiles, (4, 64, 64)))
        assert halo <= 2.5 * 196, tiles
        assert math.prod(tiles) * halo <= torch_path.PAIRS_PER_CHUNK


def test_local_bfloat16_and_float64_inputs():
    """bfloat16 is computed in float32 (close to the reference at bf16's rounding); float64 (gradcheck's
    dtype) in float64 to 1e-10, with a streaming step and GQA."""
    torch.manual_seed(5)
    pattern = Pattern.local((3, 5, 3), causal=True)
    q = torch.randn(1, 4, 1, 6, 7, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 3, 6, 7, 8, dtype=torch.float64) for _ in range(2))
    ref = reference_attention(q, k, v, pattern, 0.5)
    out64 = torch_path.sparse_attention(q, k, v, pattern, 0.5)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, ref, atol=1e-10, rtol=1e-10)
    out16 = sparse_attention(*(x.bfloat16() for x in (q, k, v)), pattern, 0.5)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), ref, atol=3e-2, rtol=3e-2)
