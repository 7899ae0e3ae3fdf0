"""The fused backward kernels against autograd through the float64 dense reference.

Every kernel test runs in two lanes (the ``device`` fixture of ``conftest.py``): ``cpu``,
the kernels in Triton's interpreter, and ``cuda``, compiled on a GPU (skipped, with the
reason, when there is none). Gradients through ``out`` and ``affinity`` are compared with
autograd through the float64 dense reference; every configuration of both backward kernels
runs once at a shape with several query and key tiles; ``gradcheck`` runs the kernels in
float64 (an internal path: the public API takes float32/float16/bfloat16 only, so there the
forward is the float64 dense map and the backward the kernels).
"""
import sys

import pytest
import torch
from einops import rearrange

from sst_triton import Pattern, sparse_attention
from sst_triton.kernels import BACKWARD
from sst_triton.kernels.backward import attention_backward
from sst_triton.triton_path import forward
from sst_triton.patterns import coords, dense_mask
from sst_triton.reference import reference_attention

# (pattern, shape (B, N, T, H, W, D), causal_affinity); grid is the slowest in the
# interpreter (one program per row, a vector step per column and time key)
CASES = [
    (Pattern.grid(), (1, 1, 2, 3, 4, 8), True),
    (Pattern.grid(causal=True), (1, 1, 3, 2, 3, 5), False),
    (Pattern.local(3), (1, 2, 3, 4, 5, 8), True),
    (Pattern.local((3, 3, 5), boundary="shift", causal=True), (1, 2, 3, 4, 5, 8), True),
    (Pattern.local((1, 5, 3), boundary="shift"), (2, 1, 2, 5, 4, 6), False),
    (Pattern.strided((1, 2, 2)), (1, 2, 3, 4, 5, 8), True),
    (Pattern.strided((2, 1, 3), causal=True), (1, 2, 3, 4, 5, 8), False),
]


def _fused_qkv(shape, dtype=torch.float32, device="cpu"):
    """q, k, v as strided views of one fused projection, as SparseAttention3d makes them."""
    B, N, T, H, W, D = shape
    qkv = torch.randn(B, T, H, W, 3 * N * D, dtype=dtype).to(device)
    q, k, v = rearrange(qkv, "b t h w (three n d) -> three b n t h w d", three=3, n=N)
    return [x.detach().requires_grad_() for x in (q, k, v)]


def _reference_grads(q, k, v, pattern, labels, num_objects, causal_affinity, g_out, g_aff, scale=None):
    """Autograd of the float64 dense reference, on the CPU."""
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    labels = None if labels is None else labels.cpu()
    res = reference_attention(*leaves, pattern, scale, labels, num_objects, causal_affinity)
    if labels is None:
        loss = (res * g_out.cpu().double()).sum()
    else:
        loss = (res[0] * g_out.cpu().double()).sum() + (res[1] * g_aff.cpu().double()).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("pattern,shape,causal_affinity", CASES, ids=[f"{c[0]}" for c in CASES])
def test_gradients_match_dense_reference(pattern, shape, causal_affinity, device):
    q, k, v = _fused_qkv(shape, device=device)
    B, _, T, H, W, _ = shape
    labels = torch.randint(-1, 3, (B, T, H, W)).to(device)
    out, aff = sparse_attention(q, k, v, pattern, labels=labels, num_objects=3,
                                causal_affinity=causal_affinity, backend="triton")
    g_out, g_aff = torch.randn_like(out), torch.randn_like(aff)
    grads = torch.autograd.grad((out * g_out).sum() + (aff * g_aff).sum(), (q, k, v))
    expected = _reference_grads(q, k, v, pattern, labels, 3, causal_affinity, g_out, g_aff)
    for name, got, want in zip("qkv", grads, expected):
        assert got.dtype == torch.float32 and got.device == q.device
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-3, rtol=1e-3, msg=lambda m: f"d{name}: {m}")
    # the case exercises the affinity's path: without g_aff the expected dq differs
    out_only = _reference_grads(q, k, v, pattern, labels, 3, causal_affinity, g_out, torch.zeros_like(g_aff))
    assert (out_only[0] - expected[0]).abs().max() > 1e-2


def test_gradients_without_labels_and_broadcast_grad(device):
    """Only ``out``; ``sum()`` hands the kernels a zero-stride gradient."""
    q, k, v = _fused_qkv((1, 2, 3, 4, 5, 8), device=device)
    pattern = Pattern.local((3, 1, 3), boundary="shift")
    out = sparse_attention(q, k, v, pattern, backend="triton")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = _reference_grads(q, k, v, pattern, None, None, True, torch.ones_like(out), None)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-3, rtol=1e-3)


