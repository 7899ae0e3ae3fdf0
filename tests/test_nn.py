"""sst_triton.nn.SparseAttention3d: shapes, gradients, and the attention it computes."""
import pytest
import torch
from einops import rearrange

from sst_triton import Pattern
from sst_triton.nn import SparseAttention3d
from sst_triton.reference import reference_attention


def _by_hand(module: SparseAttention3d, x, labels=None, num_objects=None):
    """The module's computation written out with the dense reference."""
    qkv = rearrange(x, "b c t h w -> b t h w c") @ module.qkv.weight.T + module.qkv.bias
    q, k, v = rearrange(qkv, "b t h w (three n d) -> three b n t h w d", three=3, n=module.num_heads)
    group = module.num_heads // len(module.patterns)
    outs, affs = [], []
    for i, pattern in enumerate(module.patterns):
        heads = slice(i * group, (i + 1) * group)
        res = reference_attention(q[:, heads], k[:, heads], v[:, heads], pattern, module.scale, labels, num_objects)
        outs.append(res[0] if labels is not None else res)
        if labels is not None:
            affs.append(res[1])
    out = rearrange(torch.cat(outs, 1).float(), "b n t h w d -> b t h w (n d)")
    y = rearrange(module.proj(out), "b t h w c -> b c t h w")
    return (y, torch.cat(affs, 1)) if labels is not None else y


@pytest.mark.parametrize(
    "pattern",
    [Pattern.grid(), Pattern.local((3, 3, 3)), [Pattern.local(3), Pattern.strided((1, 2, 2))]],
    ids=["grid", "local", "local+strided"],
)
def test_module_matches_hand_computation(pattern):
    torch.manual_seed(0)
    module = SparseAttention3d(16, num_heads=4, pattern=pattern, scale=1.0)
    x = torch.randn(2, 16, 3, 5, 4)
    y = module(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, _by_hand(module, x), atol=1e-4, rtol=1e-4)


def test_module_affinities_and_gradients():
    torch.manual_seed(0)
    module = SparseAttention3d(8, num_heads=2, pattern=[Pattern.local(3), Pattern.grid()])
    x = torch.randn(1, 8, 3, 4, 5, requires_grad=True)
    labels = torch.randint(-1, 3, (1, 3, 4, 5))
    y, aff = module(x, labels=labels, num_objects=3)
    assert y.shape == x.shape and aff.shape == (1, 2, 3, 3, 4, 5) and aff.dtype == torch.float32
    ref_y, ref_aff = _by_hand(module, x.detach(), labels, 3)
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(aff.double(), ref_aff, atol=1e-4, rtol=1e-4)
    # the first frame has no earlier frame: no affinity there with causal affinities
    assert aff[:, :, :, 0].abs().max() == 0
    (y.square().mean() + aff.sum()).backward()
    for name, p in [("x", x), *module.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_module_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match="num_heads"):
        SparseAttention3d(10, num_heads=4)
    with pytest.raises(ValueError, match="patterns"):
        SparseAttention3d(12, num_heads=3, pattern=[Pattern.grid(), Pattern.local(3)])
    with pytest.raises(TypeError, match="pattern"):
        SparseAttention3d(8, num_heads=2, pattern="grid")
    module = SparseAttention3d(8, num_heads=2)
    with pytest.raises(ValueError, match="x"):
        module(torch.randn(1, 6, 2, 3, 3))
    with pytest.raises(ValueError, match="x"):
        module(torch.randn(8, 2, 3, 3))
