"""``sst_triton.merge_attention``: attention over a union of disjoint key sets, exactly."""
import pytest
import torch

from sst_triton import merge_attention


def _attend(q, k, v):
    """Dense attention and its natural log-sum-exp: ``(out, lse)``."""
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(logits, -1)
    return torch.exp(logits - lse[..., None]) @ v, lse


@pytest.mark.parametrize("n_parts", [1, 2, 3, 5])
def test_merge_equals_attention_over_the_union(n_parts):
    q = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    k, v = torch.randn(2, 3, 20, 8, dtype=torch.float64), torch.randn(2, 3, 20, 8, dtype=torch.float64)
    bounds = torch.linspace(0, 20, n_parts + 1).long().tolist()
    parts = [_attend(q, k[:, :, a:b], v[:, :, a:b]) for a, b in zip(bounds, bounds[1:])]
    out, lse = merge_attention(parts)
    ref_out, ref_lse = _attend(q, k, v)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)


def test_merge_is_differentiable():
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    parts = [tuple(x.requires_grad_() for x in _attend(q, torch.randn(1, 2, n, 3, dtype=torch.float64),
                                                      torch.randn(1, 2, n, 3, dtype=torch.float64)))
             for n in (2, 3, 1)]
    leaves = [x for p in parts for x in p]

    def fn(*xs):
        return merge_attention([(xs[i], xs[i + 1]) for i in range(0, len(xs), 2)])

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_merge_keeps_dtype_and_handles_empty_parts():
    out = torch.randn(1, 2, 3, 4, 4).half()
    lse = torch.randn(1, 2, 3, 4)
    # a part that gave a query no key has lse = -inf and weight 0; a query no part reached stays 0
    empty = (torch.full_like(out, float("nan")).nan_to_num(0.0), torch.full_like(lse, float("-inf")))
    m_out, m_lse = merge_attention([(out, lse), empty])
    assert m_out.dtype == torch.float16 and m_lse.dtype == torch.float32
    assert torch.equal(m_out, out) and torch.equal(m_lse, lse)
    none_out, none_lse = merge_attention([empty, empty])
    assert not none_out.isnan().any() and (none_lse == float("-inf")).all()
