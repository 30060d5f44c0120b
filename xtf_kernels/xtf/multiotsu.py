"""Multi-Otsu thresholding in NumPy, on raw values or on a (mergeable) fixed-bin histogram.

The histogram form is what makes the distributed pipeline exact: every rank builds a histogram
over the same fixed bins, the counts are summed across ranks (an all-reduce of integers), and
the thresholds are computed from the summed histogram, so any number of ranks gives the same
thresholds as one process. The search maximises the between-class variance
``sum_k S_k^2 / P_k`` (P_k: class mass, S_k: class first moment) exactly, by dynamic
programming over bins, for any number of classes.

Classes are unions of whole bins: the search returns, per class boundary, the index of the last
bin of the lower class, and the threshold we report is that bin's UPPER EDGE. A value's class
is ``np.digitize(value, thresholds)``, which for a value in bin ``b`` (``edges[b] <= v <
edges[b + 1]``, the histogram's own rule) is the class that bin ``b`` belongs to: every value
of a bin, and so every occurrence of a token type whose score falls in it, lands in one class.
scikit-image reports the CENTRE of the same bin and classifies by comparing against it, which
splits the threshold bin between two classes (and with exactly ``classes`` non-empty bins can
leave class 0 empty); our thresholds are scikit-image's plus half a bin width.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bin_centers", "bin_edges", "fixed_histogram", "multiotsu_bins", "multiotsu_from_histogram",
           "threshold_multiotsu", "digitize"]


def fixed_histogram(
    values: np.ndarray,
    lo: float,
    hi: float,
    nbins: int = 256,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Counts of ``values`` in ``nbins`` equal bins over ``[lo, hi]`` (int64, or float64 if weighted).

    Args:
        values: 1-D float array; NaNs are ignored.
        lo, hi: histogram range, ``lo < hi``; values outside it are ignored (as np.histogram).
        nbins: number of bins (>= 2).
        weights: optional per-value weights (same shape), e.g. token-occurrence counts.

    Returns:
        ``[nbins]`` counts; summing the results of several shards gives the histogram of their union.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not isinstance(nbins, (int, np.integer)) or nbins < 2:
        raise ValueError(f"nbins: expected an int >= 2, got {nbins!r}")
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"lo, hi: expected finite lo < hi, got {lo!r}, {hi!r}")
    ok = ~np.isnan(v)
    w = None
    if weights is not None:
        w = np.asarray(weights).reshape(-1)
        if w.shape != v.shape:
            raise ValueError(f"weights: expected shape {v.shape}, got {w.shape}")
        w = w[ok]
    counts, _ = np.histogram(v[ok], bins=int(nbins), range=(float(lo), float(hi)), weights=w)
    return counts if weights is not None else counts.astype(np.int64)


def bin_centers(lo: float, hi: float, nbins: int) -> np.ndarray:
    """Centres of the ``nbins`` equal bins over ``[lo, hi]`` (float64 ``[nbins]``)."""
    edges = np.linspace(float(lo), float(hi), int(nbins) + 1)
    return (edges[:-1] + edges[1:]) / 2.0


def bin_edges(lo: float, hi: float, nbins: int) -> np.ndarray:
    """The ``nbins + 1`` edges of the equal bins over ``[lo, hi]`` (float64, as ``np.histogram``)."""
    return np.linspace(float(lo), float(hi), int(nbins) + 1)


def _search(prob: np.ndarray, classes: int) -> np.ndarray:
    """Indices of the ``classes - 1`` last bins of the first ``classes - 1`` classes (DP, exact)."""
    n = prob.shape[0]
    idx = np.arange(n, dtype=np.float64)
    cp = np.concatenate([[0.0], np.cumsum(prob)])
    cs = np.concatenate([[0.0], np.cumsum(prob * idx)])
    # H[i, j]: S^2/P of bins i..j (inclusive); 0 where the class is empty
    P = cp[None, 1:] - cp[:-1, None]
    S = cs[None, 1:] - cs[:-1, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        H = np.where(P > 0, S * S / np.where(P > 0, P, 1.0), 0.0)
    H = np.where(np.triu(np.ones((n, n), dtype=bool)), H, -np.inf)
    # best[k][j]: best score of splitting bins 0..j into k+1 classes; arg[k][j]: last bin of class k-1
    best = H[0].copy()
    args = []
    for _ in range(1, classes):
        # cand[i, j] = best[i] + H[i+1, j] for i < j
        cand = best[:-1, None] + H[1:, :]
        a = np.argmax(cand, axis=0)  # first maximum: lowest previous threshold on ties
        nb = cand[a, np.arange(n)]
        args.append(a)
        best = nb
    out = np.empty(classes - 1, dtype=np.int64)
    j = n - 1
    for k in range(classes - 2, -1, -1):
        j = int(args[k][j])
        out[k] = j
    return out


def multiotsu_bins(counts: np.ndarray, classes: int = 3) -> np.ndarray:
    """Multi-Otsu split of a histogram as bin indices.

    Args:
        counts: ``[nbins]`` non-negative counts or weights.
        classes: number of classes (>= 2).

    Returns:
        int64 ``[classes - 1]`` increasing indices: entry ``k`` is the last bin of class ``k``
        (class ``k`` holds bins ``(b[k-1], b[k]]``). Every class holds at least one non-empty bin.

    Raises:
        ValueError: fewer than ``classes`` non-empty bins.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 2:
        raise ValueError(f"classes: expected an int >= 2, got {classes!r}")
    if np.any(c < 0) or not np.all(np.isfinite(c)):
        raise ValueError("counts: expected finite non-negative values")
    nz = np.flatnonzero(c)
    if nz.size < classes:
        raise ValueError(f"counts: only {nz.size} non-empty bins, cannot split into {classes} classes")
    if nz.size == classes:  # one non-empty bin per class
        return nz[:-1].astype(np.int64)
    return _search(c / c.sum(), int(classes))


