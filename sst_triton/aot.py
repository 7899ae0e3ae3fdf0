"""Compile every kernel configuration for sm_80 and sm_90a, with no GPU, and report resources.

Usage::

    python -m sst_triton.aot            # print the table
    python -m sst_triton.aot --check    # ... and exit 1 on a compile failure, a spill, or a
                                        # kernel with tl.dot that got no tensor-core instruction

For every :class:`~sst_triton.kernels.AotSpec` registered in
:data:`sst_triton.kernels.KERNEL_MODULES` and every ``triton.Config`` its autotuner may
pick, ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` builds PTX and
a cubin. ``ptxas -v`` (the one Triton itself uses for that arch, from
``triton/backends/nvidia/bin``) gives registers and spill bytes; shared memory comes from
the compiled kernel's metadata; ``tt.dot`` in the TTIR against ``mma``/``wgmma`` in the
PTX says whether the products run on tensor cores. This is the check to run after any
change to a kernel.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

ARCHS = (80, 90)
# PTX of tensor-core products: Hopper's warpgroup MMA and Ampere-style warp MMA
TENSOR_CORE_PTX = (("wgmma", r"\bwgmma\.mma_async"), ("mma", r"\bmma\.sync"))


@dataclass
class Row:
    kernel: str
    config: str
    arch: str
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    dots: int = 0
    tensor_cores: str = "-"
    seconds: float = 0.0
    error: str = ""

    @property
    def problems(self) -> list[str]:
        out = []
        if self.error:
            out.append(f"compile failed: {self.error}")
        if self.spill_bytes:
            out.append(f"{self.spill_bytes} spill bytes")
        if self.dots and self.tensor_cores == "-":
            out.append(f"{self.dots} tl.dot without tensor-core instructions")
        return out


def _config_text(config) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def _ptxas_resources(ptx: str, arch: int) -> tuple[int, int]:
    """Registers and spill bytes (stores + loads) from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = sm_arch_from_capability(arch)
        run = subprocess.run(
            [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "kernel.o")],
            capture_output=True, text=True, check=True,
        )
    log = run.stderr + run.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def compile_one(spec_index: int, config_index: int, arch: int) -> Row:
    """Compile configuration ``config_index`` of registered spec ``spec_index`` (a worker task)."""
    from .kernels import aot_specs

    spec = aot_specs()[spec_index]
    return compile_spec(spec, spec.configs[config_index], arch)


def compile_spec(spec, config, arch: int) -> Row:
    """Compile one (kernel, configuration, arch) and measure it; failures land in ``Row.error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(spec.name, _config_text(config), f"sm_{arch}" + ("a" if arch >= 90 else ""))
    start = time.perf_counter()
    try:
        signature, constexprs, attrs = spec.compile_args(config)
        src = ASTSource(spec.kernel, signature, constexprs, attrs)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = kernel.asm["ptx"]
        row.dots = len(re.findall(r"\btt\.dot\b", kernel.asm["ttir"]))
        kinds = [name for name, pattern in TENSOR_CORE_PTX if re.search(pattern, ptx)]
        row.tensor_cores = "+".join(kinds) or "-"
        row.shared_bytes = int(kernel.metadata.shared)
        row.registers, row.spill_bytes = _ptxas_resources(ptx, arch)
    except Exception as e:  # reported in the table; --check turns it into a failure
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    row.seconds = time.perf_counter() - start
    return row


def run(archs: Sequence[int] = ARCHS, jobs: Optional[int] = None, only: Sequence[str] = ()) -> list[Row]:
    """Compile every registered kernel configuration for every arch (``jobs`` processes);
    ``only``: substrings of the kernel names to keep (all when empty)."""
    from .kernels import aot_specs

    tasks = [
        (s, c, arch)
        for s, spec in enumerate(aot_specs())
        if not only or any(part in spec.name for part in only)
        for c in range(len(spec.configs))
        for arch in archs
    ]
    jobs = jobs or min(len(tasks), os.cpu_count() or 1)
    if jobs <= 1:
        return [compile_one(*task) for task in tasks]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(compile_one, *task) for task in tasks]
        return [f.result() for f in futures]


def format_table(rows: Sequence[Row]) -> str:
    header = ("kernel", "config", "arch", "regs", "spill B", "smem B", "dots", "tensor cores", "s", "status")
    lines = [header]
    for r in rows:
        lines.append((
            r.kernel, r.config, r.arch,
            "-" if r.registers is None else str(r.registers),
            "-" if r.spill_bytes is None else str(r.spill_bytes),
            "-" if r.shared_bytes is None else str(r.shared_bytes),
            str(r.dots), r.tensor_cores, f"{r.seconds:.1f}",
            "; ".join(r.problems) or "ok",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sst_triton.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a compile failure, a spill, or a tl.dot without tensor cores")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="compute capability to compile for (repeatable; default: 80 and 90)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per core)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="compile only kernels whose name contains NAME (repeatable)")
    args = parser.parse_args(argv)
    # Triton 3.9 warns once per process when FP fusion is left to its default; fusion is
    # what the JIT uses today, so say so (workers inherit it)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    start = time.perf_counter()
    rows = run(tuple(args.arch or ARCHS), args.jobs, args.only)
    print(format_table(rows))
    bad = [r for r in rows if r.problems]
    from .kernels import aot_specs

    for spec in aot_specs():
        if spec.note and (not args.only or any(part in spec.name for part in args.only)):
            print(f"{spec.name}: {spec.note}")
    print(f"{len(rows)} compiles in {time.perf_counter() - start:.1f} s, {len(bad)} with problems")
    if args.check and bad:
        for r in bad:
            print(f"FAIL {r.kernel} [{r.config}] {r.arch}: {'; '.join(r.problems)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
