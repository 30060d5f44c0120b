"""Fused masked cross-entropy, side by side with the tools users would pick instead.

``python -m benchmarks.masked_ce [--quick] [--shapes S1,S2] [--out benchmarks/results]``

For every shape it times forward, backward and forward+backward (medians over repeats after
a warm-up) and the peak memory of:

* ``xtf-<backend>``: :func:`xtf_kernels.masked_ce`, every backend available on the device;
* ``eager``: logits materialised, upcast to fp32, ``F.cross_entropy``;
* ``torch-lce``: ``F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions())``;
* ``cce-exact``: cut-cross-entropy without gradient filtering (``filter_eps=None``; its
  ``impl="torch_compile"`` on CPU, ``"cce"`` on GPU);
* ``cce``: cut-cross-entropy with its default gradient filtering (GPU only), which skips
  backward blocks whose softmax is negligible: its speed depends on the logits, so the GPU
  shapes use peaked, trained-model-scale inputs (``make_inputs``);
* ``liger``: Liger-Kernel's fused linear cross-entropy (GPU only);
* ``gemm-floor``: the three bare matmuls (logits, dX, dW) on the kept rows.

Scenarios: ``plain`` (mean CE over the non-ignored tokens, no statistics), ``stats`` (xtf
with ``return_stats=True``), ``mask0`` / ``mask30`` / ``mask50`` (xtf with that share of the
scored tokens masked by ``keep``), ``xtf-step`` (statistics for every token, loss and
gradient only for the ~50% a rowwise ``select`` rule keeps) against ``compose-<peer>`` (the
peer's forward over every token for its per-token loss, then its loss + gradient on the
kept rows). A missing peer is reported as skipped with the reason, never faked.

Memory: on CPU each case runs in its own subprocess (``--quick``: one subprocess for all
cases) started with ``MALLOC_MMAP_THRESHOLD_`` so freed buffers return to the OS; the peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after the warm-up) minus the
resident set after the inputs and the warm-up is reported. On GPU:
``torch.cuda.max_memory_allocated`` above the inputs. Results: a printed table,
``<out>/<device>.csv`` (device, versions, load average at start, shape, dtype, method,
times, memory) and ``<out>/<device>_*.png``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: N tokens, hidden D, vocabulary V, dtype, ignored share, softcap,
    LM-head bias (``bias``: N(0, 1) entries; compared with xtf and eager only)."""

    name: str
    N: int
    D: int
    V: int
    dtype: str
    ignore: float = 0.2
    softcap: float | None = None
    logits: str = "peaked"  # "peaked" (trained-model scale, see make_inputs) or "random"
    bias: bool = False


CPU_SHAPES = {
    "S1": Shape("S1", 4096, 1024, 32000, "float32", logits="random"),
    "S2": Shape("S2", 2048, 2048, 128256, "bfloat16", logits="random"),
    # the bf16 epilogue row (issue 10, item 4): S2 with an LM-head bias and a Gemma-2 softcap
    "S2-bias-cap": Shape("S2-bias-cap", 2048, 2048, 128256, "bfloat16", softcap=30.0, logits="random",
                         bias=True),
}
GPU_SHAPES = {
    "llama3-8k": Shape("llama3-8k", 8192, 4096, 128256, "bfloat16"),
    "llama3-16k": Shape("llama3-16k", 16384, 4096, 128256, "bfloat16"),
    "llama3-32k": Shape("llama3-32k", 32768, 4096, 128256, "bfloat16"),
    "gemma2-8k": Shape("gemma2-8k", 8192, 2304, 256000, "bfloat16", softcap=30.0),
    "qwen25-16k": Shape("qwen25-16k", 16384, 3584, 152064, "bfloat16"),
}
QUICK_SHAPES = {
    "Q1": Shape("Q1", 256, 64, 1000, "float32", logits="random"),
    "Q2": Shape("Q2", 128, 64, 2048, "bfloat16"),
}

