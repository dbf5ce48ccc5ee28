"""Tests for chisep.metrics: known values on small synthetic maps."""

import numpy as np
import pytest
from scipy import ndimage

from chisep import metrics
from chisep.errors import InputError


@pytest.fixture
def maps():
    rng = np.random.default_rng(0)
    truth = np.zeros((24, 24, 24))
    truth[6:18, 6:18, 6:18] = 0.1
    truth[9:14, 9:14, 9:14] = -0.05
    truth += 0.01 * rng.standard_normal(truth.shape)
    mask = np.zeros(truth.shape, bool)
    mask[3:21, 3:21, 3:21] = True
    return truth, mask, rng


def test_nrmse_known_values(maps):
    truth, mask, _ = maps
    assert metrics.nrmse(truth, truth, mask) == pytest.approx(0.0, abs=1e-9)
    # Demeaned inside the mask: a constant offset costs nothing.
    assert metrics.nrmse(truth + 3.0, truth, mask) == pytest.approx(0.0, abs=1e-9)
    # A zero (or constant) estimate is 100 % wrong; doubling the contrast is also 100 %.
    assert metrics.nrmse(np.zeros_like(truth), truth, mask) == pytest.approx(100.0)
    assert metrics.nrmse(2 * truth, truth, mask) == pytest.approx(100.0)
    # Values outside the mask are ignored.
    outside = np.where(mask, truth, 50.0)
    assert metrics.nrmse(outside, truth, mask) == pytest.approx(0.0, abs=1e-9)


def test_detrended_nrmse_ignores_linear_trend_only(maps):
    truth, mask, rng = maps
    assert metrics.detrended_nrmse(0.5 * truth - 2.0, truth, mask) == pytest.approx(0.0, abs=1e-6)
    noisy = 0.5 * truth + 0.01 * rng.standard_normal(truth.shape)
    assert metrics.detrended_nrmse(noisy, truth, mask) > 5.0
    assert metrics.nrmse(0.5 * truth, truth, mask) == pytest.approx(50.0)


def test_hfen_zero_for_identical_and_sensitive_to_fine_detail(maps):
    truth, mask, rng = maps
    assert metrics.hfen(truth, truth, mask) == pytest.approx(0.0, abs=1e-9)
    blurred = ndimage.gaussian_filter(truth, 2.0)
    fine_loss = metrics.hfen(blurred, truth, mask)
    assert fine_loss > metrics.nrmse(blurred, truth, mask)  # HFEN weighs the lost edges more
    assert metrics.hfen(truth, truth, mask, sigma=3.0) == pytest.approx(0.0, abs=1e-9)


def test_xsim_identity_noise_and_no_rescaling(maps):
    truth, mask, rng = maps
    assert metrics.xsim(truth, truth, mask) == pytest.approx(1.0)
    small = metrics.xsim(truth + 0.01 * rng.standard_normal(truth.shape), truth, mask)
    large = metrics.xsim(truth + 0.05 * rng.standard_normal(truth.shape), truth, mask)
    assert 1.0 > small > large
    # No intensity rescaling: a map with half the contrast scores below 1.
    assert metrics.xsim(0.5 * truth, truth, mask) < 0.99


def test_roi_means_and_slope():
    labels = np.zeros((4, 4, 4), int)
    labels[0] = 1
    labels[1] = 2
    labels[2] = 3
    values = labels * 0.1
    out = metrics.roi_means(values, labels, {"a": 1, "b": 2, "ab": (1, 2), "none": 9})
    assert out["a"] == pytest.approx(0.1) and out["b"] == pytest.approx(0.2)
    assert out["ab"] == pytest.approx(0.15)
    assert np.isnan(out["none"])
    slope, intercept = metrics.linear_fit_slope([0.2, 0.4, 0.6], [0.1, 0.2, 0.3])
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(0.0, abs=1e-12)


def test_invalid_inputs(maps):
    truth, mask, _ = maps
    with pytest.raises(InputError, match="same shape"):
        metrics.nrmse(truth[:-1], truth, mask)
    with pytest.raises(InputError, match="empty"):
        metrics.nrmse(truth, truth, np.zeros_like(mask))
    bad = truth.copy()
    bad[10, 10, 10] = np.nan
    with pytest.raises(InputError, match="NaN"):
        metrics.xsim(bad, truth, mask)
    with pytest.raises(InputError, match="constant"):
        metrics.nrmse(truth, np.ones_like(truth), mask)
    with pytest.raises(InputError):
        metrics.linear_fit_slope([1.0], [1.0])
    with pytest.raises(InputError, match="labels shape"):
        metrics.roi_means(truth, np.zeros((2, 2, 2), int), {"a": 1})


def test_dice_is_the_overlap_of_two_masks():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[:2] = True  # 32 voxels
    b[1:3] = True  # 32 voxels, 16 shared
    assert metrics.dice(a, b) == pytest.approx(0.5)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(np.zeros_like(a), np.zeros_like(a)) == 0.0
    with pytest.raises(InputError, match="shapes"):
        metrics.dice(a, a[:2])
