"""Version-2 contract (SPEC.md, second half) against the float64 dense reference, on the CPU
path (``backend="torch"``) and in Triton's interpreter (``backend="triton"``, tiny shapes).

Grouped key/value heads, fewer query frames than key frames, ``return_lse``, ``extra_kv`` and
dilated local windows, mixed with each other and with labels, ``causal``, ``causal_affinity``
and the shift boundary: forward to 1e-4, gradients (through out, affinity and lse, into q, k,
v, k_x and v_x) to 1e-3; and the plain-call equivalences, exactly.
"""
from __future__ import annotations

import pytest
import torch.utils._python_dispatch
import torch
from einops import rearrange

from sst_triton import Pattern, local_attention, merge_attention, sparse_attention, strided_attention, torch_path
from sst_triton.reference import reference_attention

# (pattern, (B, N, N_kv, T_q, T, H, W, D), L, with labels, causal_affinity, return_lse)
CASES = [
    (Pattern.grid(), (1, 4, 2, 2, 3, 4, 5, 4), 3, True, True, True),
    (Pattern.grid(causal=True), (2, 2, 1, 1, 4, 3, 4, 8), 0, True, False, True),
    (Pattern.grid(), (1, 3, 3, 3, 3, 2, 5, 4), 5, False, True, False),
    (Pattern.local(3), (1, 4, 1, 2, 4, 5, 4, 4), 2, True, True, True),
    (Pattern.local((3, 5, 3), "shift", causal=True), (1, 4, 2, 1, 3, 6, 5, 4), 4, True, False, True),
    (Pattern.local((3, 3, 3), dilation=(1, 2, 2)), (1, 2, 2, 3, 3, 7, 6, 4), 0, True, True, True),
    (Pattern.local((3, 3, 1), "shift", True, dilation=(2, 2, 1)), (1, 2, 1, 3, 5, 6, 3, 4), 3, True, True, True),
    (Pattern.local((1, 3, 5), dilation=(1, 3, 2)), (1, 6, 3, 2, 2, 7, 9, 4), 2, False, True, True),
    (Pattern.local(5, "shift", dilation=2), (1, 2, 2, 4, 6, 5, 4, 4), None, True, False, False),
    (Pattern.strided((1, 2, 2)), (1, 4, 2, 2, 4, 4, 5, 4), 3, True, True, True),
    (Pattern.strided((2, 2, 3), causal=True), (1, 2, 1, 3, 5, 5, 6, 4), 1, True, True, True),
    (Pattern.strided((3, 1, 2)), (1, 4, 4, 1, 4, 3, 4, 8), None, True, False, True),
]

# the interpreter runs the real kernels: a few tiny cases, every addition among them
TRITON_CASES = [
    (Pattern.grid(causal=True), (1, 2, 1, 1, 3, 2, 4, 16), 2, True, True, True),
    (Pattern.local((3, 3, 3), "shift"), (1, 2, 1, 2, 3, 3, 4, 16), 3, True, False, True),
    (Pattern.local(3, dilation=(1, 2, 1)), (1, 2, 2, 2, 2, 4, 3, 16), 0, False, True, True),
    (Pattern.strided((1, 2, 1), causal=True), (1, 2, 1, 2, 3, 2, 3, 16), 2, True, True, False),
    # plain shapes with extra keys and lse: the operator-level merge and its written-out backward
    (Pattern.local((3, 3, 3), causal=True), (1, 2, 2, 2, 2, 3, 4, 16), 3, True, True, True),
    (Pattern.strided((1, 2, 2)), (1, 1, 1, 2, 2, 3, 4, 16), 2, True, False, True),
]


def _id(case) -> str:
    p, (B, N, N_kv, T_q, T, H, W, D), L, lab, ca, lse = case
    extra = {"local": f"{p.kernel_size}{p.boundary}d{p.dilation}", "strided": f"{p.stride}", "grid": ""}[p.kind]
    flags = f"N{N}kv{N_kv}-Tq{T_q}of{T}-L{L}" + ("-lab" if lab else "") + ("-strict" if ca else "") + ("-lse" if lse else "")
    return f"{p.kind}{extra}{'-causal' if p.causal else ''}-{flags}".replace(" ", "")


