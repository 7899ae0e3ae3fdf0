"""The fused forward kernels, run in Triton's interpreter on CPU tensors, against the dense
float64 reference: out, affinity, log-sum-exp and the key that attained each affinity.

Shapes are tiny (the interpreter is ~30x slower than PyTorch) but cross the kernels' block
edges: head dims that are not powers of two, residue classes, halos and rows longer than
the interpreter's blocks (32), strides and kernel sizes larger than their axis.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from sst_triton import grid_attention, local_attention, strided_attention
from sst_triton.patterns import Pattern, coords, dense_mask
from sst_triton.reference import reference_attention
from sst_triton.triton_path import forward


def _inputs(shape, dtype=torch.float32, num_objects=3, unknown=True):
    B, N, T, H, W, D = shape
    q, k, v = (torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(3))
    labels = torch.randint(-1 if unknown else 0, num_objects, (B, T, H, W))
    return q, k, v, labels


def _dense_lse(q, k, pattern, scale):
    """Natural log-sum-exp of the scaled logits over each query's pattern, float64."""
    B, N, T, H, W, D = q.shape
    qf, kf = (rearrange(x.double(), "b n t h w d -> b n (t h w) d") for x in (q, k))
    logits = scale * qf @ kf.transpose(-1, -2)
    mask = dense_mask(pattern, T, H, W)
    lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return rearrange(lse, "b n (t h w) -> b n t h w", t=T, h=H, w=W), logits, mask


def _check_argmax(q, k, pattern, scale, labels, num_objects, causal_affinity, aff, lse, arg):
    """``arg`` names an eligible key whose probability is the affinity; -1 exactly where it is 0."""
    B, N, T, H, W, D = q.shape
    ref_lse, logits, mask = _dense_lse(q, k, pattern, scale)
    probs = torch.exp(logits - rearrange(ref_lse, "b n t h w -> b n (t h w) 1"))
    aff_f = rearrange(aff.double(), "b n o t h w -> b n o (t h w)")
    arg_f = rearrange(arg.long(), "b n o t h w -> b n o (t h w)")
    assert ((arg_f == -1) == (aff_f == 0)).all()
    found = arg_f >= 0
    key = arg_f.clamp(min=0)
    # probability of the named key for every (b, n, o, query)
    p_key = torch.gather(probs[:, :, None].expand(B, N, num_objects, -1, -1), 4, key[..., None])[..., 0]
    torch.testing.assert_close(p_key[found], aff_f[found], rtol=1e-4, atol=1e-5)
    S = T * H * W
    query = torch.arange(S)[None, None, None, :].expand_as(key)
    assert mask[query[found], key[found]].all(), "argmax key outside the pattern"
    flat_labels = rearrange(labels, "b t h w -> b (t h w)")
    key_label = torch.gather(flat_labels[:, None, None, :].expand(B, N, num_objects, S), 3, key)
    objects = torch.arange(num_objects)[None, None, :, None].expand_as(key)
    assert (key_label[found] == objects[found]).all(), "argmax key has another label"
    if causal_affinity:
        t = coords(T, H, W)[0]
        assert (t[key[found]] < t[query[found]]).all(), "argmax key not in an earlier frame"


FP32_CASES = [
    # (pattern, shape (B, N, T, H, W, D), causal_affinity)
    (Pattern.strided((2, 2, 3)), (2, 2, 3, 5, 6, 12), True),
    (Pattern.strided((1, 2, 1), causal=True), (1, 2, 3, 4, 5, 20), False),  # classes of 30 keys
    (Pattern.strided((5, 1, 7)), (1, 1, 3, 4, 6, 8), False),  # strides past the axis
    (Pattern.local(3), (1, 2, 3, 5, 9, 12), True),
    (Pattern.local((3, 5, 3), boundary="shift", causal=True), (1, 2, 4, 6, 5, 40), False),
    (Pattern.local((5, 9, 3)), (1, 1, 3, 5, 6, 100), False),  # kernel past the axis; D pads to 128
    (Pattern.grid(), (1, 2, 3, 4, 40, 12), False),  # a row of 40 keys: two row blocks
    (Pattern.grid(causal=True), (2, 1, 4, 5, 6, 24), True),
]


def _case_id(case):
    pattern, shape, causal_affinity = case
    params = {"grid": "", "local": f"{pattern.kernel_size}-{pattern.boundary}", "strided": f"{pattern.stride}"}
    causal = "-causal" if pattern.causal else ""
    return f"{pattern.kind}{params[pattern.kind]}{causal}-{'x'.join(map(str, shape))}-caff{int(causal_affinity)}"