PLAIN_PEERS = ("eager", "torch-lce", "cce-exact", "cce", "liger")
SCENARIOS_XTF = ("stats", "mask0", "mask30", "mask50", "xtf-step")


@dataclass
class Case:
    """One measurement: a shape, a scenario and a method."""

    shape: Shape
    scenario: str
    method: str
    reps: int = 3
    warmup: int = 1


@dataclass
class Result:
    shape: str
    N: int
    D: int
    V: int
    dtype: str
    scenario: str
    method: str
    kept_rows: int = 0
    fwd_s: float | None = None
    bwd_s: float | None = None
    total_s: float | None = None
    peak_mb: float | None = None
    reps: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs


def make_inputs(shape: Shape, device: str, seed: int = 0):
    """hidden [N, D], weight [V, D] (shape.dtype), labels [N] int64 with ``ignore`` at -100.

    ``shape.logits == "random"``: N(0, 0.25) hidden states and a N(0, 1/D) head, so the logits
    are near-uniform over the vocabulary (every softmax entry ~1/V).
    ``"peaked"`` (the default): the scale of a trained model, which is what gradient filtering
    (cut-cross-entropy's ``filter_eps``) depends on. The head gets a shared direction ``u`` whose
    coefficient is a Zipf log-prior (log-probability ``-log(rank)``), the labels are drawn from
    that Zipf law, and every hidden state is ``4 u`` plus a gold component of random strength
    ``U(2, 12)`` along its label's row plus N(0, 0.3^2) noise: most of the softmax mass sits on
    the gold and the frequent tokens, and the mean loss is a few nats (printed by the harness).
    """
    import torch

    dt = getattr(torch, shape.dtype)
    g = torch.Generator().manual_seed(seed)
    N, D, V = shape.N, shape.D, shape.V
    if shape.logits == "random":
        h = torch.randn(N, D, generator=g) * 0.5
        w = torch.randn(V, D, generator=g) * D**-0.5
        y = torch.randint(0, V, (N,), generator=g)
    elif shape.logits == "peaked":
        w = torch.randn(V, D, generator=g) * D**-0.5
        perm = torch.randperm(V, generator=g)  # token id -> Zipf rank
        prior = -torch.log1p(perm.double()).float()  # log-prior up to a constant
        u = torch.randn(D, generator=g)
        u /= u.norm()
        c = 4.0
        zipf = 1.0 / (1.0 + torch.arange(V, dtype=torch.float64))
        ranks = torch.multinomial(zipf / zipf.sum(), N, replacement=True, generator=g)
        y = torch.argsort(perm)[ranks]  # rank -> token id
        rows = w[y] - (w[y] @ u)[:, None] * u[None, :]  # gold directions, orthogonal to u
        w += (prior / c)[:, None] * u[None, :]
        strength = 2.0 + torch.rand(N, 1, generator=g) * 10.0
        h = c * u[None, :] + strength * rows / rows.pow(2).sum(1, keepdim=True)
        h += torch.randn(N, D, generator=g) * 0.3
    else:
        raise ValueError(f"shape.logits: expected 'peaked' or 'random', got {shape.logits!r}")
    y[torch.rand(N, generator=g) < shape.ignore] = -100
    return h.to(dt).to(device), w.to(dt).to(device), y.to(device)


def mask_share(y, share: float, seed: int = 1):
    """bool keep mask: ``share`` of the scored (non-ignored) tokens set False."""
    import torch

    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(y.shape, generator=g) >= share
    return keep.to(y.device)


# --------------------------------------------------------------------------- methods
# Each builder returns (forward() -> loss tensor, note). The harness calls loss.backward().


