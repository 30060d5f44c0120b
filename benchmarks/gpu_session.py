"""One GPU session's checks in one call, each step under its own time limit (issue 21).

``python -m benchmarks.gpu_session OUTDIR [--dry-run]`` (``bash benchmarks/gpu_session.sh`` is the
same). A GPU is lent by chance and for 15 device-minutes in all, start-up included: this runs,
in one call of well under 10 minutes,

1. ``wheels``: the peers the GPU machine lacks (it reaches no package index), from ``.whl/*.whl``,
   installed with ``pip --no-index --no-deps`` into a temporary folder put on ``PYTHONPATH``;
2. ``env``: ``nvidia-smi`` and the versions of torch, CUDA, Triton and the peers, into the log;
3. ``tests``: the CUDA tests of the Triton backend and the attention kernel (fp32, fp16, bf16
   against float64): ``tests/backends/test_triton_backend.py``, the ``triton`` cases of
   ``tests/masked_ce/test_masked_ce.py`` and the ``triton`` / ``cuda`` cases of
   ``tests/xtf/test_attention_received.py``. tests/distributed is left out: it runs gloo
   processes on CPU tensors with the torch and native backends, nothing on the GPU;
4. ``bench-llama3-8k``, ``bench-gemma2-8k``: ``python -m benchmarks.masked_ce``, one shape per
   call (its own subprocess, its own limit, and a per-case limit), scenarios ``plain`` and
   ``xtf-step``, every method (:data:`METHODS`); the two CSVs are merged into ``<device>.csv``;
5. ``score``: ``python -m benchmarks.score_throughput`` at L = 4096, ``floor`` and ``ours``
   (``score_dataset``, default preset), plus one attention layer against SDPA.

Each step has a budget (:data:`BUDGETS`, 530 s in all) and must end by the sum of its own and
the earlier steps' budgets, so time an early step leaves goes to the later ones and the worst
case stays under 9 minutes; each step's wall time is printed. ``OUTDIR`` gets at most
:data:`MAX_FILES` files (the device returns 8): ``gpu_session_<device>.log``, ``<device>.csv``
(the masked-CE rows, named after the device as the benchmark names them),
``score_throughput_cuda.csv`` and ``score_throughput_layer_cuda.csv`` (the names the scoring
benchmark gives them); no PNGs (``python -m benchmarks.gpu_session DIR --plot
<device>.csv`` draws the masked-CE ones from the CSV afterwards, on any machine).
The results are not copied into ``benchmarks/results/``: whoever runs it copies them there
and removes the GPU files they supersede.

``--dry-run``: the same steps and command lines on this CPU with tiny problems (``--quick``
shapes Q2 / Q1, L = 64, a few interpreter-mode Triton tests, the CPU's best xtf backend for
``xtf-triton``, no torch.compile peers), so everything but the GPU is exercised here
(tests/e2e/test_gpu_session.py runs it).

Wheels (here, where PyPI is reachable; ``.whl/`` is git-ignored, so the call carries it)::

    python3 -m pip download --no-deps -d .whl cut-cross-entropy liger-kernel
    # device call: carry [".whl"], command: bash benchmarks/gpu_session.sh $OUT
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: seconds per step; a step must end by the sum of the budgets up to and including its own
BUDGETS = {
    "wheels": 20,
    "env": 15,
    "tests": 120,
    "bench-llama3-8k": 150,
    "bench-gemma2-8k": 145,
    "score": 80,
}
#: the device call returns at most 8 files from its output folder
MAX_FILES = 8
#: the masked-CE methods, in the order they run (the plain scenario first): ``{xtf}`` is
#: ``xtf-triton`` on the GPU (the CPU's best backend in a dry run)
METHODS = (
    "gemm-floor",
    "{xtf}",
    "{xtf}+gf-auto",
    "cce",
    "cce-exact",
    "liger",
    "eager",
    "torch-lce",
    "compose-cce",
    "compose-cce-exact",
    "compose-liger",
    "compose-eager",
    "compose-torch-lce",
)
#: peers a dry run leaves out: torch.compile on a 2-core CPU (the quick benchmark test runs them)
DRY_SKIP = ("cce-exact", "torch-lce", "compose-cce-exact", "compose-torch-lce")
TEST_FILES = (
    "tests/backends/test_triton_backend.py",
    "tests/masked_ce/test_masked_ce.py",
    "tests/xtf/test_attention_received.py",
)
#: the CUDA selection: every test of the Triton backend's module, the Triton cases elsewhere
TEST_K = "test_triton_backend or triton or cuda"
#: a dry run's few interpreter-mode tests (seconds each on the CPU)
DRY_TEST_K = (
    "test_supports_messages or test_forward_statistics_only_no_bias_fp16 or "
    "test_all_masked_gives_zero or test_padding_zero"
)
#: the GPU shape per benchmark step, and the quick shape a dry run uses in its place
SHAPES = {"bench-llama3-8k": ("llama3-8k", "Q2"), "bench-gemma2-8k": ("gemma2-8k", "Q1")}


@dataclass
class Step:
    """One step: its commands run in turn until one fails or the step's deadline passes."""

    name: str
    cmds: list[list[str]]
    env: dict = field(default_factory=dict)
    note: str = ""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def device_slug(dry: bool) -> str:
    """The device's file-name form, as the masked-CE benchmark writes it (``nvidia-h200``)."""
    if dry:
        from benchmarks.masked_ce.report import device_name

        return device_name("cpu")
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return (
        _slug(out.stdout.strip().splitlines()[0])
        if out.returncode == 0 and out.stdout.strip()
        else "cuda"
    )