@pytest.mark.parametrize("pattern, shape, causal_affinity", FP32_CASES, ids=[_case_id(c) for c in FP32_CASES])
def test_forward_fp32_matches_reference(pattern, shape, causal_affinity):
    q, k, v, labels = _inputs(shape)
    O, scale = 3, 0.6
    out, aff, lse, arg = forward(q, k, v, pattern, scale, labels, O, causal_affinity)
    ref_out, ref_aff = reference_attention(q, k, v, pattern, scale, labels, O, causal_affinity)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert aff.dtype == torch.float32 and aff.shape == (shape[0], shape[1], O, *shape[2:5])
    assert lse.dtype == torch.float32 and lse.shape == shape[:5]
    assert arg.dtype == torch.int32 and arg.shape == aff.shape
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aff.double(), ref_aff, rtol=1e-4, atol=1e-4)
    ref_lse, _, _ = _dense_lse(q, k, pattern, scale)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-4)
    assert (aff > 0).any(), "no affinity at all: the case tests nothing"
    _check_argmax(q, k, pattern, scale, labels, O, causal_affinity, aff, lse, arg)


@pytest.mark.parametrize(
    "call",
    [
        lambda q, k, v, **kw: grid_attention(q, k, v, **kw),
        lambda q, k, v, **kw: local_attention(q, k, v, (3, 3, 5), **kw),
        lambda q, k, v, **kw: strided_attention(q, k, v, 2, **kw),
    ],
    ids=["grid", "local", "strided"],
)
def test_public_api_backend_triton(call):
    """``backend="triton"`` on CPU runs the interpreter and returns what SPEC.md says."""
    q, k, v, labels = _inputs((1, 2, 2, 4, 5, 8))
    out = call(q, k, v, backend="triton")
    ref = call(q, k, v, backend="torch")
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out2, aff = call(q, k, v, labels=labels, num_objects=3, backend="triton")
    ref2, ref_aff = call(q, k, v, labels=labels, num_objects=3, backend="torch")
    torch.testing.assert_close(out2, ref2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aff, ref_aff, rtol=1e-4, atol=1e-5)


def test_forward_without_labels_returns_no_affinity():
    q, k, v, _ = _inputs((1, 1, 2, 3, 4, 8))
    out, aff, lse, arg = forward(q, k, v, Pattern.local(3), None)
    assert aff is None and arg is None
    ref = reference_attention(q, k, v, Pattern.local(3), None)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    ref_lse, _, _ = _dense_lse(q, k, Pattern.local(3), 8 ** -0.5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-4)


def _sdpa(q, k, v, pattern, scale):
    B, N, T, H, W, D = q.shape
    flat = [rearrange(x, "b n t h w d -> b n (t h w) d") for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*flat, attn_mask=dense_mask(pattern, T, H, W), scale=scale)
    return rearrange(out, "b n (t h w) d -> b n t h w d", t=T, h=H, w=W)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "pattern",
    [Pattern.strided((1, 2, 2), causal=True), Pattern.local((3, 3, 5)), Pattern.grid()],
    ids=["strided", "local", "grid"],
)
def test_half_precision_error_within_twice_sdpa(pattern, dtype):
    """In fp16/bf16 the error against the float64 reference is at most 2x SDPA's (same inputs)."""
    q, k, v, labels = _inputs((1, 2, 3, 4, 6, 24), dtype)
    scale = 24 ** -0.5
    out, aff, _, _ = forward(q, k, v, pattern, scale, labels, 3, True)
    ref_out, ref_aff = reference_attention(q, k, v, pattern, scale, labels, 3, True)
    assert out.dtype == dtype and aff.dtype == torch.float32
    err = (out.double() - ref_out).abs().max().item()
    sdpa_err = (_sdpa(q, k, v, pattern, scale).double() - ref_out).abs().max().item()
    assert 0 < sdpa_err and err <= 2 * sdpa_err, (err, sdpa_err)
    # the affinity is computed in float32 from half-precision logits
    aff_err = (aff.double() - ref_aff).abs().max().item()
    assert aff_err <= 4 * sdpa_err, (aff_err, sdpa_err)


@pytest.mark.parametrize(
    "pattern", [Pattern.strided((2, 1, 2)), Pattern.local(3, causal=True), Pattern.grid()],
    ids=["strided", "local", "grid"],
)
def test_non_contiguous_views(pattern):
    """Views of a fused qkv projection, laid out (B, T, H, W, N, 3D), run without copies."""
    B, N, T, H, W, D = 1, 2, 2, 3, 5, 12
    fused = torch.randn(B, T, H, W, N, 3 * D)
    q, k, v = (rearrange(x, "b t h w n d -> b n t h w d") for x in fused.split(D, dim=-1))
    assert not q.is_contiguous() and q.stride(-1) == 1
    # and a view whose head dim is not the innermost axis
    v = rearrange(torch.randn(B, D, N, T, H, W), "b d n t h w -> b n t h w d")
    assert v.stride(-1) != 1
    labels = torch.randint(-1, 2, (B, T, H, W))
    out, aff, _, _ = forward(q, k, v, pattern, None, labels, 2, False)
    ref_out, ref_aff = reference_attention(q, k, v, pattern, None, labels, 2, False)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aff.double(), ref_aff, rtol=1e-4, atol=1e-4)