def peer_available(method: str, device: str) -> tuple[bool, str]:
    """Whether a peer can run on this device (reason when not)."""
    import torch

    if method == "torch-lce":
        if not hasattr(torch.nn.functional, "linear_cross_entropy") or not hasattr(
            torch.nn, "LinearCrossEntropyOptions"
        ):
            return False, f"torch {torch.__version__} has no F.linear_cross_entropy options"
        return True, ""
    if method in ("cce", "cce-exact"):
        if method == "cce" and device != "cuda":
            return False, "gradient filtering exists only in cut-cross-entropy's CUDA kernels (cce-exact is its torch.compile path here)"
        try:
            import cut_cross_entropy  # noqa: F401
        except Exception as exc:
            return False, f"cut-cross-entropy not installed ({type(exc).__name__})"
        return True, ""
    if method == "liger":
        if device != "cuda":
            return False, "Liger-Kernel runs on GPU only"
        try:
            import liger_kernel  # noqa: F401
        except Exception as exc:
            return False, f"liger-kernel not installed ({type(exc).__name__})"
        return True, ""
    return True, ""


def peer_loss_fn(method: str, shape: Shape, device: str) -> Callable:
    """``fn(h, w, y, reduction) -> loss`` for a peer (ignore_index=-100)."""
    import torch
    import torch.nn.functional as F

    cap = shape.softcap
    if method == "eager":
        def fn(h, w, y, reduction="mean"):
            z = (h @ w.t()).float()
            if cap is not None:
                z = cap * torch.tanh(z / cap)
            return F.cross_entropy(z, y, ignore_index=-100, reduction=reduction)
        return fn
    if method == "torch-lce":
        if cap is not None:
            raise RuntimeError("F.linear_cross_entropy has no softcap")
        opts = torch.nn.LinearCrossEntropyOptions()

        def fn(h, w, y, reduction="mean"):
            return F.linear_cross_entropy(h, w, y, ignore_index=-100, reduction=reduction, options=opts)
        return fn
    if method in ("cce", "cce-exact"):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if device == "cuda" else "torch_compile"
        # cce-exact: no gradient filtering; cce: the library's default filter_eps, which skips
        # backward blocks whose softmax is negligible (so its speed depends on the logits)
        kw = {"filter_eps": None} if (method == "cce-exact" and impl == "cce") else {}

        def fn(h, w, y, reduction="mean"):
            return linear_cross_entropy(h, w, y, ignore_index=-100, softcap=cap, reduction=reduction,
                                        impl=impl, **kw)
        return fn
    if method == "liger":
        if cap is not None:
            from liger_kernel.ops.fused_linear_cross_entropy import (
                LigerFusedLinearCrossEntropyFunction,
            )

            def fn(h, w, y, reduction="mean"):
                return LigerFusedLinearCrossEntropyFunction.apply(h, w, y, None, None, -100, 0.0, 0.0,
                                                                  reduction, cap)[0]
            return fn
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        def fn(h, w, y, reduction="mean"):
            return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction=reduction)(w, h, y)
        return fn
    raise ValueError(f"method: unknown peer {method!r}")


