"""The fused forward kernels against the dense float64 reference: out, affinity,
log-sum-exp and the key that attained each affinity.

Every kernel test runs in two lanes (the ``device`` fixture of ``conftest.py``): ``cpu``,
the kernels in Triton's interpreter, and ``cuda``, the compiled kernels on a GPU (skipped,
with the reason, when there is none). Shapes are tiny (the interpreter is ~30x slower than
PyTorch) but cross the kernels' block edges: head dims that are not powers of two, residue
classes, halos and rows longer than the interpreter's blocks (32), strides and kernel sizes
larger than their axis; every configuration of every kernel's autotuning list runs once.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from sst_triton import grid_attention, local_attention, sparse_attention, strided_attention
from sst_triton.kernels import FORWARD
from sst_triton.patterns import Pattern, coords, dense_mask
from sst_triton.reference import reference_attention
from sst_triton.triton_path import forward


def _inputs(shape, dtype=torch.float32, num_objects=3, unknown=True, device="cpu"):
    B, N, T, H, W, D = shape
    q, k, v = (torch.randn(shape, dtype=torch.float64).to(dtype).to(device) for _ in range(3))
    labels = torch.randint(-1 if unknown else 0, num_objects, (B, T, H, W)).to(device)
    return q, k, v, labels


def _cpu(*xs):
    return [None if x is None else x.cpu() for x in xs]


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
def test_forward_fp32_matches_reference(pattern, shape, causal_affinity, device):
    q, k, v, labels = _inputs(shape, device=device)
    O, scale = 3, 0.6
    out, aff, lse, arg = _cpu(*forward(q, k, v, pattern, scale, labels, O, causal_affinity))
    q, k, v, labels = _cpu(q, k, v, labels)
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
def test_public_api_backend_triton(call, device):
    """``backend="triton"`` runs the kernels (the interpreter on CPU) and returns what SPEC.md says."""
    q, k, v, labels = _inputs((1, 2, 2, 4, 5, 8), device=device)
    out = call(q, k, v, backend="triton")
    ref = call(q, k, v, backend="torch")
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out2, aff = call(q, k, v, labels=labels, num_objects=3, backend="triton")
    ref2, ref_aff = call(q, k, v, labels=labels, num_objects=3, backend="torch")
    torch.testing.assert_close(out2, ref2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aff, ref_aff, rtol=1e-4, atol=1e-5)


def test_forward_without_labels_returns_no_affinity(device):
    q, k, v, _ = _inputs((1, 1, 2, 3, 4, 8), device=device)
    out, aff, lse, arg = forward(q, k, v, Pattern.local(3), None)
    assert aff is None and arg is None
    out, lse, q, k, v = _cpu(out, lse, q, k, v)
    ref = reference_attention(q, k, v, Pattern.local(3), None)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    ref_lse, _, _ = _dense_lse(q, k, Pattern.local(3), 8 ** -0.5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-4)


def _sdpa(q, k, v, pattern, scale):
    B, N, T, H, W, D = q.shape
    flat = [rearrange(x, "b n t h w d -> b n (t h w) d") for x in (q, k, v)]
    mask = dense_mask(pattern, T, H, W, device=q.device)
    out = F.scaled_dot_product_attention(*flat, attn_mask=mask, scale=scale)
    return rearrange(out, "b n (t h w) d -> b n t h w d", t=T, h=H, w=W)


# float32's unit roundoff: the affinity is float32 arithmetic on exact products of 16-bit
# operands (tensor cores and the interpreter alike accumulate in float32)
U32 = 2.0 ** -24


def _affinity_bound(q, k, scale, max_keys):
    """Elementwise bound on ``|affinity - reference| / reference`` for 16-bit q, k.

    ``affinity = exp(s* - lse)``: a logit ``s = scale * sum_i q_i k_i`` of exact products summed
    in float32 is off by at most ``D * u * scale * sum_i |q_i k_i|`` (Higham's gamma_D); the
    exponent ``s* - lse`` by twice that (lse sums ``max_keys`` exps, each relative ``u``, plus
    the base-2 rescaling: a few ``u``); ``exp2`` of the GPU's SFU is within 2 ulp. So the
    relative error is at most ``2 * D * u * scale * max|q||k|_1 + (max_keys + 8) * u``, and
    any 16-bit rounding in the affinity's path (``2**-8`` for bf16) would exceed it.
    """
    D = q.shape[-1]
    qf, kf = (rearrange(x.double().abs(), "b n t h w d -> b n (t h w) d") for x in (q, k))
    dot_abs = (qf @ kf.transpose(-1, -2)).max().item()
    return 2 * D * U32 * scale * dot_abs * 1.5 + (max_keys + 8) * U32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "pattern",
    [Pattern.strided((1, 2, 2), causal=True), Pattern.local((3, 3, 5)), Pattern.grid()],
    ids=["strided", "local", "grid"],
)
def test_half_precision_error_within_twice_sdpa(pattern, dtype, device):
    """In fp16/bf16 the error against the float64 reference is at most 2x SDPA's (same inputs,
    same device); the affinity, float32 arithmetic on exact 16-bit products, is within a bound
    derived from float32's roundoff (:func:`_affinity_bound`), ~1e-5 relative here: a 16-bit
    rounding anywhere on its path (2**-8 for bf16, 2**-11 for fp16) fails it."""
    q, k, v, labels = _inputs((1, 2, 3, 4, 6, 24), dtype, device=device)
    scale = 24 ** -0.5
    out, aff, _, _ = forward(q, k, v, pattern, scale, labels, 3, True)
    sdpa = _sdpa(q, k, v, pattern, scale).cpu()
    out, aff, q, k, v, labels = _cpu(out, aff, q, k, v, labels)
    ref_out, ref_aff = reference_attention(q, k, v, pattern, scale, labels, 3, True)
    assert out.dtype == dtype and aff.dtype == torch.float32
    err = (out.double() - ref_out).abs().max().item()
    sdpa_err = (sdpa.double() - ref_out).abs().max().item()
    assert 0 < sdpa_err and err <= 2 * sdpa_err, (err, sdpa_err)
    T, H, W = q.shape[2:5]
    bound = _affinity_bound(q, k, scale, pattern.max_keys(T, H, W))
    assert bound < 2.0 ** -11 / 4, "the bound must be able to tell float32 from 16-bit arithmetic"
    assert (ref_aff > 0).any()
    rel = ((aff.double() - ref_aff).abs() / ref_aff.clamp(min=1e-30)).masked_fill(ref_aff == 0, 0)
    assert ((aff == 0) == (ref_aff == 0)).all()
    assert rel.max().item() <= bound, (rel.max().item(), bound)


@pytest.mark.parametrize(
    "pattern", [Pattern.strided((2, 1, 2)), Pattern.local(3, causal=True), Pattern.grid()],
    ids=["strided", "local", "grid"],
)
def test_non_contiguous_views(pattern, device):
    """Views of a fused qkv projection, laid out (B, T, H, W, N, 3D), run without copies."""
    B, N, T, H, W, D = 1, 2, 2, 3, 5, 12
    fused = torch.randn(B, T, H, W, N, 3 * D, device=device)
    q, k, v = (rearrange(x, "b t h w n d -> b n t h w d") for x in fused.split(D, dim=-1))
    assert not q.is_contiguous() and q.stride(-1) == 1
    # and a view whose head dim is not the innermost axis
    v = rearrange(torch.randn(B, D, N, T, H, W, device=device), "b d n t h w -> b n t h w d")
    assert v.stride(-1) != 1
    labels = torch.randint(-1, 2, (B, T, H, W), device=device)
    out, aff, _, _ = _cpu(*forward(q, k, v, pattern, None, labels, 2, False))
    q, k, v, labels = _cpu(q, k, v, labels)
    ref_out, ref_aff = reference_attention(q, k, v, pattern, None, labels, 2, False)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aff.double(), ref_aff, rtol=1e-4, atol=1e-4)


BAD_CALLS = [
    (lambda q, k, v, lab: grid_attention(q[0], k[0], v[0], backend="triton"), ValueError, "q must have 6 dimensions"),
    (lambda q, k, v, lab: grid_attention(q, k.double(), v, backend="triton"), TypeError, "float32, float16 or bfloat16"),
    (lambda q, k, v, lab: grid_attention(q, k.half(), v, backend="triton"), TypeError, "k must have the dtype of q"),
    (lambda q, k, v, lab: grid_attention(q, k[..., :4], v, backend="triton"), ValueError,
     "k must have the batch, height, width and head dim of q"),
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


# ---------------------------------------------------------------------------------------
# Every configuration, NaN, determinism, torch.compile and autocast, in both lanes
# ---------------------------------------------------------------------------------------

# per pattern kind: a pattern and a shape (B, N, T, H, W, D) whose axes are longer than the
# tiles of every configuration (several query and key tiles; local windows across tiles,
# strided classes longer than one block, grid rows longer than a row block)
CONFIG_CASES = {
    "strided": (Pattern.strided((1, 2, 2), causal=True), (1, 1, 2, 16, 18, 20)),  # classes of 144 cells
    "local": (Pattern.local((3, 5, 5), boundary="shift"), (1, 1, 3, 9, 17, 20)),
    "grid": (Pattern.grid(causal=True), (1, 1, 2, 3, 34, 20)),
}


def _module(launcher):
    return sys.modules[launcher.__module__]


def _config_params():
    params = []
    for kind, launcher in FORWARD.items():
        for i, config in enumerate(_module(launcher).CONFIGS):
            params.append(pytest.param(kind, i, id=f"{kind}-config{i}"))
    return params


@pytest.mark.parametrize("kind, index", _config_params())
def test_every_forward_configuration_matches_reference(kind, index, device):
    """Each configuration the autotuner may pick, forced, against the float64 reference."""
    config = _module(FORWARD[kind]).CONFIGS[index]
    pattern, shape = CONFIG_CASES[kind]
    q, k, v, labels = _inputs(shape, num_objects=2, device=device)
    out, aff, lse, arg = _cpu(*forward(q, k, v, pattern, None, labels, 2, True, config=config))
    q, k, v, labels = _cpu(q, k, v, labels)
    ref_out, ref_aff = reference_attention(q, k, v, pattern, None, labels, 2, True)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aff.double(), ref_aff, rtol=1e-4, atol=1e-5)
    ref_lse, _, _ = _dense_lse(q, k, pattern, shape[-1] ** -0.5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-4)
    _check_argmax(q, k, pattern, shape[-1] ** -0.5, labels, 2, True, aff, lse, arg)


NAN_CASES = {
    "strided": (Pattern.strided((1, 2, 2)), (2, 1, 2, 6, 8, 16)),
    "local": (Pattern.local((1, 3, 3)), (2, 1, 2, 9, 10, 16)),
    "grid": (Pattern.grid(), (2, 1, 2, 3, 10, 16)),
}


def _nan_params():
    """The first and the last configuration of each kernel (the smallest and largest tiles
    as the lists are ordered): enough to see a tile-dependent behaviour."""
    params = []
    for kind, launcher in FORWARD.items():
        n = len(_module(launcher).CONFIGS)
        for i in sorted({0, n - 1}):
            for tensor in ("k", "v"):
                params.append(pytest.param(kind, i, tensor, id=f"{kind}-config{i}-{tensor}"))
    return params


@pytest.mark.parametrize("kind, index, tensor", _nan_params())
def test_nan_reaches_the_queries_that_attend_it(kind, index, tensor, device):
    """A NaN in ``k`` poisons exactly the queries whose pattern holds its cell, under every
    configuration (masked logits are replaced, not multiplied). A NaN in ``v`` poisons every
    query that attends it and may also poison other queries of the same batch-head whose
    program loads it in a key block (``P V`` multiplies it by their ``P = 0``: ``0 * NaN``
    is NaN on tensor cores): that set depends on the tile configuration. Never a query of
    another batch element. (A dense masked SDPA poisons every row.)"""
    config = _module(FORWARD[kind]).CONFIGS[index]
    pattern, shape = NAN_CASES[kind]
    B, N, T, H, W, D = shape
    q, k, v, _ = _inputs(shape, device=device)
    j = (1 * H + 2) * W + 3  # cell (1, 2, 3) of batch element 0
    target = (k if tensor == "k" else v).clone()
    rearrange(target, "b n t h w d -> b n (t h w) d")[0, 0, j, 0] = float("nan")
    k, v = (target, v) if tensor == "k" else (k, target)
    out = forward(q, k, v, pattern, None, config=config)[0].cpu()
    poisoned = rearrange(out.isnan().any(-1), "b n t h w -> b (n t h w)")
    attending = dense_mask(pattern, T, H, W)[:, j]
    assert not poisoned[1].any(), "a NaN crossed batch elements"
    if tensor == "k":
        assert torch.equal(poisoned[0], attending)
    else:
        assert (poisoned[0] | ~attending).all(), "a query attending the NaN value escaped it"


@pytest.mark.parametrize("kind", list(FORWARD))
def test_forward_is_deterministic(kind, device):
    """Two runs of the same call are bit-equal (no atomics, a fixed reduction order)."""
    pattern, shape = NAN_CASES[kind]
    q, k, v, labels = _inputs((1, *shape[1:]), device=device)
    first = forward(q, k, v, pattern, None, labels, 3, True)
    second = forward(q, k, v, pattern, None, labels, 3, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# torch.compile and autocast over the interpreter are tests/test_compile.py and
# tests/test_autocast.py; here the same through the compiled kernels on a GPU
CUDA_ONLY = pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here: the interpreter's twin is tests/test_compile.py and "
    "tests/test_autocast.py"))], indirect=True)


@CUDA_ONLY
def test_compiled_triton_forward_equals_eager(device):
    """``torch.compile(fullgraph=True)`` over the Triton operator, on the lane's device."""
    q, k, v, labels = _inputs((1, 2, 2, 4, 5, 16), device=device)
    pattern = Pattern.local((3, 3, 3), causal=True)

    def fn(q, k, v, labels):
        return sparse_attention(q, k, v, pattern, labels=labels, num_objects=3, backend="triton")

    eager = fn(q, k, v, labels)
    compiled = torch.compile(fn, fullgraph=True)(q, k, v, labels)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@CUDA_ONLY
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_triton_forward(dtype, device):
    """Under autocast q, k, v take the autocast dtype, as SDPA's do; affinities stay float32."""
    q, k, v, labels = _inputs((1, 2, 2, 4, 5, 16), device=device)
    with torch.autocast(device.type, dtype=dtype):
        out, aff = strided_attention(q, k, v, (1, 2, 2), labels=labels, num_objects=3, backend="triton")
    assert out.dtype == dtype and aff.dtype == torch.float32
    ref_out, ref_aff = strided_attention(q.to(dtype), k.to(dtype), v.to(dtype), (1, 2, 2), labels=labels,
                                         num_objects=3, backend="triton")
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(aff, ref_aff, rtol=0, atol=0)


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