def _xtf_method(dry: bool) -> str:
    if not dry:
        return "xtf-triton"
    from benchmarks.masked_ce.cases import plan
    from benchmarks.masked_ce.shapes import QUICK_SHAPES

    return next(c.method for c in plan([QUICK_SHAPES["Q2"]], "cpu", 1) if c.scenario == "xtf-step")


def plan_steps(dry: bool, scratch: Path, site: Path) -> list[Step]:
    """The steps, in order; ``{limit}`` in a command is replaced, when the step starts, by the
    seconds left to its deadline less a margin (the benchmarks' own subprocess limit)."""
    py = sys.executable
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    steps = [
        Step(
            "wheels",
            [
                [
                    py,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-index",
                    "--no-deps",
                    "--no-compile",
                    "--no-cache-dir",
                    "--upgrade",
                    "--target",
                    str(site),
                    *wheels,
                ]
            ]
            if wheels
            else [],
            note=""
            if wheels
            else "no .whl/*.whl here: peers not installed are reported as skipped",
        )
    ]
    probe = (
        "import torch; from benchmarks.masked_ce.report import versions; "
        "print('versions', versions(), 'cuda', torch.version.cuda, 'device', "
        "torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    )
    env_cmds = [[py, "-c", probe]]
    if not dry:
        env_cmds.insert(
            0,
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                "--format=csv",
            ],
        )
    steps.append(Step("env", env_cmds))
    k = f"({TEST_K}) and ({DRY_TEST_K})" if dry else TEST_K
    steps.append(
        Step(
            "tests",
            [
                [
                    py,
                    "-m",
                    "pytest",
                    "-v",  # a line per test: the log says what passed even if the step is cut
                    "-p",
                    "no:cacheprovider",
                    "-rfE",
                    "--durations=8",
                    "-o",
                    "faulthandler_timeout=60",
                    *TEST_FILES,
                    "-k",
                    k,
                ]
            ],
            env={"TRITON_INTERPRET": "1"} if dry else {},
        )
    )
    xtf = _xtf_method(dry)
    methods = [m.format(xtf=xtf) for m in METHODS if not (dry and m in DRY_SKIP)]
    for name, (gpu_shape, quick_shape) in SHAPES.items():
        extra = (
            ["--quick", "--device", "cpu", "--shapes", quick_shape]
            if dry
            else ["--device", "cuda", "--shapes", gpu_shape]
        )
        steps.append(
            Step(
                name,
                [
                    [
                        py,
                        "-m",
                        "benchmarks.masked_ce",
                        *extra,
                        "--scenarios",
                        "plain,xtf-step",
                        "--methods",
                        ",".join(methods),
                        "--out",
                        str(scratch / "bench"),
                        "--tag",
                        gpu_shape,
                        "--timeout",
                        "{limit}",
                        "--case-timeout",
                        "75",
                    ]
                ],
            )
        )
    extra = (
        [
            "--device",
            "cpu",
            "--lengths",
            "64",
            "--tokens",
            "128",
            "--batch-tokens",
            "128",
            "--repeats",
            "1",
        ]
        if dry
        else ["--device", "cuda", "--lengths", "4096", "--tokens", "16384", "--repeats", "3"]
    )
    steps.append(
        Step(
            "score",
            [
                [
                    py,
                    "-m",
                    "benchmarks.score_throughput",
                    *extra,
                    "--methods",
                    "floor",
                    "ours",
                    "--no-mixed",
                    "--no-packed-scoring",
                    "--out",
                    str(scratch / "score"),
                    "--timeout",
                    "{limit}",
                ]
            ],
        )
    )
    return steps


def run_step(step: Step, deadline: float, log, env: dict) -> tuple[str, float]:
    """Run one step's commands until ``deadline`` (monotonic seconds): ``(status, wall s)``."""
    t0 = time.monotonic()
    status = "ok" if step.cmds else "skipped"
    if step.note:
        _emit(log, f"   {step.note}")
    for cmd in step.cmds:
        left = deadline - time.monotonic()
        if left < 5:
            status = "out of time"
            break
        # the benchmarks get their own limit a little inside the step's, so they write their CSV
        cmd = [c.replace("{limit}", str(max(int(left) - 20, 5))) for c in cmd]
        _emit(log, "   $ " + " ".join(_quote(c) for c in cmd))
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env={**env, **step.env},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=left,
                errors="replace",
            )
            out, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = (
                exc.stdout.decode(errors="replace")
                if isinstance(exc.stdout, bytes)
                else (exc.stdout or "")
            )
            rc, status = None, f"timed out after {left:.0f} s"
        except OSError as exc:
            out, rc = f"{type(exc).__name__}: {exc}", 127
        for line in out.splitlines():
            line = line.rsplit("\r", 1)[-1]  # progress bars: their last state only
            if line.strip() and not re.search(r"it/s|s/it|case/s|s/case", line):
                _emit(log, "   | " + line)
        if rc is None:
            break
        if rc != 0:
            status = f"exit code {rc}"
            break
    return status, time.monotonic() - t0