def build(case: Case, device: str):
    """(inputs dict, forward fn returning the loss, kept rows) for one case."""
    import torch

    import xtf_kernels
    from xtf_kernels import masked_ce

    shape = case.shape
    h, w, y = make_inputs(shape, device)
    m = case.method
    scored = y != -100
    kept_rows = int(scored.sum())
    inputs = {"h": h, "w": w, "y": y}
    b = _bias(shape, device)
    if b is not None and not (m.startswith("xtf-") or m in ("gemm-floor", "eager")):
        raise RuntimeError(f"the bias row compares xtf with eager only, not {m}")

    if m == "gemm-floor":
        xk = h[scored].contiguous()
        inputs["xk"] = xk

        class Floor(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, ww):
                z = x @ ww.t()
                ctx.save_for_backward(x, ww, z)
                return z[0, 0].float() * 0.0  # no pass over z: the floor is the GEMMs alone

            @staticmethod
            def backward(ctx, g):
                x, ww, z = ctx.saved_tensors
                return z @ ww, z.t() @ x

        return inputs, (lambda hh, ww: Floor.apply(xk.requires_grad_(hh.requires_grad), ww)), kept_rows

    if m.startswith("xtf-"):
        be = m[4:]
        kw: dict = {"backend": be, "softcap": shape.softcap, "bias": b}
        if case.scenario == "stats":
            kw["return_stats"] = True
        elif case.scenario.startswith("mask"):
            share = int(case.scenario[4:]) / 100.0
            keep = mask_share(y, share)
            kw["keep"] = keep
            kept_rows = int((scored & keep).sum())
        elif case.scenario == "xtf-step":
            thr, kept_rows = _median_logprob(h, w, y, shape, be, b)
            kw["return_stats"] = True
            kw["select"] = xtf_kernels.rowwise(lambda s: s.logprob < thr)

        def fwd(hh, ww):
            out = masked_ce(hh, ww, y, **kw)
            return out[0] if isinstance(out, tuple) else out
        return inputs, fwd, kept_rows

    if m.startswith("compose-"):
        peer = m[len("compose-"):]
        fn = peer_loss_fn(peer, shape, device)
        thr, n_sel = _median_logprob(h, w, y, shape, "torch" if device == "cuda" else "auto")

        def fwd(hh, ww):
            with torch.no_grad():  # the statistics pass: per-token loss of every token
                tok = fn(hh.detach(), ww.detach(), y, reduction="none")
            sel = scored & (-tok < thr)
            idx = sel.nonzero().squeeze(1)
            return fn(hh.index_select(0, idx), ww, y.index_select(0, idx))
        return inputs, fwd, n_sel

    if b is not None:  # eager with the bias: F.linear in the input dtype, fp32 softcap and loss
        cap = shape.softcap

        def eager_bias(hh, ww):
            z = torch.nn.functional.linear(hh, ww, b).float()
            z = cap * torch.tanh(z / cap) if cap is not None else z
            return torch.nn.functional.cross_entropy(z, y, ignore_index=-100)
        return inputs, eager_bias, kept_rows
    fn = peer_loss_fn(m, shape, device)
    return inputs, (lambda hh, ww: fn(hh, ww, y)), kept_rows


def _bias(shape: Shape, device: str):
    """The LM-head bias of a ``bias`` shape (N(0, 1), the shape's dtype), else None."""
    import torch

    if not shape.bias:
        return None
    g = torch.Generator().manual_seed(2)
    return torch.randn(shape.V, generator=g).to(getattr(torch, shape.dtype)).to(device)


def input_summary(h, w, y, softcap: float | None, chunk: int = 2048) -> str:
    """Mean loss and mean P(gold) over the scored tokens (fp32, chunked): what the inputs look like."""
    import torch
    import torch.nn.functional as F

    tot, pg, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, h.shape[0], chunk):
            yy = y[i:i + chunk]
            z = (h[i:i + chunk] @ w.t()).float()
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            m = yy != -100
            lo = F.cross_entropy(z[m], yy[m], reduction="none")
            tot += float(lo.sum())
            pg += float(torch.exp(-lo).sum())
            n += int(m.sum())
    return f"inputs: mean loss {tot / max(n, 1):.2f} nats, mean P(gold) {pg / max(n, 1):.2f}"


def _median_logprob(h, w, y, shape: Shape, backend: str, bias=None) -> tuple[float, int]:
    """Median gold log-prob over the scored tokens and the count below it (the xtf-step rule
    keeps the lower half: the tokens the model predicts worst)."""
    import torch

    from xtf_kernels import masked_ce

    with torch.no_grad():
        _, st = masked_ce(h, w, y, bias=bias, return_stats=True, backend=backend, softcap=shape.softcap)
    lp = st.logprob[~torch.isnan(st.logprob)]
    thr = float(lp.median())
    return thr, int((lp < thr).sum())


