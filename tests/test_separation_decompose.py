"""Tests of DECOMPOSE-QSM (chisep.separation.decompose)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chisep.acquisition import Acquisition
from chisep.errors import InputError, ModelFileError
from chisep.fit import numerical_gradient
from chisep.separation.decompose import (
    PARAM_NAMES,
    DecomposeModel,
    component_susceptibilities,
    decompose_forward,
    decompose_jacobian,
)

TE = 0.004 + 0.006 * np.arange(6)  # 6 echoes, 4-34 ms
#: a generous solver budget for tests of exact recovery and calibrated errors (the default in
#: models/decompose.toml is smaller: PCS/DCS settle long before the pool parameters do)
FULL_BUDGET = {"n_starts": 2, "max_steps": 40}


def decompose(echo_times=TE, **options):
    return DecomposeModel(Acquisition(echo_times=echo_times, field_strength=3.0), **options)


def fit_maps(model, magnitude, chi, mask=None):
    """The model interface on maps of any spatial shape (here 2D); the result has the input's shape."""
    from chisep.separation import SeparationInputs

    shape = np.shape(chi)
    mask = np.ones(shape, bool) if mask is None else mask
    extra_axes = (1,) * (3 - len(shape))
    inputs = SeparationInputs(mask=mask.reshape(shape + extra_axes), chi=np.reshape(chi, shape + extra_axes),
                              magnitude=np.reshape(magnitude, shape + extra_axes + np.shape(magnitude)[-1:]))
    res = model.fit(inputs)

    def back(a):
        return None if a is None else a.reshape(shape)

    return dataclasses.replace(res, chi_para=back(res.chi_para), chi_dia=back(res.chi_dia),
                               chi_para_std=back(res.chi_para_std), chi_dia_std=back(res.chi_dia_std),
                               residual=back(res.residual), extra={k: back(v) for k, v in res.extra.items()})


def _truth(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"c_para": rng.uniform(0.15, 0.5, n), "c_dia": rng.uniform(0.15, 0.5, n), "c_0": rng.uniform(0.2, 0.6, n),
            "r2star0": rng.uniform(8.0, 25.0, n), "chi_para": rng.uniform(0.04, 0.3, n),
            "chi_dia": rng.uniform(0.04, 0.3, n)}


def test_constants_and_forward_consistency():
    model = decompose()
    assert model.a == pytest.approx(323.5, rel=1e-3)  # 2 pi / (9 sqrt 3) gamma B0 per ppm at 3 T
    assert model.omega == pytest.approx(2 / 3 * 2 * np.pi * 42.577478518 * 3, rel=1e-6)
    p = np.array([0.3, 0.2, 0.4, 15.0, 0.1, 0.07])
    np.testing.assert_allclose(np.asarray(decompose_forward(jnp.asarray(p), model.aux())),
                               model.forward(*p), rtol=2e-5, atol=1e-6)
    # a voxel with only the paramagnetic pool precesses at k omega0 chi: the phase used for the data
    single = model.forward(1.0, 0.0, 0.0, 10.0, 0.12, 0.0)
    data = model.data_from_qsm(np.abs(single), 0.12)
    np.testing.assert_allclose(data, single, rtol=1e-12)


def test_jacobian_matches_autodiff_and_finite_differences():
    model = decompose()
    with jax.enable_x64(True):
        aux = model.aux(np.float64)
        for p in ([0.3, 0.2, 0.4, 15.0, 0.1, 0.07], [0.05, 0.6, 0.1, 30.0, 0.4, 0.01]):
            p = jnp.asarray(p, jnp.float64)
            jac = np.asarray(decompose_jacobian(p, aux))
            auto = np.asarray(jax.jacfwd(lambda q: decompose_forward(q, aux))(p))
            np.testing.assert_allclose(jac, auto, rtol=1e-10, atol=1e-12)
            y = np.asarray(decompose_forward(p, aux)) * 1.1
            loss = lambda q: 0.5 * np.sum(np.abs(np.asarray(decompose_forward(jnp.asarray(q), aux)) - y) ** 2)  # noqa
            grad = np.real(np.conj(np.asarray(decompose_forward(p, aux)) - y) @ jac)
            np.testing.assert_allclose(grad, numerical_gradient(loss, np.asarray(p), step=1e-7), rtol=1e-5, atol=1e-9)


