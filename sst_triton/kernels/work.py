"""The work a kernel issues, counted the same way by its model and by an instrumented run.

Every kernel module gives, next to each kernel, a model of the work it issues for a
:class:`~sst_triton.kernels.launch.Problem` under one ``triton.Config``, derived from the
kernel's own tile geometry (``work_forward``, ``work_backward``). The instrumented
interpreter (:mod:`sst_triton.kernels.instrument`) counts the same quantities by running
the kernel; ``tests/test_work_model.py`` holds the two equal at small shapes, and
``perf/work_model.py`` turns the model into an H100/H200 time estimate.

Counting rules (the instrument applies them to the interpreter's builder calls):

- ``exp``: elements of every ``exp``/``exp2`` issued, masked lanes included (a GPU
  computes them). Per-query rescales (``alpha``) and the epilogue count too.
- ``dot_flops``: ``2 * M * N * K`` of every ``tl.dot`` of an ``[M, K] x [K, N]`` product,
  padding included.
- ``load_bytes``: bytes of every lane a load actually reads (mask true, or every lane of
  an unmasked load), at the element size of the loaded tensor.
- ``distinct_bytes``: bytes of the distinct addresses among them, over the whole launch.
- ``store_bytes``: bytes of every lane a store writes (mask true, or every lane of an
  unmasked store), at the element size of the stored-to tensor: outputs, and any scratch a
  pass writes for a later pass to read back (each such byte goes to HBM once).
- ``programs``: programs launched (product of the grid).

From these, with the pattern's useful ``(query, key)`` pairs ``U``:
``E = exp / U`` (softmax elements issued per useful pair) and
``L = load_bytes / distinct_bytes`` (how often each loaded byte is read).
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Work:
    """What one kernel launch issues (see the module docstring for the counting rules)."""

    exp: int = 0
    dot_flops: int = 0
    load_bytes: int = 0
    distinct_bytes: int = 0
    programs: int = 0
    store_bytes: int = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def reuse(self) -> float:
        """``L``: bytes loaded per distinct byte loaded."""
        return self.load_bytes / max(1, self.distinct_bytes)
