"""Bad input (SPEC.md): a ValueError or TypeError naming the argument, raised before any work."""
import pytest
import torch

from sst_triton import Pattern, grid_attention, local_attention, sparse_attention, strided_attention
from sst_triton import torch_path

SHAPE = (1, 2, 3, 4, 5, 8)


@pytest.fixture(autouse=True)
def _no_work(monkeypatch):
    """Any attempt to compute means a check came too late."""

    def fail(*args, **kwargs):
        raise AssertionError("the attention ran before the arguments were checked")

    monkeypatch.setattr(torch_path, "sparse_attention", fail)


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