def test_noiseless_recovery():
    model = decompose(constants=FULL_BUDGET)
    n = 300
    truth = _truth(n)
    signal = 250.0 * model.forward(**truth)  # arbitrary magnitude scale
    res = model.fit_signal(signal.reshape(10, 30, 6))
    est = {"chi_para": res.extra["pool_chi_para"], "chi_dia": res.extra["pool_chi_dia"], "r2star0": res.extra["r2star0"],
           "c_para": res.extra["c_para"] / 250.0, "c_dia": res.extra["c_dia"] / 250.0, "c_0": res.extra["c_0"] / 250.0}
    for name in PARAM_NAMES:
        err = np.abs(est[name].ravel() - truth[name]) / truth[name]
        assert np.max(err) < 1e-4, (name, np.max(err))
    assert res.extra["converged"].all()
    assert res.chi_para.shape == (10, 30)
    # the outputs are the component susceptibilities of those pools, not the pool susceptibilities
    with jax.enable_x64(True):
        aux = model.aux(np.float64)
        expected = np.stack([np.asarray(component_susceptibilities(jnp.asarray([truth[n][i] for n in PARAM_NAMES]), aux))
                             for i in range(n)])
    np.testing.assert_allclose(res.chi_para.ravel(), expected[:, 0], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(res.chi_dia.ravel(), expected[:, 1], rtol=1e-3, atol=1e-5)


def test_component_susceptibilities_of_one_pool_and_of_an_empty_pool():
    """One pool: PCS is its susceptibility and DCS 0, whatever the empty pool's fitted value."""
    model = decompose()
    with jax.enable_x64(True):
        aux = model.aux(np.float64)
        for empty_chi in (0.0, 0.215, 0.5):  # 0.215: the value an empty pool took on the phantom's caudate
            pcs, dcs = np.asarray(component_susceptibilities(jnp.asarray([1.0, 0.0, 0.0, 12.0, 0.06, empty_chi]), aux))
            assert pcs == pytest.approx(0.06, rel=1e-9) and dcs == pytest.approx(0.0, abs=1e-12)
            pcs, dcs = np.asarray(component_susceptibilities(jnp.asarray([0.0, 1.0, 0.0, 12.0, empty_chi, 0.03]), aux))
            assert dcs == pytest.approx(0.03, rel=1e-9) and pcs == pytest.approx(0.0, abs=1e-12)
        # the neutral pool dilutes: half the signal undephased halves the phase (to first order)
        pcs, _ = np.asarray(component_susceptibilities(jnp.asarray([0.5, 0.0, 0.5, 12.0, 0.02, 0.0]), aux))
        assert 0.4 * 0.02 < pcs < 0.6 * 0.02
    # end to end: a single-pool voxel fitted from noiseless data gives PCS = its chi and DCS ~ 0
    signal = model.forward(1.0, 0.0, 0.0, 12.0, 0.08, 0.0)[None]
    res = model.fit_signal(signal)
    assert res.chi_para[0] == pytest.approx(0.08, rel=2e-3) and res.chi_dia[0] < 2e-3


def test_fit_from_magnitude_and_qsm_masked_bounds_and_uncertainty():
    model = decompose(constants=FULL_BUDGET)
    rng = np.random.default_rng(1)
    n, sigma = 400, 0.002
    p = {"c_para": 0.35, "c_dia": 0.3, "c_0": 0.35, "r2star0": 12.0, "chi_para": 0.15, "chi_dia": 0.1}
    clean = model.forward(*[np.full(n, v) for v in p.values()])
    noisy = clean + sigma * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))
    res = model.fit_signal(noisy)
    good = res.extra["converged"].astype(bool)
    for name in ("chi_para", "chi_dia"):  # the pool susceptibilities: per-parameter errors
        est = res.extra["pool_" + name]
        mc = np.std(est[good])
        ratio = np.median(res.extra[f"pool_{name}_std"][good]) / mc
        assert 0.7 < ratio < 1.4, (name, ratio)
        assert abs(np.median(est) - p[name]) < 2 * mc
    with jax.enable_x64(True):
        components = np.asarray(component_susceptibilities(jnp.asarray(list(p.values())), model.aux(np.float64)))
    for i, name in enumerate(("chi_para", "chi_dia")):  # PCS / DCS: errors propagated with the covariance
        est = getattr(res, name)
        mc = np.std(est[good])
        ratio = np.median(getattr(res, name + "_std")[good]) / mc
        assert 0.7 < ratio < 1.4, (name, ratio)
        assert abs(np.median(est) - components[i]) < 2 * mc
    # magnitude + QSM entry point, with a mask; outputs stay inside the model bounds
    mag = np.abs(noisy).reshape(20, 20, 6)
    chi = (np.full(n, p["chi_para"] - p["chi_dia"]) + 0.01 * rng.standard_normal(n)).reshape(20, 20)
    mask = np.zeros((20, 20), bool)
    mask[3:15, 5:] = True
    res = fit_maps(model, mag, chi, mask=mask)
    for name, arr in res.maps().items():
        assert np.all(np.isfinite(arr)), name
        assert np.all(arr[~mask] == 0), name
    assert np.all(res.chi_para >= 0) and np.all(res.chi_para <= 0.5)
    assert np.all(res.chi_dia >= 0) and np.all(res.chi_dia <= 0.5)
    for name in ("c_para", "c_dia", "c_0", "r2star0"):
        assert np.all(res.extra[name] >= 0)


