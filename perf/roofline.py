"""H100/H200 roofline of the sparse attention forward and backward at the benchmark shapes.

    python perf/roofline.py

For every benchmark shape and pattern: the FLOPs of the attention the pattern asks for
(forward ``4 * D`` per query-key pair: ``Q K^T`` and ``P V``; backward ``10 * D``: the
recomputed ``Q K^T``, ``dO V^T``, ``P^T dO``, ``dS K`` and ``dS^T Q``, FlashAttention-2's
count), the bytes that must cross HBM at least once (forward: q, k, v read, out and the
log-sum-exp written; with objects, labels read and affinity and argmax written; backward:
q, k, v, dO, lse and Delta read, dq, dk, dv written; with objects argmax and the affinity
gradient read), the exponentials the softmax needs (one per pair and pass: the backward
recomputes ``P`` once), and the time the GPU cannot beat: the largest of ``bytes / HBM
bandwidth``, ``FLOPs / tensor-core peak`` and ``exps / exp-unit rate``. A GPU run of
``perf/test_triton_attention.py`` divides that bound by the measured time: the fraction
of the roofline reached.

Constants (dense, no sparsity; the SXM parts):

- H100 SXM: HBM3 3.35 TB/s; bf16 tensor cores 989.4 TFLOP/s, TF32 494.7 TFLOP/s, fp32 on
  CUDA cores 66.9 TFLOP/s (NVIDIA H100 Tensor Core GPU datasheet, "SXM" column, the
  sparsity figures halved). 989.4e12 = 132 SMs x 4096 bf16 FLOP/clk/SM x 1.83 GHz: the
  clock the tensor-core peak is quoted at.
- H200 SXM: HBM3e 4.8 TB/s (NVIDIA H200 datasheet); the same GH100 die, 132 SMs, so the
  same compute peaks.
- Exp unit: ``exp2``/``ex2.approx`` runs on the SFU (MUFU) at 16 results/clk/SM on
  compute capability 8.x and 9.0 (CUDA C++ Programming Guide, "Arithmetic Instructions",
  throughput table, row "32-bit floating-point ... base-2 exponential"), so
  16 x 132 SMs x 1.83 GHz = 3.87e12 exp/s. Triton's ``tl.exp`` on float32 lowers to a
  multiply and ``ex2.approx``: one MUFU op too. At D = 32 a forward pair costs 128 FLOPs
  (0.13 ns of tensor core) and one exp (0.26 ns of SFU): the exp unit bounds first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from sst_triton.patterns import Pattern, window_start

@dataclass(frozen=True)
class Device:
    """Peak rates of one GPU (see the module docstring for the sources)."""

    name: str
    hbm_bytes_per_s: float
    bf16_flop_per_s: float  # dense tensor cores, bf16/fp16 inputs, fp32 accumulation
    tf32_flop_per_s: float  # dense tensor cores, tf32
    fp32_flop_per_s: float  # CUDA cores (fp32 tl.dot with input_precision="ieee")
    exp_per_s: float  # SFU ex2
    l2_bytes_per_s: float = 0.0  # L2 -> SM load bandwidth (0: not modelled)

    def flop_per_s(self, dtype: str = "bf16") -> float:
        return {"bf16": self.bf16_flop_per_s, "fp16": self.bf16_flop_per_s, "tf32": self.tf32_flop_per_s,
                "fp32": self.fp32_flop_per_s}[dtype]


SMS, TENSOR_CLOCK_HZ, SFU_EXP_PER_CLK_PER_SM = 132, 1.83e9, 16
# L2 bandwidth: 8,986 GB/s is tabulated for the full GH100 (144 SMs at 1.755 GHz, i.e. 35.6
# bytes/clk/SM; Ultrasonics Sonochemistry 99:106546 (2023), Table 3); the same bytes per SM and
# clock on the SXM part's 132 SMs at 1.83 GHz give 8.6 TB/s. A peak, not a measurement: measured
# L2 bandwidth is lower, so a kernel bound here is, if anything, slower than estimated.
L2_BYTES_PER_CLK_PER_SM = 8986e9 / (144 * 1.755e9)
L2_BYTES_PER_S = L2_BYTES_PER_CLK_PER_SM * SMS * TENSOR_CLOCK_HZ
H100 = Device("H100 SXM", 3.35e12, 989.4e12, 494.7e12, 66.9e12, SFU_EXP_PER_CLK_PER_SM * SMS * TENSOR_CLOCK_HZ,
              L2_BYTES_PER_S)
H200 = Device("H200 SXM", 4.8e12, 989.4e12, 494.7e12, 66.9e12, SFU_EXP_PER_CLK_PER_SM * SMS * TENSOR_CLOCK_HZ,
              L2_BYTES_PER_S)
DEVICES = (H100, H200)

HBM_BYTES_PER_S = H100.hbm_bytes_per_s
BF16_FLOP_PER_S = H100.bf16_flop_per_s
EXP_PER_S = H100.exp_per_s

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
    exps: float = 0.0
    device: Device = H100
    dtype: str = "bf16"
    backward: bool = False

    @property
    def compute_s(self) -> float:
        return self.flops / self.device.flop_per_s(self.dtype)

    @property
    def memory_s(self) -> float:
        return self.bytes / self.device.hbm_bytes_per_s

    @property
    def exp_s(self) -> float:
        return self.exps / self.device.exp_per_s

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s, self.exp_s)

    @property
    def bound(self) -> str:
        roofs = {"compute": self.compute_s, "memory": self.memory_s, "exp": self.exp_s}
        return max(roofs, key=roofs.get)


def forward_bytes(B: int, N: int, N_kv: int, S_q: int, S: int, D: int, element_bytes: int, num_objects: int) -> int:
    """Bytes a forward must move through HBM at least once: q read, k and v read (``N_kv``
    heads), out written (``element_bytes`` each), lse written (fp32); with objects labels
    read (int32, one per key cell) and affinity (fp32) and argmax (int32) written."""
    moved = (B * N * S_q * 2 + B * N_kv * S * 2) * D * element_bytes + B * N * S_q * 4
    if num_objects:
        moved += B * S * 4 + 2 * B * N * num_objects * S_q * 4
    return moved


def backward_bytes(B: int, N: int, N_kv: int, S_q: int, S: int, D: int, element_bytes: int, num_objects: int) -> int:
    """Bytes a backward must move through HBM at least once: q, dO read and dq written,
    k, v read and dk, dv written, lse and Delta read (fp32); with objects argmax (int32)
    and the affinity gradient (fp32) read."""
    moved = (B * N * S_q * 3 + B * N_kv * S * 4) * D * element_bytes + 2 * B * N * S_q * 4
    if num_objects:
        moved += 2 * B * N * num_objects * S_q * 4
    return moved


def roofline(
    name: str, pattern: Pattern, shape: tuple, element_bytes: int = 2, num_objects: int = 0,
    device: Device = H100, backward: bool = False, dtype: Optional[str] = None,
) -> Roofline:
    """The bound of one forward (or, ``backward=True``, one backward) call.

    Args:
        shape: ``(B, N, T, H, W, D)``.
        element_bytes: 2 for bf16/fp16 q, k, v and out, 4 for fp32.
        num_objects: ``O``; with objects, labels (int32) are read and affinity (fp32) and
            argmax (int32) written.
        dtype: the tensor-core rate to use (``"bf16"``, ``"tf32"``, ``"fp32"``); by default
            bf16 for 2-byte elements, fp32 on CUDA cores for 4-byte ones.
    """
    b, n, t, h, w, d = shape
    S = t * h * w
    pairs = pattern_pairs(pattern, t, h, w)
    if backward:
        flops = 10.0 * d * b * n * pairs
        moved = backward_bytes(b, n, n, S, S, d, element_bytes, num_objects)
    else:
        flops = 4.0 * d * b * n * pairs
        moved = forward_bytes(b, n, n, S, S, d, element_bytes, num_objects)
    dtype = dtype or ("bf16" if element_bytes == 2 else "fp32")
    return Roofline(name, shape, pairs, flops, float(moved), num_objects, float(b * n * pairs), device, dtype, backward)


def benchmark_rooflines(element_bytes: int = 2, num_objects: int = 0, device: Device = H100,
                        backward: bool = False) -> list[Roofline]:
    return [
        roofline(name, pattern, (B, N, T, size, size, D), element_bytes, num_objects, device, backward)
        for size in SIZES
        for name, pattern in PATTERNS.items()
    ]


def format_rooflines(rows: list[Roofline], measured: Optional[dict] = None) -> str:
    """A table; ``measured``: ``(pattern, H) -> seconds`` adds the fraction of the roofline."""
    dev = rows[0].device if rows else H100
    kind = "backward" if rows and rows[0].backward else "forward"
    lines = [
        f"{dev.name} roofline ({dev.hbm_bytes_per_s / 1e12:.2f} TB/s HBM, {dev.bf16_flop_per_s / 1e12:.0f} TFLOP/s "
        f"bf16, {dev.exp_per_s / 1e12:.2f} T exp/s), {kind}, bf16 q/k/v/out, fp32 lse"
        + (f", {rows[0].objects} objects" if rows and rows[0].objects else ""),
        f"{'pattern':<12}{'T,H,W':>10}{'keys/q':>8}{'GFLOP':>9}{'MB':>8}{'t_mem us':>10}{'t_mma us':>10}"
        f"{'t_exp us':>10}{'bound us':>10}  {'by':<8}" + (f"{'meas us':>9}{'% roof':>8}" if measured is not None else ""),
    ]
    for r in rows:
        _, _, t, h, w, _ = r.shape
        keys = r.pairs / (t * h * w)
        line = (
            f"{r.pattern:<12}{f'{t},{h},{w}':>10}{keys:>8.1f}{r.flops / 1e9:>9.3f}{r.bytes / 2**20:>8.2f}"
            f"{r.memory_s * 1e6:>10.2f}{r.compute_s * 1e6:>10.2f}{r.exp_s * 1e6:>10.2f}{r.seconds * 1e6:>10.2f}"
            f"  {r.bound:<8}"
        )
        if measured is not None:
            m = measured.get((r.pattern, h))
            line += f"{m * 1e6:>9.1f}{100 * r.seconds / m:>7.1f}%" if m else f"{'-':>9}{'-':>8}"
        lines.append(line.rstrip())
    return "\n".join(line.rstrip() for line in lines)


def main() -> None:
    for device in DEVICES:
        for backward in (False, True):
            print(format_rooflines(benchmark_rooflines(device=device, backward=backward)))
            print()
            print(format_rooflines(benchmark_rooflines(num_objects=2, device=device, backward=backward)))
            print()


if __name__ == "__main__":
    main()
