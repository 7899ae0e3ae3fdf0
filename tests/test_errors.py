"""Bad input (SPEC.md): a ValueError or TypeError naming the argument, raised before any work."""
import pytest
import torch

from sst_triton import Pattern, grid_attention, local_attention, merge_attention, sparse_attention, strided_attention
from sst_triton import merge, torch_path, triton_path

SHAPE = (1, 2, 3, 4, 5, 8)


@pytest.fixture(autouse=True)
def _no_work(monkeypatch):
    """Any attempt to compute means a check came too late."""

    def fail(*args, **kwargs):
        raise AssertionError("the attention ran before the arguments were checked")

    monkeypatch.setattr(torch_path, "sparse_attention", fail)
    monkeypatch.setattr(torch_path, "extra_attention", fail)
    monkeypatch.setattr(triton_path, "forward", fail)
    monkeypatch.setattr(merge, "_weights", fail)


def _qkv(shape=SHAPE, dtype=torch.float32):
    return tuple(torch.randn(shape).to(dtype) for _ in range(3))


def _labels(shape=(1, 3, 4, 5), dtype=torch.long, high=2):
    return torch.randint(-1, high, shape).to(dtype)


q, k, v = _qkv()

BAD = {
    "q-not-tensor": (TypeError, "q", lambda: grid_attention(q.tolist(), k, v)),
    "q-rank": (ValueError, "q", lambda: grid_attention(q[0], k[0], v[0])),
    "k-rank": (ValueError, "k", lambda: grid_attention(q, k[..., None], v)),
    "k-shape": (ValueError, "k", lambda: grid_attention(q, k[:, :, :2], v)),
    "v-shape": (ValueError, "v", lambda: local_attention(q, k, v[..., :4], 3)),
    "v-dtype": (TypeError, "v", lambda: grid_attention(q, k, v.half())),
    "k-dtype": (TypeError, "k", lambda: grid_attention(q, k.bfloat16(), v)),
    "q-float64": (TypeError, "q", lambda: grid_attention(*(x.double() for x in (q, k, v)))),
    "q-int": (TypeError, "q", lambda: grid_attention(*(x.long() for x in (q, k, v)))),
    "q-empty": (ValueError, "q", lambda: grid_attention(*(x[:, :, :0] for x in (q, k, v)))),
    "k-device": (ValueError, "k", lambda: grid_attention(q, k.to("meta"), v)),
    "v-device": (ValueError, "v", lambda: strided_attention(q, k, v.to("meta"), 2)),
    "kernel-even": (ValueError, "kernel_size", lambda: local_attention(q, k, v, 4)),
    "kernel-even-axis": (ValueError, "kernel_size", lambda: local_attention(q, k, v, (3, 2, 3))),
    "kernel-zero": (ValueError, "kernel_size", lambda: local_attention(q, k, v, 0)),
    "kernel-negative": (ValueError, "kernel_size", lambda: local_attention(q, k, v, (3, -1, 3))),
    "kernel-length": (TypeError, "kernel_size", lambda: local_attention(q, k, v, (3, 3))),
    "kernel-float": (TypeError, "kernel_size", lambda: local_attention(q, k, v, 3.0)),
    "boundary": (ValueError, "boundary", lambda: local_attention(q, k, v, 3, boundary="pad")),
    "stride-zero": (ValueError, "stride", lambda: strided_attention(q, k, v, 0)),
    "stride-negative": (ValueError, "stride", lambda: strided_attention(q, k, v, (1, -2, 2))),
    "stride-type": (TypeError, "stride", lambda: strided_attention(q, k, v, "2")),
    "causal-type": (TypeError, "causal", lambda: grid_attention(q, k, v, causal="yes")),
    "pattern-type": (TypeError, "pattern", lambda: sparse_attention(q, k, v, "grid")),
    "causal-affinity-type": (TypeError, "causal_affinity", lambda: grid_attention(q, k, v, labels=_labels(),
                                                                                num_objects=2, causal_affinity=1)),
    "scale-type": (TypeError, "scale", lambda: grid_attention(q, k, v, scale="1")),
    "backend": (ValueError, "backend", lambda: grid_attention(q, k, v, backend="cuda")),
    "labels-shape": (ValueError, "labels", lambda: grid_attention(q, k, v, labels=_labels((1, 3, 4, 4)), num_objects=2)),
    "labels-rank": (ValueError, "labels", lambda: grid_attention(q, k, v, labels=_labels((3, 4, 5)), num_objects=2)),
    "labels-float": (TypeError, "labels", lambda: grid_attention(q, k, v, labels=_labels(dtype=torch.float32),
                                                                  num_objects=2)),
    "labels-bool": (TypeError, "labels", lambda: grid_attention(q, k, v, labels=_labels() > 0, num_objects=2)),
    "labels-not-tensor": (TypeError, "labels", lambda: grid_attention(q, k, v, labels=_labels().tolist(),
                                                                       num_objects=2)),
    "labels-too-high": (ValueError, "labels", lambda: grid_attention(q, k, v, labels=_labels(high=3), num_objects=2)),
    "labels-below-minus-one": (ValueError, "labels", lambda: grid_attention(q, k, v, labels=_labels() - 1,
                                                                            num_objects=2)),
    "labels-device": (ValueError, "labels", lambda: grid_attention(q, k, v, labels=_labels().to("meta"),
                                                                   num_objects=2)),
    "labels-without-num-objects": (ValueError, "num_objects", lambda: grid_attention(q, k, v, labels=_labels())),
    "num-objects-without-labels": (ValueError, "labels", lambda: grid_attention(q, k, v, num_objects=2)),
    "num-objects-zero": (ValueError, "num_objects", lambda: grid_attention(q, k, v, labels=_labels(), num_objects=0)),
    "num-objects-float": (ValueError, "num_objects", lambda: grid_attention(q, k, v, labels=_labels(),
                                                                            num_objects=2.0)),
}

