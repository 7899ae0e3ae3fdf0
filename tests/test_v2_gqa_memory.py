"""GQA with ``N_kv = N / 4`` must not allocate K/V repeated per query head (SPEC, issue 12).

Every tensor any ATen op produces during the forward and backward of the CPU path is recorded
(a ``TorchDispatchMode``); none may be as large as K or V repeated to the ``N`` query heads.
The shapes make that bound tight: with ``T_q = 2 < T = 8`` neither q-sized copies nor the
path's chunks (``PAIRS_PER_CHUNK``) come near it, while a ``repeat_interleave`` of K would
reach it exactly, which the first test shows the detector catches.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sst_triton import Pattern, sparse_attention

B, N, N_KV, T_Q, T, H, W, D, L = 1, 8, 2, 2, 8, 16, 16, 64, 16
REPEATED_KV = B * N * T * H * W * D  # elements of K (or V) repeated to every query head


class _Largest(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns while active, and that op."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = func(*args, **(kwargs or {}))
        for r in res if isinstance(res, (tuple, list)) else (res,):
            if isinstance(r, torch.Tensor):
                self.shapes.append(tuple(r.shape))
                if r.numel() > self.numel:
                    self.numel, self.op = r.numel(), func
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
        out, aff, lse = sparse_attention(q, k, v, pattern, labels=labels, num_objects=2, return_lse=True,
                                         extra_kv=(kx, vx))
        (out.sum() + aff.sum() + lse.sum()).backward()
    assert k.grad.shape == k.shape and kx.grad.shape == kx.shape and k.grad.abs().sum() > 0
    assert seen.numel < REPEATED_KV, f"{seen.op} made a tensor of {seen.numel} elements (repeated K/V: {REPEATED_KV})"
    # nor the extra keys repeated per query head
    assert (B, N, L, D) not in seen.shapes
