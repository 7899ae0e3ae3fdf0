"""One command that proves the kernels on the current device, then times them.

    python -m sst_triton.selftest                       # on a GPU: correctness, then timings
    python -m sst_triton.selftest --quick --backend triton   # correctness only, in Triton's
                                                        # interpreter on the CPU (CI)

1. Correctness, against the float64 dense reference at small shapes: every pattern
   (the :data:`sst_triton.kernels.FORWARD` table) x option set (plain; objects with causal
   affinity, causal pattern, shift; version 2: grouped key/value heads, fewer query frames,
   dilation) x dtype (float32, bfloat16, float16) at the first configuration, and every
   configuration of the forward, dQ and dK/dV kernels (bfloat16, objects): ``out``,
   ``affinity`` and the gradients of q, k, v. Tolerances: float32 1e-4 (out), 1e-3
   (gradients); 16-bit a few units of the dtype's epsilon relative to the largest value
   (4 eps out, 8 eps gradients); affinities are float32 arithmetic on exact products, 1e-4.
2. Timings (GPU only) with ``triton.testing.do_bench`` (L2 flushed before every run) of the
   three patterns, forward and forward+backward, at the SST paper shape (B=1, N=8, T=4,
   H=60, W=107, D=32, bf16, 3 objects) and at a video-diffusion shape (B=1, N=24, T=30,
   H=48, W=80, D=128, local (19, 25, 25), no labels), beside dense SDPA (the flash kernel,
   full attention: what the sparse pattern saves), SDPA with the pattern's boolean mask
   (where the mask fits), and compiled FlexAttention with the pattern's block mask; plus the
   version-2 cases: a streaming step (T_q=1 against T=4) and GQA (N_kv = N/4). Each row:
   time, useful TFLOP/s (4 D per pattern pair forward, 14 D forward+backward), GB/s of the
   compulsory bytes, and the fractions of the HBM and tensor-core roofline (H100 SXM
   3.35 TB/s, H200 4.8 TB/s, 989.4 TFLOP/s bf16 dense: NVIDIA datasheets).

Every case and every benchmark is guarded: a failure is recorded (in the printed table and
the JSON file) and the run goes on. The JSON is written atomically after every section.
The whole run keeps to ``--budget`` seconds (default 450, inside the 8 minutes a lent GPU
allows with start-up): cases past the budget are recorded as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .patterns import Pattern, connectivity

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
BF16_FLOP_PER_S = 989.4e12


# ---------------------------------------------------------------------------------------
# The run's record
# ---------------------------------------------------------------------------------------


@dataclass
class Report:
    path: Optional[str]
    started: float = field(default_factory=time.perf_counter)
    budget_s: float = 450.0
    data: dict = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        return self.elapsed() > self.budget_s

    def save(self) -> None:
        """Write the JSON atomically (a temporary file in the same folder, then a rename)."""
        if not self.path:
            return
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        folder = os.path.dirname(os.path.abspath(self.path)) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".selftest-", suffix=".json", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.data, f, indent=1, default=str)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _error_text(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return "".join(lines).strip().splitlines()[-1][:500]


# ---------------------------------------------------------------------------------------
# 1. Correctness
# ---------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# relative-to-max tolerance for 16-bit (units of the dtype's epsilon); float32 absolute
EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@dataclass
class Case:
    """One correctness case: a pattern, an option set, a dtype, forced configurations."""

    kind: str
    option: str
    dtype: str
    pattern: Pattern
    shape: tuple  # (B, N, N_kv, T_q, T, H, W, D)
    num_objects: int = 0
    causal_affinity: bool = True
    config: Any = None
    config_dq: Any = None
    config_dkdv: Any = None
    config_name: str = "first"

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.option}/{self.dtype}/{self.config_name}"


def _patterns(kind: str, option: str) -> Pattern:
    if kind == "local":
        if option == "plain":
            return Pattern.local((3, 3, 5))
        if option == "options":
            return Pattern.local((3, 5, 3), boundary="shift", causal=True)
        return Pattern.local((3, 3, 3), dilation=(1, 2, 2))
    if kind == "strided":
        return Pattern.strided((1, 2, 2), causal=option == "options")
    return Pattern.grid(causal=option == "options")


def correctness_cases(quick: bool) -> list[Case]:
    """The correctness cases, most telling first (a run out of time skips the tail):

    0. per pattern, the public API (``sparse_attention`` + autograd; autotuned on a GPU),
       objects and every option flag, bfloat16 (with ``quick``: float32 and bfloat16, and
       nothing else: the interpreter's budget);
    1. every configuration of the forward, dQ and dK/dV kernels, forced, bfloat16, objects,
       at a shape with several query and key tiles;
    2. every option set (plain; objects + causal + shift; GQA + T_q < T + dilation) x dtype
       (float32, bfloat16, float16) at the first configuration of each kernel.
    """
    import sys as _sys

    from .kernels import BACKWARD, FORWARD

    small = (1, 2, 2, 3, 3, 5, 7, 16)  # B, N, N_kv, T_q, T, H, W, D
    gqa = (1, 4, 2, 2, 3, 5, 7, 16)  # GQA group 2, two query frames of three
    options = {
        "plain": dict(shape=small, num_objects=0),
        "options": dict(shape=small, num_objects=2, causal_affinity=True),
        "v2": dict(shape=gqa, num_objects=2, causal_affinity=False),
    }
    tiers: list[list[Case]] = [[], [], []]
    for kind in FORWARD:
        fwd = _sys.modules[FORWARD[kind].__module__]
        bwd = _sys.modules[BACKWARD[kind].__module__]
        for dtype in (["fp32", "bf16"] if quick else ["bf16"]):
            tiers[0].append(Case(kind, "options", dtype, _patterns(kind, "options"), config_name="public",
                                 **options["options"]))
        if quick:
            continue
        n = max(len(fwd.CONFIGS), len(bwd.CONFIGS_DQ), len(bwd.CONFIGS_DKDV))
        # larger than every tile of the lists: several query and key tiles per kernel
        big = (1, 1, 1, 3, 3, 9, 34, 32) if kind != "strided" else (1, 1, 1, 2, 2, 16, 18, 32)
        for i in range(n):
            tiers[1].append(Case(
                kind, "options", "bf16", _patterns(kind, "options"), big, num_objects=2,
                config=fwd.CONFIGS[i % len(fwd.CONFIGS)], config_dq=bwd.CONFIGS_DQ[i % len(bwd.CONFIGS_DQ)],
                config_dkdv=bwd.CONFIGS_DKDV[i % len(bwd.CONFIGS_DKDV)], config_name=f"config{i}",
            ))
        for option in options:
            for dtype in DTYPES:
                tiers[2].append(Case(kind, option, dtype, _patterns(kind, option), config=fwd.CONFIGS[0],
                                     config_dq=bwd.CONFIGS_DQ[0], config_dkdv=bwd.CONFIGS_DKDV[0],
                                     config_name="first", **options[option]))
    return [case for tier in tiers for case in tier]


def _rel_max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def run_case(case: Case, device: torch.device) -> dict:
    """Forward and backward of one case against the float64 reference; returns the errors
    and whether each is within its tolerance."""
    from . import sparse_attention
    from .kernels.backward import attention_backward
    from .reference import reference_attention
    from .triton_path import forward

    B, N, N_kv, T_q, T, H, W, D = case.shape
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, T_q, H, W, D, generator=gen).to(dtype)
    k = torch.randn(B, N_kv, T, H, W, D, generator=gen).to(dtype)
    v = torch.randn(B, N_kv, T, H, W, D, generator=gen).to(dtype)
    labels = torch.randint(-1, case.num_objects, (B, T, H, W), generator=gen) if case.num_objects else None
    O = case.num_objects or None
    scale = D ** -0.5

    # the reference, float64 on the CPU, with autograd
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*leaves, case.pattern, scale, labels, O, case.causal_affinity)
    ref_out, ref_aff = (ref if O else (ref, None))
    g_out = torch.randn(ref_out.shape, generator=gen)
    g_aff = torch.randn(ref_aff.shape, generator=gen) if O else None
    loss = (ref_out * g_out.double()).sum() + ((ref_aff * g_aff.double()).sum() if O else 0)
    ref_grads = torch.autograd.grad(loss, leaves)

    dq_, dk_, dv_ = (x.to(device) for x in (q, k, v))
    lab = None if labels is None else labels.to(device)
    if case.config is None:
        # the public API (autotuned on a GPU, the first configuration in the interpreter)
        xs = [x.detach().clone().requires_grad_() for x in (dq_, dk_, dv_)]
        res = sparse_attention(*xs, case.pattern, scale, lab, O, case.causal_affinity, backend="triton")
        out, aff = (res if O else (res, None))
        total = (out.float() * g_out.to(device)).sum() + ((aff * g_aff.to(device)).sum() if O else 0)
        grads = torch.autograd.grad(total, xs)
    else:
        out, aff, lse, arg = forward(dq_, dk_, dv_, case.pattern, scale, lab, O, case.causal_affinity,
                                     dilation=case.pattern.dilation, config=case.config)
        grads = attention_backward(
            g_out.to(device).to(dtype), dq_, dk_, dv_, out, lse, case.pattern, scale,
            None if aff is None else g_aff.to(device), aff, arg, dilation=case.pattern.dilation,
            config_dq=case.config_dq, config_dkdv=case.config_dkdv,
        )
    errors = {"out": _rel_max_error(out, ref_out.detach())}
    if O:
        errors["affinity"] = (aff.double().cpu() - ref_aff.detach()).abs().max().item()
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        errors[name] = _rel_max_error(got, want)
    if dtype == torch.float32:
        limits = {"out": 1e-4, "affinity": 1e-4, "dq": 1e-3, "dk": 1e-3, "dv": 1e-3}
    else:
        eps = EPS[dtype]
        limits = {"out": 4 * eps, "affinity": 1e-4, "dq": 8 * eps, "dk": 8 * eps, "dv": 8 * eps}
    failed = {k: e for k, e in errors.items() if not (e <= limits[k])}  # NaN fails
    return dict(errors=errors, limits={k: limits[k] for k in errors}, ok=not failed,
                failed=sorted(failed))


def correctness(report: Report, device: torch.device, quick: bool, budget_s: Optional[float] = None) -> bool:
    """Run :func:`correctness_cases`; past ``budget_s`` seconds of the run the rest are
    recorded as skipped."""
    cases = correctness_cases(quick)
    rows = report.data.setdefault("correctness", [])
    print(f"correctness: {len(cases)} cases on {device} against the float64 reference", flush=True)
    all_ok = True
    for case in cases:
        if report.out_of_time() or (budget_s is not None and report.elapsed() > budget_s):
            rows.append(dict(case=case.name, skipped="time budget"))
            all_ok = False
            continue
        start = time.perf_counter()
        try:
            result = run_case(case, device)
        except Exception as exc:  # recorded; the run goes on
            result = dict(ok=False, error=_error_text(exc))
        result.update(case=case.name, seconds=round(time.perf_counter() - start, 2))
        rows.append(result)
        all_ok &= bool(result["ok"])
        status = "ok" if result["ok"] else f"FAIL {result.get('error') or result.get('failed')}"
        errs = " ".join(f"{k}={v:.1e}" for k, v in result.get("errors", {}).items())
        print(f"  {case.name:<34} {status:<6} {errs}  ({result['seconds']:.1f} s)", flush=True)
        report.save()
    skipped = sum("skipped" in r for r in rows)
    passed = sum(bool(r.get("ok")) for r in rows)
    report.data["correctness_summary"] = dict(cases=len(rows), passed=passed, skipped=skipped,
                                              failed=len(rows) - passed - skipped)
    print(f"correctness: {passed}/{len(rows)} passed, {skipped} skipped (time budget)", flush=True)
    report.save()
    return all_ok


# ---------------------------------------------------------------------------------------
# 2. Timings
# ---------------------------------------------------------------------------------------


@dataclass
class Bench:
    name: str
    pattern: Pattern
    B: int
    N: int
    T: int
    H: int
    W: int
    D: int
    num_objects: int = 0
    N_kv: Optional[int] = None
    T_q: Optional[int] = None

    @property
    def n_kv(self) -> int:
        return self.N_kv or self.N

    @property
    def t_q(self) -> int:
        return self.T_q or self.T


def benchmarks() -> list[Bench]:
    sst = dict(B=1, N=8, T=4, H=60, W=107, D=32, num_objects=3)
    return [
        Bench("SST local (7,5,5)", Pattern.local((7, 5, 5)), **sst),
        Bench("SST strided (1,4,4)", Pattern.strided((1, 4, 4)), **sst),
        Bench("SST grid", Pattern.grid(), **sst),
        Bench("diffusion local (19,25,25)", Pattern.local((19, 25, 25)), B=1, N=24, T=30, H=48, W=80, D=128),
        Bench("v2 streaming T_q=1 local (7,5,5)", Pattern.local((7, 5, 5)), **{**sst, "num_objects": 0}, T_q=1),
        Bench("v2 recompute T=4 local (7,5,5)", Pattern.local((7, 5, 5)), **{**sst, "num_objects": 0}),
        Bench("v2 GQA N_kv=N/4 local (7,5,5)", Pattern.local((7, 5, 5)), **{**sst, "num_objects": 0}, N_kv=2),
    ]


def useful_pairs(b: Bench) -> int:
    from .kernels.instrument import useful_pairs as pairs
    from .kernels.launch import Problem

    return pairs(Problem(b.B, b.N, b.n_kv, b.t_q, b.T, b.H, b.W, b.D, b.pattern, b.num_objects))


def compulsory_bytes(b: Bench, backward: bool, element_bytes: int = 2) -> int:
    """Each input read once and each output written once (q, k, v, out, lse; labels,
    affinity and argmax with objects; for forward+backward also dO, lse, Delta read and dq,
    dk, dv written)."""
    S, S_q = b.T * b.H * b.W, b.t_q * b.H * b.W
    q = b.B * b.N * S_q * b.D * element_bytes
    kv = b.B * b.n_kv * S * b.D * element_bytes
    fwd = 2 * q + 2 * kv + b.B * b.N * S_q * 4
    if b.num_objects:
        fwd += b.B * S * 4 + 2 * b.B * b.N * b.num_objects * S_q * 4
    if not backward:
        return fwd
    return fwd + 3 * q + 4 * kv + 2 * b.B * b.N * S_q * 4


def _gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _peak_bytes_per_s() -> float:
    return HBM_BYTES_PER_S["H200"] if "H200" in _gpu_name() else HBM_BYTES_PER_S["H100"]


def _mask_mod(pattern: Pattern, T: int, H: int, W: int, T_q: int) -> Callable:
    off = (T - T_q) * H * W

    def mask_mod(b, h, q_idx, kv_idx):
        return connectivity(pattern, T, H, W, q_idx + off, kv_idx)

    return mask_mod


def _contenders(b: Bench, device: torch.device) -> dict[str, Callable[[bool], Callable]]:
    """name -> ``make(backward) -> fn()``: each contender set up once (masks built), timed
    without its set-up."""
    from einops import rearrange

    from . import sparse_attention

    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    S, S_q = b.T * b.H * b.W, b.t_q * b.H * b.W

    def tensors(requires_grad: bool):
        q = torch.randn(b.B, b.N, b.t_q, b.H, b.W, b.D, device=device, dtype=dtype, generator=gen)
        k = torch.randn(b.B, b.n_kv, b.T, b.H, b.W, b.D, device=device, dtype=dtype, generator=gen)
        v = torch.randn(b.B, b.n_kv, b.T, b.H, b.W, b.D, device=device, dtype=dtype, generator=gen)
        return [x.requires_grad_(requires_grad) for x in (q, k, v)]

    labels = (torch.randint(-1, b.num_objects, (b.B, b.T, b.H, b.W), device=device, generator=gen)
              if b.num_objects else None)

    def timed(fn_forward: Callable, backward: bool, xs: list) -> Callable:
        if not backward:
            def run():
                with torch.no_grad():
                    return fn_forward(*xs)
            return run
        grad = None

        def run():
            nonlocal grad
            out = fn_forward(*xs)
            out = out[0] if isinstance(out, tuple) else out
            if grad is None:
                grad = torch.randn_like(out)
            torch.autograd.grad(out, xs, grad)
        return run

    def ours(backward: bool):
        xs = tensors(backward)
        return timed(lambda q, k, v: sparse_attention(q, k, v, b.pattern, labels=labels,
                                                      num_objects=b.num_objects or None, backend="triton"),
                     backward, xs)

    def flat(x):
        return rearrange(x, "b n t h w d -> b n (t h w) d")

    def sdpa_flash(backward: bool):
        # full dense attention through the flash kernel: the O(S^2) cost the pattern avoids
        from torch.nn.attention import SDPBackend, sdpa_kernel

        xs = tensors(backward)

        def fn(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    flat(q), flat(k), flat(v), enable_gqa=b.n_kv != b.N)
        return timed(fn, backward, xs)

    def sdpa_masked(backward: bool):
        from .patterns import dense_mask

        if S_q * S > 2**31:
            raise MemoryError(f"the boolean mask would take {S_q * S / 2**30:.1f} GiB")
        mask = dense_mask(b.pattern, b.T, b.H, b.W, device=device, T_q=b.t_q)
        xs = tensors(backward)

        def fn(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(
                flat(q), flat(k), flat(v), attn_mask=mask, enable_gqa=b.n_kv != b.N)
        return timed(fn, backward, xs)

    def flex(backward: bool):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(_mask_mod(b.pattern, b.T, b.H, b.W, b.t_q), None, None, S_q, S,
                                       device=device)
        compiled = torch.compile(flex_attention, dynamic=False)
        xs = tensors(backward)

        def fn(q, k, v):
            return compiled(flat(q), flat(k), flat(v), block_mask=block_mask, enable_gqa=b.n_kv != b.N)
        return timed(fn, backward, xs)

    return {"sst_triton": ours, "sdpa_flash_dense": sdpa_flash, "sdpa_masked": sdpa_masked, "flex": flex}


def _time_ms(fn: Callable, device: torch.device) -> float:
    """Milliseconds per call: ``triton.testing.do_bench`` on CUDA (L2 flushed before each run,
    the median); a wall-clock mean on the CPU (tests of this module only)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50)
    start = time.perf_counter()
    for _ in range(2):
        fn()
    return (time.perf_counter() - start) / 2 * 1e3


