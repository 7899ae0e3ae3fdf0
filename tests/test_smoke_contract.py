import pytest
import torch

from sst_triton import Pattern, sparse_attention
from sst_triton.reference import reference_attention

PATTERNS = [
    Pattern.grid(),
    Pattern.grid(causal=True),
    Pattern.local(3),
    Pattern.local((3, 5, 1), boundary="shift"),
    Pattern.strided((1, 3, 2), causal=True),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_torch_path_matches_dense_reference(pattern):
    q, k, v = (torch.randn(2, 2, 3, 5, 4, 8) for _ in range(3))
    labels = torch.randint(-1, 3, (2, 3, 5, 4))
    out, aff = sparse_attention(q, k, v, pattern, labels=labels, num_objects=3)
    ref_out, ref_aff = reference_attention(q, k, v, pattern, labels=labels, num_objects=3)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(aff.double(), ref_aff, atol=1e-5, rtol=1e-4)
