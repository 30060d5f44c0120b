"""The one-call GPU session (``benchmarks/gpu_session.sh``): its dry run goes through every step
on the CPU within the device's file limit, and the pieces that bound its time hold."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_session as gs
from benchmarks.masked_ce import cli as bm_cli
from benchmarks.masked_ce.measure import run_group
from benchmarks.masked_ce.report import read_csv, write_csv
from benchmarks.masked_ce.shapes import (
    GPU_SHAPES,
    QUICK_SHAPES,
    Case,
    Result,
    _generate,
    make_inputs,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_session")
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_session.sh"), str(out), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=300,
    )
    return out, proc, time.monotonic() - t0


def test_dry_run_runs_every_step_within_the_file_limit(dry_run):
    out, proc, wall = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= gs.MAX_FILES, files
    logs = [f for f in files if f.startswith("gpu_session_") and f.endswith(".log")]
    assert len(logs) == 1, files
    log = (out / logs[0]).read_text()
    for name in gs.BUDGETS:
        assert f"== step {name}: ok" in log or f"== step {name}: skipped" in log, name
    assert "== step tests: ok" in log and " passed" in log
    dev = logs[0][len("gpu_session_") : -len(".log")]
    rows = read_csv(out / f"{dev}.csv")  # both shapes' rows, merged under the device's name
    assert {r.shape for r in rows} == {"Q1", "Q2"}
    assert any(r.method.endswith("+gf-auto") and r.total_s for r in rows)
    assert {"gemm-floor", "eager"} <= {r.method for r in rows if r.total_s}
    assert (out / "score_throughput_cpu.csv").is_file()
    assert wall < 240, f"the dry run took {wall:.0f} s"


def test_plots_are_drawn_from_the_csv_afterwards(dry_run, tmp_path):
    out, proc, _ = dry_run
    assert proc.returncode == 0
    csvs = [p for p in out.glob("*.csv") if not p.name.startswith("score_")]
    assert gs.main([str(tmp_path), "--plot", str(csvs[0])]) == 0
    assert {p.name for p in tmp_path.glob("*.png")} >= {
        f"{csvs[0].stem}_plain.png",
        f"{csvs[0].stem}_scenarios.png",
    }


def test_budgets_keep_the_worst_case_under_nine_minutes():
    assert sum(gs.BUDGETS.values()) < 9 * 60
    assert list(gs.BUDGETS) == ["wheels", "env", "tests", *gs.SHAPES, "score"]


def test_gpu_plan_has_every_method_and_the_cuda_tests(tmp_path):
    steps = {s.name: s for s in gs.plan_steps(False, tmp_path, tmp_path / "site")}
    assert list(steps) == list(gs.BUDGETS)
    for name, (shape, _) in gs.SHAPES.items():
        cmd = steps[name].cmds[0]
        assert cmd[cmd.index("--shapes") + 1] == shape and "cuda" in cmd and "--quick" not in cmd
        methods = cmd[cmd.index("--methods") + 1].split(",")
        assert {
            "gemm-floor",
            "xtf-triton",
            "xtf-triton+gf-auto",
            "cce",
            "cce-exact",
            "liger",
            "eager",
            "torch-lce",
        } <= set(methods)
        assert GPU_SHAPES[shape].logits == "peaked"  # the +gf variants run on peaked shapes only
    test_cmd = steps["tests"].cmds[0]
    assert all(f in test_cmd for f in gs.TEST_FILES) and test_cmd[-1] == gs.TEST_K
    score = steps["score"].cmds[0]
    assert score[score.index("--lengths") + 1] == "4096" and "--device" in score and "cuda" in score


def test_a_step_past_its_deadline_is_stopped(tmp_path):
    step = gs.Step(
        "sleep",
        [[sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]],
    )
    with open(tmp_path / "log", "w") as log:
        status, wall = gs.run_step(step, time.monotonic() + 6, log, {"PATH": "/usr/bin:/bin"})
    assert status.startswith("timed out") and wall < 20
    assert "started" in (tmp_path / "log").read_text()


_FAKE_CHILD = """
import json, sys, time
for c in json.loads(sys.argv[1])["cases"]:
    if c["method"] == "hang":
        time.sleep(60)
    s = c["shape"]
    print("@@RESULT " + json.dumps(dict(shape=s["name"], N=s["N"], D=s["D"], V=s["V"], dtype=s["dtype"],
                                        scenario=c["scenario"], method=c["method"], total_s=1.0)), flush=True)