# ---- version 2: grouped heads, fewer query frames, extra keys, dilation, return_lse, merge
B, N, T, H, W, D = SHAPE


def _kv(n_kv=N, t=T, shape=None):
    shape = shape or (B, n_kv, t, H, W, D)
    return torch.randn(shape), torch.randn(shape)


def _x(L=3, shape=None, dtype=torch.float32):
    return torch.randn(shape or (B, N, L, D)).to(dtype)


out_, lse_ = torch.randn(B, N, T, H, W, D), torch.randn(B, N, T, H, W)

BAD_V2 = {
    "kv-heads-not-dividing": (ValueError, "N_kv", lambda: grid_attention(q, *_kv(n_kv=3))),
    "kv-heads-more-than-q": (ValueError, "N_kv", lambda: grid_attention(q, *_kv(n_kv=4))),
    "q-frames-more-than-k": (ValueError, "T_q", lambda: local_attention(q, *_kv(t=2), 3)),
    "k-height-differs": (ValueError, "k", lambda: grid_attention(q, *_kv(shape=(B, N, T, H + 1, W, D)))),
    "k-batch-differs": (ValueError, "k", lambda: grid_attention(q, *_kv(shape=(B + 1, N, T, H, W, D)))),
    "k-head-dim-differs": (ValueError, "k", lambda: grid_attention(q, *_kv(shape=(B, N, T, H, W, D + 1)))),
    "v-heads-differ-from-k": (ValueError, "v", lambda: grid_attention(q, k, v[:, :1])),
    "v-frames-differ-from-k": (ValueError, "v", lambda: grid_attention(q[:, :, :2], k, v[:, :, :2])),
    "extra-kv-tensor": (TypeError, "extra_kv", lambda: grid_attention(q, k, v, extra_kv=_x())),
    "extra-kv-triple": (TypeError, "extra_kv", lambda: grid_attention(q, k, v, extra_kv=(_x(), _x(), _x()))),
    "extra-kv-not-tensor": (TypeError, "extra_kv", lambda: grid_attention(q, k, v, extra_kv=(_x(), _x().tolist()))),
    "extra-kv-rank": (ValueError, "extra_kv", lambda: grid_attention(q, k, v, extra_kv=(_x(), _x()[0]))),
    "extra-kv-batch": (ValueError, "extra_kv", lambda: grid_attention(q, k, v, extra_kv=(_x(shape=(2, N, 3, D)),) * 2)),
    "extra-kv-heads": (ValueError, "extra_kv", lambda: grid_attention(q, *_kv(n_kv=1), extra_kv=(_x(),) * 2)),
    "extra-kv-head-dim": (ValueError, "extra_kv", lambda: grid_attention(q, k, v, extra_kv=(_x(shape=(B, N, 3, 4)),) * 2)),
    "extra-kv-lengths": (ValueError, "extra_kv", lambda: grid_attention(q, k, v, extra_kv=(_x(3), _x(4)))),
    "extra-kv-dtype": (TypeError, "extra_kv", lambda: grid_attention(q, k, v, extra_kv=(_x(), _x(dtype=torch.float16)))),
    "extra-kv-device": (ValueError, "extra_kv", lambda: grid_attention(q, k, v, extra_kv=(_x().to("meta"), _x()))),
    "dilation-zero": (ValueError, "dilation", lambda: local_attention(q, k, v, 3, dilation=0)),
    "dilation-negative-axis": (ValueError, "dilation", lambda: local_attention(q, k, v, 3, dilation=(1, -2, 1))),
    "dilation-float": (TypeError, "dilation", lambda: local_attention(q, k, v, 3, dilation=2.0)),
    "dilation-pair": (TypeError, "dilation", lambda: local_attention(q, k, v, 3, dilation=(2, 2))),
    "dilation-bool": (TypeError, "dilation", lambda: local_attention(q, k, v, 3, dilation=True)),
    "dilation-pattern": (ValueError, "dilation", lambda: sparse_attention(q, k, v, Pattern.local(3, dilation=(0, 1, 1)))),
    "return-lse-int": (TypeError, "return_lse", lambda: strided_attention(q, k, v, 2, return_lse=1)),
    "return-lse-none": (TypeError, "return_lse", lambda: grid_attention(q, k, v, return_lse=None)),
    "triton-kv-heads": (ValueError, "N_kv", lambda: grid_attention(q, *_kv(n_kv=3), backend="triton")),
    "triton-extra-kv": (ValueError, "extra_kv", lambda: local_attention(q, k, v, 3, extra_kv=(_x(), _x(4)),
                                                                         backend="triton")),
    "merge-not-list": (TypeError, "parts", lambda: merge_attention(out_)),
    "merge-empty": (ValueError, "parts", lambda: merge_attention([])),
    "merge-not-pair": (TypeError, "parts[1]", lambda: merge_attention([(out_, lse_), (out_,)])),
    "merge-not-tensors": (TypeError, "parts[0]", lambda: merge_attention([(out_, lse_.tolist())])),
    "merge-out-shapes": (ValueError, "parts[1] out", lambda: merge_attention([(out_, lse_), (out_[:, :1], lse_[:, :1])])),
    "merge-lse-shape": (ValueError, "parts[1] lse", lambda: merge_attention([(out_, lse_), (out_, lse_[..., :1])])),
    "merge-lse-int": (TypeError, "parts[0] lse", lambda: merge_attention([(out_, lse_.long())])),
    "merge-out-dtype": (TypeError, "parts[1] out", lambda: merge_attention([(out_, lse_), (out_.half(), lse_)])),
    "merge-device": (ValueError, "parts[1]", lambda: merge_attention([(out_, lse_), (out_.to("meta"), lse_)])),
}
BAD.update(BAD_V2)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument(case):
    error, name, call = BAD[case]
    with pytest.raises(error) as info:
        call()
    assert name in str(info.value), f"{info.value!r} does not name {name}"


def test_labels_must_be_labels_of_the_inputs():
    """Objects labelled in a batch element the inputs do not have are caught by the shape check."""
    with pytest.raises(ValueError, match="labels"):
        sparse_attention(q, k, v, Pattern.grid(), labels=_labels((2, 3, 4, 5)), num_objects=2)


@pytest.mark.parametrize("pattern", [Pattern.grid(), Pattern.local(3), Pattern.strided(2)], ids=lambda p: p.kind)
def test_nan_reaches_every_query_that_attends_to_it(monkeypatch, pattern):
    """As through SDPA, NaN is not hidden: every query whose keys include a NaN key is NaN."""
    monkeypatch.undo()
    from sst_triton.patterns import dense_mask

    qq, kk, vv = _qkv()
    kk[0, :, 1, 2, 3, 0] = float("nan")
    out = sparse_attention(qq, kk, vv, pattern)
    _, _, T, H, W, _ = SHAPE
    attends = dense_mask(pattern, T, H, W)[:, (1 * H + 2) * W + 3].reshape(T, H, W)
    assert out.isnan().any(-1)[0, :, attends].all()
