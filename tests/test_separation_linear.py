"""Tests of the linear R2*/chi separation (chisep.separation.linear)."""

import dataclasses

import numpy as np
import pytest
from scipy.optimize import nnls

from chisep.acquisition import Acquisition
from chisep.errors import InputError, ModelFileError
from chisep.separation import SeparationFit, SeparationInputs
from chisep.separation.linear import LinearModel, _nnls_2x2

#: R2 = the model file's nominal R2*_0 (13 1/s) where no R2 map is given, as the equations below assume
NOMINAL_R2 = {"nominal_r2": 13.0, "r2prime_fraction": None}


#: R2' as the equations give it: no model share and no smoothing. The defaults are set for measured maps
#: (noise, partial volume, a Dr that varies; test_r2prime_noise_is_averaged_where_neighbours_agree); on
#: exact, spatially random values they would average neighbours that have nothing in common.
EXACT_R2PRIME = {"relative_uncertainty": 0.0, "smoothing_voxels": 0.0}


def linear(field_strength=3.0, **options):
    options.setdefault("r2prime", EXACT_R2PRIME)
    return LinearModel(Acquisition(echo_times=(), field_strength=field_strength), **options)


def fit(model, r2star, chi, *, mask=None, r2=None):
    """Fit maps of any shape (1D, 3D) through the model interface; the result has the input's shape."""
    shape = np.shape(chi)

    def vol(a):
        if a is None or len(shape) == 3:
            return a
        return np.asarray(a).reshape(shape + (1,) * (3 - len(shape)))

    mask = np.ones(shape, bool) if mask is None else mask
    res = model.fit(SeparationInputs(mask=vol(mask), r2star=vol(r2star), chi=vol(chi), r2=vol(r2), r2_rule=NOMINAL_R2))

    def back(a):
        return None if a is None else a.reshape(shape)

    return dataclasses.replace(res, chi_para=back(res.chi_para), chi_dia=back(res.chi_dia),
                               chi_para_std=back(res.chi_para_std), chi_dia_std=back(res.chi_dia_std),
                               residual=back(res.residual), extra={k: back(v) for k, v in res.extra.items()})


def _truth(shape=(8, 9, 10), seed=0):
    rng = np.random.default_rng(seed)
    chi_para = rng.uniform(0.0, 0.2, shape)
    chi_dia = rng.uniform(0.0, 0.06, shape)
    chi_para.flat[::7] = 0.0  # components exactly on the bound
    chi_dia.flat[::5] = 0.0
    return chi_para, chi_dia


def test_noiseless_round_trip_and_result_type():
    model = linear(3.0)
    chi_para, chi_dia = _truth()
    r2star, chi = model.forward(chi_para, chi_dia)
    res = fit(model, r2star, chi)
    assert isinstance(res, SeparationFit)
    scale = np.maximum(chi_para.max(), chi_dia.max())
    assert np.abs(res.chi_para - chi_para).max() < 1e-4 * scale
    assert np.abs(res.chi_dia - chi_dia).max() < 1e-4 * scale
    assert res.residual.max() < 1e-2  # noise units
    np.testing.assert_allclose(res.extra["chi_fit"], chi, atol=1e-6)
    assert res.chi_para.dtype == np.float32 and res.chi_para.shape == chi.shape


def test_matches_chi_separation_closed_form():
    # SCIENCE.md: chi_para = (Dr*chi + R2')/(2 Dr), chi_dia = (R2' - Dr*chi)/(2 Dr) with a = Dr, b = 1
    dr = 137.0
    model = linear(3.0)
    rng = np.random.default_rng(1)
    chi = rng.uniform(-0.05, 0.15, 200)
    r2prime = np.abs(dr * chi) + rng.uniform(0.5, 10.0, 200)  # keeps both components positive
    res = fit(model, r2prime + 13.0, chi)
    np.testing.assert_allclose(res.chi_para, (dr * chi + r2prime) / (2 * dr), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.chi_dia, (r2prime - dr * chi) / (2 * dr), rtol=1e-5, atol=1e-7)