DETERMINISM_CASES = {
    "strided": Pattern.strided((1, 2, 1), causal=True),
    "local": Pattern.local((3, 3, 3)),
    "grid": Pattern.grid(),
}


@pytest.mark.parametrize("kind", list(BACKWARD))
def test_backward_is_deterministic(kind, device):
    """Two runs are bit-equal: every gradient element is written by one program, in a fixed
    order (dK/dV sums a group's query heads in a loop, not with atomics)."""
    q, k, v = _fused_qkv((1, 2, 3, 4, 5, 8), device=device)
    labels = torch.randint(-1, 2, (1, 3, 4, 5)).to(device)
    pattern = DETERMINISM_CASES.get(kind, Pattern.grid())

    def grads():
        out, aff = sparse_attention(q, k, v, pattern, labels=labels, num_objects=2, backend="triton")
        return torch.autograd.grad(out.square().sum() + aff.sum(), (q, k, v))

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


# per pattern kind: several query tiles and key tiles for every backward configuration
# (strided classes longer than a block, local windows across tiles, grid rows past a block)
CONFIG_CASES = {
    "strided": (Pattern.strided((1, 2, 2), causal=True), (1, 1, 2, 16, 18, 16)),  # classes of 144 cells
    "local": (Pattern.local((3, 5, 5), boundary="shift"), (1, 1, 3, 9, 17, 16)),
    "grid": (Pattern.grid(causal=True), (1, 1, 2, 3, 34, 16)),
}


def _module(launcher):
    return sys.modules[launcher.__module__]


def _config_params():
    params = []
    for kind, launcher in BACKWARD.items():
        module = _module(launcher)
        n = max(len(module.CONFIGS_DQ), len(module.CONFIGS_DKDV))
        params.extend(pytest.param(kind, i, id=f"{kind}-config{i}") for i in range(n))
    return params


