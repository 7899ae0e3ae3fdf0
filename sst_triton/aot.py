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
import copy
import hashlib
import json
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


# per SM: registers, and shared memory by arch (H100/H200: 228 KB, A100: 164 KB)
REGISTERS_PER_SM = 65536
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
MAX_REGISTERS_AT_8_WARPS = 168
AOT_HEAD_DIMS = (32, 64, 128)
OPTION_FLAGS = ("CAUSAL", "CAUSAL_AFF", "SHIFT")


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
    num_warps: int = 4
    cached: bool = False

    @property
    def ctas_per_sm(self) -> Optional[int]:
        """CTAs per SM that registers and shared memory allow."""
        if self.registers is None:
            return None
        by_regs = REGISTERS_PER_SM // max(1, self.registers * self.num_warps * 32)
        arch = 90 if self.arch.startswith("sm_9") else 80
        by_smem = SHARED_PER_SM[arch] // self.shared_bytes if self.shared_bytes else by_regs
        return min(by_regs, by_smem)

    @property
    def warnings(self) -> list[str]:
        out = []
        if self.registers is not None and self.num_warps >= 8 and self.registers > MAX_REGISTERS_AT_8_WARPS:
            out.append(f"{self.registers} registers at {self.num_warps} warps (> {MAX_REGISTERS_AT_8_WARPS})")
        if self.arch == "sm_90a" and self.dots and "wgmma" not in self.tensor_cores and self.tensor_cores != "-":
            out.append("sm_90a products on mma.sync, not wgmma")
        if self.ctas_per_sm == 0:
            out.append("does not fit an SM")
        return out

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


# ---------------------------------------------------------------------------------------
# Coverage: every kernel at every head dim, in two option sets
# ---------------------------------------------------------------------------------------


def registered_specs() -> list:
    """Every spec the kernel modules register, flattened (a module may nest lists)."""
    from .kernels import aot_specs

    out = []

    def add(item):
        if isinstance(item, (list, tuple)):
            for x in item:
                add(x)
        else:
            out.append(item)

    add(aot_specs())
    return out


def _head_dim(spec) -> int:
    return int(spec.constexprs.get("BLOCK_D", spec.scalars.get("D", 64)))


def _base_name(spec) -> str:
    return re.sub(r"\[d\d+\]|/flip$", "", spec.name)


def _allowed_configs(spec, block_d: int) -> list:
    """The configurations the kernel's autotuner keeps at ``block_d`` (its pruner, if any);
    the spec's own list when the kernel has no autotuner next to it."""
    import sys as _sys

    module = _sys.modules.get(spec.kernel.fn.__module__)
    tuned = getattr(module, spec.kernel.fn.__name__ + "_tuned", None)
    configs = list(getattr(tuned, "configs", None) or spec.configs)
    prune = getattr(tuned, "early_config_prune", None)
    if prune is not None:
        try:
            return list(prune(configs, {}, BLOCK_D=block_d))
        except Exception:
            return list(spec.configs)
    return configs


def _at_head_dim(spec, d: int):
    """``spec`` cloned at head dim ``d`` (strides scale with ``D``)."""
    old = _head_dim(spec)
    clone = copy.copy(spec)
    clone.scalars = dict(spec.scalars)
    for key, value in spec.scalars.items():
        if re.fullmatch(r"s[a-z]+_[bnthw]", key) and isinstance(value, int):
            clone.scalars[key] = value // old * d
    if "D" in clone.scalars:
        clone.scalars["D"] = d
    clone.constexprs = {**spec.constexprs, "BLOCK_D": d}
    clone.configs = _allowed_configs(spec, d)
    clone.name = f"{_base_name(spec)}[d{d}]"
    clone.note = re.sub(r"\b(\d+), (\d+), (\d+), (\d+), (\d+), \d+\)", rf"\1, \2, \3, \4, \5, {d})", spec.note)
    return clone