# --------------------------------------------------------------------------- measurement


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
    if case.method == "gemm-floor":
        res.extra["inputs"] = input_summary(h, w, inputs["y"], shape.softcap)
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def one() -> tuple[float, float]:
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
        del loss, hh, ww
        return out

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
        res.fwd_s = statistics.median(t[0] for t in times)
        res.bwd_s = statistics.median(t[1] for t in times)
        res.total_s = statistics.median(t[0] + t[1] for t in times)
        res.reps = len(times)
    except Exception as exc:
        res.note = f"failed: {type(exc).__name__}: {exc}"[:300]
    return res


# --------------------------------------------------------------------------- planning


def plan(shapes: list[Shape], device: str, reps: int, quick: bool = False) -> list[Case]:
    """Every case of the suite for these shapes (skipped peers become notes later).

    ``quick``: the compiled peers (torch.compile) only on the first shape, to stay fast."""
    import torch

    from xtf_kernels import backend_status
    from xtf_kernels.backends import load_backend

    cases = []
    status = backend_status()
    for sh in shapes:
        dt = getattr(torch, sh.dtype)
        xtf = []
        for name, (ok, _why) in status.items():
            if ok and load_backend(name).supports(torch.device(device), dt)[0]:
                xtf.append(f"xtf-{name}")
        peers = ("eager",) if (quick and sh is not shapes[0]) else PLAIN_PEERS
        for m in ["gemm-floor", *xtf, *peers]:
            cases.append(Case(sh, "plain", m, reps))
        best = "xtf-native" if "xtf-native" in xtf else ("xtf-triton" if "xtf-triton" in xtf else xtf[0])
        for sc in SCENARIOS_XTF:
            cases.append(Case(sh, sc, best, reps))
        for p in peers:
            cases.append(Case(sh, "xtf-step", f"compose-{p}", reps))
    return cases


def _peer_of(method: str) -> str | None:
    if method in PLAIN_PEERS:
        return method
    if method.startswith("compose-"):
        return method[len("compose-"):]
    return None


# --------------------------------------------------------------------------- driver


def device_name(device: str) -> str:
    """A file-name-safe device name: the GPU's name or the CPU model."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"cpu-{os.cpu_count()}core-{name}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def versions() -> dict[str, str]:
    """Versions of torch, xtf_kernels and the peers (``-`` when absent)."""
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "xtf-kernels", "cut-cross-entropy", "liger-kernel", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def _child(payload: str) -> None:
    """Subprocess entry: run the JSON-encoded cases, print one JSON result per line."""
    spec = json.loads(payload)
    device = spec["device"]
    for c in spec["cases"]:
        case = Case(Shape(**c["shape"]), c["scenario"], c["method"], c["reps"], c["warmup"])
        res = measure(case, device)
        print("@@RESULT " + json.dumps(asdict(res)), flush=True)


def run_cases(cases: list[Case], device: str, isolate: bool, timeout: float) -> list[Result]:
    """Run cases in subprocesses: one per case (``isolate``) or one for all of them."""
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
                r = Result(c.shape.name, c.shape.N, c.shape.D, c.shape.V, c.shape.dtype, c.scenario,
                           c.method, note=f"skipped: {why}")
                skip.append(r)
            else:
                run.append(c)
        results += skip
        bar.update(len(skip))
        if not run:
            continue
        payload = json.dumps({
            "device": device,
            "cases": [{"shape": asdict(c.shape), "scenario": c.scenario, "method": c.method,
                       "reps": c.reps, "warmup": c.warmup} for c in run],
        })
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.masked_ce", "--_child", payload],
                capture_output=True, text=True, env=env, timeout=timeout,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err, rc = f"timed out after {timeout:.0f} s", -1
        got = {}
        for line in out.splitlines():
            if line.startswith("@@RESULT "):
                r = Result(**json.loads(line[len("@@RESULT "):]))
                got[(r.shape, r.scenario, r.method)] = r
        for c in run:
            r = got.get((c.shape.name, c.scenario, c.method))
            if r is None:
                tail = (err or "").strip().splitlines()[-1:] or [f"exit code {rc}"]
                r = Result(c.shape.name, c.shape.N, c.shape.D, c.shape.V, c.shape.dtype, c.scenario,
                           c.method, note=f"failed: {tail[0][:250]}")
            results.append(r)
            bar.update(1)
    bar.close()
    return results


def add_ratios(results: list[Result]) -> None:
    """Ratio of every method's fwd+bwd time to the GEMM floor of its shape (scaled to its kept rows)."""
    floors = {r.shape: r for r in results if r.method == "gemm-floor" and r.total_s}
    for r in results:
        f = floors.get(r.shape)
        if f and r.total_s and f.kept_rows:
            # the floor is linear in the kept rows: scale it to this case's kept rows
            fl = f.total_s * max(r.kept_rows, 1) / f.kept_rows
            r.extra["floor_s"] = fl
            r.extra["ratio_floor"] = r.total_s / fl


