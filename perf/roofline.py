"""H100 roofline of the sparse attention forward at the benchmark shapes.

    python perf/roofline.py

For every benchmark shape and pattern: the FLOPs of the attention the pattern asks for
(``4 * D`` per query-key pair: ``Q K^T`` and ``P V``), the bytes that must cross HBM at
least once (q, k, v read, out and the log-sum-exp written; with objects, labels read and
affinity and argmax written), and the time an H100 SXM cannot beat: the larger of
``bytes / 3.35 TB/s`` and ``FLOPs / 990 TFLOP/s`` (dense bf16 tensor cores). A GPU run
of ``perf/test_triton_attention.py`` divides that bound by the measured time: the
fraction of the roofline reached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from sst_triton.patterns import Pattern, window_start

HBM_BYTES_PER_S = 3.35e12
BF16_FLOP_PER_S = 990e12

# the benchmark shapes of perf/ (perf/cases.py): B=1, N=8, T=4, H=W in (32, 64), D=32
B, N, T, D = 1, 8, 4, 32
SIZES = (32, 64)
PATTERNS = {
    "grid": Pattern.grid(),
    "local7": Pattern.local(7),
    "strided188": Pattern.strided((1, 8, 8)),
}


def _axis_pairs_local(length: int, k: int, boundary: str) -> int:
    import torch

    lo, hi = window_start(torch.arange(length), length, k, boundary)
    return int((hi - lo).sum())


def _axis_pairs_strided(length: int, s: int) -> int:
    return sum(math.ceil((length - r) / s) ** 2 for r in range(min(s, length)))


def pattern_pairs(pattern: Pattern, T: int, H: int, W: int) -> int:
    """Number of (query, key) pairs of the pattern, ``sum_p |I_p|``, without building a mask.

    Local and strided patterns are products over the axes, so the count is the product of
    per-axis counts; ``causal`` only changes the time axis.
    """
    if pattern.kind == "grid":
        per_frame_keys = W + H - 1  # row and column, the query once
        time_keys = sum(t for t in range(T)) if pattern.causal else T * (T - 1)
        return H * W * (T * per_frame_keys + time_keys)
    if pattern.kind == "local":
        kt, kh, kw = pattern.kernel_size
        if pattern.causal:
            import torch

            lo, hi = window_start(torch.arange(T), T, kt, pattern.boundary)
            t_pairs = int((torch.minimum(hi, torch.arange(T) + 1) - lo).clamp(min=0).sum())
        else:
            t_pairs = _axis_pairs_local(T, kt, pattern.boundary)
        return t_pairs * _axis_pairs_local(H, kh, pattern.boundary) * _axis_pairs_local(W, kw, pattern.boundary)
    st, sh, sw = pattern.stride
    if pattern.causal:
        t_pairs = sum(n * (n + 1) // 2 for n in (math.ceil((T - r) / st) for r in range(min(st, T))))
    else:
        t_pairs = _axis_pairs_strided(T, st)
    return t_pairs * _axis_pairs_strided(H, sh) * _axis_pairs_strided(W, sw)


@dataclass
class Roofline:
    pattern: str
    shape: tuple
    pairs: int
    flops: float
    bytes: float
    objects: int = 0

    @property
    def compute_s(self) -> float:
        return self.flops / BF16_FLOP_PER_S

    @property
    def memory_s(self) -> float:
        return self.bytes / HBM_BYTES_PER_S

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s > self.memory_s else "memory"


def roofline(
    name: str, pattern: Pattern, shape: tuple, element_bytes: int = 2, num_objects: int = 0
) -> Roofline:
    """The H100 bound of one forward call.

    Args:
        shape: ``(B, N, T, H, W, D)``.
        element_bytes: 2 for bf16/fp16 q, k, v and out, 4 for fp32.
        num_objects: ``O``; with objects, labels (int32) are read and affinity (fp32) and
            argmax (int32) written.
    """
    b, n, t, h, w, d = shape
    S = t * h * w
    pairs = pattern_pairs(pattern, t, h, w)
    flops = 4.0 * d * b * n * pairs
    moved = 4 * b * n * S * d * element_bytes + b * n * S * 4  # q, k, v, out; lse
    if num_objects:
        moved += b * S * 4 + 2 * b * n * num_objects * S * 4
    return Roofline(name, shape, pairs, flops, float(moved), num_objects)


def benchmark_rooflines(element_bytes: int = 2, num_objects: int = 0) -> list[Roofline]:
    return [
        roofline(name, pattern, (B, N, T, size, size, D), element_bytes, num_objects)
        for size in SIZES
        for name, pattern in PATTERNS.items()
    ]


def format_rooflines(rows: list[Roofline], measured: Optional[dict] = None) -> str:
    """A table; ``measured``: ``(pattern, H) -> seconds`` adds the fraction of the roofline."""
    lines = [
        f"H100 roofline ({HBM_BYTES_PER_S / 1e12:.2f} TB/s HBM, {BF16_FLOP_PER_S / 1e12:.0f} TFLOP/s bf16), "
        "forward, bf16 q/k/v/out, fp32 lse" + (f", {rows[0].objects} objects" if rows and rows[0].objects else ""),
        f"{'pattern':<12}{'T,H,W':>10}{'keys/q':>8}{'GFLOP':>9}{'MB':>8}{'t_mem us':>10}{'t_mma us':>10}"
        f"{'bound us':>10}  {'by':<8}" + (f"{'meas us':>9}{'% roof':>8}" if measured is not None else ""),
    ]
    for r in rows:
        _, _, t, h, w, _ = r.shape
        keys = r.pairs / (t * h * w)
        line = (
            f"{r.pattern:<12}{f'{t},{h},{w}':>10}{keys:>8.1f}{r.flops / 1e9:>9.3f}{r.bytes / 2**20:>8.2f}"
            f"{r.memory_s * 1e6:>10.2f}{r.compute_s * 1e6:>10.2f}{r.seconds * 1e6:>10.2f}  {r.bound:<8}"
        )
        if measured is not None:
            m = measured.get((r.pattern, h))
            line += f"{m * 1e6:>9.1f}{100 * r.seconds / m:>7.1f}%" if m else f"{'-':>9}{'-':>8}"
        lines.append(line.rstrip())
    return "\n".join(line.rstrip() for line in lines)


def main() -> None:
    print(format_rooflines(benchmark_rooflines()))
    print()
    print(format_rooflines(benchmark_rooflines(num_objects=2)))


if __name__ == "__main__":
    main()