def test_r2_map_replaces_nominal_r2():
    model = linear(3.0)
    chi_para, chi_dia = _truth((50,), seed=2)
    r2 = np.random.default_rng(3).uniform(10.0, 20.0, 50)
    r2star, chi = model.forward(chi_para, chi_dia, r2=r2)
    res = fit(model, r2star, chi, r2=r2)
    np.testing.assert_allclose(res.chi_para, chi_para, atol=2e-5)
    np.testing.assert_allclose(res.chi_dia, chi_dia, atol=2e-5)


def test_non_negative_and_weighted_nnls_optimal():
    rng = np.random.default_rng(4)
    n = 300
    r2star = rng.uniform(0.0, 60.0, n)  # many voxels with R2* < R2*_0 (negative R2')
    chi = rng.uniform(-0.3, 0.3, n)
    s1, s2 = 2.0, 0.02
    model = linear(3.0, r2star_sigma=s1, chi_sigma=s2)
    res = fit(model, r2star, chi)
    assert np.all(res.chi_para >= 0) and np.all(res.chi_dia >= 0)
    assert res.info["n_clipped"] > 0
    # the weighted non-negative least-squares optimum, voxel by voxel
    c = model.coefficients
    a = np.array([[c["a_para"] / s1, c["a_dia"] / s1], [c["b_para"] / s2, -c["b_dia"] / s2]])
    for i in range(0, n, 10):
        y = np.array([(r2star[i] - c["r2star0"]) / s1, (chi[i] - c["chi0"]) / s2])
        ref, _ = nnls(a, y)
        np.testing.assert_allclose([res.chi_para[i], res.chi_dia[i]], ref, atol=2e-6)


def test_nnls_helper_both_negative_gives_zero():
    cp, cd, resid = _nnls_2x2(np.array([-5.0]), np.array([0.0]), 137.0, 137.0, 1.0, 1.0, 1.0, 0.01)
    assert cp[0] == 0 and cd[0] == 0 and resid[0] == pytest.approx(5.0)


def test_uncertainty_matches_monte_carlo():
    rng = np.random.default_rng(5)
    n, s1, s2 = 20000, 1.5, 0.01
    model = linear(3.0, r2star_sigma=s1, chi_sigma=s2)
    r2star, chi = model.forward(np.full(n, 0.12), np.full(n, 0.05))  # interior: no clipping
    res = fit(model, r2star + s1 * rng.standard_normal(n), chi + s2 * rng.standard_normal(n))
    assert abs(np.std(res.chi_para) / res.chi_para_std[0] - 1) < 0.05
    assert abs(np.std(res.chi_dia) / res.chi_dia_std[0] - 1) < 0.05


def test_field_scaling_and_overrides(tmp_path):
    assert linear(7.0).coefficients["a_para"] == pytest.approx(137.0 * 7 / 3)
    model = linear(3.0, coefficients={"a_para": 100.0, "b_dia": 0.8})
    assert model.coefficients["a_para"] == 100.0 and model.coefficients["b_dia"] == 0.8
    chi_para, chi_dia = _truth((40,), seed=6)
    res = fit(model, *model.forward(chi_para, chi_dia))
    np.testing.assert_allclose(res.chi_para, chi_para, atol=1e-5)
    with pytest.raises(InputError, match="valid keys"):
        linear(3.0, coefficients={"dr": 1.0})
    calibrated = tmp_path / "cal.toml"
    calibrated.write_text(
        "reference_field_strength_t = 3.0\n[coefficients]\na_para_hz_per_ppm = 150.0\na_dia_hz_per_ppm = 90.0\n"
        "b_para = 1.0\nb_dia = 1.0\nr2star0_per_s = 12.0\nchi0_ppm = 0.0\n"
        "[noise]\nr2star_sigma_per_s = 1.0\nchi_sigma_ppm = 0.01\n"
        "[checks]\nmax_abs_chi_ppm = 10.0\nmin_median_r2star_per_s = 0.5\n")
    model = linear(1.5, coefficients_file=calibrated, r2prime=None)
    assert model.coefficients["a_dia"] == pytest.approx(45.0)
    # a calibration file without [r2prime] takes the packaged way of taking R2'
    assert model.r2prime == LinearModel(Acquisition(echo_times=(), field_strength=3.0)).r2prime
    assert model.r2prime["smoothing_voxels"] > 0
    with pytest.raises(InputError, match="valid keys"):
        linear(3.0, r2prime={"smoothing": 1.0})
    with pytest.raises(InputError, match="smoothing_range must be"):
        linear(3.0, r2prime={"smoothing_range": 0.0})
    missing = tmp_path / "missing.toml"
    missing.write_text(calibrated.read_text().replace("b_dia = 1.0\n", ""))
    with pytest.raises(ModelFileError, match="b_dia"):
        linear(3.0, coefficients_file=missing)


