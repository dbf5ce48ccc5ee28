"""Tests for chisep.qsm.inversion: recover a piecewise-constant phantom from its local field."""

import numpy as np
import pytest

from chisep import physics
from chisep.errors import InputError
from chisep.metrics import nrmse
from chisep.qsm import inversion as inv

VS = (3.0, 3.0, 3.0)
B0_T = 3.0


def ellipsoid(shape, vs, centre, radii):
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * h - c for n, h, c in zip(shape, vs, centre)], indexing="ij")
    return sum((x / r) ** 2 for x, r in zip(grids, radii)) <= 1.0


def brain_phantom(shape=(48, 52, 44), vs=VS, b0=(0.0, 0.0, 1.0)):
    """Ellipsoidal brain with deep-grey-like nuclei, a white-matter block and a vein-like rod."""
    brain = ellipsoid(shape, vs, (0, 0, 0), (60, 66, 54))
    chi = np.zeros(shape, np.float32)
    chi[ellipsoid(shape, vs, (0, -10, 0), (35, 30, 25))] = -0.03
    chi[ellipsoid(shape, vs, (20, 10, 5), (10, 10, 8))] = 0.13
    chi[ellipsoid(shape, vs, (-20, 10, 5), (10, 10, 8))] = 0.05
    chi[ellipsoid(shape, vs, (0, 35, 15), (8, 8, 8))] = 0.10
    chi[ellipsoid(shape, vs, (0, -40, -20), (5, 20, 5))] = 0.30
    chi = np.where(brain, chi, 0).astype(np.float32)
    field = np.asarray(physics.forward_field_hz(chi, B0_T, vs, b0))
    magnitude = np.where(brain, 1.0 - 2.0 * np.abs(chi), 0).astype(np.float32)
    return chi, brain, field, magnitude


@pytest.fixture(scope="module")
def phantom():
    chi, brain, field, magnitude = brain_phantom()
    rng = np.random.default_rng(0)
    noise_hz = 0.05 * np.std(field[brain]) * 4  # SNR of the field about 5
    noisy = field + rng.normal(0, noise_hz, field.shape).astype(np.float32)
    return dict(chi=chi, brain=brain, field=field, noisy=noisy, magnitude=magnitude)


# Measured on this phantom (noiseless / noisy NRMSE %): tkd 30/40, tikhonov 23/34, tv 5/8,
# medi 3/6, ilsqr 39/51. Bounds leave room for platform differences, not for broken code.
BOUNDS = {"tkd": (40, 55), "tikhonov": (35, 45), "tv": (12, 18), "medi": (12, 18), "ilsqr": (50, 65)}


@pytest.mark.parametrize("method", sorted(BOUNDS))
def test_methods_recover_phantom(phantom, method):
    clean_bound, noisy_bound = BOUNDS[method]
    for key, bound in (("field", clean_bound), ("noisy", noisy_bound)):
        chi = inv.invert(phantom[key], phantom["brain"], method=method, voxel_size=VS, field_strength=B0_T,
                         magnitude=phantom["magnitude"])
        assert chi.dtype == np.float32 and chi.shape == phantom["brain"].shape
        assert np.all(chi[~phantom["brain"]] == 0)
        score = nrmse(chi, phantom["chi"], phantom["brain"])
        assert score < bound, (method, key, score)


def test_tv_data_terms_and_regularisation_order(phantom):
    brain, truth = phantom["brain"], phantom["chi"]
    kw = dict(voxel_size=VS, field_strength=B0_T)
    weighted = nrmse(inv.tv(phantom["noisy"], brain, **kw), truth, brain)
    linear = nrmse(inv.tv(phantom["noisy"], brain, data_term="linear", **kw), truth, brain)
    tkd = nrmse(inv.tkd(phantom["noisy"], brain, **kw), truth, brain)
    assert weighted < 18 and linear < 20  # measured 8 and 12
    assert max(weighted, linear) < tkd  # TV beats the direct method on a piecewise-constant map


