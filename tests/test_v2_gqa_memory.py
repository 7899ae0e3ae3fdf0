"""GQA with ``N_kv = N / 4`` must not allocate K/V repeated per query head (SPEC, issue 12).

Every tensor any ATen op produces during the forward and backward of the CPU path is recorded
(a ``TorchDispatchMode``, by the size of the storage it lives in, so that views of existing
tensors count as what they are); none may be as large as K or V repeated to the ``N`` query
heads. A dispatch mode sees a custom operator as one op, so the mode wraps the function the
operator ``sst_triton::attention_torch`` runs (:func:`sst_triton.torch_path.sparse_attention`;
its backward operator recomputes that same function under autograd).
The shapes make that bound tight: with ``T_q = 2 < T = 8`` neither q-sized copies nor the
path's chunks (``PAIRS_PER_CHUNK``) come near it, while a ``repeat_interleave`` of K would
reach it exactly, which the first test shows the detector catches.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sst_triton import Pattern, torch_path

B, N, N_KV, T_Q, T, H, W, D, L = 1, 8, 2, 2, 8, 16, 16, 64, 16
REPEATED_KV = B * N * T * H * W * D  # elements of K (or V) repeated to every query head


class _Largest(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns while active, and that op."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None
        self.shapes, self.ops = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = func(*args, **(kwargs or {}))
        for r in res if isinstance(res, (tuple, list)) else (res,):
            if isinstance(r, torch.Tensor):
                self.shapes.append(tuple(r.shape))
                self.ops.add(func._schema.name)
                numel = r.untyped_storage().nbytes() // r.element_size()
                if numel > self.numel:
                    self.numel, self.op = numel, func
        return res


def _inputs():
    q = torch.randn(B, N, T_Q, H, W, D, requires_grad=True)
    k, v = (torch.randn(B, N_KV, T, H, W, D, requires_grad=True) for _ in range(2))
    kx, vx = (torch.randn(B, N_KV, L, D, requires_grad=True) for _ in range(2))
    return q, k, v, kx, vx


def test_detector_catches_repeated_kv():
    _, k, _, _, _ = _inputs()
    with _Largest() as seen:
        k.repeat_interleave(N // N_KV, dim=1)
    assert seen.numel >= REPEATED_KV


@pytest.mark.parametrize(
    "pattern", [Pattern.grid(causal=True), Pattern.local((3, 5, 5)), Pattern.local(3, dilation=(1, 2, 2)),
                Pattern.strided((1, 4, 4))], ids=lambda p: f"{p.kind}{p.dilation}"
)
def test_gqa_allocates_no_repeated_kv(pattern):
    q, k, v, kx, vx = _inputs()
    labels = torch.randint(-1, 2, (B, T, H, W))
    with _Largest() as seen:
        out, aff, lse = torch_path.sparse_attention(q, k, v, pattern, D ** -0.5, labels, 2, True,
                                                    extra_kv=(kx, vx), return_lse=True)
        (out.sum() + aff.sum() + lse.sum()).backward()
    # the mode saw the path's own work, forward and backward (not one opaque operator)
    assert "aten::mm" in seen.ops or "aten::bmm" in seen.ops
    assert any(name.endswith("_backward") for name in seen.ops)
    assert k.grad.shape == k.shape and kx.grad.shape == kx.shape and k.grad.abs().sum() > 0
    assert seen.numel < REPEATED_KV, f"{seen.op} made a tensor of {seen.numel} elements (repeated K/V: {REPEATED_KV})"
    # nor the extra keys repeated per query head
    assert (B, N, L, D) not in seen.shapes