def test_mask_and_bad_inputs():
    model = linear(3.0)
    chi_para, chi_dia = _truth((6, 6, 6), seed=7)
    r2star, chi = model.forward(chi_para, chi_dia)
    mask = np.zeros(chi.shape, bool)
    mask[1:5, 1:5, 1:5] = True
    r2star_nan = r2star.copy()
    r2star_nan[0, 0, 0] = np.nan  # outside the mask: ignored
    res = fit(model, r2star_nan, chi, mask=mask)
    for m in res.maps().values():
        assert np.all(m[~mask] == 0)
    with pytest.raises(InputError, match="NaN"):
        fit(model, r2star_nan, chi)
    with pytest.raises(InputError, match="Hz or ppb"):
        fit(model, r2star, chi * 1000.0)  # ppb
    with pytest.raises(InputError, match="1/ms"):
        fit(model, r2star / 1000.0, chi)
    with pytest.raises(InputError, match="swapped"):
        fit(model, r2star, chi, r2=r2star + 5.0)
    with pytest.raises(InputError, match="shape"):
        fit(model, r2star, chi[:-1])
    with pytest.raises(InputError, match="field_strength"):
        linear(-3.0)


def test_forward_derivatives_match_finite_differences():
    # the forward model is linear: its finite-difference derivatives are the coefficients
    model = linear(3.0)
    c = model.coefficients
    base = np.array([0.1]), np.array([0.03])
    h = 1e-3
    for k, (da, db) in enumerate(((c["a_para"], c["b_para"]), (c["a_dia"], -c["b_dia"]))):
        plus = [b.copy() for b in base]
        minus = [b.copy() for b in base]
        plus[k] += h
        minus[k] -= h
        (r2p, chip), (r2m, chim) = model.forward(*plus), model.forward(*minus)
        assert (r2p - r2m)[0] / (2 * h) == pytest.approx(da, rel=1e-3)
        assert (chip - chim)[0] / (2 * h) == pytest.approx(db, rel=1e-3)


def test_predict_gives_the_inputs_back_and_the_r2star_only_rule_applies():
    model = linear(3.0)
    chi_para, chi_dia = _truth(seed=8)
    r2 = np.full(chi_para.shape, 11.0)
    r2star, chi = model.forward(chi_para, chi_dia, r2=r2)
    res = model.fit(SeparationInputs(mask=np.ones(chi.shape, bool), r2star=r2star, chi=chi, r2=r2))
    predicted = res.predict()
    np.testing.assert_allclose(predicted["r2star"], r2star, atol=1e-3)
    np.testing.assert_allclose(predicted["chi"], chi, atol=1e-5)
    # without R2: R2 = min(13, 0.7 R2*) voxel by voxel, reported in the fit's info
    no_r2 = SeparationInputs(mask=np.ones(chi.shape, bool), r2star=r2star, chi=chi)
    np.testing.assert_allclose(no_r2.r2, np.minimum(13.0, 0.7 * r2star), rtol=1e-6)
    assert "R2*-only" in model.fit(no_r2).info["r2_source"]


