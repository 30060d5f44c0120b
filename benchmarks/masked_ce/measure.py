"""Timing and peak memory of one case, and the subprocesses that isolate the cases.

On CPU each case runs in its own subprocess (``--quick``: one for all) started with
``MALLOC_MMAP_THRESHOLD_`` so freed buffers return to the OS; the peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` after the warm-up) minus the resident set
after the inputs and the warm-up is reported. On GPU: ``torch.cuda.max_memory_allocated``
above the inputs.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from .cases import build, input_summary
from .gradfilter import describe, filter_report
from .peers import _peer_of, peer_available
from .shapes import FLOORS, Case, Result, Shape

#: the repository root: the subprocesses run ``python -m benchmarks.masked_ce`` from there
REPO = Path(__file__).resolve().parent.parent.parent


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _step(fwd, h, w, cuda: bool) -> tuple[float, float]:
    """One timed forward + backward: (forward seconds, backward seconds)."""
    import torch

    hh = h.detach().requires_grad_()
    ww = w.detach().requires_grad_()
    if cuda:
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        loss = fwd(hh, ww)
        e1.record()
        loss.backward()
        e2.record()
        torch.cuda.synchronize()
        out = e0.elapsed_time(e1) / 1e3, e1.elapsed_time(e2) / 1e3
    else:
        t0 = time.perf_counter()
        loss = fwd(hh, ww)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        out = t1 - t0, t2 - t1
    if not torch.isfinite(loss.detach()).all():
        raise RuntimeError("non-finite loss")
    return out


def _set_times(res: Result, times: list[tuple[float, float]]) -> None:
    """Medians of the (forward, backward) repeats into ``res``."""
    res.fwd_s = statistics.median(t[0] for t in times)
    res.bwd_s = statistics.median(t[1] for t in times)
    res.total_s = statistics.median(t[0] + t[1] for t in times)
    res.reps = len(times)


def measure_interleaved(cases: list[Case], device: str, rounds: int) -> list[Result]:
    """All cases in this process, timed round-robin (one repeat of each case per round), so a
    change of machine load hits every method alike: medians over rounds, and each method's
    ratio to the GEMM floor as the median of its per-round ratios. No peak memory."""
    from tqdm import tqdm

    runs, results, refs = [], [], {}
    for case in cases:
        sh = case.shape
        res = Result(
            sh.name, sh.N, sh.D, sh.V, sh.dtype, case.scenario, case.method, note="interleaved"
        )
        try:
            inputs, fwd, res.kept_rows = build(case, device)
            _step(fwd, inputs["h"], inputs["w"], device == "cuda")  # warm-up
            _add_filter_report(res, case, inputs, refs)
            runs.append((res, fwd, inputs, []))
        except Exception as exc:
            res.note = f"skipped: {type(exc).__name__}: {exc}"[:300]
        results.append(res)
    for _ in tqdm(range(rounds), desc="interleaved rounds", file=sys.stderr):
        for _res, fwd, inputs, ts in runs:
            ts.append(_step(fwd, inputs["h"], inputs["w"], device == "cuda"))
    floors = {}
    for f in reversed(FLOORS):  # the first of FLOORS measured for a shape is its reference
        floors.update({res.shape: ts for res, _, _, ts in runs if res.method == f})
    for res, _, _, ts in runs:
        _set_times(res, ts)
        res.extra["rounds"] = [(a, b) for a, b in ts]  # per round (fwd s, bwd s): runs can be pooled
        fl = floors.get(res.shape)
        if fl:
            res.extra["ratio_rounds"] = statistics.median(
                (a[0] + a[1]) / (b[0] + b[1]) for a, b in zip(ts, fl)
            )
    return results


def _add_filter_report(res: Result, case: Case, inputs: dict, refs: dict) -> None:
    """For a gradient-filtered method (``+gf-...``): the skipped share and the gradient error
    (:func:`.gradfilter.filter_report`) into ``res.extra["grad_filter"]``."""
    if "+gf" in case.method:
        rep = filter_report(inputs, (case.shape.name, case.scenario), refs)
        res.extra["grad_filter"] = describe(rep)
        res.extra["grad_filter_report"] = rep


def measure(case: Case, device: str) -> Result:
    """Run one case in this process: warm-up, then timed repeats and the peak memory."""
    import torch

    shape = case.shape
    res = Result(shape.name, shape.N, shape.D, shape.V, shape.dtype, case.scenario, case.method)
    try:
        inputs, fwd, kept = build(case, device)
    except Exception as exc:
        res.note = f"skipped: {type(exc).__name__}: {exc}"[:300]
        return res
    res.kept_rows = kept
    h, w = inputs["h"], inputs["w"]
    if case.method in FLOORS:
        res.extra["inputs"] = input_summary(h, w, inputs["y"], shape.softcap)
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def one() -> tuple[float, float]:
        return _step(fwd, h, w, cuda)

    try:
        for _ in range(case.warmup):
            one()
        gc.collect()
        sync()
        if cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = _rss_kb("VmRSS")
            have_peak = _reset_peak()
        times = []
        t_start = time.perf_counter()
        for _ in range(case.reps):
            times.append(one())
            # slow cases (a minute or more per repeat): stop once 75 s of repeats are spent
            if time.perf_counter() - t_start > 75:
                break
        if cuda:
            res.peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        elif have_peak:
            res.peak_mb = (_rss_kb("VmHWM") - base) / 1024
        _set_times(res, times)
        _add_filter_report(res, case, inputs, {})  # after the timing: no effect on the peak
    except Exception as exc:
        res.note = f"failed: {type(exc).__name__}: {exc}"[:300]
    return res


def _child(payload: str) -> None:
    """Subprocess entry: run the JSON-encoded cases, print one JSON result per line."""
    spec = json.loads(payload)
    device = spec["device"]
    for c in spec["cases"]:
        case = Case(Shape(**c["shape"]), c["scenario"], c["method"], c["reps"], c["warmup"])
        res = measure(case, device)
        print("@@RESULT " + json.dumps(asdict(res)), flush=True)


def run_cases(
    cases: list[Case], device: str, isolate: bool, timeout: float, case_timeout: float | None = None
) -> list[Result]:
    """Run cases in subprocesses: one per case (``isolate``) or one for all of them, each under
    ``timeout`` seconds; ``case_timeout``: also at most that long per case (a child that runs
    past it is killed, the case noted as timed out, and a new child runs the cases after it)."""
    from tqdm import tqdm

    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))
    env.setdefault("PYTHONWARNINGS", "ignore")
    groups = [[c] for c in cases] if isolate else [cases]
    results: list[Result] = []
    bar = tqdm(total=len(cases), desc="masked_ce benchmark", unit="case", file=sys.stderr)
    for grp in groups:
        skip = []
        run = []
        for c in grp:
            peer = _peer_of(c.method)
            ok, why = peer_available(peer, device) if peer else (True, "")
            if not ok:
                skip.append(_noted(c, f"skipped: {why}"))
            else:
                run.append(c)
        results += skip
        bar.update(len(skip))
        if not run:
            continue
        got, notes = run_group(run, device, env, timeout, case_timeout)
        for c in run:
            r = got.get(_key(c))
            results.append(r if r is not None else _noted(c, notes.get(_key(c), "failed: no result")))
            bar.update(1)
    bar.close()
    return results


def _noted(c: Case, note: str) -> Result:
    """A result with no timings for case ``c``: only ``note`` (skipped, timed out, failed)."""
    sh = c.shape
    return Result(sh.name, sh.N, sh.D, sh.V, sh.dtype, c.scenario, c.method, note=note)


def _key(c: Case | Result) -> tuple[str, str, str]:
    name = c.shape.name if isinstance(c, Case) else c.shape
    return (name, c.scenario, c.method)


def _pump(stream, tag: str, q: queue.Queue) -> None:
    for line in stream:
        q.put((tag, line))
    q.put((tag, None))


def run_group(
    run: list[Case],
    device: str,
    env: dict,
    timeout: float,
    case_timeout: float | None,
    argv: list[str] | None = None,
) -> tuple[dict, dict]:
    """Run ``run`` in order in child processes (``argv`` + the JSON payload; default
    ``python -m benchmarks.masked_ce --_child``), all within ``timeout`` seconds and each case
    within ``case_timeout`` (None: no per-case limit). Returns ``({key: Result},
    {key: note})`` for the cases with a result and those without one."""
    argv = argv or [sys.executable, "-m", "benchmarks.masked_ce", "--_child"]
    got: dict = {}
    notes: dict = {}
    deadline = time.monotonic() + timeout
    todo = list(run)
    while todo:
        payload = json.dumps(
            {
                "device": device,
                "cases": [
                    {
                        "shape": asdict(c.shape),
                        "scenario": c.scenario,
                        "method": c.method,
                        "reps": c.reps,
                        "warmup": c.warmup,
                    }
                    for c in todo
                ],
            }
        )
        proc = subprocess.Popen(
            [*argv, payload],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(REPO),
        )
        q: queue.Queue = queue.Queue()
        for stream, tag in ((proc.stdout, "out"), (proc.stderr, "err")):
            threading.Thread(target=_pump, args=(stream, tag, q), daemon=True).start()
        tail: list[str] = []
        open_streams, case_start, hit = 2, time.monotonic(), None
        while open_streams:
            case_end = (
                deadline if case_timeout is None else min(deadline, case_start + case_timeout)
            )
            try:
                tag, line = q.get(timeout=max(case_end - time.monotonic(), 0.01))
            except queue.Empty:
                hit = "case" if case_end < deadline else "group"
                proc.kill()
                break
            if line is None:
                open_streams -= 1
            elif tag == "err" and line.strip():
                tail = [line.strip()]
            elif tag == "out" and line.startswith("@@RESULT "):
                r = Result(**json.loads(line[len("@@RESULT ") :]))
                got[_key(r)] = r
                todo = [c for c in todo if _key(c) != _key(r)]
                case_start = time.monotonic()
        rc = proc.wait()
        if hit is None:  # the child ended: what it did not report failed
            why = tail[0][:250] if tail else f"exit code {rc}"
            notes.update({_key(c): f"failed: {why}" for c in todo})
            break
        if not todo:
            break
        if hit == "case":
            notes[_key(todo[0])] = (
                f"failed: timed out after {case_timeout:.0f} s (the per-case limit)"
            )
            todo = todo[1:]
            continue
        notes[_key(todo[0])] = (
            f"failed: timed out after {timeout:.0f} s (the subprocess limit, during this case)"
        )
        notes.update(
            {
                _key(c): f"not run: the subprocess limit of {timeout:.0f} s came first"
                for c in todo[1:]
            }
        )
        break
    return got, notes