def multiotsu_from_histogram(counts: np.ndarray, edges: np.ndarray, classes: int = 3) -> np.ndarray:
    """Multi-Otsu thresholds of a histogram, as bin edges.

    Args:
        counts: ``[nbins]`` non-negative counts or weights.
        edges: ``[nbins + 1]`` increasing bin edges (:func:`bin_edges`).
        classes: number of classes (>= 2).

    Returns:
        float64 ``[classes - 1]`` increasing thresholds: the upper edge of the last bin of each
        class but the top one. The class of a value x is ``np.digitize(x, thresholds)``,
        consistent with the bin x falls in.

    Raises:
        ValueError: fewer than ``classes`` non-empty bins, or ``edges`` of the wrong length.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    e = np.asarray(edges, dtype=np.float64).reshape(-1)
    if e.shape != (c.size + 1,):
        raise ValueError(f"edges: expected {c.size + 1} bin edges for {c.size} bins, got shape {e.shape}")
    if np.any(np.diff(e) <= 0):
        raise ValueError("edges: expected strictly increasing values")
    return e[multiotsu_bins(c, classes) + 1]


def threshold_multiotsu(values: np.ndarray, classes: int = 3, nbins: int = 256) -> np.ndarray:
    """Multi-Otsu thresholds of raw float values (bins over [min, max], as scikit-image).

    Args:
        values: float array of any shape; NaNs are ignored.
        classes: number of classes (>= 2).
        nbins: number of histogram bins.

    Returns:
        float64 ``[classes - 1]`` thresholds (bin edges, see :func:`multiotsu_from_histogram`).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    if v.size == 0:
        raise ValueError("values: expected at least one non-NaN value")
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        raise ValueError("values: all values are equal, nothing to threshold")
    counts = fixed_histogram(v, lo, hi, nbins)
    return multiotsu_from_histogram(counts, bin_edges(lo, hi, nbins), classes)


def digitize(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Class index (0 = lowest) of each value; NaN values get -1."""
    v = np.asarray(values, dtype=np.float64)
    cls = np.digitize(v, np.asarray(thresholds, dtype=np.float64)).astype(np.int64)
    return np.where(np.isnan(v), -1, cls)
