"""The rules of the authors' released implementation (the ``official`` preset), our own code.

Every rule is capped per sequence by a percentage. For one sequence with ``n`` response
tokens and ``sorted_x`` = their values in ascending order:

* KN: ``p > 1 - kn_threshold`` (0.95) and ``p > sorted_p[int(n * (1 - cap_kn))]``: at most
  about ``cap_kn`` of the sequence, its most confidently predicted tokens.
* TR: ``rel < t_TR`` and ``rel < sorted_rel[int(n * cap_tr)]`` (nothing fires when
  ``n * cap_tr < 1``: index 0 is the minimum).
* RI: fence ``Q1 - k * IQR`` (k = 1.5, linear percentiles); when more than ``cap_ri`` of the
  tokens lie below it, the fence becomes ``sorted_ri[int(n * cap_ri)]``; fires strictly below.

``t_TR`` comes from :func:`official_tr_cut`: a Multi-Otsu (5 classes, 256 bins between the
data's minimum and maximum, thresholds at bin centres as scikit-image returns them) over the
relevance of every token occurrence of the data, then the released cumulative-proportion pick.

NaN values are left out of ``n`` and never fire (the released code has no NaN: it gives the
first position p = 0).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .multiotsu import bin_centers, multiotsu_bins

__all__ = ["capped_kn_mask", "capped_tr_mask", "capped_ri_mask", "official_tr_cut", "cumulative_pick"]


def _sequences(values: np.ndarray, example_id: np.ndarray, is_response: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(example id, row indices of its non-NaN response values) per sequence, rows in table order."""
    sel = np.flatnonzero(is_response & ~np.isnan(values))
    if sel.size == 0:
        return
    order = sel[np.argsort(example_id[sel], kind="stable")]
    uniq, starts = np.unique(example_id[order], return_index=True)
    bounds = np.append(starts, order.size)
    for i, e in enumerate(uniq):
        yield int(e), order[bounds[i] : bounds[i + 1]]


def _columns(name: str, values, example_id, is_response) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    ex = np.asarray(example_id)
    resp = np.asarray(is_response, dtype=bool)
    if v.ndim != 1 or ex.shape != v.shape or resp.shape != v.shape:
        raise ValueError(f"{name}, example_id, is_response: expected 1-D arrays of one length, got "
                         f"{v.shape}, {ex.shape}, {resp.shape}")
    return v, ex, resp


def _check_cap(name: str, cap: float) -> float:
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0.0 <= cap <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {cap!r}")
    return float(cap)


def capped_kn_mask(p, example_id, is_response, threshold: float = 0.95, cap: float = 0.10) -> np.ndarray:
    """KN as released: ``p > threshold`` and ``p > sorted_p[int(n * (1 - cap))]`` per sequence.

    Args:
        p: float ``[N]`` probability of the gold token under the base model.
        example_id: int ``[N]``; is_response: bool ``[N]`` (only response tokens count and fire).
        threshold: the absolute cut (0.95).
        cap: the sequence's share (0.10).

    Returns:
        bool ``[N]``.
    """
    v, ex, resp = _columns("p", p, example_id, is_response)
    cap = _check_cap("cap", cap)
    fired = np.zeros(v.shape, dtype=bool)
    for _, rows in _sequences(v, ex, resp):
        x = v[rows]
        n = x.size
        k = min(int(n * (1.0 - cap)), n - 1)  # the released index; cap = 0 reads the maximum
        fired[rows] = (x > float(threshold)) & (x > np.sort(x)[k])
    return fired


def capped_tr_mask(rel, example_id, is_response, cut: float | None, cap: float = 0.05) -> np.ndarray:
    """TR as released: ``rel < cut`` and ``rel < sorted_rel[int(n * cap)]`` per sequence (bool ``[N]``).

    ``cut=None`` (no threshold could be computed) never fires.
    """
    v, ex, resp = _columns("rel", rel, example_id, is_response)
    cap = _check_cap("cap", cap)
    fired = np.zeros(v.shape, dtype=bool)
    if cut is None:
        return fired
    for _, rows in _sequences(v, ex, resp):
        x = v[rows]
        k = min(int(x.size * cap), x.size - 1)
        fired[rows] = (x < float(cut)) & (x < np.sort(x)[k])
    return fired