@pytest.mark.parametrize("kind, index", _config_params())
def test_every_backward_configuration_matches_reference(kind, index, device):
    """Configuration ``index`` of the dQ kernel and of the dK/dV kernel (the shorter list
    wraps around), forced, against autograd of the float64 reference, objects included."""
    module = _module(BACKWARD[kind])
    config_dq = module.CONFIGS_DQ[index % len(module.CONFIGS_DQ)]
    config_dkdv = module.CONFIGS_DKDV[index % len(module.CONFIGS_DKDV)]
    pattern, shape = CONFIG_CASES[kind]
    B, N, T, H, W, D = shape
    q, k, v = (torch.randn(shape).to(device) for _ in range(3))
    labels = torch.randint(-1, 2, (B, T, H, W)).to(device)
    scale = D ** -0.5
    out, aff, lse, arg = forward(q, k, v, pattern, scale, labels, 2, True)
    g_out, g_aff = torch.randn_like(out), torch.randn_like(aff)
    grads = attention_backward(g_out, q, k, v, out, lse, pattern, scale, g_aff, aff, arg,
                               config_dq=config_dq, config_dkdv=config_dkdv)
    expected = _reference_grads(q, k, v, pattern, labels, 2, True, g_out, g_aff, scale)
    for name, got, want in zip("qkv", grads, expected):
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-3, rtol=1e-3, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("pattern", [Pattern.local(3, causal=True), Pattern.grid(), Pattern.strided(2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients(dtype, pattern, device):
    """fp16/bf16 operands, fp32 accumulation: within the rounding of the operands' dtype.

    The forward's saved tensors come from the float64 dense map, so only the backward
    kernels' own rounding is measured.
    """
    shape = (1, 1, 2, 3, 4, 16)
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    labels = torch.randint(-1, 2, (1, 2, 3, 4))
    out, aff, lse, arg = _forward_saved(q.detach(), k.detach(), v.detach(), pattern, 0.25, labels, 2)
    g_out, g_aff = torch.randn_like(out), torch.randn_like(aff)
    ref_out, ref_aff = reference_attention(q, k, v, pattern, 0.25, labels, 2)
    expected = torch.autograd.grad((ref_out * g_out).sum() + (ref_aff * g_aff).sum(), (q, k, v))
    cast = lambda x: x.detach().to(dtype).to(device)  # noqa: E731
    grads = attention_backward(
        cast(g_out), cast(q), cast(k), cast(v), cast(out), lse.float().to(device), pattern, 0.25,
        g_aff.float().to(device), aff.float().to(device), arg.to(device),
    )
    tol = 4e-3 if dtype == torch.float16 else 3e-2  # a few ulps of the dtype (2**-11, 2**-8)
    for got, want in zip(grads, expected):
        assert got.dtype == dtype
        err = (got.cpu().double() - want).abs().max() / want.abs().max()
        assert err < tol, f"relative error {err:.3g}"


# --------------------------------------------------------------------------------------
# gradcheck in float64
# --------------------------------------------------------------------------------------


def _forward_saved(q, k, v, pattern, scale, labels, num_objects):
    """float64 ``out``, ``affinity``, ``lse`` and ``argmax`` from the dense map."""
    B, N, T, H, W, D = q.shape
    qf, kf, vf = (rearrange(x, "b n t h w d -> b n (t h w) d") for x in (q, k, v))
    mask = dense_mask(pattern, T, H, W)
    logits = (scale * qf @ kf.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    probs = torch.softmax(logits, -1)
    t = coords(T, H, W)[0]
    eligible = mask & (t[None, :] < t[:, None])
    flat = rearrange(labels, "b t h w -> b (t h w)")
    hit = eligible[None, None] & (flat[:, None, None, :] == torch.arange(num_objects)[None, :, None, None])
    aff, arg = (probs[:, :, None] * hit[:, None]).max(-1)
    arg = torch.where(aff > 0, arg, -1).int()
    cells = dict(t=T, h=H, w=W)
    return (
        rearrange(probs @ vf, "b n (t h w) d -> b n t h w d", **cells),
        rearrange(aff, "b n o (t h w) -> b n o t h w", **cells),
        rearrange(lse, "b n (t h w) -> b n t h w", **cells),
        rearrange(arg, "b n o (t h w) -> b n o t h w", **cells),
    )


class _DenseForwardKernelBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, labels, num_objects):
        out, aff, lse, arg = _forward_saved(q, k, v, pattern, scale, labels, num_objects)
        ctx.save_for_backward(q, k, v, out, aff, lse, arg)
        ctx.pattern, ctx.scale = pattern, scale
        return out, aff

    @staticmethod
    def backward(ctx, g_out, g_aff):
        q, k, v, out, aff, lse, arg = ctx.saved_tensors
        dq, dk, dv = attention_backward(g_out, q, k, v, out, lse, ctx.pattern, ctx.scale, g_aff, aff, arg)
        return dq, dk, dv, None, None, None, None


@pytest.mark.parametrize(
    "pattern",
    [Pattern.grid(causal=True), Pattern.local((3, 3, 3), boundary="shift"), Pattern.strided((1, 2, 1), causal=True)],
    ids=str,
)
def test_gradcheck_float64(pattern):
    shape = (1, 1, 2, 3, 3, 4)
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    labels = torch.randint(-1, 2, (1, 2, 3, 3))
    fn = lambda q, k, v: _DenseForwardKernelBackward.apply(q, k, v, pattern, 0.5, labels, 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_float64_kernels_match_autograd_of_reference():
    """The float64 path is exact to rounding, not just to gradcheck's tolerance."""
    shape = (1, 2, 3, 4, 3, 5)
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    labels = torch.randint(-1, 3, (1, 3, 4, 3))
    pattern = Pattern.local((3, 3, 5), causal=True)
    out, aff = _DenseForwardKernelBackward.apply(q, k, v, pattern, 0.5, labels, 3)
    g_out, g_aff = torch.randn_like(out), torch.randn_like(aff)
    grads = torch.autograd.grad((out * g_out).sum() + (aff * g_aff).sum(), (q, k, v))
    ref_out, ref_aff = reference_attention(q, k, v, pattern, 0.5, labels, 3)
    expected = torch.autograd.grad((ref_out * g_out).sum() + (ref_aff * g_aff).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------------------
# torch.compile and autocast through the compiled kernels (the interpreter's twins are
# tests/test_compile.py and tests/test_autocast.py)
# --------------------------------------------------------------------------------------

CUDA_ONLY = pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here: the interpreter's twin is tests/test_compile.py and "
    "tests/test_autocast.py"))], indirect=True)


@CUDA_ONLY
def test_compiled_forward_backward_equals_eager(device):
    q, k, v = _fused_qkv((1, 2, 3, 4, 5, 16), device=device)
    labels = torch.randint(-1, 2, (1, 3, 4, 5)).to(device)
    pattern = Pattern.local((3, 3, 3), causal=True)

    def fn(q, k, v):
        out, aff = sparse_attention(q, k, v, pattern, labels=labels, num_objects=2, backend="triton")
        return out.square().sum() + aff.sum()

    eager = torch.autograd.grad(fn(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(fn, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@CUDA_ONLY
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_backward_reaches_float32_leaves(dtype, device):
    q, k, v = _fused_qkv((1, 2, 3, 4, 5, 16), device=device)
    with torch.autocast(device.type, dtype=dtype):
        out = sparse_attention(q, k, v, Pattern.strided((1, 2, 2)), backend="triton")
    assert out.dtype == dtype
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