def _flipped(spec):
    """``spec`` with every option flag negated, no objects, the other GROUP and T_Q."""
    clone = copy.copy(spec)
    clone.constexprs = dict(spec.constexprs)
    clone.scalars = dict(spec.scalars)
    changes = []
    for flag in OPTION_FLAGS:
        if flag in clone.constexprs:
            clone.constexprs[flag] = not clone.constexprs[flag]
            changes.append(f"{flag}={clone.constexprs[flag]}")
    if clone.constexprs.get("NUM_OBJ"):
        clone.constexprs["NUM_OBJ"] = 0
        changes.append("no objects")
    if "GROUP" in clone.scalars:
        clone.scalars["GROUP"] = 2 if clone.scalars["GROUP"] == 1 else 1
        changes.append(f"GROUP={clone.scalars['GROUP']}")
    if "T_Q" in clone.scalars and "T" in clone.scalars:
        clone.scalars["T_Q"] = 1 if clone.scalars["T_Q"] == clone.scalars["T"] else clone.scalars["T"]
        changes.append(f"T_Q={clone.scalars['T_Q']}")
    if not changes:
        return None
    clone.name = spec.name + "/flip"
    clone.note = f"{spec.note}; flipped: {', '.join(changes)}"
    return clone


def coverage_specs() -> list:
    """The registered specs, completed to :data:`AOT_HEAD_DIMS` per kernel, each with its
    flipped option set (see the module docstring). Deterministic order."""
    specs = registered_specs()
    by_kernel: dict[str, list] = {}
    for spec in specs:
        by_kernel.setdefault(_base_name(spec), []).append(spec)
    out = []
    for name, given in by_kernel.items():
        dims = {_head_dim(s) for s in given}
        complete = list(given)
        for d in AOT_HEAD_DIMS:
            if d not in dims:
                nearest = min(given, key=lambda s: abs(_head_dim(s) - d))
                complete.append(_at_head_dim(nearest, d))
        complete.sort(key=_head_dim)
        for spec in complete:
            out.append(spec)
            flipped = _flipped(spec)
            if flipped is not None:
                out.append(flipped)
    return out


def compile_one(spec_index: int, config_index: int, arch: int, use_cache: bool = True) -> Row:
    """Compile configuration ``config_index`` of coverage spec ``spec_index`` (a worker task)."""
    spec = coverage_specs()[spec_index]
    config = spec.configs[config_index]
    key = _cache_key(spec, config, arch) if use_cache else None
    if key is not None:
        row = _cache_load(key, spec.name)
        if row is not None:
            return row
    row = compile_spec(spec, config, arch)
    if key is not None and not row.error:
        _cache_store(key, row)
    return row


def _cache_dir() -> str:
    return os.environ.get("SST_AOT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sst_triton", "aot")


