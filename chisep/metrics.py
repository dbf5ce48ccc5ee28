"""Scores for reconstructed maps against ground truth, as the QSM community computes them.

The definitions follow the QSM reconstruction challenge 2.0 (Bilgic et al.,
MRM 2021) and its evaluation code (qsm-ci): NRMSE after demeaning inside the
mask, detrended NRMSE, HFEN (NRMSE of Laplacian-of-Gaussian filtered maps),
XSIM (SSIM without intensity rescaling), deep-grey-matter ROI means and the
slope of a linear fit of estimated against true ROI values.

Pure NumPy/SciPy; all functions take the estimate, the truth and a mask of
the same 3D shape.

References
----------
Bilgic B, Langkammer C, Marques JP, et al. QSM reconstruction challenge 2.0:
design and report of results. Magn Reson Med 2021;86:1241-1255.
XSIM: the SSIM variant of the challenge 2.0 evaluation code by C. Milovic
(no rescaling, L = 1 ppm, K = (0.01, 0.001)), also used by qsm-ci.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy import ndimage

from chisep.errors import InputError

__all__ = ["nrmse", "detrended_nrmse", "hfen", "xsim", "roi_means", "linear_fit_slope", "dice"]


def _inputs(estimate, truth, mask):
    est = np.asarray(estimate, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    msk = np.asarray(mask).astype(bool)
    if est.shape != tru.shape or msk.shape != tru.shape:
        raise InputError(
            f"estimate {est.shape}, truth {tru.shape} and mask {msk.shape} must have the same shape"
        )
    if not msk.any():
        raise InputError("mask is empty; scores need at least one voxel")
    if not (np.all(np.isfinite(est[msk])) and np.all(np.isfinite(tru[msk]))):
        raise InputError("estimate or truth holds NaN/inf inside the mask")
    return est, tru, msk


def _nrmse_values(a: np.ndarray, t: np.ndarray) -> float:
    norm = np.linalg.norm(t)
    if norm == 0:
        raise InputError("the truth is constant inside the mask; NRMSE is undefined")
    return float(100.0 * np.linalg.norm(a - t) / norm)


def nrmse(estimate, truth, mask) -> float:
    """Normalised root-mean-square error in percent: ``100 ||a - t|| / ||t||``.

    Both maps are demeaned inside ``mask`` first (susceptibility is only
    defined up to a constant), as the QSM challenge 2.0 scores.

    Parameters
    ----------
    estimate, truth : arrays of one shape
    mask : bool array of that shape
        Voxels scored.

    Returns
    -------
    float, percent

    Examples
    --------
    >>> truth = np.array([0.0, 1.0, 2.0, 3.0])
    >>> round(nrmse(truth + 5.0, truth, np.ones(4, bool)), 6)  # a constant offset costs nothing
    0.0
    >>> round(nrmse(2 * truth, truth, np.ones(4, bool)), 1)
    100.0
    """
    est, tru, msk = _inputs(estimate, truth, mask)
    a, t = est[msk], tru[msk]
    return _nrmse_values(a - a.mean(), t - t.mean())


def detrended_nrmse(estimate, truth, mask) -> float:
    """NRMSE (%) after removing a linear trend: fit ``a = s t + c`` in the mask, score ``(a - c) / s``.

    Insensitive to a global scaling of the estimate (e.g. the systematic
    underestimation of strongly regularised methods).

    Parameters
    ----------
    estimate, truth : arrays of one shape
    mask : bool array of that shape

    Returns
    -------
    float, percent
    """
    est, tru, msk = _inputs(estimate, truth, mask)
    a, t = est[msk], tru[msk]
    s, c = np.polyfit(t, a, 1)
    if s == 0:
        raise InputError("the estimate does not vary with the truth (slope 0); detrended NRMSE is undefined")
    a = (a - c) / s
    return _nrmse_values(a - a.mean(), t - t.mean())


def hfen(estimate, truth, mask, sigma: float = 1.5) -> float:
    """High-frequency error norm (%): NRMSE of Laplacian-of-Gaussian filtered maps.

    Maps are zeroed outside the mask, filtered with
    :func:`scipy.ndimage.gaussian_laplace` (``sigma`` in voxels, 1.5 as in
    the challenge), and compared inside the mask.

    Parameters
    ----------
    estimate, truth : 3D arrays of one shape
    mask : bool array of that shape
    sigma : float, voxels

    Returns
    -------
    float, percent
    """
    est, tru, msk = _inputs(estimate, truth, mask)
    la = ndimage.gaussian_laplace(np.where(msk, est, 0.0), sigma)
    lt = ndimage.gaussian_laplace(np.where(msk, tru, 0.0), sigma)
    return _nrmse_values(la[msk], lt[msk])


def xsim(estimate, truth, mask, L: float = 1.0, K1: float = 0.01, K2: float = 0.001) -> float:
    """Structural similarity without intensity rescaling (XSIM), mean over the mask.

    SSIM with a Gaussian window (sigma 1.5 voxels, truncated at 3.5 sigma,
    as scikit-image's ``gaussian_weights=True``) on the maps as they are
    (zero outside the mask), with dynamic range ``L`` = 1 ppm and the
    challenge's constants K1 = 0.01, K2 = 0.001 (the latter smaller than
    SSIM's 0.03 so that low-contrast susceptibility structure counts).
    Returns a value in [-1, 1]; 1 means identical maps.
    """
    est, tru, msk = _inputs(estimate, truth, mask)
    x, y = np.where(msk, est, 0.0), np.where(msk, tru, 0.0)

    def blur(v):
        return ndimage.gaussian_filter(v, 1.5, truncate=3.5)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (K1 * L) ** 2, (K2 * L) ** 2
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(ssim[msk].mean())


def roi_means(values, labels, label_names: Mapping[str, int | tuple[int, ...]]) -> dict[str, float]:
    """Mean of ``values`` in each labelled region.

    Parameters
    ----------
    values : (nx, ny, nz) array
    labels : (nx, ny, nz) integer array
    label_names : mapping name -> label value (or tuple of values, merged)

    Returns
    -------
    dict name -> mean (NaN where the region is empty)
    """
    vals = np.asarray(values, dtype=np.float64)
    labs = np.asarray(labels)
    if vals.shape != labs.shape:
        raise InputError(f"values shape {vals.shape} does not match labels shape {labs.shape}")
    out = {}
    for name, ids in label_names.items():
        region = np.isin(labs, np.atleast_1d(ids))
        out[name] = float(vals[region].mean()) if region.any() else float("nan")
    return out


def linear_fit_slope(estimate_values, truth_values) -> tuple[float, float]:
    """Least-squares line ``estimate = slope * truth + intercept`` through paired values.

    Used on deep-grey-matter ROI means: the challenge scores ``|1 - slope|``.

    Returns
    -------
    (slope, intercept)
    """
    e = np.asarray(estimate_values, dtype=np.float64).reshape(-1)
    t = np.asarray(truth_values, dtype=np.float64).reshape(-1)
    if e.shape != t.shape or e.size < 2:
        raise InputError(f"need two equally long sequences of at least 2 values, got {e.size} and {t.size}")
    ok = np.isfinite(e) & np.isfinite(t)
    if ok.sum() < 2 or np.ptp(t[ok]) == 0:
        raise InputError("need at least two finite pairs with distinct truth values to fit a line")
    slope, intercept = np.polyfit(t[ok], e[ok], 1)
    return float(slope), float(intercept)


def dice(mask_a, mask_b) -> float:
    """Dice overlap ``2 |A & B| / (|A| + |B|)`` of two masks of one shape (0 when both are empty).

    Parameters
    ----------
    mask_a, mask_b : arrays of one shape (non-zero = inside)

    Returns
    -------
    float in [0, 1]

    Examples
    --------
    >>> dice(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    0.6666666666666666
    """
    a, b = np.asarray(mask_a).astype(bool), np.asarray(mask_b).astype(bool)
    if a.shape != b.shape:
        raise InputError(f"masks of shapes {a.shape} and {b.shape} cannot be compared; resample one first")
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return float(2.0 * np.count_nonzero(a & b) / total) if total else 0.0