BAD_CALLS = [
    (lambda q, k, v, lab: grid_attention(q[0], k[0], v[0], backend="triton"), ValueError, "q must have 6 dimensions"),
    (lambda q, k, v, lab: grid_attention(q, k.double(), v, backend="triton"), TypeError, "float32, float16 or bfloat16"),
    (lambda q, k, v, lab: grid_attention(q, k.half(), v, backend="triton"), TypeError, "k must have the dtype of q"),
    (lambda q, k, v, lab: grid_attention(q, k[..., :4], v, backend="triton"), ValueError, "k must have the shape of q"),
    (lambda q, k, v, lab: local_attention(q, k, v, 4, backend="triton"), ValueError, "kernel_size must be odd"),
    (lambda q, k, v, lab: strided_attention(q, k, v, (1, 0, 1), backend="triton"), ValueError, "stride must be >= 1"),
    (lambda q, k, v, lab: grid_attention(q, k, v, labels=lab, backend="triton"), ValueError, "without num_objects"),
    (lambda q, k, v, lab: grid_attention(q, k, v, labels=lab.float(), num_objects=2, backend="triton"), TypeError,
     "labels must have an integer dtype"),
    (lambda q, k, v, lab: grid_attention(q, k, v, labels=lab[:, :1], num_objects=2, backend="triton"), ValueError,
     "labels must have shape"),
    (lambda q, k, v, lab: grid_attention(q, k, v, labels=lab + 5, num_objects=2, backend="triton"), ValueError,
     r"labels must lie in \[-1, num_objects\)"),
]


@pytest.mark.parametrize("call, error, message", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input_raises_before_any_kernel(call, error, message, monkeypatch):
    from sst_triton.kernels import _common

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the arguments were checked")

    monkeypatch.setattr(_common, "interpreted", no_kernel)
    q, k, v, labels = _inputs((1, 1, 2, 3, 4, 8), num_objects=2)
    with pytest.raises(error, match=message):
        call(q, k, v, labels)


def test_forward_rejects_what_it_cannot_run():
    q = torch.randn(1, 1, 1, 2, 2, 300)
    with pytest.raises(ValueError, match="head dim D must be <= 256"):
        forward(q, q, q, Pattern.grid(), None)
    m = torch.empty(1, 1, 1, 2, 2, 8, device="meta")
    with pytest.raises(ValueError, match="q must be on a CUDA device or the CPU"):
        forward(m, m, m, Pattern.grid(), None)
    with pytest.raises(TypeError, match="pattern must be a sst_triton.Pattern"):
        forward(q[..., :8], q[..., :8], q[..., :8], "grid", None)


def test_interpreter_twins_leave_compiled_kernels_alone():
    """The interpreted twin is a separate object; the module's kernel stays a compiled JITFunction."""
    from triton.runtime.jit import JITFunction

    from sst_triton.kernels import _common, strided_fwd

    twin = _common.interpreted(strided_fwd.strided_fwd)
    assert twin is _common.interpreted(strided_fwd.strided_fwd)
    assert isinstance(strided_fwd.strided_fwd, JITFunction)
    assert isinstance(_common.online_softmax_block, JITFunction)
    assert not isinstance(twin, JITFunction)


def test_nan_reaches_exactly_the_queries_that_attend_it():
    """A NaN key poisons the queries whose pattern holds it and no other (a dense masked SDPA
    on CPU poisons every row: its masked-out products still see the NaN)."""
    pattern = Pattern.local((1, 3, 3))
    q, k, v, _ = _inputs((1, 1, 2, 5, 6, 8))
    j = (1 * 5 + 2) * 6 + 3  # cell (1, 2, 3)
    k = k.clone()
    rearrange(k, "b n t h w d -> b n (t h w) d")[0, 0, j, 0] = float("nan")
    out, _, _, _ = forward(q, k, v, pattern, None)
    poisoned = rearrange(out.isnan().any(-1), "b n t h w -> (b n t h w)")
    expected = dense_mask(pattern, 2, 5, 6)[:, j]
    assert torch.equal(poisoned, expected)


def test_float32_dot_precision_follows_torch():
    from sst_triton.kernels._common import dot_precision

    matmul = torch.backends.cuda.matmul
    saved_tf32 = matmul.allow_tf32
    saved_precision = getattr(matmul, "fp32_precision", None)
    try:
        matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.bfloat16) == "ieee"  # 16-bit operands: tensor cores regardless
    finally:
        matmul.allow_tf32 = saved_tf32
        if saved_precision is not None:
            matmul.fp32_precision = saved_precision
