"""What each kernel issues at the benchmark shapes, and the H100/H200 time that follows.

    python perf/work_model.py [--all-configs] [--device H100|H200]

Every kernel module models the work its kernels issue for a problem and a configuration
(``work_forward`` / ``work_backward``: exp count, ``tl.dot`` FLOPs, bytes loaded, distinct
bytes loaded, bytes stored, programs; :mod:`sst_triton.kernels.work`), and ``tests/test_work_model.py``
holds each model equal to an instrumented interpreter run of the kernel. From the model:

- ``E`` = exp elements issued / useful ``(query, key)`` pairs ``U``; ``L`` = bytes loaded /
  distinct bytes loaded;
- HBM bytes, estimated: the distinct bytes loaded (each read once from HBM, re-reads
  served by L2/shared memory: ``L`` is the price paid there, not in HBM) plus the bytes
  its stores write (``store_bytes``, modelled and counted like the loads: the outputs, and
  any scratch one pass writes for the next to read back, e.g. grid's partial states);
- time estimate = max(HBM bytes / bandwidth, MMA FLOPs / tensor-core peak, exps / exp-unit
  rate) with the constants of ``perf/roofline.py`` (H100 SXM 3.35 TB/s, H200 4.8 TB/s,
  989.4 TFLOP/s bf16 dense, 66.9 TFLOP/s fp32 on CUDA cores, 3.87e12 exp/s from the SFU's
  16 ex2/clk/SM x 132 SMs x 1.83 GHz; sources there), and a fourth roof issue 11 does not
  name: bytes loaded / L2 bandwidth (8.6 TB/s, a peak derived in ``perf/roofline.py``; every
  byte a program loads crosses L2 -> SM, so a kernel that re-reads its keys ``L`` times pays
  ``L`` there: the small query boxes of the local kernels at D = 128 are bound by it;
  ``--no-l2`` prints the three-roof figures). The roofs are taken as perfectly overlapped and
  launch overhead as zero: an optimistic estimate, and a measured GPU time always outranks it;
- the roofline of the pattern itself: compulsory bytes (each input read once, each output
  written once), useful FLOPs (forward ``4 D U``; backward ``dQ`` kernel ``6 D U`` (``Q K^T``,
  ``dO V^T``, ``dS K``), ``dK/dV`` kernel ``8 D U`` (``Q K^T``, ``dO V^T``, ``P^T dO``,
  ``dS^T Q``), a whole backward ``10 D U`` as FlashAttention-2 counts it) and one exp per
  useful pair and pass; the fraction of the roofline is its time over the estimate. A
  backward whose kernels compute dQ, dK and dV at once (grid: one fused kernel per axis;
  its ``work_backward`` returns one Work) is one ``dq+dkdv`` row, against the whole
  backward's roofline.

Shapes (issue 11): the SST paper shape (B=1, N=8, T=4, H=60, W=107, D=32, bf16, 3 objects)
with local (7,5,5), local (3,7,7), strided (1,4,4) and grid; the video-diffusion shape
(B=1, N=24, T=30, H=48, W=80, D=128, bf16, local (19,25,25), no labels).

A configuration row per candidate the autotuner may pick (``--all-configs``; by default the
first, the interpreter's, and the best estimated); "autotuned" is the best.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from roofline import DEVICES, H100, Device  # noqa: E402

from sst_triton.kernels import BACKWARD, FORWARD, _common  # noqa: E402
from sst_triton.kernels.instrument import useful_pairs  # noqa: E402
from sst_triton.kernels.launch import Problem  # noqa: E402
from sst_triton.kernels.work import Work  # noqa: E402
from sst_triton.patterns import Pattern  # noqa: E402

ELEMENT_BYTES = 2  # bf16 q, k, v, out, dO, dq, dk, dv


@dataclass
class Case:
    name: str
    problem: Problem


def cases() -> list[Case]:
    sst = dict(B=1, N=8, N_kv=8, T_q=4, T=4, H=60, W=107, D=32, num_obj=3)
    out = [
        Case(f"SST {label}", Problem(pattern=pattern, **sst))
        for label, pattern in (
            ("local (7,5,5)", Pattern.local((7, 5, 5))),
            ("local (3,7,7)", Pattern.local((3, 7, 7))),
            ("strided (1,4,4)", Pattern.strided((1, 4, 4))),
            ("grid", Pattern.grid()),
        )
    ]
    out.append(Case("diffusion local (19,25,25)", Problem(1, 24, 24, 30, 30, 48, 80, 128, Pattern.local((19, 25, 25)))))
    return out


# ---------------------------------------------------------------------------------------
# Bytes the kernels must move and write
# ---------------------------------------------------------------------------------------


def _q_bytes(p: Problem, eb: int) -> int:
    return p.B * p.N * p.S_q * p.D * eb


def _kv_bytes(p: Problem, eb: int) -> int:
    return p.B * p.N_kv * p.S * p.D * eb


def _obj_bytes(p: Problem) -> int:
    return p.B * p.N * p.num_obj * p.S_q * 4


def written_bytes(p: Problem, kernel: str, eb: int) -> int:
    """What a kernel must write (compulsory): forward out + lse (+ affinity, argmax); dq;
    dk + dv. The estimates use the kernel's own ``store_bytes`` (scratch included)."""
    if kernel == "fwd":
        return _q_bytes(p, eb) + p.B * p.N * p.S_q * 4 + 2 * _obj_bytes(p)
    if kernel == "dq":
        return _q_bytes(p, eb)
    return 2 * _kv_bytes(p, eb)