def write_csv(results: list[Result], path: Path, meta: dict) -> None:
    """One row per result, with the device / versions / load average columns repeated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["device", "torch", "xtf_kernels", "cut_cross_entropy", "liger_kernel", "threads",
            "loadavg_start", "shape", "N", "D", "V", "dtype", "scenario", "method", "kept_rows",
            "fwd_s", "bwd_s", "total_s", "floor_s", "ratio_floor", "peak_mb", "reps", "note", "inputs"]
    with open(path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=cols)
        wr.writeheader()
        for r in results:
            row = {k: v for k, v in asdict(r).items() if k in cols}
            row.update(meta)
            row["floor_s"] = r.extra.get("floor_s")
            row["ratio_floor"] = r.extra.get("ratio_floor")
            row["inputs"] = r.extra.get("inputs", "")
            for k in ("fwd_s", "bwd_s", "total_s", "floor_s", "ratio_floor", "peak_mb"):
                if row[k] is not None:
                    row[k] = f"{row[k]:.4g}"
            wr.writerow(row)


def print_table(results: list[Result]) -> str:
    """The results as an aligned text table (also returned)."""
    head = f"{'shape':<11}{'scenario':<10}{'method':<17}{'kept':>6}{'fwd s':>9}{'bwd s':>9}{'total s':>9}{'x floor':>9}{'peak MB':>9}  note"
    lines = [head, "-" * len(head)]
    fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"
    for r in results:
        lines.append(
            f"{r.shape:<11}{r.scenario:<10}{r.method:<17}{r.kept_rows:>6}{fmt(r.fwd_s):>9}{fmt(r.bwd_s):>9}"
            f"{fmt(r.total_s):>9}{fmt(r.extra.get('ratio_floor'), 2):>9}{fmt(r.peak_mb, 0):>9}  {r.note or r.extra.get('inputs', '')}"
        )
    text = "\n".join(lines)
    print(text)
    return text


def plot(results: list[Result], out: Path, dev: str) -> list[Path]:
    """PNG plots: fwd+bwd time and peak memory per method and shape (plain scenario), and the
    scenario comparison. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    plain = [r for r in results if r.scenario == "plain" and r.total_s]
    shapes = list(dict.fromkeys(r.shape for r in plain))
    methods = list(dict.fromkeys(r.method for r in plain))
    if plain:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        width = 0.8 / max(1, len(methods))
        for k, (key, label) in enumerate((("total_s", "forward+backward time (s)"),
                                         ("peak_mb", "peak memory above inputs (MB)"))):
            ax = axes[k]
            for j, m in enumerate(methods):
                xs, vs = [], []
                for i, s in enumerate(shapes):
                    r = next((r for r in plain if r.shape == s and r.method == m), None)
                    if r is not None and getattr(r, key) is not None:
                        xs.append(i + j * width)
                        vs.append(getattr(r, key))
                ax.bar(xs, vs, width=width, label=m)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
            ax.set_xticklabels([f"{s}\n" + next(f"N={r.N} D={r.D} V={r.V} {r.dtype}" for r in plain if r.shape == s)
                                for s in shapes], fontsize=8)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"masked CE, 20% of labels ignored: {dev}")
        fig.tight_layout()
        p = out / f"{dev}_plain.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
        # time and memory vs tokens, per method (shapes that share D, V, dtype)
        fams: dict[tuple, list[Result]] = {}
        for r in plain:
            fams.setdefault((r.D, r.V, r.dtype), []).append(r)
        fams = {k: v for k, v in fams.items() if len({r.N for r in v}) > 1}
        if fams:
            fig, axes = plt.subplots(len(fams), 2, figsize=(12, 4 * len(fams)), squeeze=False)
            for row, ((D, V, dt), rs) in enumerate(fams.items()):
                for k, key in enumerate(("total_s", "peak_mb")):
                    ax = axes[row][k]
                    for m in methods:
                        pts = sorted((r.N, getattr(r, key)) for r in rs if r.method == m and getattr(r, key))
                        if pts:
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
                    ax.set_xlabel("tokens N")
                    ax.set_ylabel(key)
                    ax.set_title(f"D={D} V={V} {dt}")
                    ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=8)
            fig.tight_layout()
            p = out / f"{dev}_vs_tokens.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    scen = [r for r in results if r.scenario != "plain" and r.total_s]
    if scen:
        fig, ax = plt.subplots(figsize=(12, 4.5))
        labels = [f"{r.shape}\n{r.scenario}\n{r.method}" for r in scen]
        ax.bar(range(len(scen)), [r.total_s for r in scen],
               color=["C0" if r.method.startswith("xtf") else "C1" for r in scen])
        ax.set_xticks(range(len(scen)))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylabel("forward+backward time (s)")
        ax.set_title("statistics, masking and the XTF step (blue: xtf, orange: peer compositions)")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        p = out / f"{dev}_scenarios.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (see the module docstring). Returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.masked_ce", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats, one subprocess (CI smoke)")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names (default: all for the device)")
    ap.add_argument("--methods", default=None, help="comma-separated methods to keep (default: all)")
    ap.add_argument("--scenarios", default=None, help="comma-separated scenarios to keep (default: all)")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats per case (default 3, quick 2)")
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                    help="output directory for <device>.csv and the PNG plots")
    ap.add_argument("--tag", default="", help="suffix of the output file names (a partial re-run)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child is not None:
        _child(args._child)
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.reps is not None and args.reps < 1:
        ap.error("--reps: expected >= 1")
    table = QUICK_SHAPES if args.quick else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    names = args.shapes.split(",") if args.shapes else list(table)
    bad = [n for n in names if n not in table]
    if bad:
        ap.error(f"--shapes: unknown {bad}; expected names from {list(table)}")
    reps = args.reps or (2 if args.quick else 3)
    cases = plan([table[n] for n in names], device, reps, quick=args.quick)
    if args.methods:
        keep = set(args.methods.split(","))
        cases = [c for c in cases if c.method in keep]
    if args.scenarios:
        keep = set(args.scenarios.split(","))
        cases = [c for c in cases if c.scenario in keep]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    dev = device_name(device) + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    vs = versions()
    meta = {"device": dev, "torch": vs["torch"], "xtf_kernels": vs["xtf-kernels"],
            "cut_cross_entropy": vs["cut-cross-entropy"], "liger_kernel": vs["liger-kernel"],
            "threads": torch.get_num_threads(), "loadavg_start": f"{load:.2f}"}
    print(f"device {dev}; load average at start {load:.2f}; versions {vs}", file=sys.stderr)
    # isolate every case on CPU (peak RSS per process); on GPU memory is measured per case anyway
    isolate = device == "cpu" and not args.quick
    results = run_cases(cases, device, isolate, args.timeout)
    add_ratios(results)
    print_table(results)
    out = Path(args.out)
    write_csv(results, out / f"{dev}.csv", meta)
    paths = plot(results, out, dev)
    print(f"wrote {out / (dev + '.csv')} and {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