"""


def test_a_hanging_case_is_cut_and_the_rest_still_run():
    sh = QUICK_SHAPES["Q1"]
    run = [Case(sh, "plain", m, 1) for m in ("a", "hang", "b")]
    t0 = time.monotonic()
    got, notes = run_group(
        run, "cpu", {"PATH": "/usr/bin:/bin"}, 50, 4, argv=[sys.executable, "-c", _FAKE_CHILD]
    )
    assert time.monotonic() - t0 < 40
    assert set(got) == {("Q1", "plain", "a"), ("Q1", "plain", "b")}
    assert "per-case limit" in notes[("Q1", "plain", "hang")]


def test_the_subprocess_limit_names_the_case_it_cut():
    sh = QUICK_SHAPES["Q1"]
    run = [Case(sh, "plain", m, 1) for m in ("a", "hang", "b")]
    got, notes = run_group(
        run, "cpu", {"PATH": "/usr/bin:/bin"}, 4, None, argv=[sys.executable, "-c", _FAKE_CHILD]
    )
    assert set(got) == {("Q1", "plain", "a")}
    assert "during this case" in notes[("Q1", "plain", "hang")]
    assert notes[("Q1", "plain", "b")].startswith("not run")


def test_methods_set_the_run_order_plain_first():
    sh = QUICK_SHAPES["Q2"]
    cases = [Case(sh, sc, m) for sc in ("plain", "xtf-step") for m in ("x", "y", "z")]
    got = bm_cli.select(cases, "z,x", "plain,xtf-step")
    assert [(c.scenario, c.method) for c in got] == [
        ("plain", "z"),
        ("plain", "x"),
        ("xtf-step", "z"),
        ("xtf-step", "x"),
    ]


def test_inputs_are_generated_once_per_shape_and_copied(monkeypatch):
    _generate.cache_clear()
    sh = QUICK_SHAPES["Q2"]
    h1, w1, y1 = make_inputs(sh, "cpu")
    h2, w2, y2 = make_inputs(sh, "cpu")
    assert _generate.cache_info().hits == 1
    assert h1.equal(h2) and w1.equal(w2) and y1.equal(y2)
    h1.zero_()  # a case's change does not reach the next one
    assert not make_inputs(sh, "cpu")[0].eq(0).all()


def test_merged_csv_reads_back(tmp_path):
    src = tmp_path / "bench"
    for tag, sh in (("llama3-8k", QUICK_SHAPES["Q2"]), ("gemma2-8k", QUICK_SHAPES["Q1"])):
        r = Result(
            sh.name,
            sh.N,
            sh.D,
            sh.V,
            sh.dtype,
            "plain",
            "eager",
            kept_rows=10,
            total_s=0.5,
            peak_mb=3.0,
        )
        r.extra.update(ratio_floor=2.0, grad_filter="g")
        write_csv([r], src / f"dev-{tag}.csv", {"device": f"dev-{tag}"})
    assert gs.merge_bench_csvs(src, tmp_path / "dev.csv") == 2
    rows = read_csv(tmp_path / "dev.csv")
    assert [r.shape for r in rows] == ["Q2", "Q1"] and rows[0].total_s == 0.5
    assert rows[0].extra["ratio_floor"] == 2.0 and rows[0].extra["grad_filter"] == "g"
    assert json.loads(json.dumps(rows[1].N)) == QUICK_SHAPES["Q1"].N


def test_bad_arguments_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gs.main([])
    with pytest.raises(SystemExit):
        gs.main([str(tmp_path), "--plot", str(tmp_path / "missing.csv")])
    assert "--plot" in capsys.readouterr().err
