"""The benchmark script runs end to end (``--quick``) so it cannot rot, and its pieces are sound."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import masked_ce as bm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.masked_ce", "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, cwd=str(REPO), timeout=240,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p.stdout


def test_quick_writes_table_csv_and_plots(quick_run):
    out, stdout = quick_run
    csvs = list(out.glob("*.csv"))
    assert len(csvs) == 1 and csvs[0].stem.endswith("-quick")
    rows = list(csv.DictReader(open(csvs[0])))
    assert {"device", "torch", "loadavg_start", "shape", "dtype", "method", "fwd_s", "bwd_s",
            "total_s", "peak_mb", "ratio_floor"} <= set(rows[0])
    by = {(r["shape"], r["scenario"], r["method"]): r for r in rows}
    for shape in bm.QUICK_SHAPES:
        for method in ("gemm-floor", "xtf-torch", "eager"):
            r = by[(shape, "plain", method)]
            assert r["note"] == "" and float(r["total_s"]) > 0 and float(r["fwd_s"]) > 0
            assert float(r["peak_mb"]) >= 0
        assert float(by[(shape, "plain", "gemm-floor")]["ratio_floor"]) == pytest.approx(1.0)
        # the XTF step keeps about half of the scored rows
        step = [r for k, r in by.items() if k[0] == shape and k[1] == "xtf-step" and k[2].startswith("xtf-")]
        assert step and all(r["note"] == "" for r in step)
        scored = int(by[(shape, "plain", "gemm-floor")]["kept_rows"])
        assert abs(int(step[0]["kept_rows"]) - scored / 2) <= 1
    # Liger is GPU-only: reported as skipped with the reason, never faked
    liger = by[("Q1", "plain", "liger")]
    assert liger["note"].startswith("skipped:") and liger["total_s"] == ""
    assert list(out.glob("*_plain.png")) and list(out.glob("*_scenarios.png"))
    assert "gemm-floor" in stdout and "xtf-" in stdout
    # gradient filtering (peaked Q2 only): timed, with its report in the grad_filter column
    gf = [r for k, r in by.items() if "+gf-" in k[2]]
    assert {r["shape"] for r in gf} == {"Q2"} and {r["scenario"] for r in gf} == {"plain", "xtf-step"}
    for r in gf:
        assert r["note"] == "" and float(r["total_s"]) > 0 and "dX rel err" in r["grad_filter"], r
    assert all(r["grad_filter"] == "" for r in rows if "+gf-" not in r["method"])
    assert list(out.glob("*_gradfilter.png"))


def test_plan_covers_every_scenario():
    cases = bm.plan([bm.QUICK_SHAPES["Q1"]], "cpu", 2)
    scen = {(c.scenario, c.method) for c in cases}
    assert ("plain", "gemm-floor") in scen and ("plain", "xtf-torch") in scen
    for s in bm.SCENARIOS_XTF:
        assert any(c.scenario == s and c.method.startswith("xtf-") for c in cases)
    for p in bm.PLAIN_PEERS:
        assert ("plain", p) in scen and ("xtf-step", f"compose-{p}") in scen


def test_grad_filter_methods_on_peaked_shapes_only():
    cases = bm.plan([bm.QUICK_SHAPES["Q1"], bm.QUICK_SHAPES["Q2"]], "cpu", 2)
    gf = {(c.shape.name, c.scenario, c.method.split("+")[1]) for c in cases if "+gf-" in c.method}
    assert gf == {("Q2", s, v) for s in bm.SCENARIOS_GRAD_FILTER for v in bm.GRAD_FILTERS}
    assert bm.grad_filter_of("gf-auto") == "auto"
    assert bm.grad_filter_of("gf-1e-2").max_skipped == pytest.approx(1e-2)
    for bad in ("gf-x", "gf--1", "filter"):
        with pytest.raises(ValueError, match="gradient-filter variant"):
            bm.grad_filter_of(bad)


def test_filter_report_measures_skipped_work_and_error():
    """On peaked bf16 logits "auto" skips most of the dX / dW work (and a real share of the
    mass: a dX error far above rounding); the report's numbers agree with each other."""
    from benchmarks.masked_ce.gradfilter import describe, filter_report

    shape = bm.Shape("P", 256, 256, 32000, "bfloat16")
    reps = {}
    for variant in ("gf-auto", "gf-1e-2"):
        inputs, _, _ = bm.build(bm.Case(shape, "plain", f"xtf-torch+{variant}"), "cpu")
        reps[variant] = filter_report(inputs, ("P", "plain"), {})
    auto, bound = reps["gf-auto"], reps["gf-1e-2"]
    assert auto["work_skipped"] > 0.5 and auto["dense_rows"] == 0.0
    assert auto["skipped_mean"] > 1e-2 and auto["dx_rel_err"] > 1e-2
    assert bound["skipped_max"] <= 1e-2 * (1 + 1e-3) and bound["dx_rel_err"] < auto["dx_rel_err"]
    assert "GEMM work skipped" in describe(auto)


