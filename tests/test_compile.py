"""``torch.compile(fullgraph=True)`` over the attention calls and the nn module, on CPU.

Every public call is one ``torch.library`` operator, so Dynamo must trace it without a
graph break, and the compiled forward and backward must equal eager execution.
"""
import functools

import pytest
import torch

from sst_triton import Pattern, grid_attention, local_attention, merge_attention, strided_attention
from sst_triton.nn import SparseAttention3d

SHAPE = (1, 2, 3, 4, 5, 8)  # (B, N, T, H, W, D)
CALLS = {
    "grid": functools.partial(grid_attention, causal=True),
    "local": functools.partial(local_attention, kernel_size=(3, 3, 5), boundary="shift"),
    "strided": functools.partial(strided_attention, stride=(1, 2, 2)),
}


def _inputs():
    q, k, v = (torch.randn(SHAPE, requires_grad=True) for _ in range(3))
    B, _, T, H, W, _ = SHAPE
    labels = torch.randint(-1, 3, (B, T, H, W))
    return q, k, v, labels


def _value_and_grads(fn, q, k, v, labels):
    for x in (q, k, v):
        x.grad = None
    res = fn(q, k, v, labels)
    outs = res if isinstance(res, tuple) else (res,)
    # a weighted sum so that every output element has its own gradient
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [x.grad.clone() for x in (q, k, v)]


@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no_labels"])
@pytest.mark.parametrize("name", list(CALLS))
def test_compiled_call_equals_eager(name, with_labels):
    call = CALLS[name]

    def fn(q, k, v, labels):
        if with_labels:
            return call(q, k, v, labels=labels, num_objects=3)
        return call(q, k, v)

    q, k, v, labels = _inputs()
    eager = _value_and_grads(fn, q, k, v, labels)
    compiled = _value_and_grads(torch.compile(fn, fullgraph=True), q, k, v, labels)
    assert len(eager) == (5 if with_labels else 4)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(CALLS))
def test_explain_reports_no_graph_break(name):
    call = CALLS[name]

    def fn(q, k, v, labels):
        out, aff = call(q, k, v, labels=labels, num_objects=3)
        return out.sum() + aff.sum()

    explanation = torch._dynamo.explain(fn)(*_inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_module_equals_eager():
    module = SparseAttention3d(16, num_heads=4, pattern=[Pattern.local(3), Pattern.strided((1, 2, 2))], scale=1.0)
    x = torch.randn(2, 16, 3, 4, 5, requires_grad=True)
    labels = torch.randint(-1, 2, (2, 3, 4, 5))

    def run(m):
        x.grad = None
        module.zero_grad()
        y, aff = m(x, labels=labels, num_objects=2)
        (y.square().sum() + aff.sum()).backward()
        return [y.detach(), aff.detach(), x.grad.clone(), module.qkv.weight.grad.clone()]

    eager = run(module)
    compiled = run(torch.compile(module, fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-4)
    explanation = torch._dynamo.explain(module)(x, labels=labels, num_objects=2)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_label_range_still_checked_eagerly():
    q, k, v, labels = _inputs()
    with pytest.raises(ValueError, match="labels must lie in"):
        local_attention(q, k, v, 3, labels=labels + 5, num_objects=3)


def test_compiled_triton_backend_equals_eager():
    """``backend="triton"`` on CPU: the same operator, its kernels run by the interpreter."""
    shape = (1, 1, 2, 3, 4, 8)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    labels = torch.randint(-1, 2, (1, 2, 3, 4))

    def fn(q, k, v, labels):
        return local_attention(q, k, v, 3, labels=labels, num_objects=2, causal=True, backend="triton")

    eager = _value_and_grads(fn, q, k, v, labels)
    compiled = _value_and_grads(torch.compile(fn, fullgraph=True), q, k, v, labels)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-5)
    explanation = torch._dynamo.explain(fn)(q, k, v, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ---- version 2: each new argument traces with no graph break; compiled equals eager

V2_SHAPE = dict(B=1, N=4, N_kv=2, T_q=2, T=3, H=4, W=5, D=8, L=3)


def _v2_inputs():
    s = V2_SHAPE
    q = torch.randn(s["B"], s["N"], s["T_q"], s["H"], s["W"], s["D"], requires_grad=True)
    k, v = (torch.randn(s["B"], s["N_kv"], s["T"], s["H"], s["W"], s["D"], requires_grad=True) for _ in range(2))
    kx, vx = (torch.randn(s["B"], s["N_kv"], s["L"], s["D"], requires_grad=True) for _ in range(2))
    labels = torch.randint(-1, 3, (s["B"], s["T"], s["H"], s["W"]))
    return q, k, v, kx, vx, labels


V2_CALLS = {
    "gqa": lambda q, k, v, kx, vx, lab: grid_attention(torch.cat([q[:, :, :1], q], 2), k, v),
    "fewer_query_frames": lambda q, k, v, kx, vx, lab: strided_attention(
        q[:, :2], k, v, (1, 2, 2), labels=lab, num_objects=3),
    "return_lse": lambda q, k, v, kx, vx, lab: local_attention(q, k, v, 3, return_lse=True),
    "extra_kv": lambda q, k, v, kx, vx, lab: local_attention(q, k, v, 3, extra_kv=(kx, vx)),
    "dilation": lambda q, k, v, kx, vx, lab: local_attention(q, k, v, 3, dilation=(1, 2, 2), labels=lab, num_objects=3),
    "merge_attention": lambda q, k, v, kx, vx, lab: merge_attention(
        [grid_attention(q, k, v, return_lse=True), strided_attention(q, k, v, 2, return_lse=True)]),
}


@pytest.mark.parametrize("name", list(V2_CALLS))
def test_v2_argument_traces_without_graph_break(name):
    call = V2_CALLS[name]

    def fn(*args):
        res = call(*args)
        res = res if isinstance(res, tuple) else (res,)
        return sum(r.float().sum() for r in res)

    explanation = torch._dynamo.explain(fn)(*_v2_inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_v2_call_equals_eager(backend):
    """Every addition at once (GQA, T_q < T, extra keys, lse, labels), forward and backward."""

    def fn(q, k, v, kx, vx, labels):
        return local_attention(q, k, v, 3, causal=True, labels=labels, num_objects=3, return_lse=True,
                               extra_kv=(kx, vx), backend=backend)

    inputs = _v2_inputs()
    leaves = inputs[:5]

    def value_and_grads(f):
        for x in leaves:
            x.grad = None
        outs = f(*inputs)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
        loss.backward()
        return [o.detach() for o in outs] + [x.grad.clone() for x in leaves]

    eager = value_and_grads(fn)
    compiled = value_and_grads(torch.compile(fn, fullgraph=True))
    assert len(eager) == 8
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-4)
