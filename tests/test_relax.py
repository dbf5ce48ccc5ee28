"""R2* fits (log-linear, ARLO, nonlinear) against known decays; R2' from R2* and R2."""

import numpy as np
import pytest

from chisep.errors import InputError
from chisep.relax import R2STAR_METHODS, R2STAR_RANGE, r2prime_map, r2star_map

TES = np.array([5.0, 11.0, 17.0, 23.0, 29.0]) * 1e-3  # the chi-separation protocol


def decay_data(shape=(12, 10, 8), seed=0, noise=0.0, tes=TES):
    rng = np.random.default_rng(seed)
    r2 = rng.uniform(8.0, 90.0, shape)
    s0 = rng.uniform(200.0, 400.0, shape)
    signal = s0[..., None] * np.exp(-r2[..., None] * tes)
    if noise:
        signal = np.abs(signal + noise * (rng.normal(size=signal.shape) + 1j * rng.normal(size=signal.shape)))
    return signal.astype(np.float32), r2


@pytest.mark.parametrize("method,rtol", [("loglinear", 1e-3), ("nonlinear", 1e-3), ("arlo", 0.03)])
def test_noiseless_recovery(method, rtol):
    mag, r2 = decay_data()
    out = r2star_map(mag, TES, method=method)
    assert out.dtype == np.float32 and out.shape == r2.shape
    assert np.max(np.abs(out / r2 - 1)) < rtol


def test_float64_input_and_mask():
    mag, r2 = decay_data()
    mask = np.zeros(r2.shape, bool)
    mask[2:8, 3:7, 1:5] = True
    out = r2star_map(mag.astype(np.float64), TES, mask, method="loglinear")
    assert np.all(out[~mask] == 0)
    assert np.max(np.abs(out[mask] / r2[mask] - 1)) < 1e-3


@pytest.mark.parametrize("method", R2STAR_METHODS)
def test_noisy_estimates_are_unbiased_and_close(method):
    mag, r2 = decay_data(shape=(20, 20, 10), noise=3.0, seed=1)  # SNR ~ 100 at TE1
    out = r2star_map(mag, TES, method=method)
    err = out - r2
    assert abs(err.mean()) < 0.5
    assert np.sqrt(np.mean(err**2)) < 4.0


def test_nonlinear_beats_loglinear_at_low_snr_late_echoes():
    """Log-linear weights S^2 are noisy where S is small; the nonlinear fit is at least as good."""
    mag, r2 = decay_data(shape=(20, 20, 10), noise=12.0, seed=4)
    rmse = {m: np.sqrt(np.mean((r2star_map(mag, TES, method=m) - r2) ** 2)) for m in ("loglinear", "nonlinear")}
    assert rmse["nonlinear"] <= 1.05 * rmse["loglinear"]


def test_arlo_bias_grows_with_r2star_dte():
    """ARLO's Simpson rule is exact as dTE -> 0; a small known bias otherwise."""
    tes = np.arange(1, 6) * 6e-3
    mag, r2 = decay_data(tes=tes)
    out = r2star_map(mag, tes, method="arlo")
    rel = np.abs(out / r2 - 1)
    assert rel.max() < 0.03
    assert rel[r2 > 60].mean() > rel[r2 < 20].mean()


@pytest.mark.parametrize("method", R2STAR_METHODS)
def test_clipping_is_flagged(method):
    mag, r2 = decay_data(shape=(4, 4, 4))
    mag[0, 0, 0] = 300.0 * np.exp(-1500.0 * TES)  # R2* beyond the plausible range
    mag[1, 1, 1] = 300.0 * np.exp(+5.0 * TES)  # growing signal: negative R2*
    out, info = r2star_map(mag, TES, method=method, return_info=True)
    assert out[1, 1, 1] == 0.0 and info["clipped"][1, 1, 1]
    if method == "arlo":
        # ARLO saturates at 3 / dTE (Simpson's rule): never above the range
        assert out[0, 0, 0] == pytest.approx(3 / 6e-3, rel=1e-3)
        assert info["clipped_fraction"] == pytest.approx(1 / 64)
    else:
        assert out[0, 0, 0] == pytest.approx(R2STAR_RANGE[1])
        assert info["clipped"][0, 0, 0]
        assert info["clipped_fraction"] == pytest.approx(2 / 64)


def test_zero_voxels_do_not_crash():
    mag, _ = decay_data(shape=(4, 4, 4))
    mag[0] = 0.0
    for method in R2STAR_METHODS:
        out = r2star_map(mag, TES, method=method)
        assert np.all(np.isfinite(out))


