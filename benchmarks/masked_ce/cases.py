"""Planning the suite and building one case: (inputs, forward returning the loss, kept rows)."""

from __future__ import annotations

from .peers import PLAIN_PEERS, peer_loss_fn
from .shapes import (
    CHUNK_VARIANTS,
    FLOORS,
    GRAD_FILTERS,
    SCENARIOS_GRAD_FILTER,
    SCENARIOS_XTF,
    Case,
    Shape,
    chunk_elems_of,
    grad_filter_of,
    make_inputs,
    mask_share,
)


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

    if m in FLOORS:
        xk = h[scored].contiguous()
        inputs["xk"] = xk
        up = m == "gemm-floor-fp32"  # half operands upcast in the step (as the CPU backends do)

        class Floor(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, ww):
                if up:
                    x, ww = x.float(), ww.float()
                z = x @ ww.t()
                ctx.save_for_backward(x, ww, z)
                return z[0, 0].float() * 0.0  # no pass over z: the floor is the GEMMs alone

            @staticmethod
            def backward(ctx, g):
                x, ww, z = ctx.saved_tensors
                return z @ ww, z.t() @ x

        return inputs, (lambda hh, ww: Floor.apply(xk.requires_grad_(hh.requires_grad), ww)), kept_rows

    if m.startswith("xtf-"):
        be, _, variant = m[4:].partition("+")
        kw: dict = {"backend": be, "softcap": shape.softcap, "bias": b}
        chunk = None
        if variant.startswith("ce-"):
            chunk = chunk_elems_of(variant, shape)
        elif variant:
            kw["grad_filter"] = grad_filter_of(variant)
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
            # the op records chunk_elems in the forward: the backward runs with it too
            with xtf_kernels.options(**({} if chunk is None else {"chunk_elems": chunk})):
                out = masked_ce(hh, ww, y, **kw)
            return out[0] if isinstance(out, tuple) else out
        inputs["kw"] = kw  # the call's options (the gradient-filter report reruns it)
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


def _bias(shape: Shape, device: str):
    """The LM-head bias of a ``bias`` shape (N(0, 1), the shape's dtype), else None."""
    import torch

    if not shape.bias:
        return None
    g = torch.Generator().manual_seed(2)
    return torch.randn(shape.V, generator=g).to(getattr(torch, shape.dtype)).to(device)


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
        # a CPU without native half GEMMs runs ATen's slow fallback: the fp32 floor is the fair one
        floors = ["gemm-floor", "gemm-floor-fp32"] if device == "cpu" and sh.dtype != "float32" else ["gemm-floor"]
        for m in [*floors, *xtf, *peers]:
            cases.append(Case(sh, "plain", m, reps))
        best = "xtf-native" if "xtf-native" in xtf else ("xtf-triton" if "xtf-triton" in xtf else xtf[0])
        for sc in SCENARIOS_XTF:
            cases.append(Case(sh, sc, best, reps))
        for p in peers:
            cases.append(Case(sh, "xtf-step", f"compose-{p}", reps))
        if device == "cpu" and sh.dtype == "float32":
            cases += [Case(sh, "plain", f"{best}+{cv}", reps) for cv in CHUNK_VARIANTS]
        if sh.logits == "peaked":
            for sc in SCENARIOS_GRAD_FILTER:
                cases += [Case(sh, sc, f"{best}+{gf}", reps) for gf in GRAD_FILTERS]
    return cases

