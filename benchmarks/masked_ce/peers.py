"""The peers: what users would pick instead of xtf_kernels (availability and a loss function each).

Each builder returns ``fn(h, w, y, reduction) -> loss`` (ignore_index=-100); a peer that
cannot run here is reported as skipped with the reason, never faked.
"""

from __future__ import annotations

from collections.abc import Callable

from .shapes import PLAIN_PEERS, Shape


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


def _peer_of(method: str) -> str | None:
    if method in PLAIN_PEERS:
        return method
    if method.startswith("compose-"):
        return method[len("compose-"):]
    return None

