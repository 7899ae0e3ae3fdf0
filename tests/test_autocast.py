"""Under ``torch.autocast`` the attention takes the autocast dtype for q, k, v, as SDPA does."""
import pytest
import torch

import sst_triton._custom_ops as custom_ops
from sst_triton import Pattern, local_attention, strided_attention

SHAPE = (1, 2, 3, 4, 5, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_qkv_like_sdpa(dtype):
    q, k, v = (torch.randn(SHAPE, requires_grad=True) for _ in range(3))
    labels = torch.randint(-1, 2, SHAPE[:1] + SHAPE[2:5])
    with torch.autocast("cpu", dtype=dtype):
        out, aff = local_attention(q, k, v, 3, labels=labels, num_objects=2)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q[..., 0, :], k[..., 0, :], v[..., 0, :])
    assert sdpa.dtype == dtype
    assert out.dtype == dtype
    assert aff.dtype == torch.float32  # affinities are always float32 (SPEC)
    # the same as casting by hand
    ref_out, ref_aff = local_attention(q.to(dtype), k.to(dtype), v.to(dtype), 3, labels=labels, num_objects=2)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(aff, ref_aff, atol=0, rtol=0)
    # gradients flow back through the cast to the float32 leaves
    (out.float().sum() + aff.sum()).backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0 for x in (q, k, v))


def test_autocast_accepts_mixed_input_dtypes():
    q = torch.randn(SHAPE)
    k, v = torch.randn(SHAPE, dtype=torch.bfloat16), torch.randn(SHAPE, dtype=torch.float16)
    with pytest.raises(TypeError, match="dtype of q"):
        strided_attention(q, k, v, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = strided_attention(q, k, v, 2)
    assert out.dtype == torch.bfloat16


def test_operator_has_its_own_autocast_rule():
    """A caller of the operator itself (not ops.py) gets the same cast."""
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    kx, vx = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    args = (*custom_ops.pattern_args(Pattern.grid()), 1.0, None, 0, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aff, lse = torch.ops.sst_triton.attention_torch(q, k, v, *args, kx, vx, True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert aff.numel() == 0
    # the extra keys are cast too: by hand, everything in bfloat16
    expected, _, expected_lse = torch.ops.sst_triton.attention_torch(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), *args, kx.bfloat16(), vx.bfloat16(), True
    )
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=0, rtol=0)


def test_autocast_disabled_keeps_float32():
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert local_attention(q, k, v, 3).dtype == torch.float32


def test_autocast_on_triton_backend():
    q, k, v = (torch.randn(1, 1, 2, 3, 4, 16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.float16):
        out = strided_attention(q, k, v, (1, 2, 1), backend="triton")
    assert out.dtype == torch.float16
    expected = strided_attention(q.half(), k.half(), v.half(), (1, 2, 1), backend="triton")
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out.float().sum().backward()
    assert all(x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_with_v2_arguments(backend):
    """GQA, extra keys and lse under autocast: all of q, k, v, k_x, v_x take the autocast dtype,
    lse stays float32, and gradients reach the float32 leaves (extra keys included)."""
    q = torch.randn(1, 4, 1, 3, 4, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 2, 3, 4, 16, requires_grad=True) for _ in range(2))
    kx, vx = (torch.randn(1, 2, 3, 16, requires_grad=True) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = local_attention(q, k, v, 3, return_lse=True, extra_kv=(kx, vx), backend=backend)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = local_attention(*(x.bfloat16() for x in (q, k, v)), 3, return_lse=True,
                                       extra_kv=(kx.bfloat16(), vx.bfloat16()), backend=backend)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)
    (out.float().sum() + lse.sum()).backward()
    assert all(x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0 for x in (q, k, v, kx, vx))
