"""Our NumPy Multi-Otsu against an exhaustive float64 oracle and scikit-image.

Convention (docs/xtf.md): classes are unions of whole bins and a threshold is the UPPER EDGE of
the last bin of its class; scikit-image reports the centre of that bin. So on the same bins our
thresholds are scikit-image's plus half a bin width, and the tests compare bin indices.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from xtf_kernels.xtf.multiotsu import (
    bin_centers,
    bin_edges,
    digitize,
    fixed_histogram,
    multiotsu_bins,
    multiotsu_from_histogram,
    threshold_multiotsu,
)

skf = pytest.importorskip("skimage.filters")


def _brute(prob: np.ndarray, classes: int) -> tuple[int, ...]:
    """Exhaustive search of the between-class variance (float64), lexicographically first max."""
    n = prob.size
    idx = np.arange(n)
    best, arg = -1.0, None
    for cut in itertools.combinations(range(n - 1), classes - 1):
        edges = (-1, *cut, n - 1)
        tot = 0.0
        for a, b in zip(edges[:-1], edges[1:]):
            p = prob[a + 1 : b + 1].sum()
            s = (prob[a + 1 : b + 1] * idx[a + 1 : b + 1]).sum()
            tot += s * s / p if p > 0 else 0.0
        if tot > best + 1e-12:
            best, arg = tot, cut
    return arg


def _between_var(x: np.ndarray, th: np.ndarray) -> float:
    cls = np.digitize(x, th)
    return sum(x[cls == k].sum() ** 2 / (cls == k).sum() for k in range(th.size + 1) if (cls == k).any())


@pytest.mark.parametrize("classes", [2, 3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_matches_exhaustive_oracle(classes, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 20, size=14).astype(float)
    counts[rng.integers(0, 14, 3)] = 0
    edges = np.linspace(0.0, 1.0, 15)
    want = list(_brute(counts / counts.sum(), classes))
    np.testing.assert_array_equal(multiotsu_bins(counts, classes), want)
    np.testing.assert_array_equal(multiotsu_from_histogram(counts, edges, classes), edges[np.array(want) + 1])


def _sk_bins(ref: np.ndarray, lo: float, hi: float, nbins: int = 256) -> np.ndarray:
    """scikit-image's thresholds (bin centres) as bin indices."""
    return np.rint((ref - lo) / ((hi - lo) / nbins) - 0.5).astype(int)


def _our_bins(ours: np.ndarray, lo: float, hi: float, nbins: int = 256) -> np.ndarray:
    """Our thresholds (upper bin edges) as the index of the last bin of the lower class."""
    return np.rint((ours - lo) / ((hi - lo) / nbins)).astype(int) - 1


def test_well_separated_equals_skimage():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.1, 0.01, 400), rng.normal(0.5, 0.01, 300), rng.normal(0.9, 0.01, 300)])
    half = (x.max() - x.min()) / 256 / 2
    for classes in (2, 3):
        # the same bins as scikit-image; the threshold is the bin's upper edge, not its centre
        np.testing.assert_allclose(threshold_multiotsu(x, classes), skf.threshold_multiotsu(x, classes=classes) + half)
    cls = digitize(x, threshold_multiotsu(x, 3))
    assert np.bincount(cls).tolist() == [400, 300, 300]


@pytest.mark.parametrize("seed", range(5))
def test_classes_are_whole_bins(seed):
    """Every value of a bin lands in one class (the bin-centre comparison split the threshold bin)."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.random(2000) ** 2, 3)  # many exact repeats, as per-token-id scores are
    x[:2] = [0.0, 1.0]
    th = threshold_multiotsu(x, 3)
    b = np.clip(np.floor(x * 256).astype(int), 0, 255)
    cls = digitize(x, th)
    for k in np.unique(b):
        assert np.unique(cls[b == k]).size == 1
    # and the classes equal the bin-index split
    last = multiotsu_bins(fixed_histogram(x, 0.0, 1.0, 256), 3)
    np.testing.assert_array_equal(cls, np.searchsorted(last, b, side="left"))


def test_degenerate_one_bin_per_class_leaves_no_class_empty():
    # the pipeline's form: a fixed [0, 1] histogram, values above their bin's centre
    x = np.array([0.003, 0.003, 0.5, 1.0])
    hist = fixed_histogram(x, 0.0, 1.0, 256)
    assert digitize(x, multiotsu_from_histogram(hist, bin_edges(0.0, 1.0, 256), 3)).tolist() == [0, 0, 1, 2]
    # the former convention (centres of the non-empty bins) put both 0.003 into class 1: class 0 empty
    old = bin_centers(0.0, 1.0, 256)[np.flatnonzero(hist)[:-1]]
    assert np.digitize(x, old).tolist() == [1, 1, 1, 2]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("classes", [2, 3, 4])
def test_close_to_skimage_and_never_worse(seed, classes):
    """skimage searches in float32 and weighs bin 0 as index 1, so on noisy data its thresholds
    can move by a bin within near-ties; ours is the exact optimum: never a smaller between-class
    variance than skimage's, and within two bins of it."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 1, 600), rng.normal(3, 0.5, 300), rng.normal(6, 1, 200)]) if seed % 2 else rng.random(1000) ** 2
    ours = threshold_multiotsu(x, classes)
    ref = skf.threshold_multiotsu(x, classes=classes)
    lo, hi = x.min(), x.max()
    assert ours.shape == ref.shape
    assert np.all(np.abs(_our_bins(ours, lo, hi) - _sk_bins(ref, lo, hi)) <= 2)
    # compare partitions by bins (ours: whole bins; scikit-image's bin split moved to the same side)
    assert _between_var(x, ours) >= _between_var(x, ref + (hi - lo) / 256 / 2) * (1 - 1e-9)


def test_histogram_form_equals_raw_form_and_merges():
    rng = np.random.default_rng(1)
    x = rng.random(3000)
    x[[0, 1]] = [0.0, 1.0]
    parts = np.array_split(x, 3)
    merged = sum(fixed_histogram(p, 0.0, 1.0, 256) for p in parts)
    assert merged.dtype == np.int64
    np.testing.assert_array_equal(merged, fixed_histogram(x, 0.0, 1.0, 256))
    np.testing.assert_array_equal(multiotsu_from_histogram(merged, bin_edges(0, 1, 256), 3), threshold_multiotsu(x, 3))
    assert bin_centers(0, 1, 4).tolist() == [0.125, 0.375, 0.625, 0.875]


def test_few_values_and_errors():
    x = np.array([0.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(threshold_multiotsu(x, 3), skf.threshold_multiotsu(x, classes=3) + 1 / 256 / 2)
    with pytest.raises(ValueError, match="all values are equal"):
        threshold_multiotsu(np.ones(5))
    with pytest.raises(ValueError, match="non-empty bins"):
        multiotsu_from_histogram(np.array([1, 0, 0, 2]), np.arange(5.0), 3)
    with pytest.raises(ValueError, match="edges"):
        multiotsu_from_histogram(np.array([1, 2, 3, 2]), np.arange(4.0), 3)
    with pytest.raises(ValueError, match="classes"):
        threshold_multiotsu(np.arange(5.0), classes=1)
    with pytest.raises(ValueError, match="lo, hi"):
        fixed_histogram(np.arange(3.0), 1.0, 1.0)
    assert digitize(np.array([np.nan, 0.2, 0.7]), np.array([0.5])).tolist() == [-1, 0, 1]