def test_tikhonov_closed_form_is_data_consistent(phantom):
    """With a tiny lambda, the forward field of the estimate reproduces the data inside the mask."""
    brain, field = phantom["brain"], phantom["field"]
    chi = inv.tikhonov(field, brain, voxel_size=VS, field_strength=B0_T, lam=1e-4, regulariser="identity")
    refit = np.asarray(physics.forward_field_hz(chi, B0_T, VS))
    assert nrmse(refit, field, brain) < 10.0  # measured 5.5
    # Larger lambda shrinks the estimate towards zero.
    big = inv.tikhonov(field, brain, voxel_size=VS, field_strength=B0_T, lam=1.0, regulariser="identity")
    assert np.std(big[brain]) < 0.5 * np.std(chi[brain])


def test_tkd_sign_preserving_truncation():
    """A field that is pure k-space cone content is not zeroed (sign(D)/t), and the result is linear."""
    chi, brain, field, _ = brain_phantom()
    a = inv.tkd(field, brain, voxel_size=VS, field_strength=B0_T)
    b = inv.tkd(2 * field, brain, voxel_size=VS, field_strength=B0_T)
    np.testing.assert_allclose(b, 2 * a, rtol=1e-4, atol=1e-6)
    # Scaling: Hz -> ppm uses the field strength.
    c = inv.tkd(field * 7.0 / 3.0, brain, voxel_size=VS, field_strength=7.0)
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)


def test_oblique_b0_and_anisotropic_voxels():
    vs = (2.5, 3.0, 3.5)
    b0 = physics.direction_from_angles(25.0, 30.0)
    chi, brain, field, magnitude = brain_phantom(shape=(56, 48, 40), vs=vs, b0=b0)
    good = inv.tv(field, brain, voxel_size=vs, b0_direction=b0, field_strength=B0_T)
    assert nrmse(good, chi, brain) < 12.0  # measured 4
    # Ignoring the tilt (treating the data as axial) fails (measured 110 %).
    axial = inv.tv(field, brain, voxel_size=vs, b0_direction=(0, 0, 1), field_strength=B0_T)
    assert nrmse(axial, chi, brain) > 5 * nrmse(good, chi, brain)


def test_weights_discount_corrupted_voxels(phantom):
    brain, truth = phantom["brain"], phantom["chi"]
    corrupted = phantom["field"].copy()
    bad = ellipsoid(brain.shape, VS, (-30, -20, 10), (8, 8, 8)) & brain
    corrupted[bad] += 20.0
    weights = np.where(bad, 0.0, 1.0)
    plain = nrmse(inv.tv(corrupted, brain, voxel_size=VS, field_strength=B0_T), truth, brain & ~bad)
    weighted = nrmse(inv.tv(corrupted, brain, voxel_size=VS, field_strength=B0_T, weights=weights), truth, brain & ~bad)
    assert weighted < 20.0 and plain > 5 * weighted  # measured 10 and 200


def test_reference():
    chi = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    mask = np.ones_like(chi, bool)
    mask[0, 0, 0] = False
    out = inv.reference(chi, mask)
    assert out[mask].mean() == pytest.approx(0.0, abs=1e-5) and out[0, 0, 0] == 0
    csf = np.zeros_like(mask)
    csf[2, 2, 2] = True
    assert inv.reference(chi, mask, method="csf", csf_mask=csf)[2, 2, 2] == 0
    with pytest.raises(InputError, match="csf_mask"):
        inv.reference(chi, mask, method="csf")
    with pytest.raises(InputError, match="does not overlap"):
        inv.reference(chi, mask, method="csf", csf_mask=~mask)
    with pytest.raises(InputError, match="valid choices"):
        inv.reference(chi, mask, method="median")