def test_default_budget_gives_the_components_of_the_full_one():
    # the default (1 start, 15 steps) is 3x faster; what it returns, PCS and DCS, must not move
    truth = _truth(600, seed=3)
    quick, full = decompose(), decompose(constants=FULL_BUDGET)
    assert quick.constants["max_steps"] < full.constants["max_steps"]
    rng = np.random.default_rng(4)
    clean = quick.forward(**truth)
    noisy = clean + 0.01 * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))  # SNR 100
    a, b = quick.fit_signal(noisy), full.fit_signal(noisy)
    with jax.enable_x64(True):
        aux = quick.aux(np.float64)
        true = np.stack([np.asarray(component_susceptibilities(jnp.asarray([truth[n][i] for n in PARAM_NAMES]), aux))
                         for i in range(600)])
    for i, name in enumerate(("chi_para", "chi_dia")):
        gap = np.abs(getattr(a, name) - getattr(b, name))
        error = np.abs(getattr(b, name) - true[:, i])
        assert np.median(gap) < 0.25 * np.median(error), name  # the budget's effect is well inside the noise's
        assert np.sqrt(np.mean((getattr(a, name) - true[:, i]) ** 2)) < 1.1 * np.sqrt(np.mean(error**2)), name


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="at least 4 echoes"):
        decompose(TE[:3])
    with pytest.raises(InputError, match="milliseconds"):
        decompose(TE * 1000)
    model = decompose()
    mag = np.ones((4, 4, 6))
    chi = np.zeros((4, 4))
    with pytest.raises(InputError, match="Hz or ppb"):
        fit_maps(model, mag, chi + 50.0)
    with pytest.raises(InputError, match="number of echo times"):
        fit_maps(model, mag[..., :5], chi)
    bad = mag.copy()
    bad[1, 1, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fit_maps(model, bad, chi)
    with pytest.raises(InputError, match="negative"):
        fit_maps(model, -mag, chi)
    text = (
        "reference_field_strength_t = 3.0\n[constants]\nfrequency_factor = 0.6667\n"
        "[bounds]\nchi_para_max_ppm = 0.5\nchi_dia_max_ppm = 0.5\nr2star0_max_per_s = 150.0\n"
        "[grid]\nchi_para_ppm = [0.0, 0.1]\nchi_dia_ppm = [0.0, 0.1]\nr2star0_per_s = [10.0]\n"
        "[fit]\nn_starts = 1\nmax_steps = 40\ntol = 1e-4\nmin_echoes = 4\nmax_abs_chi_ppm = 10.0\n"
        "max_component_std_ppm = 0.05\n")
    path = tmp_path / "decompose.toml"
    path.write_text(text)
    with pytest.raises(ModelFileError, match="dephasing_factor"):
        decompose(constants_file=path)
    path.write_text(text.replace("frequency_factor", "dephasing_factor = 0.403\nfrequency_factor"))
    assert decompose(constants_file=path).constants["n_starts"] == 1


def test_components_are_lifted_to_the_bounds_qsm_sets():
    # chi = chi_para - chi_dia with both >= 0 forces chi_para >= chi and chi_dia >= -chi
    from chisep.separation.base import SeparationFit
    from chisep.separation.decompose import bound_by_qsm

    pcs = np.array([[0.05, 0.02, 0.00, 0.10]], np.float32)
    dcs = np.array([[0.01, 0.03, 0.20, 0.00]], np.float32)
    chi = np.array([[0.02, 0.08, -3.0, -0.05]], np.float32)  # a -3 ppm calcification in the third voxel
    mask = np.array([[True, True, True, False]])
    res = bound_by_qsm(SeparationFit(chi_para=pcs * mask, chi_dia=dcs * mask), chi, mask)
    np.testing.assert_allclose(res.chi_para, [[0.05, 0.08, 0.0, 0.0]])
    np.testing.assert_allclose(res.chi_dia, [[0.01, 0.03, 3.0, 0.0]])
    np.testing.assert_array_equal(res.extra["bound_active"], [[0, 1, 2, 0]])
    np.testing.assert_allclose(res.extra["pcs"], pcs * mask)  # the published values are kept
    assert np.all(res.chi_para >= np.maximum(chi, 0) * mask) and np.all(res.chi_dia >= np.maximum(-chi, 0) * mask)


def test_quality_flags_voxels_whose_components_the_data_do_not_determine():
    # bit 4 follows "separable" (PCS/DCS standard errors within the model file's limit), not the
    # solver's convergence test, which fails in flat directions that PCS/DCS do not depend on
    from chisep import pipeline
    from chisep.pipeline import QsmMaps

    model = decompose()
    rng = np.random.default_rng(5)
    truth = _truth(60, seed=5)
    clean = model.forward(**truth)
    noisy = clean + 0.002 * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))
    res = fit_maps(model, np.abs(noisy).reshape(6, 10, 6), (truth["chi_para"] - truth["chi_dia"]).reshape(6, 10))
    assert res.extra["separable"].mean() > 0.9  # SNR 500: determined nearly everywhere
    assert res.extra["converged"].mean() < res.extra["separable"].mean()  # the solver's test is stricter
    # a voxel with an undetermined component is flagged, a determined one is not
    res.chi_para_std[0, 0] = np.inf
    res.extra["separable"][0, 0] = 0
    shape = (6, 10, 1)
    ones = np.ones(shape, bool)
    zeros = np.zeros(shape, np.float32)
    maps = QsmMaps(mask=ones, head_mask=ones, field_total=zeros, field_noise=zeros + 1, field_local=zeros,
                   r2star=zeros + 20, chi=zeros)
    result = dataclasses.replace(res, extra={k: v[..., None] for k, v in res.extra.items()},
                                 chi_para=res.chi_para[..., None], chi_dia=res.chi_dia[..., None])
    flags = pipeline.quality_map(maps, {"decompose": result})
    assert flags[0, 0, 0] & 4
    assert ((flags[..., 0] & 4) > 0).sum() == (res.extra["separable"] == 0).sum()