def test_voxels_with_unknown_r2prime_take_the_sign_of_chi():
    model = linear(3.0)
    chi_para, chi_dia = _truth()
    r2star, chi = model.forward(chi_para, chi_dia)
    unknown = np.zeros(chi.shape, bool)
    unknown.flat[::3] = True
    res = model.fit(SeparationInputs(mask=np.ones(chi.shape, bool), r2star=r2star, chi=chi,
                                     r2=np.full(chi.shape, 13.0), r2prime_unknown=unknown))
    c0 = model.coefficients["chi0"]
    np.testing.assert_allclose(res.chi_para[unknown], np.maximum(chi - c0, 0)[unknown], atol=1e-6)
    np.testing.assert_allclose(res.chi_dia[unknown], np.maximum(c0 - chi, 0)[unknown], atol=1e-6)
    known = model.fit(SeparationInputs(mask=np.ones(chi.shape, bool), r2star=r2star, chi=chi,
                                       r2=np.full(chi.shape, 13.0)))
    np.testing.assert_allclose(res.chi_para[~unknown], known.chi_para[~unknown])


def test_r2prime_noise_is_averaged_where_neighbours_agree():
    """Measured R2* and R2 each carry noise, and the 2 x 2 solve is exact where both components are
    positive, so R2''s noise went into both maps. The model averages R2' over the neighbours that agree
    with it within its expected error: both maps improve, and a step well beyond the error (a
    calcified nucleus) keeps its height."""
    from scipy import ndimage

    rng = np.random.default_rng(21)
    shape = (24, 24, 24)

    def smooth(low, high):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), 4.0)
        return low + (high - low) * (field - field.min()) / np.ptp(field)

    chi_para, chi_dia = smooth(0.03, 0.12), smooth(0.02, 0.06)
    nucleus = np.zeros(shape, bool)
    nucleus[8:15, 8:15, 8:15] = True
    chi_dia[nucleus] += 0.15  # R2' rises by 20 1/s against an R2' noise of 1.4 1/s
    model = linear(3.0, r2prime=None)  # the packaged way of taking R2'
    r2 = 12.0 + rng.normal(0.0, 1.0, shape)  # a spin-echo R2 with 1 1/s of noise
    r2star, chi = model.forward(chi_para, chi_dia, r2=np.full(shape, 12.0))
    r2star = r2star + rng.normal(0.0, 1.0, shape)
    chi = chi + rng.normal(0.0, 0.002, shape)
    inputs = SeparationInputs(mask=np.ones(shape, bool), r2star=r2star.astype(np.float32),
                              chi=chi.astype(np.float32), r2=np.maximum(r2, 0).astype(np.float32))
    smoothed, exact = model.fit(inputs), linear(3.0).fit(inputs)
    assert smoothed.info["r2prime"]["smoothing_voxels"] > 0 and exact.info["r2prime"]["smoothing_voxels"] == 0

    def nrmse(a, t):
        return np.linalg.norm((a - a.mean()) - (t - t.mean())) / np.linalg.norm(t - t.mean())

    for name, truth in (("chi_para", chi_para), ("chi_dia", chi_dia)):
        # measured 0.46 -> 0.18 (chi_para), 0.22 -> 0.09 (chi_dia)
        assert nrmse(getattr(smoothed, name), truth) < 0.75 * nrmse(getattr(exact, name), truth), name
    # the nucleus's surface layer, whose neighbourhoods straddle the step: measured 3.5 % low (a plain
    # Gaussian of the same width: 11 % low)
    surface = nucleus & ~ndimage.binary_erosion(nucleus)
    assert smoothed.chi_dia[surface].mean() == pytest.approx(chi_dia[surface].mean(), rel=0.06)
    # the wider model share shows in the uncertainty maps where R2' is high
    assert smoothed.chi_dia_std[nucleus].mean() > exact.chi_dia_std[nucleus].mean()