def test_compiled_once_per_shape(phantom):
    core = inv._tv_admm_core
    if not hasattr(core, "_cache_size"):
        pytest.skip("jax does not expose the jit cache size")
    brain, field = phantom["brain"], phantom["field"]
    inv.tv(field, brain, voxel_size=VS, field_strength=B0_T)
    before = core._cache_size()
    inv.tv(field, brain, voxel_size=VS, field_strength=B0_T, alpha=1e-3, max_iter=5, tol=0.0)
    inv.tv(field * 0.5, brain, voxel_size=(3.0, 3.0, 3.0), b0_direction=(0, 0.1, 1), field_strength=7.0)
    assert core._cache_size() == before


def test_invalid_inputs(phantom):
    brain, field = phantom["brain"], phantom["field"]
    kw = dict(voxel_size=VS, field_strength=B0_T)
    with pytest.raises(InputError, match="valid choices are: tv, medi, ilsqr, tikhonov, tkd"):
        inv.invert(field, brain, method="qsmnet", **kw)
    with pytest.raises(InputError, match="unknown setting"):
        inv.invert(field, brain, method="tkd", lam=0.1, **kw)
    with pytest.raises(InputError, match="mask is empty"):
        inv.tv(field, np.zeros_like(brain), **kw)
    with pytest.raises(InputError, match="does not match"):
        inv.tkd(field, brain[1:], **kw)
    bad = field.copy()
    bad[24, 26, 22] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        inv.tikhonov(bad, brain, **kw)
    with pytest.raises(InputError, match="do not overlap"):
        inv.tv(field, brain, weights=np.where(brain, 0.0, 1.0), **kw)
    with pytest.raises(InputError, match="weights spatial shape"):
        inv.medi(field, brain, weights=np.ones((3, 3, 3)), magnitude=phantom["magnitude"], **kw)
    with pytest.raises(InputError, match="magnitude"):
        inv.medi(field, brain, **kw)
    with pytest.raises(InputError, match="tesla"):
        inv.tkd(field, brain, voxel_size=VS, field_strength=3000.0)
    with pytest.raises(InputError, match="regulariser"):
        inv.tikhonov(field, brain, regulariser="laplacian", **kw)
    with pytest.raises(InputError, match="data_term"):
        inv.tv(field, brain, data_term="nonlinear", **kw)
    with pytest.raises(InputError, match="alpha"):
        inv.tv(field, brain, alpha=-1.0, **kw)
    with pytest.raises(InputError, match="max_iter"):
        inv.ilsqr(field, brain, max_iter=0, **kw)


def test_built_in_phantom_3mm():
    """True local field of the built-in head at 3 mm: TV/MEDI within 25 %, deep-grey slope near 1.

    Measured NRMSE: MEDI 11 %, TV 15 %, TKD 35 %, iLSQR (LSQR stage) 36 %; TV's deep-grey slope 0.97.
    """
    from chisep.metrics import linear_fit_slope, roi_means
    from chisep.sim import gre as sim
    from chisep.sim.phantom import head_phantom

    phantom = head_phantom(3.0)
    _, local = sim.simulate_fields(phantom, field_strength=B0_T)
    mask, truth = phantom.brain_mask, np.where(phantom.brain_mask, phantom.chi, 0)
    magnitude = np.where(mask, phantom.m0 * np.exp(-0.02 * phantom.r2), 0)
    kw = dict(voxel_size=(3.0, 3.0, 3.0), field_strength=B0_T)
    tv_chi = inv.tv(local, mask, **kw)
    assert nrmse(tv_chi, truth, mask) < 25.0
    assert nrmse(inv.medi(local, mask, magnitude=magnitude, **kw), truth, mask) < 25.0
    assert nrmse(inv.tkd(local, mask, **kw), truth, mask) < 45.0
    names = {n: phantom.label_of(n) for n in ("caudate", "putamen", "globus_pallidus", "substantia_nigra",
                                               "red_nucleus", "dentate", "thalamus")}
    est = roi_means(inv.reference(tv_chi, mask), phantom.labels, names)
    ref = roi_means(inv.reference(truth, mask), phantom.labels, names)
    slope, _ = linear_fit_slope([est[n] for n in names], [ref[n] for n in names])
    assert 0.85 < slope < 1.15


