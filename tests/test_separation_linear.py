"""Tests of the linear R2*/chi separation (chisep.separation.linear)."""

import numpy as np
import pytest
from scipy.optimize import nnls

from chisep.errors import InputError, ModelFileError
from chisep.separation.linear import LinearModel, _nnls_2x2
from chisep.separation.result import SeparationResult


def _truth(shape=(8, 9, 10), seed=0):
    rng = np.random.default_rng(seed)
    chi_para = rng.uniform(0.0, 0.2, shape)
    chi_dia = rng.uniform(0.0, 0.06, shape)
    chi_para.flat[::7] = 0.0  # components exactly on the bound
    chi_dia.flat[::5] = 0.0
    return chi_para, chi_dia


def test_noiseless_round_trip_and_result_type():
    model = LinearModel(3.0)
    chi_para, chi_dia = _truth()
    r2star, chi = model.predict(chi_para, chi_dia)
    res = model.fit(r2star, chi)
    assert isinstance(res, SeparationResult)
    scale = np.maximum(chi_para.max(), chi_dia.max())
    assert np.abs(res.chi_para - chi_para).max() < 1e-4 * scale
    assert np.abs(res.chi_dia - chi_dia).max() < 1e-4 * scale
    assert res.residual.max() < 1e-2  # noise units
    np.testing.assert_allclose(res.extra["chi_fit"], chi, atol=1e-6)
    assert res.chi_para.dtype == np.float32 and res.chi_para.shape == chi.shape


def test_matches_chi_separation_closed_form():
    # SCIENCE.md: chi_para = (Dr*chi + R2')/(2 Dr), chi_dia = (R2' - Dr*chi)/(2 Dr) with a = Dr, b = 1
    dr = 137.0
    model = LinearModel(3.0)
    rng = np.random.default_rng(1)
    chi = rng.uniform(-0.05, 0.15, 200)
    r2prime = np.abs(dr * chi) + rng.uniform(0.5, 10.0, 200)  # keeps both components positive
    res = model.fit(r2prime + 13.0, chi)
    np.testing.assert_allclose(res.chi_para, (dr * chi + r2prime) / (2 * dr), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.chi_dia, (r2prime - dr * chi) / (2 * dr), rtol=1e-5, atol=1e-7)


def test_r2_map_replaces_nominal_r2():
    model = LinearModel(3.0)
    chi_para, chi_dia = _truth((50,), seed=2)
    r2 = np.random.default_rng(3).uniform(10.0, 20.0, 50)
    r2star, chi = model.predict(chi_para, chi_dia, r2=r2)
    res = model.fit(r2star, chi, r2=r2)
    np.testing.assert_allclose(res.chi_para, chi_para, atol=2e-5)
    np.testing.assert_allclose(res.chi_dia, chi_dia, atol=2e-5)


def test_non_negative_and_weighted_nnls_optimal():
    rng = np.random.default_rng(4)
    n = 300
    r2star = rng.uniform(0.0, 60.0, n)  # many voxels with R2* < R2*_0 (negative R2')
    chi = rng.uniform(-0.3, 0.3, n)
    model = LinearModel(3.0)
    s1, s2 = 2.0, 0.02
    res = model.fit(r2star, chi, r2star_sigma=s1, chi_sigma=s2)
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
    model = LinearModel(3.0)
    rng = np.random.default_rng(5)
    n, s1, s2 = 20000, 1.5, 0.01
    r2star, chi = model.predict(np.full(n, 0.12), np.full(n, 0.05))  # interior: no clipping
    res = model.fit(r2star + s1 * rng.standard_normal(n), chi + s2 * rng.standard_normal(n),
                    r2star_sigma=s1, chi_sigma=s2)
    assert abs(np.std(res.chi_para) / res.chi_para_std[0] - 1) < 0.05
    assert abs(np.std(res.chi_dia) / res.chi_dia_std[0] - 1) < 0.05


def test_field_scaling_and_overrides(tmp_path):
    assert LinearModel(7.0).coefficients["a_para"] == pytest.approx(137.0 * 7 / 3)
    model = LinearModel(3.0, coefficients={"a_para": 100.0, "b_dia": 0.8})
    assert model.coefficients["a_para"] == 100.0 and model.coefficients["b_dia"] == 0.8
    chi_para, chi_dia = _truth((40,), seed=6)
    res = model.fit(*model.predict(chi_para, chi_dia))
    np.testing.assert_allclose(res.chi_para, chi_para, atol=1e-5)
    with pytest.raises(InputError, match="valid keys"):
        LinearModel(3.0, coefficients={"dr": 1.0})
    calibrated = tmp_path / "cal.toml"
    calibrated.write_text(
        "reference_field_strength_t = 3.0\n[coefficients]\na_para_hz_per_ppm = 150.0\na_dia_hz_per_ppm = 90.0\n"
        "b_para = 1.0\nb_dia = 1.0\nr2star0_per_s = 12.0\nchi0_ppm = 0.0\n"
        "[noise]\nr2star_sigma_per_s = 1.0\nchi_sigma_ppm = 0.01\n"
        "[checks]\nmax_abs_chi_ppm = 10.0\nmin_median_r2star_per_s = 0.5\n")
    model = LinearModel(1.5, coefficients_file=calibrated)
    assert model.coefficients["a_dia"] == pytest.approx(45.0)
    missing = tmp_path / "missing.toml"
    missing.write_text(calibrated.read_text().replace("b_dia = 1.0\n", ""))
    with pytest.raises(ModelFileError, match="b_dia"):
        LinearModel(3.0, coefficients_file=missing)


def test_mask_and_bad_inputs():
    model = LinearModel(3.0)
    chi_para, chi_dia = _truth((6, 6, 6), seed=7)
    r2star, chi = model.predict(chi_para, chi_dia)
    mask = np.zeros(chi.shape, bool)
    mask[1:5, 1:5, 1:5] = True
    r2star_nan = r2star.copy()
    r2star_nan[0, 0, 0] = np.nan  # outside the mask: ignored
    res = model.fit(r2star_nan, chi, mask=mask)
    for m in res.maps().values():
        assert np.all(m[~mask] == 0)
    with pytest.raises(InputError, match="NaN"):
        model.fit(r2star_nan, chi)
    with pytest.raises(InputError, match="Hz or ppb"):
        model.fit(r2star, chi * 1000.0)  # ppb
    with pytest.raises(InputError, match="1/ms"):
        model.fit(r2star / 1000.0, chi)
    with pytest.raises(InputError, match="swapped"):
        model.fit(r2star, chi, r2=r2star + 5.0)
    with pytest.raises(InputError, match="shape"):
        model.fit(r2star, chi[:-1])
    with pytest.raises(InputError, match="field_strength"):
        LinearModel(-3.0)


def test_forward_derivatives_match_finite_differences():
    # the forward model is linear: its finite-difference derivatives are the coefficients
    model = LinearModel(3.0)
    c = model.coefficients
    base = np.array([0.1]), np.array([0.03])
    h = 1e-3
    for k, (da, db) in enumerate(((c["a_para"], c["b_para"]), (c["a_dia"], -c["b_dia"]))):
        plus = [b.copy() for b in base]
        minus = [b.copy() for b in base]
        plus[k] += h
        minus[k] -= h
        (r2p, chip), (r2m, chim) = model.predict(*plus), model.predict(*minus)
        assert (r2p - r2m)[0] / (2 * h) == pytest.approx(da, rel=1e-3)
        assert (chip - chim)[0] / (2 * h) == pytest.approx(db, rel=1e-3)