def _cache_key(spec, config, arch: int) -> Optional[str]:
    try:
        import triton

        signature, constexprs, attrs = spec.compile_args(config)
        text = json.dumps([
            spec.kernel.cache_key, signature, {k: repr(v) for k, v in sorted(constexprs.items())},
            sorted((repr(k), repr(v)) for k, v in attrs.items()), _config_text(config), config.num_warps,
            config.num_stages, arch, triton.__version__, os.environ.get("TRITON_DEFAULT_FP_FUSION", ""),
        ], sort_keys=True, default=repr)
    except Exception:
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _cache_load(key: str, name: str) -> Optional[Row]:
    try:
        with open(os.path.join(_cache_dir(), key + ".json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    data.update(kernel=name, cached=True)
    try:
        return Row(**data)
    except TypeError:
        return None


def _cache_store(key: str, row: Row) -> None:
    try:
        os.makedirs(_cache_dir(), exist_ok=True)
        data = {f: getattr(row, f) for f in Row.__dataclass_fields__ if f != "cached"}
        tmp = os.path.join(_cache_dir(), f".{key}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, os.path.join(_cache_dir(), key + ".json"))
    except OSError:
        pass


def compile_spec(spec, config, arch: int) -> Row:
    """Compile one (kernel, configuration, arch) and measure it; failures land in ``Row.error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(spec.name, _config_text(config), f"sm_{arch}" + ("a" if arch >= 90 else ""), num_warps=config.num_warps)
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


def run(archs: Sequence[int] = ARCHS, jobs: Optional[int] = None, only: Sequence[str] = (),
        use_cache: bool = True) -> list[Row]:
    """Compile every coverage configuration for every arch (``jobs`` processes);
    ``only``: substrings of the kernel names to keep (all when empty)."""
    tasks = [
        (s, c, arch, use_cache)
        for s, spec in enumerate(coverage_specs())
        if not only or any(part in spec.name for part in only)
        for c in range(len(spec.configs))
        for arch in archs
    ]
    jobs = jobs or min(len(tasks), os.cpu_count() or 1)
    if jobs <= 1 or not tasks:
        return [compile_one(*task) for task in tasks]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(compile_one, *task) for task in tasks]
        return [f.result() for f in futures]


def format_table(rows: Sequence[Row]) -> str:
    header = ("kernel", "config", "arch", "regs", "regs x thr", "CTA/SM", "spill B", "smem B", "dots",
              "tensor cores", "s", "status")
    lines = [header]
    for r in rows:
        lines.append((
            r.kernel, r.config, r.arch,
            "-" if r.registers is None else str(r.registers),
            "-" if r.registers is None else f"{r.registers}x{32 * r.num_warps}",
            "-" if r.ctas_per_sm is None else str(r.ctas_per_sm),
            "-" if r.spill_bytes is None else str(r.spill_bytes),
            "-" if r.shared_bytes is None else str(r.shared_bytes),
            str(r.dots), r.tensor_cores, "cached" if r.cached else f"{r.seconds:.1f}",
            "; ".join(r.problems) or "ok",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def summary(rows: Sequence[Row], seconds: float) -> str:
    """Counts of compiles, spills, failures and warnings, with each warning spelled out."""
    spills = [r for r in rows if r.spill_bytes]
    failed = [r for r in rows if r.error]
    warned = [r for r in rows if r.warnings]
    dims = sorted({int(m) for r in rows for m in re.findall(r"\[d(\d+)\]", r.kernel)})
    hopper = [r for r in rows if r.arch == "sm_90a" and r.dots]
    lines = [f"WARN {r.kernel} [{r.config}] {r.arch}: {'; '.join(r.warnings)}" for r in warned]
    lines.append(
        f"{len(rows)} compiles ({sum(r.cached for r in rows)} cached) in {seconds:.1f} s, head dims {dims}: "
        f"{len(spills)} spilling, {len(failed)} failed, {len(warned)} with warnings; sm_90a: "
        f"{sum('wgmma' in r.tensor_cores for r in hopper)} wgmma, "
        f"{sum('wgmma' not in r.tensor_cores and r.tensor_cores != '-' for r in hopper)} mma.sync only; "
        f"{len([r for r in rows if r.problems])} with problems"
    )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sst_triton.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a compile failure, a spill, or a tl.dot without tensor cores")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="compute capability to compile for (repeatable; default: 80 and 90)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per core)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="compile only kernels whose name contains NAME (repeatable)")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything (ignore $SST_AOT_CACHE)")
    args = parser.parse_args(argv)
    # Triton 3.9 warns once per process when FP fusion is left to its default; fusion is
    # what the JIT uses today, so say so (workers inherit it)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    start = time.perf_counter()
    rows = run(tuple(args.arch or ARCHS), args.jobs, args.only, use_cache=not args.no_cache)
    print(format_table(rows))
    bad = [r for r in rows if r.problems]
    for spec in coverage_specs():
        if spec.note and (not args.only or any(part in spec.name for part in args.only)):
            print(f"{spec.name}: {spec.note}")
    print(summary(rows, time.perf_counter() - start))
    if args.check and bad:
        for r in bad:
            print(f"FAIL {r.kernel} [{r.config}] {r.arch}: {'; '.join(r.problems)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