# ---------------------------------------------------------------------------
# single-step inversion of the total field
# ---------------------------------------------------------------------------
def _head_with_background(shape, vs):
    """Brain (deep nuclei, a vein, cortex-like sources against its surface), skull and a sinus outside."""
    brain = ellipsoid(shape, vs, (0, 0, 0), (60, 66, 54))
    chi = np.zeros(shape, np.float32)
    for centre, radii, value in [((0, -10, 0), (35, 30, 25), -0.03), ((20, 10, 5), (10, 10, 8), 0.13),
                                 ((-20, 10, 5), (10, 10, 8), 0.05), ((0, -40, -20), (5, 20, 5), 0.30),
                                 ((50, 0, 0), (12, 20, 20), 0.08), ((0, 0, 48), (25, 25, 10), -0.06)]:
        chi[ellipsoid(shape, vs, centre, radii)] = value
    chi = np.where(brain, chi, 0).astype(np.float32)
    skull = ellipsoid(shape, vs, (0, 0, 0), (70, 76, 64)) & ~ellipsoid(shape, vs, (0, 0, 0), (64, 70, 58))
    sinus = ellipsoid(shape, vs, (0, 75, -45), (20, 14, 14))
    return brain, chi, (9.0 * sinus - 2.0 * skull).astype(np.float32)


@pytest.fixture(scope="module")
def total_field_head():
    """Total and local field simulated at 1.5 mm and averaged to the 3 mm grid the methods work on
    (no inverse crime: another grid, and partial volume at every edge); background 4x the local field."""
    fine_vs, fine_shape = (1.5,) * 3, (96, 104, 88)
    brain_f, chi_f, outside_f = _head_with_background(fine_shape, fine_vs)

    def down(x):
        return np.asarray(x, np.float32).reshape(48, 2, 52, 2, 44, 2).mean(axis=(1, 3, 5))

    total = down(physics.forward_field_hz(chi_f + outside_f, B0_T, fine_vs))
    local = down(physics.forward_field_hz(chi_f, B0_T, fine_vs))
    brain = down(brain_f) > 0.99
    chi = down(chi_f)
    noisy = total + np.random.default_rng(1).normal(0, 0.1 * np.std(local[brain]), total.shape).astype(np.float32)
    return dict(brain=brain, chi=chi, total=total, noisy=noisy, local=local,
                magnitude=np.where(brain, 1.0 - 2.0 * np.abs(chi), 0).astype(np.float32))


def test_single_step_keeps_the_brain_field_that_background_removal_takes(total_field_head):
    # Sources against the brain's surface have a field that is partly harmonic inside the brain;
    # V-SHARP and LBV take that part out with the background and the inversion then fits the
    # rest. Measured NRMSE %: single-step 17 with its default 10 iterations and 11 run to 100,
    # MEDI on the TRUE local field 10, V-SHARP + MEDI 57, LBV + MEDI 52 (field noise at 10 % of the
    # local field's SD). This head is piecewise constant, TV's best case, so more iterations help
    # here; on the realistic heads the 10th iterate is the better one (benchmarks/RESULTS.md).
    from chisep.qsm import background

    h = total_field_head
    brain, kw = h["brain"], dict(voxel_size=(3.0, 3.0, 3.0), field_strength=B0_T, magnitude=h["magnitude"])
    assert np.std((h["total"] - h["local"])[brain]) > 3 * np.std(h["local"][brain])  # a real background
    chi = inv.invert(h["noisy"], brain, method="single-step", **kw)
    assert chi.dtype == np.float32 and np.all(chi[~brain] == 0)
    score = nrmse(chi, h["chi"], brain)
    assert score < 20.0, score
    local, eroded = background.remove_background(h["noisy"], brain, method="vsharp", voxel_size=(3.0, 3.0, 3.0))
    two_step = nrmse(inv.medi(local, eroded, **kw), h["chi"], brain)
    assert two_step > 2.5 * score, (two_step, score)
    # run on, no better than the true local field allows, i.e. the background is gone, not fitted as brain
    ideal = nrmse(inv.medi(np.where(brain, h["local"], 0), brain, **kw), h["chi"], brain)
    converged = nrmse(inv.invert(h["noisy"], brain, method="single-step", max_iter=100, tol=0.0, **kw), h["chi"], brain)
    assert converged < ideal + 3.0, (converged, ideal)