def test_predict_reproduces_the_magnitude_it_was_fitted_to():
    model = decompose(n_starts=2)
    truth = _truth(40, seed=9)
    signal = model.forward(**truth).reshape(4, 10, 1, 6)
    chi = (truth["c_para"] * truth["chi_para"] - truth["c_dia"] * truth["chi_dia"]).reshape(4, 10, 1)
    from chisep.separation import SeparationInputs

    res = model.fit(SeparationInputs(mask=np.ones((4, 10, 1), bool), magnitude=np.abs(signal), chi=chi))
    predicted = res.predict()
    assert predicted["magnitude"].shape == signal.shape
    # the data are |S| with the phase chi implies, not S itself: the pools fit them to a few percent
    misfit = predicted["magnitude"] - np.abs(signal)
    assert np.median(np.abs(misfit) / np.abs(signal).max(axis=-1, keepdims=True)) < 0.03
    # and predict() is the forward model at the fitted parameters: | |pred| - |data| | <= |pred - data|,
    # whose RMS over echoes is the fit's residual map
    rms = np.sqrt(np.mean(misfit**2, axis=-1))
    assert np.all(rms <= res.residual * (1 + 1e-3) + 1e-6)
    # PCS - DCS follows the chi the phase was built from (Chen et al.'s chi = PCS - DCS, approximate)
    assert np.corrcoef(predicted["chi"].ravel(), chi.ravel())[0, 1] > 0.9
    assert np.sqrt(np.mean((predicted["chi"] - chi) ** 2)) < 0.35 * np.std(chi)
