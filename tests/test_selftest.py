"""``python -m sst_triton.selftest``: the command a lent GPU runs, proven on the CPU first.

The correctness part runs for real in Triton's interpreter (``--quick --backend triton``);
the timing machinery (contenders, failure recording, JSON) runs on tiny CPU shapes with a
wall-clock timer in place of ``triton.testing.do_bench``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from sst_triton import selftest
from sst_triton.kernels import BACKWARD, FORWARD
from sst_triton.patterns import Pattern, dense_mask


def test_quick_selftest_passes_in_the_interpreter(tmp_path):
    path = tmp_path / "selftest.json"
    run = subprocess.run(
        [sys.executable, "-m", "sst_triton.selftest", "--quick", "--backend", "triton", "--json", str(path)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(path.read_text())
    assert data["ok"] is True and data["device"] == "cpu" and data["quick"] is True
    summary = data["correctness_summary"]
    assert summary["cases"] == 2 * len(FORWARD) and summary["passed"] == summary["cases"]
    for row in data["correctness"]:
        assert set(row["errors"]) == {"out", "affinity", "dq", "dk", "dv"}
        assert all(row["errors"][k] <= row["limits"][k] for k in row["errors"])
    assert "passed" in run.stdout
    assert [p for p in os.listdir(tmp_path) if p.startswith(".selftest-")] == []  # atomic write left no temp


def test_full_case_list_covers_every_pattern_option_dtype_and_configuration():
    cases = selftest.correctness_cases(quick=False)
    for kind, launcher in FORWARD.items():
        mine = [c for c in cases if c.kind == kind]
        grid = {(c.option, c.dtype) for c in mine if c.config_name == "first"}
        assert grid == {(o, d) for o in ("plain", "options", "v2") for d in selftest.DTYPES}
        fwd = sys.modules[launcher.__module__]
        bwd = sys.modules[BACKWARD[kind].__module__]
        forced = [c for c in mine if c.config_name.startswith("config")]
        assert {id(c.config) for c in forced} == {id(c) for c in fwd.CONFIGS}
        assert {id(c.config_dq) for c in forced} == {id(c) for c in bwd.CONFIGS_DQ}
        assert {id(c.config_dkdv) for c in forced} == {id(c) for c in bwd.CONFIGS_DKDV}
        assert any(c.config is None for c in mine), "the public API (autotuned on a GPU) is exercised"
    # the version-2 cases: grouped key/value heads, fewer query frames, a dilated local window
    v2 = [c for c in cases if c.option == "v2"]
    assert all(c.shape[1] > c.shape[2] and c.shape[3] < c.shape[4] for c in v2)
    assert any(c.pattern.dilation != (1, 1, 1) for c in v2)


def test_a_wrong_result_fails_its_case(monkeypatch):
    """The check can fail: a reference off by 1e-3 fails a float32 case (limit 1e-4)."""
    import sst_triton.reference as reference

    real = reference.reference_attention

    def off(*args, **kwargs):
        out, aff = real(*args, **kwargs)
        return out * (1 + 1e-3), aff

    case = next(c for c in selftest.correctness_cases(quick=True) if c.kind == "strided" and c.dtype == "fp32")
    assert selftest.run_case(case, torch.device("cpu"))["ok"]
    monkeypatch.setattr(reference, "reference_attention", off)
    result = selftest.run_case(case, torch.device("cpu"))
    assert not result["ok"] and "out" in result["failed"]


def test_timings_record_every_row_and_survive_a_failing_contender(tmp_path, monkeypatch):
    report = selftest.Report(str(tmp_path / "t.json"), budget_s=300)
    bench = selftest.Bench("tiny", Pattern.strided((1, 2, 2)), B=1, N=2, T=2, H=3, W=4, D=16, num_objects=2)
    real = selftest._contenders

    def contenders(b, device):
        out = real(b, device)

        def broken(backward):
            raise RuntimeError("boom")
        out["sdpa_flash_dense"] = broken
        return out

    monkeypatch.setattr(selftest, "_contenders", contenders)
    rows = selftest.timings(report, torch.device("cpu"), [bench], impls=("sst_triton", "sdpa_flash_dense",
                                                                          "sdpa_masked"))
    assert [(r["impl"], r["passes"]) for r in rows] == [
        (i, p) for i in ("sst_triton", "sdpa_flash_dense", "sdpa_masked") for p in ("fwd", "fwd+bwd")]
    for r in rows:
        if r["impl"] == "sdpa_flash_dense":
            assert "boom" in r["error"]
        else:
            assert r["ms"] > 0 and r["useful_tflops"] > 0 and 0 < r["fraction_hbm"] and "time_over_ours" in r
        if r["impl"] == "sdpa_masked" and r["passes"] == "fwd":
            # the masked baseline computes the same pattern: it agrees with our output
            assert r["agrees_with_ours"] and r["max_abs_diff_vs_ours"] < 5e-2
    saved = json.loads((tmp_path / "t.json").read_text())
    assert len(saved["timings"]) == len(rows)
    # the figures rest on the pattern's useful pairs and compulsory bytes
    assert selftest.useful_pairs(bench) == 2 * int(dense_mask(bench.pattern, 2, 3, 4).sum())
    assert rows[0]["compulsory_bytes"] < rows[1]["compulsory_bytes"]


def test_benchmarks_are_the_issue_shapes():
    names = {b.name: b for b in selftest.benchmarks()}
    sst = [b for b in names.values() if b.name.startswith("SST")]
    assert {b.pattern.kind for b in sst} == {"local", "strided", "grid"}
    assert all((b.B, b.N, b.T, b.H, b.W, b.D, b.num_objects) == (1, 8, 4, 60, 107, 32, 3) for b in sst)
    diffusion = next(b for b in names.values() if b.name.startswith("diffusion"))
    assert (diffusion.N, diffusion.T, diffusion.H, diffusion.W, diffusion.D) == (24, 30, 48, 80, 128)
    assert diffusion.pattern.kernel_size == (19, 25, 25) and diffusion.num_objects == 0
    assert any(b.T_q == 1 for b in names.values()) and any(b.N_kv == b.N // 4 for b in names.values())
