"""Multi-echo field fits recover a known field; their noise maps match the actual errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from chisep.errors import InputError
from chisep.physics import wrap_phase
from chisep.qsm.echoes import FIELD_METHODS, FieldFit, fit_multi_echo_field

TES = np.array([4.0, 9.0, 14.0, 19.0, 24.0]) * 1e-3
N = 28


def _grid(n=N):
    axis = np.arange(n, dtype=np.float64) - n / 2 + 0.5
    return np.meshgrid(axis, axis, axis, indexing="ij")


def scene(n=N):
    """Field (Hz) with a gradient and a 120 Hz blob, smooth phase offset, T2* decay."""
    x, y, z = _grid(n)
    mask = x**2 + y**2 + (z / 0.9) ** 2 < 12.5**2
    field = 15.0 + 2.0 * x - 1.5 * y + 120.0 * np.exp(-((x - 3) ** 2 + (y + 2) ** 2 + z**2) / (2 * 5.5**2))
    phi0 = 0.9 * np.sin(x / 7.0) + 0.4
    r2star = 25.0 + 0.5 * (x + 14)
    magnitude = 100.0 * np.exp(-r2star[..., None] * TES)
    signal = magnitude * np.exp(1j * (phi0[..., None] + 2 * np.pi * field[..., None] * TES))
    return signal, field, phi0, mask


def noisy(signal, sigma, seed):
    rng = np.random.default_rng(seed)
    return signal + sigma * (rng.normal(size=signal.shape) + 1j * rng.normal(size=signal.shape))


@pytest.mark.parametrize("method", FIELD_METHODS)
def test_noiseless_field_and_offset_recovered(method):
    signal, field, phi0, mask = scene()
    with pytest.warns(UserWarning, match="wraps between consecutive echoes"):
        fit = fit_multi_echo_field(np.abs(signal), np.angle(signal), TES, mask, method=method)
    assert isinstance(fit, FieldFit) and fit.method == method
    assert np.max(np.abs(fit.field_hz - field)[mask]) < 1e-3
    assert np.max(np.abs(wrap_phase(fit.phase_offset - phi0))[mask]) < 1e-3
    assert np.all(fit.field_hz[~mask] == 0) and np.all(fit.field_noise_hz[~mask] == 0)
    # the unwrapped phase is the true phase up to one global multiple of 2 pi
    diff = (fit.unwrapped_phase - (phi0[..., None] + 2 * np.pi * field[..., None] * TES))[mask]
    assert np.ptp(diff) < 1e-3


@pytest.mark.parametrize("method", FIELD_METHODS)
def test_noise_map_matches_actual_errors(method):
    signal, field, _, mask = scene()
    sigma = 2.0  # SNR 50 at TE1
    errors, noise_maps = [], []
    for seed in range(2):
        data = noisy(signal, sigma, seed)
        with pytest.warns(UserWarning):
            fit = fit_multi_echo_field(np.abs(data), np.angle(data), TES, mask, method=method)
        assert fit.info["noise_source"] == "residuals"
        assert fit.info["noise_sigma"] == pytest.approx(sigma, rel=0.1)
        errors.append((fit.field_hz - field)[mask])
        noise_maps.append(fit.field_noise_hz[mask])
    z = np.concatenate(errors) / np.concatenate(noise_maps)
    assert 0.7 < np.std(z) < 1.5
    assert abs(np.mean(z)) < 0.1


def test_weighted_linear_noise_map_scales_with_magnitude():
    signal, _, _, mask = scene()
    with pytest.warns(UserWarning, match="wraps"):
        fit = fit_multi_echo_field(np.abs(signal), np.angle(signal), TES, mask,
                                   method="weighted-linear", noise_sigma=1.0)
    assert fit.info["noise_source"] == "given"
    x = _grid()[0]
    # R2* grows with x, so the magnitude falls and the field noise rises
    assert fit.field_noise_hz[mask & (x > 8)].mean() > fit.field_noise_hz[mask & (x < -8)].mean()


@pytest.mark.parametrize("method", FIELD_METHODS)
def test_zero_magnitude_voxels_get_finite_huge_noise(method):
    signal, field, _, mask = scene()
    magnitude = np.abs(signal)
    magnitude[:12] = 0.0  # signal void (e.g. a mask that reaches into air)
    with pytest.warns(UserWarning):
        fit = fit_multi_echo_field(magnitude, np.angle(signal), TES, mask, method=method, noise_sigma=1.0)
    void = mask.copy()
    void[12:] = False
    assert np.all(np.isfinite(fit.field_hz)) and np.all(np.isfinite(fit.field_noise_hz))
    assert fit.field_noise_hz[void].min() > 1e6 * np.median(fit.field_noise_hz[mask & ~void])
    assert np.max(np.abs(fit.field_hz - field)[mask & ~void]) < 1e-3


def test_laplacian_unwrapping_option_smooth_field():
    signal, field, phi0, mask = scene()
    small = 0.2 * (field - 15.0)  # |f| dTE < 0.5 everywhere
    s = np.abs(signal) * np.exp(1j * (phi0[..., None] + 2 * np.pi * small[..., None] * TES))
    fit = fit_multi_echo_field(np.abs(s), np.angle(s), TES, mask, method="nonlinear", unwrap="laplacian")
    assert np.max(np.abs(fit.field_hz - small)[mask]) < 0.05


def test_single_echo_warns_and_assumes_zero_offset():
    signal, field, _, mask = scene()
    te = TES[:1]
    small = 0.1 * field
    s = np.abs(signal[..., :1]) * np.exp(1j * 2 * np.pi * small[..., None] * te)
    with pytest.warns(UserWarning, match="single echo"):
        fit = fit_multi_echo_field(np.abs(s[..., 0]), np.angle(s[..., 0]), te, mask)
    assert np.max(np.abs(fit.field_hz - small)[mask]) < 1e-3
    assert np.all(fit.phase_offset == 0)
    assert fit.info["noise_source"] == "background"
    assert fit.unwrapped_phase.shape == mask.shape + (1,)


def test_two_echoes_use_background_noise():
    """No residual degrees of freedom: sigma comes from the (Rayleigh) background."""
    signal, field, _, mask = scene()
    signal = np.where(mask[..., None], signal, 0.0)  # air outside the head
    data = noisy(signal[..., :2], 1.0, seed=3)
    with pytest.warns(UserWarning, match="wraps"):
        fit = fit_multi_echo_field(np.abs(data), np.angle(data), TES[:2], mask, method="weighted-linear")
    assert fit.info["noise_source"] == "background"
    assert fit.info["noise_sigma"] == pytest.approx(1.0, rel=0.1)


def test_invalid_inputs_give_clear_errors():
    signal, _, _, mask = scene(8)
    mag, ph = np.abs(signal), np.angle(signal)
    bad = ph.copy()
    bad[1, 1, 1, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fit_multi_echo_field(mag, bad, TES)
    with pytest.raises(InputError, match="same shape"):
        fit_multi_echo_field(mag[..., :4], ph, TES)
    with pytest.raises(InputError, match="one echo time"):
        fit_multi_echo_field(mag, ph, TES[:4])
    with pytest.raises(InputError, match="milliseconds"):
        fit_multi_echo_field(mag, ph, TES * 1e3)
    with pytest.raises(InputError, match="increasing"):
        fit_multi_echo_field(mag, ph, TES[::-1])
    with pytest.raises(InputError, match="nonlinear"):
        fit_multi_echo_field(mag, ph, TES, method="linear")
    with pytest.raises(InputError, match="romeo"):
        fit_multi_echo_field(mag, ph, TES, unwrap="prelude")
    with pytest.raises(InputError, match="mask"):
        fit_multi_echo_field(mag, ph, TES, np.ones((8, 8, 7), bool))
    with pytest.raises(InputError, match="empty"):
        fit_multi_echo_field(mag, ph, TES, np.zeros((8, 8, 8), bool))
    with pytest.raises(InputError, match="complex"):
        fit_multi_echo_field(mag, signal, TES)


# ---------------------------------------------------------------------------
# head phantom (chisep.sim) at 4 mm
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_sim():
    from chisep.sim.gre import simulate_gre
    from chisep.sim.phantom import head_phantom

    return simulate_gre(head_phantom(4.0), snr=100.0, seed=1, intravoxel_dephasing=False)  # exact model phase


@pytest.mark.parametrize("method", ["weighted-linear", "nonlinear"])
def test_phantom_unwrapping_and_total_field(phantom_sim, method):
    from chisep.qsm.mask import erode_mask

    sim, truth = phantom_sim, phantom_sim.truth
    tes = np.asarray(sim.acquisition.echo_times)
    vs = sim.acquisition.voxel_size
    fit = fit_multi_echo_field(sim.magnitude, sim.phase, tes, truth.brain_mask, method=method, voxel_size=vs)
    inner = erode_mask(truth.brain_mask, vs, 4.0)
    true_phase = truth.phase_offset[..., None] + 2 * np.pi * truth.field_total_hz[..., None] * tes
    diff = (fit.unwrapped_phase - true_phase)[inner]
    assert np.count_nonzero(np.rint((diff - np.median(diff)) / (2 * np.pi))) == 0
    err = (fit.field_hz - truth.field_total_hz)[inner]
    assert np.sqrt(np.mean(err**2)) < 0.3  # Hz, at SNR 100
    assert 0.7 < np.std(err / fit.field_noise_hz[inner]) < 1.5


def test_whole_cycle_field_errors_are_corrected_from_the_phase_offset():
    """A patch off by 1/dTE (the echo difference unwrapped wrongly) is found by its phi0 jump."""
    from chisep.qsm.echoes import _correct_echo_wraps

    shape = (24, 24, 24)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = x**2 + y**2 + z**2 < 0.9
    tes = np.array([0.004, 0.010, 0.016, 0.022])
    dte = 0.006
    f_true = 200 * x + 80 * y * z
    phi0_true = 0.8 * x - 0.5 * y + 0.3
    f_est, phi0_est = f_true.copy(), phi0_true.copy()
    patch = mask & (np.abs(x - 0.3) < 0.2) & (np.abs(y) < 0.2) & (np.abs(z) < 0.2)
    f_est[patch] -= 1 / dte  # the field is one cycle low there
    phi0_est[patch] += 2 * np.pi * tes[0] / dte  # the phase at TE1 is unchanged
    f_fix, phi0_fix, n = _correct_echo_wraps(f_est[mask], phi0_est[mask], mask, tes)
    assert n == patch.sum() > 20
    np.testing.assert_allclose(f_fix, f_true[mask], atol=1e-9)
    # blind when TE1 is a multiple of dTE: the offset then does not move, nothing is changed
    tes_blind = np.array([0.006, 0.012, 0.018])
    f_same, _, n_blind = _correct_echo_wraps(f_est[mask], phi0_est[mask], mask, tes_blind)
    assert n_blind == 0 and np.array_equal(f_same, f_est[mask])


def test_echo_wrap_rounds_grow_into_a_thick_patch_and_judge_only_near_their_last_fixes():
    """A patch thicker than the window's reach is corrected from its rim inwards over several rounds; a
    later round judges only the voxels near the last round's fixes, which leaves every fix the same: a
    lone wrong voxel far away is corrected in the first round and not looked at again."""
    from chisep.qsm.echoes import _correct_echo_wraps

    shape = (40, 44, 36)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = x**2 + y**2 + z**2 < 0.95
    tes = np.array([0.004, 0.010, 0.016, 0.022])
    dte = 0.006
    f_true = 150 * x + 60 * y * z
    phi0_true = 0.6 * x - 0.4 * y + 0.2
    cycles = np.zeros(shape)
    cycles[12:17, 16:26, 12:22] = -1  # 5 x 10 x 10 voxels
    cycles[30, 10, 18] = 1
    f_est, phi0_est = f_true + cycles / dte, phi0_true - 2 * np.pi * cycles * tes[0] / dte
    _, _, n_first = _correct_echo_wraps(f_est[mask], phi0_est[mask], mask, tes, rounds=1)
    f_fix, _, n = _correct_echo_wraps(f_est[mask], phi0_est[mask], mask, tes)
    assert 1 < n_first < 0.5 * n  # the first round reaches the patch's rim and the lone voxel only
    assert n == np.count_nonzero(cycles[mask]) == 501
    np.testing.assert_allclose(f_fix, f_true[mask], atol=1e-9)


def test_global_cycle_ambiguity_is_settled_by_the_median_field():
    """f + k/dTE with phi0 - 2 pi k TE1/dTE fits equally spaced echoes exactly; the median picks k."""
    from chisep.qsm.echoes import _centre_whole_cycles

    tes = np.array([0.004, 0.010, 0.016, 0.022])
    dte = 0.006
    rng = np.random.default_rng(0)
    f_true = rng.normal(5.0, 20.0, 500)
    phi0_true = rng.uniform(-1, 1, 500)
    measured = np.ones(500, bool)
    for k in (-2, -1, 1, 3):
        f_off = f_true + k / dte
        phi0_off = phi0_true - 2 * np.pi * k * tes[0] / dte
        f, phi0, shift = _centre_whole_cycles(f_off, phi0_off, tes, measured)
        assert shift == -k
        np.testing.assert_allclose(f, f_true, atol=1e-9)
        # every echo's phase is unchanged modulo 2 pi
        before = phi0_off[:, None] + 2 * np.pi * f_off[:, None] * tes
        after = phi0[:, None] + 2 * np.pi * f[:, None] * tes
        np.testing.assert_allclose(np.angle(np.exp(1j * (after - before))), 0.0, atol=1e-7)
    # unequal spacing breaks the ambiguity: nothing is changed
    uneven = np.array([0.004, 0.009, 0.016, 0.022])
    f, phi0, shift = _centre_whole_cycles(f_true + 1 / dte, phi0_true, uneven, measured)
    assert shift == 0 and np.allclose(f, f_true + 1 / dte)


def test_phase_unwrapped_elsewhere_is_fitted_as_given():
    # unwrap="none": the phase comes unwrapped (e.g. from ROMEO); the fit uses it without unwrapping,
    # so an unwrapped phase gives the field, and a wrapped one is not silently "fixed"
    signal, field, phi0, mask = scene()
    true_phase = (phi0[..., None] + 2 * np.pi * field[..., None] * TES).astype(np.float32)
    with pytest.warns(UserWarning, match="wraps between consecutive echoes"):  # the scene's field does
        fit = fit_multi_echo_field(np.abs(signal), true_phase, TES, mask, method="weighted-linear", unwrap="none")
    assert np.max(np.abs(fit.field_hz - field)[mask]) < 1e-3
    np.testing.assert_array_equal(fit.unwrapped_phase[mask], true_phase[mask])
    with pytest.warns(UserWarning, match="wraps"):
        wrapped = fit_multi_echo_field(np.abs(signal), np.angle(signal), TES, mask, method="weighted-linear",
                                       unwrap="none")
    assert np.max(np.abs(wrapped.field_hz - field)[mask]) > 10.0
    with pytest.raises(InputError, match="valid choices are: romeo, laplacian, none"):
        fit_multi_echo_field(np.abs(signal), true_phase, TES, mask, unwrap="prelude")


def test_complex_fit_steps_reach_the_least_squares_optimum():
    """The Gauss-Newton steps of the nonlinear fit against scipy's least squares on the same loss."""
    from scipy.optimize import least_squares

    from chisep.qsm.echoes import PHASOR_STEPS, _phasor_gauss_newton

    rng = np.random.default_rng(5)
    n = 40
    f_true, p_true = rng.uniform(-60, 60, n), rng.uniform(-3, 3, n)
    mag = np.exp(-40.0 * TES)[None] * rng.uniform(0.3, 1.0, (n, 1))
    s = mag * np.exp(1j * (p_true[:, None] + 2 * np.pi * f_true[:, None] * TES))
    s = s + 0.05 * (rng.standard_normal(s.shape) + 1j * rng.standard_normal(s.shape))
    ph, w = np.angle(s), np.abs(s) ** 2
    # a start 2 Hz and 0.4 rad off (what the weighted-linear fit gives where one echo is poor)
    p0, f, rss = (np.asarray(a, np.float64) for a in _phasor_gauss_newton(
        jnp.asarray(ph, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(TES, jnp.float32),
        jnp.asarray(p_true + 0.4, jnp.float32), jnp.asarray(f_true + 2.0, jnp.float32), PHASOR_STEPS))
    for i in range(n):
        def residual(x):
            r = np.sqrt(w[i]) * (np.exp(1j * ph[i]) - np.exp(1j * (x[0] + 2 * np.pi * x[1] * TES)))
            return np.concatenate([r.real, r.imag])
        best = least_squares(residual, [p_true[i], f_true[i]], xtol=1e-12, ftol=1e-12)
        assert f[i] == pytest.approx(best.x[1], abs=0.01)  # the field noise here is 0.2-1 Hz
        assert rss[i] == pytest.approx(np.sum(best.fun**2), rel=1e-3, abs=1e-6)


def test_rows_left_stepping_by_a_block_end_where_every_row_run_alone_ends():
    """A block leaves its Gauss-Newton loop while a few noise-only rows still step; fit_multi_echo_field
    takes those on in small blocks. Every row ends where it ends when each row steps to its own end, and
    a well-measured row's field does not depend on the noise-only rows beside it."""
    from chisep.qsm.echoes import PHASOR_STEPS, _field_rows, _phasor_gauss_newton

    rng = np.random.default_rng(7)
    n, n_noise = 4096, 3  # a block of 4096 leaves its loop once at most 4 rows step
    f_true, p_true = rng.uniform(-40, 40, n), rng.uniform(-3, 3, n)
    mag = np.exp(-30.0 * TES)[None] * rng.uniform(0.5, 1.0, (n, 1))
    s = mag * np.exp(1j * (p_true[:, None] + 2 * np.pi * f_true[:, None] * TES))
    s = s + 0.03 * (rng.standard_normal(s.shape) + 1j * rng.standard_normal(s.shape))
    s[:n_noise] = 0.05 * (rng.standard_normal((n_noise, TES.size)) + 1j * rng.standard_normal((n_noise, TES.size)))
    phase, m = np.angle(s).astype(np.float32), np.abs(s).astype(np.float32)
    unwrapped = np.unwrap(phase, axis=1).astype(np.float32)
    rows = tuple(map(jnp.asarray, (unwrapped, phase, m)))
    tes = jnp.asarray(TES, jnp.float32)
    phi0, f, _, rss, stepping, left = (np.asarray(a) for a in _field_rows(*rows, tes, True))
    assert stepping[:n_noise].all() and stepping.sum() <= n // 1024
    # every row to its end, from the weighted-linear start
    linear_phi0, linear_f, *_ = _field_rows(*rows, tes, False)
    w = (m / m.max(1, keepdims=True)) ** 2
    _, f_alone, rss_alone = (np.asarray(a) for a in _phasor_gauss_newton(
        rows[1], jnp.asarray(w), tes, jnp.angle(jnp.exp(1j * linear_phi0)), linear_f, PHASOR_STEPS))
    # a row stops once its step is below 1e-3 Hz: from starts that differ by rounding, within a few of that
    done = stepping == 0
    np.testing.assert_allclose(f[done], f_alone[done], atol=5e-3)
    fit = fit_multi_echo_field(m[:, None, None, :], unwrapped[:, None, None, :], TES, unwrap="none", noise_sigma=1.0,
                               fix_echo_wraps=False)
    cycle = 1.0 / (TES[1] - TES[0])  # the fit centres the field's whole cycles between echoes on the median's
    np.testing.assert_allclose((fit.field_hz[:, 0, 0] - f_alone + cycle / 2) % cycle - cycle / 2, 0.0, atol=5e-3)
    assert np.any(np.abs(f[:n_noise] - f_alone[:n_noise]) > 0.05)  # the second round moved them on


def test_temporal_unwrapping_gets_the_field_up_to_whole_cycles_between_echoes():
    """unwrap="temporal-only" (the automatic mask's head pass): no spatial unwrapping, so the field may be off
    by whole cycles between echoes (k / dTE), never by anything else."""
    signal, field, phi0, mask = scene()
    dte = float(np.diff(TES).mean())
    steep = field + 12.0 * _grid()[0]  # |f| dTE > 0.5 at both ends of x: wraps between echoes there
    signal = np.abs(signal) * np.exp(1j * (phi0[..., None] + 2 * np.pi * steep[..., None] * TES))
    fit = fit_multi_echo_field(np.abs(signal), np.angle(signal), TES, mask, unwrap="temporal-only",
                               fix_echo_wraps=False)
    cycles = (fit.field_hz - steep)[mask] * dte
    np.testing.assert_allclose(cycles, np.rint(cycles), atol=1e-3)
    assert np.any(np.rint(cycles) != 0)  # not the spatially unwrapped field: the test can tell them apart
    romeo = fit_multi_echo_field(np.abs(signal), np.angle(signal), TES, mask)
    np.testing.assert_allclose(romeo.field_hz[mask], steep[mask], atol=1e-3)
    with pytest.raises(InputError, match="multi-echo"):
        fit_multi_echo_field(np.abs(signal[..., 0]), np.angle(signal[..., 0]), TES[:1], mask, unwrap="temporal-only")
