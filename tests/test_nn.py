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


# ---- version 2: grouped heads, extra tokens, dilation, streaming with a cache


def _v2_by_hand(module: SparseAttention3d, x, labels=None, num_objects=None, extra_tokens=None, T_q=None):
    """The module written out with the float64 reference (repeating nothing by hand either:
    the reference takes GQA shapes and extra keys itself); queries of the last ``T_q`` frames."""
    N, M, d = module.num_heads, module.kv_heads, module.head_dim
    qkv = rearrange(x, "b c t h w -> b t h w c") @ module.qkv.weight.T + module.qkv.bias
    q, k, v = qkv.split([N * d, M * d, M * d], dim=-1)
    q, k, v = (rearrange(y, "b t h w (n d) -> b n t h w d", d=d) for y in (q, k, v))
    if T_q is not None:
        q = q[:, :, -T_q:]
    extra = None
    if extra_tokens is not None:
        kv = extra_tokens @ module.extra_kv.weight.T + module.extra_kv.bias
        extra = tuple(rearrange(kv, "b l (two n d) -> two b n l d", two=2, n=M))
    g, kg = N // len(module.patterns), M // len(module.patterns)
    outs, affs = [], []
    for i, pattern in enumerate(module.patterns):
        h, kv = slice(i * g, (i + 1) * g), slice(i * kg, (i + 1) * kg)
        res = reference_attention(q[:, h], k[:, kv], v[:, kv], pattern, module.scale, labels, num_objects,
                                  extra_kv=None if extra is None else (extra[0][:, kv], extra[1][:, kv]))
        outs.append(res[0] if labels is not None else res)
        if labels is not None:
            affs.append(res[1])
    y = rearrange(module.proj(rearrange(torch.cat(outs, 1).float(), "b n t h w d -> b t h w (n d)")),
                  "b t h w c -> b c t h w")
    return (y, torch.cat(affs, 1)) if labels is not None else y


def test_module_gqa_dilation_and_extra_tokens():
    torch.manual_seed(0)
    module = SparseAttention3d(16, num_heads=4, pattern=[Pattern.local((3, 3, 3)), Pattern.strided((1, 2, 2))],
                               kv_heads=2, dilation=(1, 2, 1), extra_dim=6)
    assert module.patterns[0].dilation == (1, 2, 1) and module.patterns[1].kind == "strided"
    assert module.qkv.out_features == (4 + 2 * 2) * 4 and module.extra_kv.out_features == 2 * 2 * 4
    x = torch.randn(1, 16, 3, 5, 4, requires_grad=True)
    text = torch.randn(1, 7, 6, requires_grad=True)
    labels = torch.randint(-1, 2, (1, 3, 5, 4))
    y, aff = module(x, labels=labels, num_objects=2, extra_tokens=text)
    assert y.shape == x.shape and aff.shape == (1, 4, 2, 3, 5, 4)
    ref_y, ref_aff = _v2_by_hand(module, x.detach(), labels, 2, text.detach())
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(aff.double(), ref_aff, atol=1e-4, rtol=1e-4)
    (y.square().mean() + aff.sum()).backward()
    assert text.grad.abs().sum() > 0 and module.extra_kv.weight.grad.abs().sum() > 0


def test_module_streaming_with_a_cache_equals_the_full_clip():
    """Frame by frame with a KV cache = the full clip's newest frame, at constant cache size."""
    torch.manual_seed(0)
    module = SparseAttention3d(8, num_heads=4, kv_heads=1, pattern=Pattern.grid(causal=True), scale=1.0)
    frames = torch.randn(1, 8, 5, 4, 3)
    labels = torch.randint(-1, 2, (1, 5, 4, 3))
    cache = None
    for t in range(5):
        y, aff, cache = module(frames[:, :, t:t + 1], labels=labels[:, max(0, t - 2):t + 1], num_objects=2,
                               cache=cache, return_cache=True, cache_frames=2)
        assert cache.k.shape == (1, 1, min(t + 1, 2), 4, 3, 2) and y.shape == (1, 8, 1, 4, 3)
        window = frames[:, :, max(0, t - 2):t + 1]  # the cache holds 2 frames, plus the new one
        ref_y, ref_aff = _v2_by_hand(module, window, labels[:, max(0, t - 2):t + 1], 2, T_q=1)
        torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(aff.double(), ref_aff, atol=1e-4, rtol=1e-4)
        full = module(window)
        torch.testing.assert_close(y, full[:, :, -1:], atol=1e-5, rtol=1e-4)


def test_module_rejects_bad_v2_configuration_and_input():
    with pytest.raises(ValueError, match="kv_heads"):
        SparseAttention3d(16, num_heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="kv_heads"):
        SparseAttention3d(16, num_heads=4, kv_heads=1, pattern=[Pattern.grid(), Pattern.local(3)])
    with pytest.raises(ValueError, match="dilation"):
        SparseAttention3d(16, num_heads=4, pattern=Pattern.grid(), dilation=2)
    module = SparseAttention3d(8, num_heads=2, pattern=Pattern.local(3), kv_heads=1, extra_dim=4)
    x = torch.randn(1, 8, 2, 3, 3)
    with pytest.raises(ValueError, match="extra_tokens"):
        module(x, extra_tokens=torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match="extra_tokens"):
        SparseAttention3d(8, num_heads=2)(x, extra_tokens=torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="cache.k"):
        module(x, cache=(torch.randn(1, 2, 1, 3, 3, 4), torch.randn(1, 2, 1, 3, 3, 4)))
    with pytest.raises(ValueError, match="cache_frames"):
        module(x, return_cache=True, cache_frames=0)
