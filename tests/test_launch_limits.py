"""CUDA's launch limits (issue 10.1), proven on the CPU.

CUDA refuses a grid whose axis x reaches 2**31 or whose axis y or z passes 65,535; Triton's
interpreter checks neither. Here the grids the launchers would launch are captured with
``capture_grids(launch=False)`` (shapes only, no kernel runs), through the public API for the
forward and through ``attention_backward`` for the backward, at the shapes that used to break:
65,536 residue classes (strided stride (1, 256, 256) on 256x256 frames), ``T*H = 70,000``
(grid), ``T = 70,000`` (local) and ``B*N = 65,536`` heads for every pattern. Every captured
grid must be within the limits. A shape that still cannot run (more than 2**31 programs)
must raise a ``ValueError`` naming the size, before any work.

Tensors are expanded views of one small buffer (or ``torch.empty``): nothing is computed.
"""
from __future__ import annotations

import pytest
import torch

import sst_triton
from sst_triton.kernels import BACKWARD, FORWARD, capture_grids
from sst_triton.kernels.backward import attention_backward
from sst_triton.kernels.launch import GRID_LIMITS, Problem
from sst_triton.patterns import Pattern

D = 16
DTYPE = torch.float16


def view(B, N, T, H, W):
    """A ``(B, N, T, H, W, D)`` tensor that costs one row of memory (zero strides)."""
    return torch.zeros(1, 1, 1, 1, 1, D, dtype=DTYPE).expand(B, N, T, H, W, D)


# name: (pattern, public call, (B, N, T, H, W))
SHAPES = {
    "strided-65536-classes": (Pattern.strided((1, 256, 256)),
                              lambda q, k, v: sst_triton.strided_attention(q, k, v, (1, 256, 256), backend="triton"),
                              (1, 1, 1, 256, 256)),
    "grid-TH-70000": (Pattern.grid(),
                      lambda q, k, v: sst_triton.grid_attention(q, k, v, backend="triton"),
                      (1, 1, 1, 70_000, 2)),
    "local-T-70000": (Pattern.local(3),
                      lambda q, k, v: sst_triton.local_attention(q, k, v, 3, backend="triton"),
                      (1, 1, 70_000, 1, 2)),
    "strided-BN-65536": (Pattern.strided((1, 2, 2)),
                         lambda q, k, v: sst_triton.strided_attention(q, k, v, (1, 2, 2), backend="triton"),
                         (2, 32_768, 1, 2, 2)),
    "grid-BN-65536": (Pattern.grid(),
                      lambda q, k, v: sst_triton.grid_attention(q, k, v, backend="triton"),
                      (2, 32_768, 1, 2, 2)),
    "local-BN-65536": (Pattern.local(3),
                       lambda q, k, v: sst_triton.local_attention(q, k, v, 3, backend="triton"),
                       (2, 32_768, 1, 2, 2)),
}


def assert_within_limits(grids):
    assert grids, "no launch was captured"
    for name, grid in grids:
        assert len(grid) <= 3, (name, grid)
        assert all(extent >= 1 for extent in grid), (name, grid)
        for axis, (extent, limit) in enumerate(zip(grid, GRID_LIMITS)):
            assert extent <= limit, f"{name}: grid {grid} passes CUDA's limit {limit} on axis {'xyz'[axis]}"


@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_grids_within_cuda_limits(name):
    pattern, call, (B, N, T, H, W) = SHAPES[name]
    q = k = v = view(B, N, T, H, W)
    with capture_grids(launch=False) as grids:
        out = call(q, k, v)
    assert out.shape == (B, N, T, H, W, D)
    assert_within_limits(grids)
    # the sizes that broke the old grids are now behind axis x
    assert max(grid[0] for _, grid in grids) >= 65_536 // 128


@pytest.mark.parametrize("name", list(SHAPES))
def test_backward_grids_within_cuda_limits(name):
    pattern, _, (B, N, T, H, W) = SHAPES[name]
    q = k = v = grad_out = out = view(B, N, T, H, W)
    lse = torch.zeros(1, 1, 1, 1, 1).expand(B, N, T, H, W)
    with capture_grids(launch=False) as grids:
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, pattern, D ** -0.5)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert_within_limits(grids)
    names = [n for n, _ in grids]
    if pattern.kind == "grid":  # one fused dQ + dK/dV kernel per axis
        assert names == ["grid_bwd_rows", "grid_bwd_cols"], names
    else:
        assert any("dq" in n for n in names) and any("dq" not in n for n in names), names


def test_strided_grids_count_every_class_and_head():
    """The 65,536 classes of one frame (one cell each) and the heads all land on axis x."""
    q = k = v = view(1, 3, 1, 256, 256)
    with capture_grids(launch=False) as grids:
        sst_triton.strided_attention(q, k, v, (1, 256, 256), backend="triton")
    (name, grid), = grids
    assert name == "strided_fwd" and grid == (3 * 65_536,)


# More than 2**31 - 1 programs on axis x: 2**20 heads of 2**18 cells. Checked at the launcher,
# which every call goes through, with a Problem and placeholder tensors: outputs of that size
# could not even be allocated here.
TOO_LARGE = {
    "strided": Pattern.strided((1, 1, 2)),
    "grid": Pattern.grid(),
    "local": Pattern.local(3),
}


def _too_large(pattern):
    return Problem(B=1, N=2**20, N_kv=2**20, T_q=64, T=64, H=64, W=64, D=D, pattern=pattern)


def _placeholders(n):
    return tuple(torch.empty(1, dtype=DTYPE) for _ in range(n))


@pytest.mark.parametrize("kind", list(TOO_LARGE))
def test_forward_too_large_for_cuda_raises_naming_the_size(kind):
    p = _too_large(TOO_LARGE[kind])
    meta = dict(CAUSAL=False, CAUSAL_AFF=True, NUM_OBJ=0, BLOCK_O=2, BLOCK_D=16, DOT_PRECISION="ieee",
                INTERPRET_BF16=False)
    with capture_grids(launch=False) as grids:
        with pytest.raises(ValueError, match=r"exceeds CUDA's limit of 2147483647 on axis x") as err:
            FORWARD[kind](p, _placeholders(8), (0,) * 18, 1.0, meta, interpret=True)
    assert grids == []  # raised before anything was launched (or recorded)
    assert "launch grid (" in str(err.value)  # the grid it refused, with the kernel's name


@pytest.mark.parametrize("kind", list(TOO_LARGE))
def test_backward_too_large_for_cuda_raises_naming_the_size(kind):
    p = _too_large(TOO_LARGE[kind])
    meta = dict(CAUSAL=False, NUM_OBJ=0, BLOCK_D=16, DOT_PRECISION="ieee", DOT_FP32=False)
    dq, dk, dv = _placeholders(3)
    with capture_grids(launch=False) as grids:
        with pytest.raises(ValueError, match=r"exceeds CUDA's limit of 2147483647 on axis x"):
            BACKWARD[kind](p, _placeholders(8), dq, dk, dv, (0,) * 24, 1.0, meta, interpret=True)
    assert grids == []


def test_strided_too_large_names_heads_and_classes():
    p = _too_large(TOO_LARGE["strided"])
    meta = dict(CAUSAL=False, CAUSAL_AFF=True, NUM_OBJ=0, BLOCK_O=2, BLOCK_D=16, DOT_PRECISION="ieee",
                INTERPRET_BF16=False)
    with pytest.raises(ValueError, match=r"B\*N=1048576, classes=2\b"):
        FORWARD["strided"](p, _placeholders(8), (0,) * 18, 1.0, meta, interpret=True)
