"""GPU forward of the fused Triton kernels beside dense SDPA + mask and compiled FlexAttention,
at the CPU benchmark shapes, with the fraction of the H100 roofline each reaches.

    pytest perf/test_triton_attention.py --benchmark-only -s

B=1, N=8, T=4, H=W in (32, 64), D=32, bf16 (perf/roofline.py). Without CUDA the timed
benchmarks skip (the kernels then only run in Triton's interpreter: tests/); the roofline
table is still printed at the end of the module, and ``python -m sst_triton.aot`` gives the
kernels' compile resources without a GPU.
"""
from __future__ import annotations

import pytest
import torch

from baselines import dense_mask, dense_sdpa_attention, flex_block_mask, flex_sparse_attention
from roofline import PATTERNS, SIZES, B, D, N, T, benchmark_rooflines, format_rooflines, pattern_pairs
from sst_triton import sparse_attention

IMPLS = ("sst_triton", "sst_triton+aff", "sdpa", "flex")
NUM_OBJECTS = 2
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="the fused kernels need a CUDA GPU (on CPU they run in Triton's interpreter: tests/test_triton_forward.py; "
    "compile resources without a GPU: python -m sst_triton.aot)",
)

# (impl, pattern, size) -> seconds (min over rounds), printed against the roofline at the end
_MEASURED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _print_rooflines(request):
    """After the module: the roofline of every case, with the measured fraction on a GPU."""
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + report())


def report() -> str:
    lines = []
    for impl, objects in (("sst_triton", 0), ("sst_triton+aff", NUM_OBJECTS)):
        measured = {(p, s): t for (i, p, s), t in _MEASURED.items() if i == impl} if _MEASURED else None
        lines.append(f"[{impl}{f', {objects} objects' if objects else ''}]")
        lines.append(format_rooflines(benchmark_rooflines(num_objects=objects), measured))
    if _MEASURED:
        lines.append("GPU forward (bf16), min over rounds, ms:")
        lines.append(f"{'case':<22}" + "".join(f"{i:>16}" for i in IMPLS))
        for size in SIZES:
            for name in PATTERNS:
                cells = [_MEASURED.get((i, name, size)) for i in IMPLS]
                lines.append(f"{name + ' H=W=' + str(size):<22}" + "".join(
                    f"{c * 1e3:>16.3f}" if c else f"{'-':>16}" for c in cells))
    else:
        lines.append("(no GPU here: roofline bounds only)")
    return "\n".join(lines)


def test_roofline_pair_counts_match_the_dense_masks():
    """The FLOPs of the roofline rest on sum_p |I_p|: count it from the masks at small sizes."""
    for pattern in PATTERNS.values():
        for t, h, w in ((4, 8, 8), (3, 10, 9)):
            assert pattern_pairs(pattern, t, h, w) == int(dense_mask(pattern, t, h, w).sum())
    rows = benchmark_rooflines()
    assert len(rows) == len(PATTERNS) * len(SIZES)
    assert all(r.seconds > 0 and r.bytes >= 4 * B * N * T * 32 * 32 * D * 2 for r in rows)


def _prepare(impl: str, name: str, q: torch.Tensor):
    pattern = PATTERNS[name]
    _, _, t, h, w, _ = q.shape
    if impl == "sst_triton":
        return lambda q, k, v: sparse_attention(q, k, v, pattern)
    if impl == "sst_triton+aff":
        labels = torch.randint(-1, NUM_OBJECTS, (q.shape[0], t, h, w), device=q.device)
        return lambda q, k, v: sparse_attention(q, k, v, pattern, labels=labels, num_objects=NUM_OBJECTS)[0]
    if impl == "sdpa":
        mask = dense_mask(pattern, t, h, w, device=q.device)
        return lambda q, k, v: dense_sdpa_attention(q, k, v, mask)
    block_mask = flex_block_mask(pattern, t, h, w, device=q.device)
    return lambda q, k, v: flex_sparse_attention(q, k, v, block_mask)


@requires_cuda
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("impl", IMPLS)
def test_gpu_forward(benchmark, impl, name, size):
    benchmark.group = f"gpu forward {name} T={T} H=W={size}"
    q, k, v = (torch.randn(B, N, T, size, size, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fn = _prepare(impl, name, q)

    def run():
        out = fn(q, k, v)
        torch.cuda.synchronize()
        return out

    with torch.no_grad():
        out = benchmark.pedantic(run, rounds=20, warmup_rounds=3, iterations=1)
        # every contender computes the same attention
        mask = dense_mask(PATTERNS[name], T, size, size, device="cuda")
        ref = dense_sdpa_attention(q.float(), k.float(), v.float(), mask)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    _MEASURED[(impl, name, size)] = benchmark.stats.stats.min
    bound = {(r.pattern, r.shape[3]): r.seconds for r in benchmark_rooflines(
        num_objects=NUM_OBJECTS if impl == "sst_triton+aff" else 0)}[(name, size)]
    benchmark.extra_info.update(roofline_us=bound * 1e6, fraction_of_roofline=bound / benchmark.stats.stats.min)