def compulsory_bytes(p: Problem, kernel: str, eb: int) -> int:
    """Each input the kernel needs read once, each output written once."""
    stats = p.B * p.N * p.S_q * 4  # lse, Delta: fp32 per query
    if kernel == "fwd":
        labels = p.B * p.S * 4 if p.num_obj else 0
        return _q_bytes(p, eb) + 2 * _kv_bytes(p, eb) + labels + written_bytes(p, kernel, eb)
    # q, dO, k, v, lse, Delta (+ argmax, affinity gradient) read
    reads = 2 * _q_bytes(p, eb) + 2 * _kv_bytes(p, eb) + 2 * stats + 2 * _obj_bytes(p)
    if kernel in ("bwd", "dq+dkdv"):
        return reads + _q_bytes(p, eb) + 2 * _kv_bytes(p, eb)
    return reads + written_bytes(p, kernel, eb)


def useful_flops(p: Problem, kernel: str) -> float:
    # "dq+dkdv": a fused kernel computing the whole backward, as "bwd"
    per_pair = {"fwd": 4, "dq": 6, "dkdv": 8, "bwd": 10, "dq+dkdv": 10}[kernel]
    return float(per_pair * p.D * useful_pairs(p))


# ---------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------


@dataclass
class Estimate:
    kernel: str
    config: str
    work: Work
    hbm_bytes: float
    seconds: float
    bound: str


# whether estimates include the L2 roof (``--no-l2``: the three roofs issue 11 names)
WITH_L2 = True


def estimate(p: Problem, kernel: str, work: Work, config_text: str, device: Device, eb: int = ELEMENT_BYTES,
             dtype: str = "bf16") -> Estimate:
    # every byte stored reaches HBM once; scratch a later pass reads back is also in its distinct loads
    hbm = work.distinct_bytes + work.store_bytes
    roofs = {
        "memory": hbm / device.hbm_bytes_per_s,
        "mma": work.dot_flops / device.flop_per_s(dtype),
        "exp": work.exp / device.exp_per_s,
    }
    if WITH_L2 and device.l2_bytes_per_s:
        # every byte a program loads crosses L2 -> SM (re-reads hit L2, not HBM): L bytes per
        # distinct byte, which small query tiles pay most
        roofs["l2"] = work.load_bytes / device.l2_bytes_per_s
    bound = max(roofs, key=roofs.get)
    return Estimate(kernel, config_text, work, hbm, roofs[bound], bound)


def roof_seconds(p: Problem, kernel: str, device: Device, eb: int = ELEMENT_BYTES, dtype: str = "bf16") -> float:
    """The pattern's own bound for one kernel (or ``"bwd"``: the whole backward)."""
    # one exp per useful pair: the forward's P; a backward kernel's recomputed P (a whole
    # backward as FlashAttention-2 counts it: P recomputed once)
    exps = useful_pairs(p)
    return max(
        compulsory_bytes(p, kernel, eb) / device.hbm_bytes_per_s,
        useful_flops(p, kernel) / device.flop_per_s(dtype),
        exps / device.exp_per_s,
    )