def _quote(s: str) -> str:
    return s if re.fullmatch(r"[A-Za-z0-9_./:=,+@-]+", s) else "'" + s.replace("'", "'\\''") + "'"


def _emit(log, text: str) -> None:
    print(text, flush=True)
    log.write(text + "\n")
    log.flush()


def merge_bench_csvs(src: Path, dest: Path) -> int:
    """Concatenate the per-shape ``<device>-<shape>.csv`` files of ``src`` into ``dest`` (the
    device column stripped of the shape tag). Returns the rows written."""
    rows, cols = [], None
    for tag in (gpu for gpu, _ in SHAPES.values()):
        for path in sorted(src.glob(f"*-{tag}.csv")):
            with open(path, newline="") as fh:
                rd = csv.DictReader(fh)
                cols = cols or rd.fieldnames
                for row in rd:
                    row["device"] = row["device"].removesuffix(f"-{tag}")
                    rows.append(row)
    if not rows:
        return 0
    with open(dest, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=cols)
        wr.writeheader()
        wr.writerows(rows)
    return len(rows)


def run_session(out: Path, dry: bool, budgets: dict[str, float] | None = None) -> int:
    """Every step in order, the files into ``out``. Returns 0 when every step ran and ended well."""
    budgets = dict(BUDGETS, **(budgets or {}))
    out.mkdir(parents=True, exist_ok=True)
    dev = device_slug(dry)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_session_"))
    site = scratch / "site"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run never touches a GPU, even where one exists
    t_start = time.monotonic()
    ends, total = {}, 0.0
    for name, b in budgets.items():
        total += b
        ends[name] = t_start + total
    steps = plan_steps(dry, scratch, site)
    summary = []
    with open(out / f"gpu_session_{dev}.log", "w") as log:
        _emit(
            log,
            f"gpu_session: device {dev}, {'dry run (CPU)' if dry else 'GPU'}, "
            f"worst case {total:.0f} s, out {out}",
        )
        for step in steps:
            _emit(
                log,
                f"== step {step.name} (must end within {ends[step.name] - time.monotonic():.0f} s)",
            )
            status, wall = run_step(step, ends[step.name], log, env)
            if step.name.startswith("bench-"):
                n = merge_bench_csvs(scratch / "bench", out / f"{dev}.csv")
                _emit(log, f"   {dev}.csv: {n} rows so far")
            if step.name == "score":
                for f in sorted((scratch / "score").glob("*.csv")):
                    shutil.copy(f, out / f.name)
            _emit(log, f"== step {step.name}: {status}, {wall:.1f} s")
            summary.append((step.name, status, wall))
        files = sorted(p.name for p in out.iterdir())
        _emit(log, f"gpu_session: {time.monotonic() - t_start:.0f} s in all; steps:")
        for name, status, wall in summary:
            _emit(log, f"   {name:18s} {wall:7.1f} s  {status}")
        _emit(log, f"files in {out} ({len(files)} of at most {MAX_FILES}): {', '.join(files)}")
    shutil.rmtree(scratch, ignore_errors=True)
    if len(files) > MAX_FILES:
        print(f"gpu_session: {len(files)} files in {out}, more than {MAX_FILES}", file=sys.stderr)
        return 1
    return 0 if all(s in ("ok", "skipped") for _, s, _ in summary) else 1


def plot_csv(path: Path, out: Path) -> list[Path]:
    """The masked-CE PNGs of a CSV this session wrote (read back as results)."""
    from benchmarks.masked_ce.plots import plot
    from benchmarks.masked_ce.report import read_csv

    return plot(read_csv(path), out, path.stem)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_session", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "out", type=Path, nargs="?", help="output folder (at most 8 files: CSVs and one log)"
    )
    ap.add_argument("--dry-run", action="store_true", help="every step on this CPU, tiny problems")
    ap.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="only draw the PNGs of this masked-CE CSV into --out",
    )
    args = ap.parse_args(argv)
    if args.out is None:
        ap.error("OUTDIR: required")
    if args.plot is not None:
        if not args.plot.is_file():
            ap.error(f"--plot: no file {args.plot}")
        for p in plot_csv(args.plot, args.out):
            print(p)
        return 0
    if not args.dry_run and shutil.which("nvidia-smi") is None:
        ap.error("no nvidia-smi here: this is the GPU run (use --dry-run on a CPU)")
    return run_session(args.out, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