IMPLS = ("sst_triton", "sdpa_flash_dense", "flex", "sdpa_masked")


def timings(report: Report, device: torch.device, benches: Optional[list] = None,
            impls: tuple = IMPLS) -> list[dict]:
    """Time every contender on every benchmark, ours first everywhere (then the baselines),
    so that a run short of time still has our figures; rows printed and saved as they come."""
    rows = report.data.setdefault("timings", [])
    peak_bw = _peak_bytes_per_s()
    report.data["roofline"] = dict(gpu=_gpu_name(), hbm_bytes_per_s=peak_bw, bf16_flop_per_s=BF16_FLOP_PER_S)
    benches = benchmarks() if benches is None else benches
    print(f"{'case':<34}{'pass':<9}{'impl':<18}{'ms':>9}{'uTFLOP/s':>10}{'GB/s':>8}{'%HBM':>7}{'%TC':>7}"
          f"{'t/ours':>8}", flush=True)
    ours: dict = {}
    reference_out: dict = {}  # our forward output per case: the masked baselines must agree with it
    for impl in impls:
        for b in benches:
            pairs = useful_pairs(b)
            try:
                make = _contenders(b, device)[impl]
            except Exception as exc:
                make, setup_error = None, _error_text(exc)
            for backward in (False, True):
                flops = (14 if backward else 4) * b.D * pairs
                moved = compulsory_bytes(b, backward)
                row = dict(case=b.name, passes="fwd+bwd" if backward else "fwd", impl=impl,
                           useful_flops=flops, compulsory_bytes=moved)
                if report.out_of_time():
                    row["skipped"] = "time budget"
                    rows.append(row)
                    continue
                try:
                    if make is None:
                        raise RuntimeError(setup_error)
                    fn = make(backward)
                    first = fn()  # compile / autotune outside the timing
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if not backward:
                        _agreement(row, impl, b, first, reference_out)
                    ms = _time_ms(fn, device)
                    row.update(ms=ms, useful_tflops=flops / ms / 1e9, gb_per_s=moved / ms / 1e6)
                    row.update(fraction_hbm=row["gb_per_s"] * 1e9 / peak_bw,
                               fraction_tensor_core=row["useful_tflops"] * 1e12 / BF16_FLOP_PER_S)
                    if impl == "sst_triton":
                        ours[(b.name, backward)] = ms
                    if (b.name, backward) in ours:
                        row["time_over_ours"] = ms / ours[(b.name, backward)]
                except Exception as exc:  # recorded; the next contender runs
                    row["error"] = _error_text(exc)
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                _print_timing(row)
                report.save()
    print("by case:", flush=True)
    for row in sorted(rows, key=lambda r: (r["case"], r["passes"], IMPLS.index(r["impl"]))):
        _print_timing(row)
    return rows


