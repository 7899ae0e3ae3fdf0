"""The label-range check costs at most one device-to-host transfer per call (issue 10.5).

On CUDA every ``.item()`` / ``int(tensor)`` is a host sync. The check is counted here on
CPU tensors by the ops that a sync would be: ``aten._local_scalar_dense`` (``.item()``)
and copies to another device. Under ``torch.compile`` the value check is skipped
altogether (``tests/test_compile.py`` traces with ``fullgraph=True``, which a sync breaks).
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sst_triton import local_attention
from sst_triton import _checks


class _CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **kwargs)


def test_label_check_reads_both_bounds_in_one_transfer():
    q = torch.randn(1, 1, 2, 3, 4, 8)
    labels = torch.randint(-1, 3, (1, 2, 3, 4))
    with _CountSyncs() as mode:
        _checks.check_labels(q, labels, 3)
    assert mode.syncs <= 1
    # the check still catches an out-of-range id in either direction
    for bad in (3, -2):
        wrong = labels.clone()
        wrong[0, 1, 2, 3] = bad
        try:
            _checks.check_labels(q, wrong, 3)
        except ValueError as err:
            assert "labels" in str(err) and str(bad) in str(err)
        else:
            raise AssertionError(f"label {bad} passed the range check")


def test_a_whole_call_syncs_at_most_once():
    q, k, v = (torch.randn(1, 2, 2, 3, 4, 8) for _ in range(3))
    labels = torch.randint(-1, 2, (1, 2, 3, 4))
    with _CountSyncs() as mode:
        local_attention(q, k, v, 3, labels=labels, num_objects=2)
    assert mode.syncs <= 1