def _inputs(shape, L, dtype=torch.float32):
    B, N, N_kv, T_q, T, H, W, D = shape
    q = torch.randn(B, N, T_q, H, W, D, dtype=dtype)
    # k, v as views of one fused projection: the GQA path must read them in place
    kv = torch.randn(B, T, H, W, 2 * N_kv * D, dtype=dtype)
    k, v = rearrange(kv, "b t h w (two n d) -> two b n t h w d", two=2, n=N_kv)
    extra = None if L is None else tuple(torch.randn(B, N_kv, L, D, dtype=dtype) for _ in range(2))
    return q, k, v, extra


def _labels(B, T, H, W, O):
    labels = torch.randint(-1, O - 1, (B, T, H, W))
    labels[:, -1, 0, 0] = O - 1  # an object only in the newest frame: no strict-earlier affinity
    return labels


def _check_case(case, backend):
    pattern, shape, L, with_labels, causal_affinity, return_lse = case
    B, N, N_kv, T_q, T, H, W, D = shape
    O = 3
    q, k, v, extra = _inputs(shape, L)
    leaves = [x.requires_grad_() for x in (q, k, v)] + ([x.requires_grad_() for x in extra] if extra else [])
    labels = _labels(B, T, H, W, O) if with_labels else None
    kw = dict(labels=labels, num_objects=O if with_labels else None, causal_affinity=causal_affinity)
    res = sparse_attention(q, k, v, pattern, 0.7, **kw, backend=backend, return_lse=return_lse, extra_kv=extra)
    res = res if isinstance(res, tuple) else (res,)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_extra = tuple(ref_leaves[3:]) if extra else None
    ref = reference_attention(*ref_leaves[:3], pattern, 0.7, **kw, extra_kv=ref_extra, return_lse=return_lse)
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert len(res) == 1 + with_labels + return_lse
    assert res[0].shape == (B, N, T_q, H, W, D) and res[0].dtype == torch.float32
    if with_labels:
        assert res[1].shape == (B, N, O, T_q, H, W) and res[1].dtype == torch.float32
    if return_lse:
        assert res[-1].shape == (B, N, T_q, H, W) and res[-1].dtype == torch.float32
    for r, e in zip(res, ref):
        torch.testing.assert_close(r.double(), e, atol=1e-4, rtol=1e-4)
    if with_labels and causal_affinity:
        # the object that only the newest key frame holds is in no strictly earlier frame
        assert res[1][:, :, O - 1].abs().max() == 0
    weights = [torch.randn_like(e) for e in ref]
    grads = torch.autograd.grad(sum((r.double() * w).sum() for r, w in zip(res, weights)), leaves)
    ref_grads = torch.autograd.grad(sum((e * w).sum() for e, w in zip(ref, weights)), ref_leaves)
    for name, g, e in zip(["q", "k", "v", "k_x", "v_x"], grads, ref_grads):
        assert g.shape == e.shape, name
        torch.testing.assert_close(g.double(), e, atol=1e-3, rtol=1e-3, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_torch_path_matches_reference(case):
    _check_case(case, "torch")


def _random_case(seed: int):
    """A random mix of every addition with the old options (seeded, so a failure reproduces)."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    kind, causal = pick(["grid", "local", "strided"]), pick([False, True])
    if kind == "grid":
        pattern = Pattern.grid(causal)
    elif kind == "local":
        pattern = Pattern.local(tuple(pick([1, 3, 5]) for _ in range(3)), pick(["clip", "shift"]), causal,
                                tuple(pick([1, 1, 2, 3]) for _ in range(3)))
    else:
        pattern = Pattern.strided(tuple(pick([1, 2, 3]) for _ in range(3)), causal)
    N_kv = pick([1, 2])
    T = pick([2, 3, 4])
    shape = (1, N_kv * pick([1, 2, 3]), N_kv, pick(list(range(1, T + 1))), T, pick([3, 4, 5]), pick([3, 5, 6]), 4)
    return pattern, shape, pick([None, 0, 1, 4]), pick([False, True]), pick([False, True]), pick([False, True])


RANDOM_CASES = [_random_case(seed) for seed in range(10)]


@pytest.mark.parametrize("case", RANDOM_CASES, ids=[f"seed{i}-{_id(c)}" for i, c in enumerate(RANDOM_CASES)])
def test_random_mixes_match_reference(case):
    _check_case(case, "torch")


@pytest.mark.parametrize("case", TRITON_CASES, ids=[_id(c) for c in TRITON_CASES])
def test_interpreter_matches_reference(case):
    _check_case(case, "triton")


PLAIN = [Pattern.grid(causal=True), Pattern.local((3, 3, 5), "shift"), Pattern.strided((1, 2, 2), causal=True)]


def _all_outputs_and_grads(fn, leaves):
    res = fn(*leaves)
    res = res if isinstance(res, tuple) else (res,)
    loss = sum((r.double() * torch.linspace(-1, 1, r.numel(), dtype=torch.float64).view(r.shape)).sum() for r in res)
    grads = torch.autograd.grad(loss, leaves[:3])
    return [r.detach() for r in res] + list(grads)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("pattern", PLAIN, ids=lambda p: p.kind)
def test_plain_call_equivalences_are_exact(pattern, backend):
    """GQA with N_kv = N, T_q = T, L = 0 and dilation 1 are the plain call, bit for bit."""
    # the interpreter is slow: one head, a 2x3 frame there
    shape = (1, 2, 2, 2, 2, 3, 4, 16) if backend == "torch" else (1, 1, 1, 2, 2, 2, 3, 16)
    q, k, v, _ = _inputs(shape, None)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    B, N, D = shape[0], shape[1], shape[-1]
    labels = torch.randint(-1, 2, (B, *shape[4:7]))
    kw = dict(labels=labels, num_objects=2, backend=backend)
    empty = (torch.randn(B, N, 0, D), torch.randn(B, N, 0, D))
    plain = _all_outputs_and_grads(lambda q, k, v: sparse_attention(q, k, v, pattern, **kw), leaves)
    variants = {"L=0": lambda q, k, v: sparse_attention(q, k, v, pattern, **kw, extra_kv=empty)}
    if backend == "torch":  # the same call, by shapes; the interpreter is too slow to run it twice
        variants["N_kv=N, T_q=T"] = lambda q, k, v: sparse_attention(q, k, v, pattern, **kw)
    if pattern.kind == "local":
        p1 = Pattern.local(pattern.kernel_size, pattern.boundary, pattern.causal, dilation=(1, 1, 1))
        variants["dilation=1"] = lambda q, k, v: sparse_attention(q, k, v, p1, **kw)
        variants["local_attention dilation=1"] = lambda q, k, v: local_attention(
            q, k, v, pattern.kernel_size, None, pattern.causal, pattern.boundary, dilation=1, **kw
        )
    for name, fn in variants.items():
        for a, b in zip(plain, _all_outputs_and_grads(fn, leaves)):
            assert torch.equal(a, b), name
    # return_lse only appends: out and affinity are the plain call's
    out, aff, lse = sparse_attention(*leaves, pattern, **kw, return_lse=True)
    assert torch.equal(out, plain[0]) and torch.equal(aff, plain[1])


@pytest.mark.parametrize("pattern", PLAIN + [Pattern.local(3, dilation=(1, 2, 2))], ids=lambda p: f"{p.kind}{p.dilation}")
def test_gqa_equals_repeated_heads_and_streaming_equals_last_frames(pattern):
    """GQA is the plain call on K/V repeated per query head; a T_q-frame query block is the last
    T_q frames of the full call (for any pattern, the times being absolute)."""
    B, N, N_kv, T, H, W, D = 1, 4, 2, 4, 5, 6, 8
    q = torch.randn(B, N, T, H, W, D)
    k, v = torch.randn(B, N_kv, T, H, W, D), torch.randn(B, N_kv, T, H, W, D)
    labels = torch.randint(-1, 3, (B, T, H, W))
    kw = dict(labels=labels, num_objects=3, return_lse=True)
    full = sparse_attention(q, k, v, pattern, **kw)
    repeated = sparse_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), pattern, **kw)
    for a, b in zip(full, repeated):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for T_q in (1, 3):
        stream = sparse_attention(q[:, :, T - T_q:], k, v, pattern, **kw)
        # out (B, N, T, ...), affinity (B, N, O, T, ...), lse (B, N, T, ...): time is axis 2, 3, 2
        for a, b, axis in zip(stream, full, (2, 3, 2)):
            torch.testing.assert_close(a, b.narrow(axis, T - T_q, T_q), atol=1e-6, rtol=1e-5)


def test_extra_keys_are_an_lse_merge_of_two_attentions():
    """Joint attention over pattern + extra keys = merge_attention of the pattern part and a
    dense SDPA over the extra keys; affinities are rescaled by the pattern part's share."""
    B, N, T, H, W, D, L = 1, 2, 3, 4, 5, 8, 6
    q, k, v = (torch.randn(B, N, T, H, W, D) for _ in range(3))
    kx, vx = torch.randn(B, N, L, D), torch.randn(B, N, L, D)
    labels = torch.randint(-1, 2, (B, T, H, W))
    out, aff, lse = strided_attention(q, k, v, (1, 2, 2), labels=labels, num_objects=2, return_lse=True, extra_kv=(kx, vx))
    out_s, aff_s, lse_s = strided_attention(q, k, v, (1, 2, 2), labels=labels, num_objects=2, return_lse=True)
    qf = rearrange(q, "b n t h w d -> b n (t h w) d")
    out_x = rearrange(torch.nn.functional.scaled_dot_product_attention(qf, kx, vx), "b n (t h w) d -> b n t h w d", t=T, h=H)
    lse_x = rearrange(torch.logsumexp(qf @ kx.transpose(-1, -2) * D ** -0.5, -1), "b n (t h w) -> b n t h w", t=T, h=H)
    m_out, m_lse = merge_attention([(out_s, lse_s), (out_x, lse_x)])
    torch.testing.assert_close(out, m_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, m_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aff, aff_s * torch.exp(lse_s - lse)[:, :, None], atol=1e-6, rtol=1e-5)
    assert (aff <= aff_s + 1e-7).all() and (aff < aff_s).any()


def test_lse_gradient_alone():
    """A loss on lse only (as in a merge downstream) differentiates into q, k and k_x, not v."""
    q, k, v = (torch.randn(1, 2, 2, 3, 4, 8, dtype=torch.float32, requires_grad=True) for _ in range(3))
    kx, vx = (torch.randn(1, 2, 3, 8, requires_grad=True) for _ in range(2))
    _, lse = local_attention(q, k, v, 3, return_lse=True, extra_kv=(kx, vx))
    lse.sum().backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0 and kx.grad.abs().sum() > 0
    assert v.grad.abs().max() == 0 and vx.grad.abs().max() == 0


class _QueryRows(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the query rows the softmaxes (or fused attentions) of a call compute."""

    OPS = ("aten::_softmax", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_safe_softmax")

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = func(*args, **(kwargs or {}))
        if func._schema.name in self.OPS:
            out = res[0] if isinstance(res, tuple) else res
            self.rows += out.numel() // out.shape[-1]
        return res


@pytest.mark.parametrize(
    "pattern", [Pattern.grid(causal=True), Pattern.local((3, 3, 3)), Pattern.local(3, dilation=(2, 1, 2)),
                Pattern.strided((1, 2, 2))], ids=lambda p: f"{p.kind}{p.dilation}"
)
def test_streaming_step_computes_only_its_query_frames(pattern):
    """T_q = 1 against T = 4 key frames softmaxes a quarter of the query rows of T_q = 4."""
    q, k, v = (torch.randn(1, 2, 4, 8, 8, 8) for _ in range(3))
    counts = []
    for T_q in (4, 1):
        # the path the operator runs: a dispatch mode sees the operator itself as one op
        with _QueryRows() as mode, torch.no_grad():
            torch_path.sparse_attention(q[:, :, 4 - T_q:], k, v, pattern, 0.5)
        counts.append(mode.rows)
    assert counts[0] > 0 and counts[1] <= counts[0] / 4
