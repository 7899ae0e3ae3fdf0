"""The CPU benchmark cases: B=1, N=8, T=4, H=W=size, D=32, the three patterns as in SST."""
from __future__ import annotations

from typing import Callable

import torch

from baselines import dense_mask, dense_sdpa_attention, flex_block_mask, flex_sparse_attention
from sst_triton import Pattern, sparse_attention

B, N, T, D = 1, 8, 4, 32
CASES = {
    "grid": Pattern.grid(),
    "local7": Pattern.local(7),
    "strided188": Pattern.strided((1, 8, 8)),
}
IMPLS = ("sst", "sdpa", "flex")


def make_inputs(size: int, T: int = T):
    return tuple(torch.randn(B, N, T, size, size, D) for _ in range(3))


def prepare(impl: str, pattern: Pattern, q: torch.Tensor) -> Callable:
    """``fn(q, k, v) -> out`` for one implementation, with its pattern set up (masks built) once."""
    _, _, T, H, W, _ = q.shape
    if impl == "sst":
        return lambda q, k, v: sparse_attention(q, k, v, pattern)
    if impl == "sdpa":
        mask = dense_mask(pattern, T, H, W)
        return lambda q, k, v: dense_sdpa_attention(q, k, v, mask)
    if impl == "flex":
        block_mask = flex_block_mask(pattern, T, H, W)
        return lambda q, k, v: flex_sparse_attention(q, k, v, block_mask)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