def test_r2star_invalid_inputs():
    mag, _ = decay_data(shape=(4, 4, 4))
    with pytest.raises(InputError, match="equally spaced"):
        r2star_map(mag, [0.005, 0.010, 0.016, 0.023, 0.029], method="arlo")
    with pytest.raises(InputError, match="at least 3"):
        r2star_map(mag[..., :2], TES[:2], method="arlo")
    with pytest.raises(InputError, match="at least 2"):
        r2star_map(mag[..., :1], TES[:1])
    with pytest.raises(InputError, match="4D"):
        r2star_map(mag[..., 0], TES)
    with pytest.raises(InputError, match="one echo time"):
        r2star_map(mag, TES[:4])
    with pytest.raises(InputError, match="milliseconds"):
        r2star_map(mag, TES * 1e3)
    with pytest.raises(InputError, match="loglinear"):
        r2star_map(mag, TES, method="exponential")
    bad = mag.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        r2star_map(bad, TES)
    with pytest.raises(InputError, match="negative"):
        r2star_map(-mag, TES)
    with pytest.raises(InputError, match="mask"):
        r2star_map(mag, TES, np.ones((4, 4, 5), bool))


# ---------------------------------------------------------------------------
# R2'
# ---------------------------------------------------------------------------
def test_r2prime_nominal_and_measured():
    r2star = np.array([10.0, 20.0, 30.0, 40.0]).reshape(2, 2, 1)
    out, info = r2prime_map(r2star)
    assert np.allclose(out.ravel(), [0.0, 7.0, 17.0, 27.0])
    assert info["r2_source"] == "nominal" and info["nominal_r2"] == 13.0
    assert info["clipped_fraction"] == pytest.approx(0.25) and info["clipped"][0, 0, 0]
    r2 = np.array([5.0, 25.0, 10.0, 10.0]).reshape(2, 2, 1)
    out, info = r2prime_map(r2star, r2)
    assert np.allclose(out.ravel(), [5.0, 0.0, 20.0, 30.0])
    assert info["r2_source"] == "measured" and info["clipped_fraction"] == pytest.approx(0.25)
    out, _ = r2prime_map(r2star, 12.0)
    assert np.allclose(out.ravel(), [0.0, 8.0, 18.0, 28.0])


def test_r2prime_mask_and_errors():
    r2star = np.full((3, 3, 3), 30.0)
    mask = np.zeros((3, 3, 3), bool)
    mask[1, 1, 1] = True
    out, info = r2prime_map(r2star, nominal_r2=10.0, mask=mask)
    assert out[1, 1, 1] == pytest.approx(20.0) and out.sum() == pytest.approx(20.0)
    with pytest.raises(InputError, match="shape"):
        r2prime_map(r2star, np.ones((3, 3, 2)))
    with pytest.raises(InputError, match="negative"):
        r2prime_map(r2star, np.full((3, 3, 3), -1.0))
    with pytest.raises(InputError, match="NaN"):
        r2prime_map(r2star, np.full((3, 3, 3), np.nan))
    with pytest.raises(InputError, match="nominal_r2"):
        r2prime_map(r2star, nominal_r2=-2.0)
    with pytest.raises(InputError, match="r2star"):
        r2prime_map(np.full((3, 3, 3), np.nan))


def test_gradient_dephasing_correction_recovers_the_decay_of_a_box_voxel():
    """A field ramp across box voxels dephases each by sinc(g TE); the correction undoes it."""
    from chisep.relax import gradient_dephasing_correction

    tes = np.array([0.005, 0.011, 0.017, 0.023, 0.029])
    shape = (12, 10, 8)
    slope = np.array([10.0, -5.0, 0.0])  # Hz per voxel along x, y, z (below 1/(2 TE_max): no sinc zero)
    idx = np.indices(shape).astype(np.float64)
    field = np.tensordot(slope, idx, axes=1)
    r2star = 20.0
    true = 1000.0 * np.exp(-r2star * tes)
    dephased = true * np.prod(np.sinc(slope[:, None] * tes), axis=0)
    magnitude = np.broadcast_to(dephased, shape + (tes.size,)).astype(np.float32)
    mask = np.ones(shape, bool)
    corrected = gradient_dephasing_correction(magnitude, field, tes, mask)
    np.testing.assert_allclose(corrected[3, 4, 4], true, rtol=1e-4)
    # fitted R2*: biased high by the gradients without the correction, right with it
    before = r2star_map(magnitude, tes, mask, method="loglinear")[3, 4, 4]
    after = r2star_map(corrected, tes, mask, method="loglinear")[3, 4, 4]
    assert before > r2star + 5.0
    assert after == pytest.approx(r2star, abs=0.05)
    # one-sided differences at the mask's edge, and voxels outside the mask untouched
    edge = np.zeros(shape, bool)
    edge[:6] = True
    part = gradient_dephasing_correction(magnitude, field, tes, edge)
    np.testing.assert_allclose(part[5, 4, 4], true, rtol=1e-4)
    np.testing.assert_array_equal(part[8], magnitude[8])
    with pytest.raises(InputError, match="floor"):
        gradient_dephasing_correction(magnitude, field, tes, mask, floor=1.5)