def test_single_step_with_oblique_b0():
    # B0 25 degrees from the voxel z axis (and simulated on a 2x finer grid): the kernels follow it
    fine_vs, b0 = (1.5,) * 3, (0.0, np.sin(np.deg2rad(25.0)), np.cos(np.deg2rad(25.0)))
    brain_f, chi_f, outside_f = _head_with_background((96, 104, 88), fine_vs)

    def down(x):
        return np.asarray(x, np.float32).reshape(48, 2, 52, 2, 44, 2).mean(axis=(1, 3, 5))

    total = down(physics.forward_field_hz(chi_f + outside_f, B0_T, fine_vs, b0))
    brain, chi = down(brain_f) > 0.99, down(chi_f)
    kw = dict(voxel_size=(3.0, 3.0, 3.0), field_strength=B0_T, magnitude=np.where(brain, 1.0 - 2.0 * np.abs(chi), 0))
    # measured 13.7 % with B0 as simulated, 51 % with B0 taken along z
    assert nrmse(inv.single_step(total, brain, b0_direction=b0, **kw), chi, brain) < 18.0
    assert nrmse(inv.single_step(total, brain, **kw), chi, brain) > 35.0


def test_single_step_leaves_out_voxels_without_weight(total_field_head):
    # a dark source's field on the wrong phase branch: hundreds of Hz off, weight zero
    h = total_field_head
    brain, kw = h["brain"], dict(voxel_size=(3.0, 3.0, 3.0), field_strength=B0_T, magnitude=h["magnitude"])
    clean = inv.single_step(h["noisy"], brain, **kw)
    corrupted, weights = h["noisy"].copy(), brain.astype(np.float32)
    corrupted[22:25, 30:33, 20:23] += 300.0
    weights[22:25, 30:33, 20:23] = 0.0
    ignored = inv.single_step(corrupted, brain, weights=weights, **kw)
    assert nrmse(ignored, h["chi"], brain) < nrmse(clean, h["chi"], brain) + 3.0
    assert nrmse(inv.single_step(corrupted, brain, **kw), h["chi"], brain) > 50.0  # used, it ruins the map


def test_admm_penalty_changes_the_path_not_the_answer(total_field_head):
    # ADMM converges to the same minimiser for any data penalty mu_data > 0; a penalty counted twice in
    # the x-update (mu^2 against mu) made mu_data = 2 diverge (NRMSE 1e9 %) while 1 hid the error
    h = total_field_head
    brain, kw = h["brain"], dict(voxel_size=(3.0, 3.0, 3.0), field_strength=B0_T, magnitude=h["magnitude"])
    local = np.where(brain, h["local"], 0)
    for method, field in (("medi", local), ("single-step", h["total"])):
        scores = [nrmse(inv.invert(field, brain, method=method, mu_data=mu, max_iter=200, tol=0.0, **kw), h["chi"], brain)
                  for mu in (0.5, 1.0, 4.0)]
        assert max(scores) < 10.0 and np.ptp(scores) < 3.0, (method, scores)