def config_text(config) -> str:
    if isinstance(config, tuple):
        return " / ".join(config_text(c) for c in config)
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def _call_model(fn, args: tuple, eb: int) -> Work:
    """The model at element size ``eb``: passed as the argument after the configurations when
    the model takes one (the models default to float32's 4 bytes)."""
    params = [q for q in inspect.signature(fn).parameters.values()
              if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    if len(params) > len(args):
        return fn(*args, eb)
    return fn(*args)


def candidates(module, list_name: str, tuned_name: str, p: Problem) -> list:
    """The configurations the autotuner may pick at ``p``'s head dim (its pruner, if any)."""
    configs = list(getattr(module, list_name))
    tuned = getattr(module, tuned_name, None)
    prune = getattr(tuned, "early_config_prune", None)
    if prune is not None:
        try:
            configs = list(prune(configs, {}, BLOCK_D=_common.block_d(p.D)))
        except Exception:  # a pruner that needs more arguments: keep the list
            pass
    return configs


def forward_estimates(p: Problem, device: Device) -> list[Estimate]:
    module = sys.modules[FORWARD[p.pattern.kind].__module__]
    model = getattr(module, "work_forward", None)
    if model is None:
        raise LookupError(f"{module.__name__} has no work_forward")
    tuned = f"{module.__name__.rsplit('.', 1)[1]}_tuned"
    return [
        estimate(p, "fwd", _call_model(model, (p, c), ELEMENT_BYTES), config_text(c), device)
        for c in candidates(module, "CONFIGS", tuned, p)
    ]


def backward_estimates(p: Problem, device: Device) -> list[tuple[Estimate, ...]]:
    """Per candidate configuration: ``(dq, dkdv)`` estimates, or ``(dq+dkdv,)`` for a module
    whose kernels compute the three gradients at once (its model returns one Work)."""
    module = sys.modules[BACKWARD[p.pattern.kind].__module__]
    model = getattr(module, "work_backward", None)
    if model is None:
        raise LookupError(f"{module.__name__} has no work_backward")
    base = module.__name__.rsplit(".", 1)[1]
    dqs = candidates(module, "CONFIGS_DQ", f"{base}_dq_tuned", p)
    dkdvs = candidates(module, "CONFIGS_DKDV", f"{base}_dkdv_tuned", p)
    out = []
    # the two kernels are tuned apart: each kernel's estimate under each of its configs
    # (the other kernel at its first configuration; the model returns both)
    for i in range(max(len(dqs), len(dkdvs))):
        cdq, cdkdv = dqs[min(i, len(dqs) - 1)], dkdvs[min(i, len(dkdvs) - 1)]
        works = _call_model(model, (p, cdq, cdkdv), ELEMENT_BYTES)
        if len(works) == 1:
            out.append((estimate(p, "dq+dkdv", works[0], config_text(cdq), device),))
            continue
        w_dq, w_dkdv = works
        out.append((estimate(p, "dq", w_dq, config_text(cdq), device),
                    estimate(p, "dkdv", w_dkdv, config_text(cdkdv), device)))
    return out


def _row(case: str, kernel: str, e: Estimate, p: Problem, device: Device, mark: str = "") -> str:
    U = useful_pairs(p)
    roof = roof_seconds(p, kernel, device)
    useful = useful_flops(p, kernel)
    w = e.work
    return (
        f"{case:<28}{kernel:<8}{e.config:<57}{w.exp / U:>7.2f}{w.reuse:>7.2f}{w.exp / 1e6:>9.1f}"
        f"{w.dot_flops / 1e9:>9.2f}{w.load_bytes / 2**20:>10.1f}{e.hbm_bytes / 2**20:>9.1f}"
        f"{compulsory_bytes(p, kernel, ELEMENT_BYTES) / 2**20:>9.1f}{useful / 1e9:>9.2f}{e.seconds * 1e6:>9.1f}"
        f"  {e.bound:<6}{useful / e.seconds / 1e12:>8.1f}{100 * roof / e.seconds:>7.1f}%{mark}"
    )


HEADER = (
    f"{'case':<28}{'kernel':<8}{'config':<57}{'E':>7}{'L':>7}{'Mexp':>9}{'MMA GF':>9}{'load MiB':>10}"
    f"{'HBM MiB':>9}{'comp MiB':>9}{'use GF':>9}{'est us':>9}  {'by':<6}{'uTF/s':>8}{'roof':>8}"
)


def report(device: Device = H100, all_configs: bool = False) -> str:
    lines = [
        f"{device.name}: {device.hbm_bytes_per_s / 1e12:.2f} TB/s HBM, {device.bf16_flop_per_s / 1e12:.1f} TFLOP/s bf16, "
        f"{device.exp_per_s / 1e12:.2f} T exp/s, "
        + (f"L2 {device.l2_bytes_per_s / 1e12:.1f} TB/s" if WITH_L2 and device.l2_bytes_per_s else "no L2 roof")
        + "; bf16 inputs; E = exp/useful pair, L = loaded/distinct bytes, "
        "Mexp = 1e6 exps, MMA GF = tl.dot GFLOP, HBM MiB = distinct loaded + stored, comp MiB = compulsory (MiB = 2**20 bytes), "
        "use GF = useful GFLOP, uTF/s = useful TFLOP/s at the estimate, roof = pattern roofline / estimate",
        HEADER,
    ]
    for case in cases():
        p = case.problem
        try:
            fwd = forward_estimates(p, device)
            best = min(fwd, key=lambda e: e.seconds)
            shown = fwd if all_configs else [e for e in fwd if e is fwd[0] or e is best]
            for e in shown:
                lines.append(_row(case.name, "fwd", e, p, device, "  <- autotuned" if e is best else ""))
        except Exception as exc:  # a kernel without its model yet: say so, keep the table
            lines.append(f"{case.name:<28}fwd   (no estimate: {type(exc).__name__}: {exc})")
        try:
            bwd = backward_estimates(p, device)
            # each kernel's best estimate among its configurations (dq, dkdv; or the fused one)
            kernels = [b.kernel for b in bwd[0]]
            per_kernel = [[b[i] for b in bwd] for i in range(len(kernels))]
            bests = [min(ests, key=lambda e: e.seconds) for ests in per_kernel]
            for kernel, ests, best in zip(kernels, per_kernel, bests):
                seen = set()
                for e in ests:
                    if e.config in seen or not (all_configs or e is ests[0] or e is best):
                        continue
                    seen.add(e.config)
                    lines.append(_row(case.name, kernel, e, p, device, "  <- autotuned" if e is best else ""))
            total = sum(best.seconds for best in bests)
            roof = roof_seconds(p, "bwd", device)
            lines.append(
                f"{case.name:<28}bwd   {' + '.join(kernels)} autotuned: est {total * 1e6:.1f} us, "
                f"{useful_flops(p, 'bwd') / total / 1e12:.1f} useful TFLOP/s (10 D U), "
                f"{100 * roof / total:.1f}% of the backward roofline ({roof * 1e6:.1f} us)"
            )
        except Exception as exc:
            lines.append(f"{case.name:<28}bwd   (no estimate: {type(exc).__name__}: {exc})")
    return "\n".join(lines)


def issue_table() -> str:
    """Issue 11's E/L table from the models (validated against the instrumented interpreter
    by tests/test_work_model.py): T, H, W = 4, 24, 40, D = 32, 3 objects, ``CONFIGS[0]``,
    float32 elements as the interpreter runs them."""
    lines = ["T,H,W = 4,24,40, D = 32, 3 objects, CONFIGS[0] (model = instrumented count)",
             f"{'kernel':<16} | {'forward':<15} | {'backward dQ':<15} | {'backward dK/dV':<15}"]
    for label, pattern in (("local (7,5,5)", Pattern.local((7, 5, 5))), ("local (3,7,7)", Pattern.local((3, 7, 7))),
                           ("strided (1,4,4)", Pattern.strided((1, 4, 4))), ("grid", Pattern.grid())):
        p = Problem(1, 1, 1, 4, 4, 24, 40, 32, pattern, 3)
        fwd_module = sys.modules[FORWARD[pattern.kind].__module__]
        bwd_module = sys.modules[BACKWARD[pattern.kind].__module__]
        U = useful_pairs(p)
        cells = []
        try:
            bwd = bwd_module.work_backward(p, bwd_module.CONFIGS_DQ[0], bwd_module.CONFIGS_DKDV[0])
            works = [fwd_module.work_forward(p, fwd_module.CONFIGS[0]), *bwd]
            cells = [f"E {w.exp / U:5.2f} L {w.reuse:5.2f}" for w in works]
            if len(bwd) == 1:  # one fused kernel computes dQ, dK and dV
                cells[1] += " (dQ+dK/dV fused)"
        except Exception as exc:
            cells = [f"({type(exc).__name__})"] * 3
        lines.append(f"{label:<16} | " + " | ".join(cells))
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python perf/work_model.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=[d.name.split()[0] for d in DEVICES], action="append")
    parser.add_argument("--all-configs", action="store_true", help="a row for every candidate configuration")
    parser.add_argument("--issue-table", action="store_true", help="only issue 11's E/L table at T,H,W = 4,24,40")
    parser.add_argument("--no-l2", action="store_true",
                        help="leave out the L2 roof (issue 11's model: HBM, tensor cores, exp unit)")
    args = parser.parse_args(argv)
    global WITH_L2
    WITH_L2 = not args.no_l2
    if args.issue_table:
        print(issue_table())
        return 0
    chosen = [d for d in DEVICES if not args.device or d.name.split()[0] in args.device]
    for device in chosen:
        print(report(device, args.all_configs))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