def _agreement(row: dict, impl: str, b: Bench, out, reference_out: dict) -> None:
    """Keep our forward output; for the baselines computing the same pattern (masked SDPA,
    FlexAttention) record their largest difference from it: a timing of a wrong mask is
    worthless. Dense flash SDPA attends everything: not compared."""
    out = out[0] if isinstance(out, tuple) else out
    if impl == "sst_triton":
        reference_out[b.name] = out.detach().reshape(b.B, b.N, -1, b.D)
    elif impl in ("sdpa_masked", "flex") and b.name in reference_out:
        diff = (out.detach().float() - reference_out[b.name].float()).abs().max().item()
        row["max_abs_diff_vs_ours"] = diff
        row["agrees_with_ours"] = diff <= 5e-2  # bf16 outputs of O(1): a few ulps


def _print_timing(row: dict) -> None:
    head = f"{row['case']:<34}{row['passes']:<9}{row['impl']:<18}"
    if "ms" not in row:
        print(head + f"  {row.get('error') or row.get('skipped')}", flush=True)
        return
    agree = {True: "", False: "  DISAGREES with ours"}.get(row.get("agrees_with_ours"), "")
    print(head + f"{row['ms']:>9.3f}{row['useful_tflops']:>10.1f}{row['gb_per_s']:>8.0f}"
          f"{100 * row['fraction_hbm']:>6.1f}%{100 * row['fraction_tensor_core']:>6.1f}%"
          f"{row.get('time_over_ours', float('nan')):>8.2f}{agree}", flush=True)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sst_triton.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="correctness only, the option set with objects, float32 and bfloat16")
    parser.add_argument("--backend", choices=["triton"], default="triton",
                        help="the kernels under test (the Triton kernels: compiled on CUDA, interpreted on the CPU)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when a GPU is present, else cpu (Triton's interpreter)")
    parser.add_argument("--json", default="selftest.json", help="where to write the results ('' for nowhere)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    parser.add_argument("--no-timings", action="store_true", help="skip the timings (GPU)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu (Triton's interpreter)", file=sys.stderr)
        return 2
    report = Report(args.json or None, budget_s=args.budget)
    import triton

    report.data.update(
        command=" ".join(["python -m sst_triton.selftest", *(argv if argv is not None else sys.argv[1:])]),
        device=str(device), gpu=_gpu_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), quick=args.quick,
    )
    print(f"sst_triton selftest on {device} ({_gpu_name()}), torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    # on a GPU, the timings get what the correctness part leaves of the budget, at least 45%
    ok = correctness(report, device, args.quick, None if device.type == "cpu" else 0.55 * args.budget)
    if device.type == "cuda" and not args.no_timings and not args.quick:
        try:
            timings(report, device)
        except Exception as exc:  # the correctness table is already saved
            report.data["timings_error"] = _error_text(exc)
            print(f"timings stopped: {report.data['timings_error']}", flush=True)
    elif not args.quick and not args.no_timings:
        report.data["timings"] = "not run: no GPU (the timings need CUDA)"
        print("timings: not run (no GPU)", flush=True)
    report.data["ok"] = ok
    report.save()
    print(f"selftest {'passed' if ok else 'FAILED'} in {report.elapsed():.0f} s"
          + (f"; results in {args.json}" if args.json else ""), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
