"""``python -m sst_triton.aot --check``: every kernel configuration compiles for sm_80 and
sm_90a with no GPU, without spills, with tensor-core instructions wherever ``tl.dot`` is used,
at head dims 32, 64 and 128, with and without objects, with every option flag both ways.

The full check compiles a few hundred kernels; results are cached by content
(``$SST_AOT_CACHE``), so a rerun recompiles only the kernels that changed."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl

from sst_triton import aot
from sst_triton.kernels import KERNEL_MODULES
from sst_triton.kernels._common import AotSpec


def test_aot_check_passes_for_every_registered_configuration():
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "sst_triton.aot", "--check"], capture_output=True, text=True, env=env, timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    for spec in aot.coverage_specs():
        for config in spec.configs:
            for arch in ("sm_80", "sm_90a"):
                hits = [
                    r for r in rows
                    if r and r[0] == spec.name and arch in r and " ".join(r).find(aot._config_text(config)) >= 0
                ]
                assert len(hits) == 1, f"no row for {spec.name} [{aot._config_text(config)}] {arch}"
                assert hits[0][-1] == "ok", " ".join(hits[0])
    # a dot kernel reports tensor cores on Hopper as wgmma or mma
    assert any("wgmma" in r for r in rows)


@pytest.mark.parametrize("module_name", [m for m in KERNEL_MODULES if m.endswith("_fwd")])
def test_aot_specs_cover_every_config_the_autotuner_may_pick(module_name):
    """For each checked head dim, the AOT spec lists exactly what the autotuner keeps."""
    module = importlib.import_module(f"sst_triton.kernels.{module_name}")
    tuned = getattr(module, f"{module_name}_tuned")
    assert list(tuned.configs) == list(module.CONFIGS)
    # every configuration is benchmarked by the autotuner on a GPU's first call (selftest budget)
    assert len(module.CONFIGS) <= 6
    prune = tuned.early_config_prune
    for spec in module.AOT_SPECS:
        block_d = spec.constexprs["BLOCK_D"]
        # a module with several kernels of their own configurations (grid: two passes, or a
        # single pass) prunes each kernel's own list
        own = list(getattr(module, spec.kernel.fn.__name__ + "_tuned", tuned).configs)
        kept = prune(own, {}, BLOCK_D=block_d)
        assert [aot._config_text(c) for c in kept] == [aot._config_text(c) for c in spec.configs]
        # the interpreter's configuration is one the GPU may run too
        if module.CONFIGS[0] in own:
            assert aot._config_text(module.CONFIGS[0]) in [aot._config_text(c) for c in spec.configs]
        for config in spec.configs:
            blocks = [v for k, v in config.kwargs.items() if k.startswith("BLOCK")]
            assert min(blocks) >= 16, "tl.dot needs blocks of at least 16"


def test_coverage_spans_head_dims_options_and_objects_for_every_kernel():
    specs = aot.coverage_specs()
    kernels = {aot._base_name(s) for s in aot.registered_specs()}
    assert kernels == {aot._base_name(s) for s in specs}
    for kernel in kernels:
        mine = [s for s in specs if aot._base_name(s) == kernel]
        assert {aot._head_dim(s) for s in mine} == set(aot.AOT_HEAD_DIMS), kernel
        for d in aot.AOT_HEAD_DIMS:
            at_d = [s for s in mine if aot._head_dim(s) == d]
            assert {bool(s.constexprs.get("NUM_OBJ")) for s in at_d} == {True, False}, (kernel, d)
            for flag in aot.OPTION_FLAGS:
                if flag in at_d[0].constexprs:
                    assert {s.constexprs[flag] for s in at_d} == {True, False}, (kernel, d, flag)
            for s in at_d:
                # grid's single pass fits the registers at small head dims only: its launcher
                # never runs it where its pruner keeps nothing
                if aot._base_name(s) == "grid_fwd_tiles" and d > 32:
                    assert not s.configs, s.name
                    continue
                assert s.configs, f"{s.name}: no configuration left at head dim {d}"
                # the signature is complete: every runtime argument has a type or a value
                s.compile_args(s.configs[0])
                assert s.scalars.get("D", d) == d


def test_occupancy_flags_and_summary():
    heavy = aot.Row("k", "c", "sm_90a", registers=200, spill_bytes=0, shared_bytes=1024, dots=2,
                    tensor_cores="wgmma", num_warps=8)
    assert heavy.ctas_per_sm == 1 and any("> 168" in w for w in heavy.warnings) and not heavy.problems
    small = aot.Row("k", "c", "sm_90a", registers=96, spill_bytes=0, shared_bytes=100 * 1024, dots=2,
                    tensor_cores="mma", num_warps=4)
    assert small.ctas_per_sm == 2  # shared memory, not registers, bounds it
    assert any("mma.sync" in w for w in small.warnings)
    text = aot.summary([heavy, small], 1.0)
    assert "WARN k" in text and "2 with warnings" in text and "0 spilling" in text


def test_results_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("SST_AOT_CACHE", str(tmp_path))
    spec = AotSpec(
        name="fp32_ieee_dot", kernel=_fp32_ieee_dot, pointers=dict(A="*fp32", B="*fp32", C="*fp32"),
        scalars={}, constexprs=dict(BLOCK=32), configs=[triton.Config({}, num_warps=4, num_stages=1)],
    )
    key = aot._cache_key(spec, spec.configs[0], 90)
    assert key and key != aot._cache_key(spec, spec.configs[0], 80)
    assert aot._cache_load(key, spec.name) is None
    row = aot.Row(spec.name, "c", "sm_90a", registers=40, spill_bytes=0, shared_bytes=0, dots=1,
                  tensor_cores="-", num_warps=4)
    aot._cache_store(key, row)
    again = aot._cache_load(key, "renamed")
    assert again.cached and again.kernel == "renamed" and again.registers == 40


@triton.jit
def _fp32_ieee_dot(A, B, C, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(A + offs[:, None] * BLOCK + offs[None, :])
    b = tl.load(B + offs[:, None] * BLOCK + offs[None, :])
    tl.store(C + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, b, input_precision="ieee"))


def test_check_flags_a_dot_without_tensor_cores():
    """IEEE float32 dot runs on FMA units: the check must call that out, so it can fail."""
    spec = AotSpec(
        name="fp32_ieee_dot", kernel=_fp32_ieee_dot, pointers=dict(A="*fp32", B="*fp32", C="*fp32"),
        scalars={}, constexprs=dict(BLOCK=32), configs=[triton.Config({}, num_warps=4, num_stages=1)],
    )
    row = aot.compile_spec(spec, spec.configs[0], 90)
    assert not row.error and row.registers and row.spill_bytes == 0
    assert row.dots == 1 and row.tensor_cores == "-"
    assert any("without tensor-core" in p for p in row.problems)
    assert "without tensor-core" in aot.format_table([row])


def test_check_reports_compile_failures():
    spec = AotSpec(
        name="bf16_dot", kernel=_fp32_ieee_dot, pointers=dict(A="*bf16", B="*bf16", C="*fp32"),
        scalars={}, constexprs=dict(BLOCK=8), configs=[triton.Config({}, num_warps=4, num_stages=1)],
    )
    row = aot.compile_spec(spec, spec.configs[0], 80)  # a bf16 tl.dot needs blocks of at least 16
    assert row.error and any("compile failed" in p for p in row.problems)