def capped_ri_mask(ri, example_id, is_response, k: float = 1.5, cap: float = 0.05) -> tuple[np.ndarray, dict[int, float]]:
    """RI as released: below ``Q1 - k * IQR``, the fence capped to ``sorted_ri[int(n * cap)]``.

    Returns:
        (bool ``[N]`` fired, ``{example_id: fence in force}``).
    """
    v, ex, resp = _columns("ri", ri, example_id, is_response)
    cap = _check_cap("cap", cap)
    fired = np.zeros(v.shape, dtype=bool)
    fences: dict[int, float] = {}
    for e, rows in _sequences(v, ex, resp):
        x = v[rows]
        q1, q3 = np.percentile(x, [25.0, 75.0])
        fence = q1 - float(k) * (q3 - q1)
        if np.mean(x < fence) > cap:
            fence = np.sort(x)[min(int(x.size * cap), x.size - 1)]
        fences[e] = float(fence)
        fired[rows] = x < fence
    return fired, fences


def cumulative_pick(thresholds: np.ndarray, proportions: np.ndarray, limit: float = 1.0) -> float:
    """The released pick: walk ``i = 0, 1, ...`` summing ``proportions[i]`` (share of occurrences
    ``>= thresholds[i]``); at the first ``i`` where the sum exceeds ``limit`` take
    ``thresholds[i - 1]`` (``thresholds[0]`` when ``i = 0``); ``thresholds[-1]`` if never."""
    t = np.asarray(thresholds, dtype=np.float64)
    pr = np.asarray(proportions, dtype=np.float64)
    if t.ndim != 1 or t.size == 0 or pr.shape != t.shape:
        raise ValueError(f"thresholds, proportions: expected two 1-D arrays of one non-zero length, got {t.shape}, {pr.shape}")
    total = 0.0
    for i, share in enumerate(pr.tolist()):
        total += share
        if total > limit:
            return float(t[i - 1] if i > 0 else t[0])
    return float(t[-1])


def official_tr_cut(values: np.ndarray, counts: np.ndarray, classes: int = 5, nbins: int = 256) -> dict:
    """``t_TR`` of the official preset from the relevance of every token occurrence.

    Args:
        values: float ``[K]`` relevance of each distinct token (NaN ignored).
        counts: int ``[K]`` occurrences of each in the data (prompt tokens included).
        classes, nbins: the Multi-Otsu (5 classes, 256 bins between the minimum and maximum).

    Returns:
        ``{"thresholds": [classes - 1] bin centres, "proportions": share of occurrences >= each,
        "cut": t_TR, "range": [min, max]}``.

    Raises:
        ValueError: fewer than ``classes`` non-empty bins (e.g. every value equal).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    if v.shape != c.shape or np.any(c < 0):
        raise ValueError(f"values, counts: expected equal 1-D shapes and counts >= 0, got {v.shape}, {c.shape}")
    ok = ~np.isnan(v) & (c > 0)
    v, c = v[ok], c[ok]
    if v.size == 0:
        raise ValueError("values: no token occurrence to threshold")
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        raise ValueError("values: every token has the same relevance, nothing to threshold")
    hist, _ = np.histogram(v, bins=int(nbins), range=(lo, hi), weights=c)
    idx = multiotsu_bins(np.rint(hist).astype(np.int64), int(classes))
    thr = bin_centers(lo, hi, int(nbins))[idx]
    total = float(c.sum())
    props = np.array([c[v >= t].sum() / total for t in thr], dtype=np.float64)
    return {"thresholds": [float(x) for x in thr], "proportions": [float(x) for x in props],
            "cut": cumulative_pick(thr, props), "range": [lo, hi]}