def test_single_step_residual_stop_stops_where_the_data_term_levels_off(total_field_head):
    # The rule, replayed from the residuals of runs cut at 1, 2, ... iterations: the solver must stop
    # after the first iteration from min_iter on whose weighted data residual fell by less than the drop,
    # and return that iterate.
    h = total_field_head
    brain = h["brain"]
    kw = dict(voxel_size=(3.0, 3.0, 3.0), field_strength=B0_T, magnitude=h["magnitude"], mu_data=0.1, tol=0.0)
    residuals, chis = [], []
    for k in range(1, 16):
        info = {}
        chis.append(inv.single_step(h["noisy"], brain, max_iter=k, info=info, **kw))
        assert info["iterations"] == k  # no rule given: runs to max_iter
        residuals.append(info["residual"])
    assert residuals[-1] < 0.5 * residuals[0]  # the data term is being fitted
    for drop, min_iter in ((0.05, 5), (0.02, 4), (0.3, 3)):
        expected = next((k for k in range(max(min_iter, 2), 16)
                         if residuals[k - 2] - residuals[k - 1] < drop * residuals[k - 2]), 15)
        info = {}
        chi = inv.single_step(h["noisy"], brain, max_iter=15, residual_drop=drop, min_iter=min_iter, info=info, **kw)
        assert info["iterations"] == expected, (drop, min_iter, residuals)
        assert info["residual"] == pytest.approx(residuals[expected - 1], rel=1e-5)
        np.testing.assert_allclose(chi, chis[expected - 1], atol=1e-6)
    # a drop of 0 stops only where the residual rose: never here before that happens
    rises = [k for k in range(5, 16) if residuals[k - 1] >= residuals[k - 2]]
    info = {}
    inv.single_step(h["noisy"], brain, max_iter=15, residual_drop=0.0, info=info, **kw)
    assert info["iterations"] == (rises[0] if rises else 15)
    with pytest.raises(InputError, match="residual_drop"):
        inv.single_step(h["noisy"], brain, residual_drop=-0.1, **kw)


def test_single_step_invalid_inputs(total_field_head):
    h = total_field_head
    brain, kw = h["brain"], dict(voxel_size=(3.0, 3.0, 3.0), field_strength=B0_T)
    with pytest.raises(InputError, match="magnitude"):
        inv.single_step(h["total"], brain, **kw)
    with pytest.raises(InputError, match="radii_mm"):
        inv.single_step(h["total"], brain, magnitude=h["magnitude"], radii_mm=(-4.0,), **kw)
    with pytest.raises(InputError, match="no sphere of radius 200 mm fits"):
        inv.single_step(h["total"], brain, magnitude=h["magnitude"], radii_mm=(200.0,), **kw)


def test_dipole_field_on_the_inversion_grid_matches_the_padded_forward_model(total_field_head):
    # the single-step chain hands D chi on as the local field, computed on the inversion's own padded grid
    h = total_field_head
    brain, chi = h["brain"], np.where(h["brain"], h["chi"], 0).astype(np.float32)
    reference = np.asarray(physics.forward_field_hz(chi, B0_T, (3.0, 3.0, 3.0), (0.0, 0.3, 0.95)))
    got = inv.dipole_field_hz(chi, brain, voxel_size=(3.0, 3.0, 3.0), b0_direction=(0.0, 0.3, 0.95), field_strength=B0_T)
    assert got.dtype == np.float32 and np.all(got[~brain] == 0)
    assert nrmse(got, reference, brain) < 3.0
    assert nrmse(-got, reference, brain) > 150.0  # the sign of the source's field


def test_single_step_alpha_follows_the_field_noise():
    # proportional to the median field noise in ppm, never below the floor; unusable voxels not counted
    mask = np.ones((4, 4, 4), bool)
    noise = np.full(mask.shape, 0.9, np.float32)
    alpha = inv.single_step_alpha(noise, mask, field_strength=3.0)
    assert alpha == pytest.approx(inv.ALPHA_PER_NOISE_PPM * 0.9 / 127.7, rel=1e-3)
    assert inv.single_step_alpha(2 * noise, mask, field_strength=3.0) == pytest.approx(2 * alpha)
    assert inv.single_step_alpha(noise, mask, field_strength=7.0) == pytest.approx(alpha * 3 / 7, rel=1e-6)
    noise[0] = np.inf
    assert inv.single_step_alpha(noise, mask, field_strength=3.0) == pytest.approx(alpha)
    assert inv.single_step_alpha(noise / 100, mask, field_strength=3.0) == inv.ALPHA_FLOOR
    assert inv.single_step_alpha(np.full(mask.shape, np.inf), mask, field_strength=3.0) == inv.ALPHA_FLOOR