def test_ratios_scale_the_floor_to_kept_rows():
    mk = lambda m, kept, t: bm.Result("S", 10, 4, 8, "float32", "plain", m, kept_rows=kept, total_s=t)
    rs = [mk("gemm-floor", 100, 2.0), mk("a", 100, 3.0), mk("b", 50, 1.5)]
    bm.add_ratios(rs)
    assert rs[1].extra["ratio_floor"] == pytest.approx(1.5)
    assert rs[2].extra["floor_s"] == pytest.approx(1.0) and rs[2].extra["ratio_floor"] == pytest.approx(1.5)


def test_the_fp32_floor_is_the_reference_when_the_half_floor_is_not_run():
    mk = lambda m, t: bm.Result("S", 10, 4, 8, "bfloat16", "plain", m, kept_rows=100, total_s=t)
    rs = [mk("gemm-floor-fp32", 2.0), mk("a", 1.0)]
    bm.add_ratios(rs)
    assert rs[1].extra["ratio_floor"] == pytest.approx(0.5)
    rs = [mk("gemm-floor-fp32", 2.0), mk("gemm-floor", 4.0), mk("a", 1.0)]
    bm.add_ratios(rs)
    assert rs[2].extra["ratio_floor"] == pytest.approx(0.25)
    planned = {c.method for c in bm.plan([bm.QUICK_SHAPES["Q1"], bm.QUICK_SHAPES["Q2"]], "cpu", 2)
               if c.shape.name == "Q2"}
    assert {"gemm-floor", "gemm-floor-fp32"} <= planned


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bm.main(["--shapes", "nope", "--quick"])
    with pytest.raises(SystemExit):
        bm.main(["--reps", "0", "--quick"])


def test_interleaved_ratios_are_medians_of_same_round_ratios(monkeypatch):
    """--interleave: a load spike in one round moves every method's time in that round, and the
    ratio to the floor is the median of the per-round ratios, not a ratio of medians."""
    import importlib

    ms = importlib.import_module("benchmarks.masked_ce.measure")

    shape = bm.Shape("T", 10, 4, 8, "float32")
    cases = [bm.Case(shape, "plain", m, 3) for m in ("gemm-floor", "a")]
    monkeypatch.setattr(ms, "build", lambda case, device: ({"h": None, "w": None}, case.method, 10))
    clock = iter([1.0, 2.0,  # warm-up: floor, a
                  1.0, 3.0, 4.0, 8.0, 3.0, 3.3])  # rounds: (floor, a) x 3 under a changing load
    monkeypatch.setattr(ms, "_step", lambda fwd, h, w, cuda: (next(clock), 0.0))
    res = ms.measure_interleaved(cases, "cpu", rounds=3)
    bm.add_ratios(res)
    assert [r.reps for r in res] == [3, 3] and res[1].note == "interleaved"
    assert res[1].extra["ratio_floor"] == pytest.approx(2.0)  # per round 3.0, 2.0, 1.1
    assert res[0].total_s == pytest.approx(3.0) and res[1].total_s == pytest.approx(3.3)


def test_row_kernel_benchmark_writes_every_path(tmp_path):
    """``benchmarks.row_kernel_cpu`` on a tiny chunk: one CSV row per code path, thread count and
    mode, positive times, and the plot; a bad size is refused by name."""
    import xtf_kernels

    if not xtf_kernels.backend_status().get("native", (False, ""))[0]:
        pytest.skip("native backend unavailable")
    from benchmarks import row_kernel_cpu
    from xtf_kernels._native_build import available_isas

    assert row_kernel_cpu.main(["--rows", "8", "--vocab", "301", "--reps", "2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("row-kernel-*.csv")
    rows = list(csv.DictReader(open(path)))
    assert {r["isa"] for r in rows} == set(available_isas())
    assert {r["mode"] for r in rows} == {"stats", "stats+grad"}
    assert all(float(r["ns_per_logit"]) > 0 for r in rows)
    assert path.with_suffix(".png").is_file()
    with pytest.raises(SystemExit):
        row_kernel_cpu.main(["--vocab", "0"])


def test_chunk_variant_on_cpu_fp32_shapes_only():
    """``+ce-vd`` (chunk_elems = V * D) is planned for the CPU's fp32 shapes, plain scenario,
    and means what it says; a bad variant is refused by name."""
    cases = bm.plan([bm.QUICK_SHAPES["Q1"], bm.QUICK_SHAPES["Q2"]], "cpu", 2)
    ce = {(c.shape.name, c.scenario, c.method.split("+")[1]) for c in cases if "+ce-" in c.method}
    assert ce == {("Q1", "plain", v) for v in bm.CHUNK_VARIANTS}
    q1 = bm.QUICK_SHAPES["Q1"]
    assert bm.chunk_elems_of("ce-vd", q1) == q1.V * q1.D and bm.chunk_elems_of("ce-4096", q1) == 4096
    for bad in ("ce-0", "ce-x", "ce--5"):
        with pytest.raises(ValueError, match="chunk variant"):
            bm.chunk_elems_of(bad, q1)


def _interleaved_rounds(monkeypatch, clock_values, kept):
    """measure_interleaved on stub cases ``gemm-floor`` and ``a`` (``kept`` rows each), the
    stub clock giving each (case, round) its seconds."""
    import importlib

    ms = importlib.import_module("benchmarks.masked_ce.measure")
    shape = bm.Shape("T", 10, 4, 8, "float32")
    cases = [bm.Case(shape, "plain", m, 3) for m in ("gemm-floor", "a")]
    monkeypatch.setattr(ms, "build", lambda case, device: ({"h": None, "w": None}, case.method, kept[case.method]))
    clock = iter(clock_values)
    monkeypatch.setattr(ms, "_step", lambda fwd, h, w, cuda: (next(clock), 0.0))
    res = ms.measure_interleaved(cases, "cpu", rounds=3)
    bm.add_ratios(res)
    return res


def test_rounds_csv_and_pooling_over_runs(monkeypatch, tmp_path, capsys):
    """An interleaved run writes every round (the same round's floor scaled to the case's kept
    rows); ``benchmarks.pool_rounds`` pools the ratios of several runs into one median with a
    bootstrap interval and each run's own median; bad files are refused by name."""
    import csv as _csv

    from benchmarks import pool_rounds
    from benchmarks.masked_ce.report import write_rounds_csv

    meta = {"device": "t", "torch": "x", "xtf_kernels": "y", "threads": 2}
    # run 1: 'a' keeps half the floor's rows; per round ratios 3.0/0.5, 2.0/0.5, 1.1/0.5
    r1 = _interleaved_rounds(monkeypatch, [1.0, 1.0, 1.0, 1.5, 4.0, 4.0, 3.0, 1.65], {"gemm-floor": 10, "a": 5})
    assert write_rounds_csv(r1, tmp_path / "r1-rounds.csv", meta) == 6
    rows = list(_csv.DictReader(open(tmp_path / "r1-rounds.csv")))
    a = [r for r in rows if r["method"] == "a"]
    assert [float(r["floor_s"]) for r in a] == pytest.approx([0.5, 2.0, 1.5])
    assert [float(r["ratio_floor"]) for r in a] == pytest.approx([3.0, 2.0, 1.1])
    assert r1[1].extra["ratio_floor"] == pytest.approx(2.0)  # the run's own median agrees
    # run 2: ratios 1.0, 1.0, 1.0
    r2 = _interleaved_rounds(monkeypatch, [1.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0], {"gemm-floor": 10, "a": 5})
    write_rounds_csv(r2, tmp_path / "r2-rounds.csv", meta)

    out = tmp_path / "pooled"
    assert pool_rounds.main([str(tmp_path / "r1-rounds.csv"), str(tmp_path / "r2-rounds.csv"),
                             "--out", str(out), "--name", "p", "--target", "1.5"]) == 0
    (row,) = list(_csv.DictReader(open(out / "p.csv")))  # the reference floor is left out
    assert row["method"] == "a" and int(row["rounds"]) == 6 and int(row["runs"]) == 2
    assert float(row["median"]) == pytest.approx(1.05)  # median of 1, 1, 1, 1.1, 2.0, 3.0
    assert float(row["ci_lo"]) <= float(row["median"]) <= float(row["ci_hi"])
    assert row["run_medians"] == "2.000 1.000"
    assert row["meets_target"] == str(float(row["ci_hi"]) <= 1.5)
    assert (out / "p.png").is_file()

    (tmp_path / "plain.csv").write_text("shape,method\nS1,x\n")
    for bad, msg in ([str(tmp_path / "nope.csv")], "no such file"), \
                    ([str(tmp_path / "plain.csv")], "not a rounds CSV"), \
                    ([str(tmp_path / "r1-rounds.csv")] * 2, "more than once"), \
                    ([str(tmp_path / "r1-rounds.csv"), "--target", "0"], "--target"):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            pool_rounds.main([*bad, "--out", str(out)])
        assert msg in capsys.readouterr().err
