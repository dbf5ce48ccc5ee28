"""Unreliable voxels (noise-only skull, air, partial volume) must not reach background removal.

The end-to-end tests give the pipeline masks that reach 1-3 voxels into
noise-only skull, a BET-style mask, and a mask with a hole where the brain is
dark, on a simulated head with and without intra-voxel dephasing; chi and the
chi-separation components must stay within 5 NRMSE points of the result with
the true brain mask. Without the reliability step these masks give chi NRMSE
in the thousands of per cent (tests below check that too, so the test data
keep showing the failure).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from chisep import metrics, pipeline
from chisep.errors import InputError
from chisep.qsm import background, reliability
from chisep.sim import head_phantom, simulate_gre, simulate_gre_partial_volume

TES = np.array([0.004, 0.010, 0.016, 0.022, 0.028, 0.034])
OFF = {name: None for name in reliability.CRITERIA}


# ---------------------------------------------------------------------------
# the statistics
# ---------------------------------------------------------------------------
def test_echo_spread_is_zero_for_one_frequency_and_sees_two():
    # zero within float32 precision (1e-4 Hz; the thresholds are tenths of a Hz and more)
    mag = np.exp(-20.0 * TES)[None, :]
    one = 2 * np.pi * 7.0 * TES[None, :] + 0.3
    assert reliability.echo_spread_hz(mag, one, TES)[0] == pytest.approx(0.0, abs=1e-4)
    # two equal compartments 40 Hz apart with different decay: the frequency drifts with TE
    s = 0.5 * np.exp(-10 * TES + 2j * np.pi * 0 * TES) + 0.5 * np.exp(-80 * TES + 2j * np.pi * 40 * TES)
    spread = reliability.echo_spread_hz(np.abs(s)[None], np.angle(s)[None], TES)[0]
    assert spread > 2.0
    # wrapped phase of a 60 Hz field (wraps over the 4-34 ms echoes) still has no spread
    wrapped = np.angle(np.exp(1j * 2 * np.pi * 60.0 * TES))[None]
    assert reliability.echo_spread_hz(mag, wrapped, TES)[0] == pytest.approx(0.0, abs=1e-4)
    # unequal spacing (4, 7, 11, 8 ms) and 70 Hz: the phase wraps between some pairs but not others;
    # on the fitted field's branch there is still no spread, without it a large one
    uneven = np.array([0.003, 0.007, 0.014, 0.025, 0.033])
    phase = np.angle(np.exp(1j * 2 * np.pi * 70.0 * uneven))[None]
    decay = np.exp(-20.0 * uneven)[None]
    assert reliability.echo_spread_hz(decay, phase, uneven)[0] > 10.0
    assert reliability.echo_spread_hz(decay, phase, uneven, np.array([70.0]))[0] == pytest.approx(0.0, abs=1e-4)


def test_echo_spread_noise_scale_is_the_spread_that_noise_gives():
    tes = np.array([0.004, 0.009, 0.014, 0.019, 0.024, 0.029])
    # constant magnitude m, equal spacing: each pair's frequency has SD sqrt(2) sigma / (2 pi m dTE)
    flat = np.full((1, 6), 7.0)
    assert reliability.echo_spread_noise_hz(flat, tes, 2.0)[0] == pytest.approx(
        np.sqrt(2) * 2.0 / (2 * np.pi * 7.0 * 0.005), rel=1e-6)
    assert reliability.echo_spread_noise_hz(np.array([[3.0, 0.0, 1.0]]), tes[:3], 1.0)[0] == np.inf
    assert reliability.echo_spread_noise_hz(flat[:, :2], tes[:2], 1.0)[0] == 0.0

    # one field, decaying, complex noise: spread / scale has the same distribution at any SNR, with a
    # median near 0.9 and a tail far below the default factor (the criterion's false-alarm rate)
    rng = np.random.default_rng(0)
    ratios = {}
    for snr in (30.0, 300.0):
        clean = snr * np.exp(-20.0 * tes + 2j * np.pi * 3.0 * tes)
        noisy = clean + rng.standard_normal((20000, 6)) + 1j * rng.standard_normal((20000, 6))
        spread = reliability.echo_spread_hz(np.abs(noisy), np.angle(noisy), tes)
        ratios[snr] = spread / reliability.echo_spread_noise_hz(np.abs(noisy), tes, 1.0)
    # the raw spread follows the noise (what a median-relative threshold follows too) ...
    for ratio in ratios.values():
        assert 0.75 < np.median(ratio) < 1.0
        assert np.mean(ratio > reliability.DEFAULT_FACTORS["echo_spread_over_noise"]) < 1e-3
    # ... the ratio does not
    assert np.median(ratios[30.0]) == pytest.approx(np.median(ratios[300.0]), rel=0.05)


def test_echo_spread_over_noise_flags_partial_volume_that_the_median_rule_misses_at_low_snr():
    """At SNR 30 the brain's echo spread is its noise, and 10x its median rises above the systematic
    spread of tissue next to bone (two compartments 60 Hz apart, decaying at different rates): the
    automatic mask then leaked through the skull (benchmarks/RESULTS.md). In noise units it stands out."""
    rng = np.random.default_rng(1)
    tes = np.array([0.004, 0.009, 0.014, 0.019, 0.024, 0.029])
    shape = (16, 16, 16)
    mask = np.ones(shape, bool)
    slab = np.zeros(shape, bool)
    slab[:3] = True  # partial volume at one face of the mask
    one_field = np.exp(-20.0 * tes + 2j * np.pi * 3.0 * tes)
    two_fields = 0.7 * np.exp(-10.0 * tes) + 0.4 * np.exp(-40.0 * tes + 2j * np.pi * 60.0 * tes)
    assert reliability.echo_spread_hz(np.abs(two_fields)[None], np.angle(two_fields)[None], tes)[0] > 12.0
    for snr, median_rule_finds_it in ((30.0, False), (300.0, True)):
        clean = snr * np.where(slab[..., None], two_fields, one_field)
        noisy = clean + rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape)
        rel = reliability.field_reliability(np.abs(noisy), np.angle(noisy), tes, mask,
                                            field_noise_hz=np.full(shape, 0.5), field_hz=np.full(shape, 3.0),
                                            noise_sigma=1.0)
        by_median = rel.flagged_by["echo_spread"][slab].mean()
        assert (by_median > 0.9) if median_rule_finds_it else (by_median < 0.1)
        over_noise = rel.flagged_by["echo_spread_over_noise"]
        assert over_noise[slab].mean() > 0.8 and over_noise[~slab].mean() < 0.002
        assert rel.excluded[slab].mean() > 0.8  # at the mask's face: connected to the outside
        assert rel.thresholds["echo_spread_over_noise"] == reliability.DEFAULT_FACTORS["echo_spread_over_noise"]
        assert rel.statistics["echo_spread_over_noise"][~slab].max() < 4.0
    # the criterion needs the noise sigma, and can be switched off
    unknown = reliability.field_reliability(np.abs(noisy), np.angle(noisy), tes, mask,
                                            field_noise_hz=np.full(shape, 0.5))
    assert unknown.thresholds["echo_spread_over_noise"] is None
    assert not unknown.flagged_by["echo_spread_over_noise"].any()
    off = reliability.field_reliability(np.abs(noisy), np.angle(noisy), tes, mask, field_noise_hz=np.full(shape, 0.5),
                                        noise_sigma=1.0, factors={"echo_spread_over_noise": "off"})
    assert not off.flagged_by["echo_spread_over_noise"].any()
    with pytest.raises(InputError, match=r"echo_spread_over_noise=0.5 must be a number > 1 \(in noise units\)"):
        reliability.check_factors({"echo_spread_over_noise": 0.5})


def test_edge_off_branch_finds_a_wrapped_cap_and_leaves_gradients_and_inner_sources():
    """A cap of the mask's edge a whole wrap (200 Hz) off, under a steep harmonic background
    (20 Hz/mm, as next to sinuses) and beside a strong compact source inside: only the cap is flagged
    (a mean of the deeper field instead of a plane through it flagged 108 right voxels). A cap thicker
    than the band (its deeper voxels then count in the reference) is found in part, more of it in rounds."""
    shape, vs = (40, 40, 40), (1.0, 1.0, 1.0)
    x, y, z = np.indices(shape).astype(np.float64) - 19.5
    radius = np.sqrt(x**2 + y**2 + z**2)
    mask = radius <= 16.0
    background = 20.0 * x + 0.2 * (x**2 - y**2)  # harmonic; 20 Hz/mm, 620 Hz over the sphere
    source = np.where(radius <= 3.0, 300.0, 0.0)  # inside, far from the band
    found = {}
    for thickness, rounds in ((3.0, 1), (6.0, 1), (6.0, 4)):
        cap = mask & (radius > 16.0 - thickness) & (x > 8.0)
        field = background + source + np.where(cap, 200.0, 0.0)
        flagged = reliability.edge_off_branch(field, mask, mask, voxel_size=vs, tolerance_hz=100.0, rounds=rounds)
        assert not (flagged & ~cap).any()
        found[thickness, rounds] = flagged[cap].mean()
    # measured 1.0, 0.46 and 1.0
    assert found[3.0, 1] > 0.99 and found[6.0, 1] < 0.5 and found[6.0, 4] > found[6.0, 1] + 0.2
    # without a wrong branch nothing is flagged; untrusted voxels are not a reference
    assert not reliability.edge_off_branch(background + source, mask, mask, voxel_size=vs, tolerance_hz=100.0).any()
    assert not reliability.edge_off_branch(field, mask, np.zeros(shape, bool), voxel_size=vs, tolerance_hz=100.0).any()


def test_edge_off_branch_in_field_reliability_needs_a_spatially_unwrapped_field():
    from chisep.qsm import echoes

    mag, ph, mask, tissue, dark = _shell_volume()
    fit = echoes.fit_multi_echo_field(mag, ph, TES, mask, unwrap="laplacian")
    wrap_hz = 1.0 / float(np.diff(TES).min())
    edge = tissue & ~ndimage.binary_erosion(tissue) & (np.indices(mask.shape)[0] < 8)
    field = np.where(edge, fit.field_hz + wrap_hz, fit.field_hz)

    def judged(**kwargs):
        return reliability.field_reliability(mag, ph, TES, mask, field_noise_hz=fit.field_noise_hz, field_hz=field,
                                             voxel_size=(2.0, 2.0, 2.0), **kwargs)

    unwrapped = judged()
    # all but the cube's 4 corners on that side (no deeper voxel within reach of them)
    assert unwrapped.flagged_by["edge_off_branch"][edge].mean() > 0.98 and unwrapped.excluded[edge].mean() > 0.98
    assert unwrapped.excluded_ml_by_criterion()["edge_off_branch"] > 0
    assert not unwrapped.flagged_by["edge_off_branch"][tissue & ~edge].any()
    temporal_only = judged(field_unwrapped=False)
    assert not temporal_only.flagged_by["edge_off_branch"].any() and not temporal_only.excluded[edge].any()
    assert temporal_only.thresholds["edge_off_branch"] is None
    assert unwrapped.thresholds["edge_off_branch"] == pytest.approx(wrap_hz / 2)
    # factor 4: a quarter wrap
    assert judged(factors={"edge_off_branch": 4.0}).thresholds["edge_off_branch"] == pytest.approx(wrap_hz / 4)
    assert not judged(factors={"edge_off_branch": "off"}).flagged_by["edge_off_branch"].any()


def test_decay_residual_is_zero_for_mono_exponential_and_large_for_noise():
    mono = 3.0 * np.exp(-25.0 * TES)[None]
    assert reliability.decay_residual(mono, TES)[0] == pytest.approx(0.0, abs=1e-6)
    bi = (0.5 * np.exp(-5 * TES) + 0.5 * np.exp(-300 * TES))[None]
    assert reliability.decay_residual(bi, TES)[0] > 0.02
    noise = np.abs(np.random.default_rng(0).standard_normal((200, TES.size)))
    assert np.median(reliability.decay_residual(noise, TES)) > 0.2
    # fewer than 3 echoes: two points always fit
    assert reliability.decay_residual(bi[:, :2], TES[:2])[0] == 0.0


def test_decay_residual_in_float32_matches_the_float64_log_linear_fit():
    # float32 on scaled magnitudes and centred echo times: the same fit as relax.loglinear_fit in
    # float64, over scanner-like scales (1e-3 .. 1e4), fast and slow decays and noise-level voxels
    from chisep.relax import loglinear_fit

    rng = np.random.default_rng(3)
    n = 2000
    scale = 10.0 ** rng.uniform(-3, 4, n)
    frac = rng.uniform(0, 1, n)
    rates = rng.uniform(5, 400, (n, 2))
    clean = scale[:, None] * (frac[:, None] * np.exp(-rates[:, :1] * TES) + (1 - frac[:, None]) * np.exp(-rates[:, 1:] * TES))
    mag = np.abs(clean + 0.02 * scale[:, None] * rng.standard_normal(clean.shape))
    s0, r2 = loglinear_fit(mag, TES)
    fit = s0[:, None] * np.exp(-r2[:, None] * TES)
    expected = np.sqrt(((mag - fit) ** 2).sum(-1) / (mag**2).sum(-1))
    got = reliability.decay_residual(mag.astype(np.float32), TES)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
    assert reliability.decay_residual(np.zeros((2, TES.size)), TES).tolist() == [1.0, 1.0]


def _shell_volume(seed=0):
    """A cube of tissue (field 5 Hz + gradient) inside a shell of noise-only voxels, plus a dark core."""
    rng = np.random.default_rng(seed)
    shape = (24, 24, 24)
    x = np.indices(shape).astype(np.float64)
    field = 5.0 + 0.3 * x[0]
    tissue = np.zeros(shape, bool)
    tissue[4:20, 4:20, 4:20] = True
    dark = np.zeros(shape, bool)
    dark[11:13, 11:13, 11:13] = True  # enclosed, fast-decaying (a bleed)
    amp = np.where(tissue, 1.0, 0.0)[..., None] * np.exp(-np.where(dark, 250.0, 25.0)[..., None] * TES)
    signal = amp * np.exp(1j * 2 * np.pi * field[..., None] * TES)
    sigma = 0.01
    signal = signal + sigma * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape))
    mask = np.zeros(shape, bool)
    mask[2:22, 2:22, 2:22] = True  # two voxels of noise-only "skull" around the tissue
    return np.abs(signal), np.angle(signal), mask, tissue, dark


def test_an_enclosed_dark_source_on_the_wrong_phase_branch_is_marked_off_branch():
    from chisep.qsm import echoes

    mag, ph, mask, tissue, dark = _shell_volume()
    fit = echoes.fit_multi_echo_field(mag, ph, TES, mask, unwrap="laplacian")
    wrap_hz = 1.0 / float(np.diff(TES).min())

    def judged(field):
        return reliability.field_reliability(mag, ph, TES, mask, field_noise_hz=fit.field_noise_hz,
                                             field_hz=field, voxel_size=(2.0, 2.0, 2.0))

    right = judged(fit.field_hz)
    assert right.enclosed[dark].all() and not right.off_branch.any()
    # the dark core's field one wrap off (what a dephased signal gives next to a strong source)
    wrong = judged(np.where(dark, fit.field_hz + wrap_hz, fit.field_hz))
    assert np.array_equal(wrong.off_branch, dark)
    # within the tolerance of the harmonic bridge it is kept; past it, it is not
    tol = reliability.BRANCH_TOLERANCE * wrap_hz
    assert not judged(np.where(dark, fit.field_hz + 0.8 * tol, fit.field_hz)).off_branch.any()
    assert judged(np.where(dark, fit.field_hz - 1.2 * tol, fit.field_hz)).off_branch[dark].all()
    assert wrong.record()["enclosed_off_branch_ml"] == pytest.approx(dark.sum() * 0.008)
    assert "phase wraps" in wrong.summary()


def test_a_field_without_weight_does_not_reach_background_removal_or_the_inversion():
    """qsm_from_field with infinite field noise where the field is garbage: chi as from the clean field."""
    from chisep.acquisition import Acquisition
    from chisep.physics import forward_field_hz

    ph = head_phantom(4.0)
    acq = Acquisition(echo_times=(), field_strength=3.0, affine=np.diag([4.0, 4.0, 4.0, 1.0]))
    mask = ph.brain_mask
    x = np.indices(mask.shape).astype(np.float64)
    background = 30.0 + 2.0 * (x[0] - x[0].mean()) + 0.1 * ((x[0] - 20) ** 2 - (x[2] - 20) ** 2)
    local = forward_field_hz(np.where(mask, ph.chi, 0.0), 3.0, voxel_size=acq.voxel_size)
    clean = (background + local).astype(np.float32)
    bad = np.zeros(mask.shape, bool)
    centre = tuple(int(c) for c in ndimage.center_of_mass(mask))
    bad[centre[0] - 1:centre[0] + 1, centre[1] - 1:centre[1] + 1, centre[2] - 1:centre[2] + 1] = True
    garbage = np.where(bad, clean + 300.0, clean)
    noise = np.full(mask.shape, 0.5, np.float32)
    settings = pipeline.QsmSettings(inversion="tv")
    ref = pipeline.qsm_from_field(clean, mask, acq, field_noise_hz=noise, settings=settings)[2]
    unused = pipeline.qsm_from_field(garbage, mask, acq, field_noise_hz=np.where(bad, np.inf, noise),
                                     settings=settings)[2]
    used = pipeline.qsm_from_field(garbage, mask, acq, field_noise_hz=np.where(bad, 50.0, noise),
                                   settings=settings)[2]
    out = ph.brain_mask & ~ndimage.binary_dilation(bad, iterations=1)
    assert metrics.nrmse(unused, ref, out) < 2.0  # measured 0.1 %; without the fill 300 %
    # kept with a merely large noise, the garbage spreads (the test data show the failure)
    assert metrics.nrmse(used, ref, out) > 50.0


def test_field_reliability_excludes_the_noise_shell_and_keeps_an_enclosed_dark_source():
    from chisep.qsm import echoes

    mag, ph, mask, tissue, dark = _shell_volume()
    fit = echoes.fit_multi_echo_field(mag, ph, TES, mask, unwrap="laplacian")
    rel = reliability.field_reliability(mag, ph, TES, mask, field_noise_hz=fit.field_noise_hz,
                                        field_hz=fit.field_hz, voxel_size=(2.0, 2.0, 2.0))
    shell = mask & ~tissue
    assert rel.excluded[shell].mean() > 0.98
    assert not rel.excluded[tissue & ~dark].any()
    assert not rel.excluded[dark].any() and rel.enclosed[dark].all()
    assert np.array_equal(rel.region, mask & ~rel.excluded)
    assert rel.volume_ml(rel.excluded) == pytest.approx(rel.excluded.sum() * 0.008)
    assert "excluded" in rel.summary() and "mL" in rel.summary()
    # every criterion can be switched off; with all off nothing is excluded
    none = reliability.field_reliability(mag, ph, TES, mask, field_noise_hz=fit.field_noise_hz, factors=OFF)
    assert not none.excluded.any()
    # "off" (a config file has no None) does the same
    off = reliability.field_reliability(mag, ph, TES, mask, field_noise_hz=fit.field_noise_hz,
                                        factors={name: "off" for name in reliability.CRITERIA})
    assert not off.excluded.any()


def test_excluded_voxels_do_not_depend_on_whole_cycle_field_errors():
    """The automatic mask's head pass fits without the echo-wrap correction (pipeline): what it is
    used for, the excluded voxels, must not change where the field is off by k / dTE."""
    from chisep.qsm import echoes

    mag, ph, mask, tissue, dark = _shell_volume()
    fit = echoes.fit_multi_echo_field(mag, ph, TES, mask, unwrap="laplacian", fix_echo_wraps=False)
    assert "wrap_corrected_voxels" not in fit.info
    wrap_hz = 1.0 / float(np.diff(TES).mean())

    def judged(field):
        return reliability.field_reliability(mag, ph, TES, mask, field_noise_hz=fit.field_noise_hz,
                                             field_hz=field, voxel_size=(2.0, 2.0, 2.0), field_unwrapped=False)

    reference = judged(fit.field_hz)
    patch = tissue & ~dark & (np.indices(mask.shape)[0] < 12)
    for cycles in (1, -2):
        shifted = judged(np.where(patch, fit.field_hz + cycles * wrap_hz, fit.field_hz))
        assert np.array_equal(shifted.excluded, reference.excluded)
        assert np.array_equal(shifted.region, reference.region)


def test_head_pass_weighted_linear_fit_excludes_what_the_nonlinear_fit_does():
    """The automatic mask's head pass fits the field by weighted least squares, not the nonlinear fit
    (pipeline: a quarter of the time): the criteria read the field only for its branch and take its
    noise from the magnitudes, so the excluded voxels must be (nearly) the same."""
    from chisep.qsm import echoes

    mag, ph, mask, tissue, dark = _shell_volume()
    excluded = {}
    for method in ("nonlinear", "weighted-linear"):
        fit = echoes.fit_multi_echo_field(mag, ph, TES, mask, method=method, unwrap="temporal-only",
                                          fix_echo_wraps=False)
        excluded[method] = reliability.field_reliability(mag, ph, TES, mask, field_noise_hz=fit.field_noise_hz,
                                                         field_hz=fit.field_hz, voxel_size=(2.0, 2.0, 2.0)).excluded
    assert excluded["nonlinear"].sum() > 0.05 * mask.sum()  # the shell's noise voxels are found at all
    assert (excluded["nonlinear"] ^ excluded["weighted-linear"]).sum() <= 0.002 * mask.sum()


def test_echo_spread_threshold_comes_from_the_reference_voxels():
    """With a reference for echo_spread (the pipeline passes a head mask's core, the brain), outer tissue
    holding fat, whose multi-peak signal spreads the frequencies between echoes, no longer sets that
    threshold; the other criteria keep the whole mask's medians."""
    from chisep.qsm import echoes

    mag, ph, mask, tissue, dark = _shell_volume()
    # the tissue's outer layers hold 30 % fat: its main peak (-3.4 ppm at 3 T) beats with the water
    outer = tissue & ~ndimage.binary_erosion(tissue, iterations=3)
    signal = mag * np.exp(1j * ph)
    fat = 0.3 * np.exp(-30.0 * TES) * np.exp(-2j * np.pi * 434.0 * TES)
    signal = np.where(outer[..., None], 0.7 * signal + fat * np.exp(1j * ph[..., :1]), signal)
    mag, ph = np.abs(signal), np.angle(signal)
    fit = echoes.fit_multi_echo_field(mag, ph, TES, mask, unwrap="laplacian")
    assert 0.4 < reliability.mask_core(mask).sum() / mask.sum() < 0.6  # the default: the deeper half
    core = reliability.mask_core(mask, fraction=0.1)  # inside the fat layers
    depth = ndimage.distance_transform_edt(mask)
    assert 0.05 < core.sum() / mask.sum() < 0.15 and depth[core].min() >= depth[mask & ~core].max()
    assert not (core & outer).any()

    def judged(**kwargs):
        return reliability.field_reliability(mag, ph, TES, mask, field_noise_hz=fit.field_noise_hz,
                                             field_hz=fit.field_hz, **kwargs)

    rel, whole = judged(reference_masks={"echo_spread": core}), judged()
    spread, factor = rel.statistics["echo_spread"], reliability.DEFAULT_FACTORS["echo_spread"]
    used = core & ~rel.flagged_by["field_noise"]  # noise-flagged voxels never set a median
    assert rel.thresholds["echo_spread"] == pytest.approx(factor * np.median(spread[used]), rel=1e-4)
    # over the whole mask the fat layers set the median: a threshold several times higher that lets
    # most fat voxels pass, where the core's flags nearly all of them
    assert whole.thresholds["echo_spread"] > 3 * rel.thresholds["echo_spread"]
    assert rel.flagged_by["echo_spread"][outer].mean() > 0.9 > 0.5 > whole.flagged_by["echo_spread"][outer].mean()
    assert rel.thresholds["decay_residual"] == whole.thresholds["decay_residual"]
    assert rel.thresholds["field_noise"] == whole.thresholds["field_noise"]
    with pytest.raises(InputError, match=r"reference_masks\['echo_spread'\] has no voxel"):
        judged(reference_masks={"echo_spread": ~mask})
    with pytest.raises(InputError, match="unknown criterion 'low_signal'"):
        judged(reference_masks={"low_signal": core})


def test_field_reliability_validates_its_inputs():
    mag, ph, mask, _, _ = _shell_volume()
    noise = np.ones(mask.shape)
    with pytest.raises(InputError, match="unknown reliability criterion 'snr'"):
        reliability.field_reliability(mag, ph, TES, mask, field_noise_hz=noise, factors={"snr": 3})
    with pytest.raises(InputError, match="must be a number > 1"):
        reliability.field_reliability(mag, ph, TES, mask, field_noise_hz=noise, factors={"echo_spread": 0.5})
    with pytest.raises(InputError, match="mask is empty"):
        reliability.field_reliability(mag, ph, TES, np.zeros_like(mask), field_noise_hz=noise)
    with pytest.raises(InputError, match="share the"):
        reliability.field_reliability(mag, ph, TES, mask[:-1], field_noise_hz=noise)
    with pytest.raises(InputError, match="every voxel of the mask"):
        reliability.field_reliability(mag, ph, TES, mask, field_noise_hz=np.full(mask.shape, np.inf))
    with pytest.raises(InputError, match="unknown reliability criterion 'magnitude'"):
        pipeline.QsmSettings(reliability={"magnitude": 3.0})


def test_reliability_factors_come_from_a_config_file(tmp_path):
    config = tmp_path / "chisep.toml"
    config.write_text('[qsm]\nreliability = {echo_spread = 5.0, decay_residual = "off"}\n')
    settings = pipeline.PipelineSettings.from_sources(config_path=config)
    assert settings.qsm.reliability == {"echo_spread": 5.0, "decay_residual": "off"}
    assert reliability.check_factors(settings.qsm.reliability) == {
        "low_signal": 3.0, "field_noise": 10.0, "echo_spread": 5.0, "decay_residual": None,
        "echo_spread_over_noise": 4.0, "edge_off_branch": 2.0}
    config.write_text('[qsm]\nreliability = {echo_spread = 0.5}\n')
    with pytest.raises(InputError, match="echo_spread=0.5 must be a number > 1"):
        pipeline.PipelineSettings.from_sources(config_path=config)


def test_resharp_weights_down_weight_noisy_voxels():
    """Half the sphere 100x noisier: inverse-noise weights cut RESHARP's error there, not elsewhere."""
    from chisep import physics

    shape = (48, 48, 48)
    x = np.indices(shape).astype(np.float32)
    mask = ((x - 23.5) ** 2).sum(0) < 21**2
    chi = np.zeros(shape, np.float32)
    chi[18:26, 20:28, 20:30] = 0.2
    chi[28:32, 16:22, 22:26] = -0.1
    local = np.asarray(physics.forward_field_hz(chi, 3.0, (1, 1, 1), (0, 0, 1)))
    harmonic = 2.0 * (x[0] - 24) + 0.5 * (x[1] - 24)
    sigma = np.where(x[0] > 30, 5.0, 0.05).astype(np.float32)
    field = (harmonic + local + sigma * np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
    plain, used = background.resharp(field, mask, radius_mm=4.0)
    weighted, used_w = background.resharp(field, mask, radius_mm=4.0, weights=1.0 / sigma)
    assert np.array_equal(used, used_w)

    def rmse(estimate, region):
        return float(np.sqrt(np.mean((estimate - local)[region] ** 2)))

    assert rmse(weighted, used) < 0.5 * rmse(plain, used)
    quiet = used & (x[0] < 26)
    assert rmse(weighted, quiet) < 1.05 * rmse(plain, quiet)
    with pytest.raises(InputError, match="weights has .* negative"):
        background.resharp(field, mask, weights=-sigma)


# ---------------------------------------------------------------------------
# partial-volume simulation
# ---------------------------------------------------------------------------
def test_partial_volume_simulation_averages_the_complex_signal():
    fine = head_phantom(4.0, scenario="healthy")
    coarse = simulate_gre_partial_volume(fine, 2, snr=None, seed=0)
    direct = simulate_gre(fine, snr=None, seed=0)
    signal = direct.magnitude * np.exp(1j * direct.phase)
    n = [s // 2 for s in fine.shape]
    block = signal[: 2 * n[0], : 2 * n[1], : 2 * n[2]].reshape(n[0], 2, n[1], 2, n[2], 2, -1).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(coarse.magnitude * np.exp(1j * coarse.phase), block, atol=1e-5)
    assert np.allclose(coarse.acquisition.voxel_size, 8.0)
    assert coarse.truth.brain_mask.shape == coarse.magnitude.shape[:3] == coarse.truth.labels.shape
    # truth: the fine-grid average of the brain's chi, zero outside the coarse brain mask
    chi_fine = np.where(direct.truth.brain_mask, direct.truth.chi, 0)[: 2 * n[0], : 2 * n[1], : 2 * n[2]]
    chi_block = chi_fine.reshape(n[0], 2, n[1], 2, n[2], 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(coarse.truth.chi[coarse.truth.brain_mask], chi_block[coarse.truth.brain_mask],
                               atol=1e-6)
    # the centre of voxel (0, 0, 0) sits between the first two fine voxels
    np.testing.assert_allclose(coarse.acquisition.affine[:3, 3],
                               fine.affine[:3, :3] @ np.full(3, 0.5) + fine.affine[:3, 3], atol=1e-6)
    with pytest.raises(InputError, match="factor must be an integer >= 2"):
        simulate_gre_partial_volume(fine, 1)
    noisy = simulate_gre_partial_volume(fine, 2, snr=50, seed=0)
    assert noisy.truth.noise_sigma == pytest.approx(
        np.abs(block[..., 0])[coarse.truth.brain_mask].mean() / 50, rel=1e-4)


# ---------------------------------------------------------------------------
# end to end: masks a user brings
# ---------------------------------------------------------------------------
def _user_masks(sim):
    brain = sim.truth.brain_mask
    masks = {f"dilated {k}": ndimage.binary_dilation(brain, iterations=k) for k in (1, 2, 3)}
    # BET-style: a smooth surface that bridges sulci and reaches into the skull
    masks["bet-style"] = ndimage.binary_closing(ndimage.binary_dilation(brain, iterations=2), iterations=4)
    # a threshold mask that lost the darkest brain voxels (calcification, bleeds, veins)
    first = sim.magnitude[..., 0]
    hole = brain & (first > 0.3 * np.median(first[brain]))
    assert (brain & ~hole).sum() > 10
    masks["dark hole"] = hole
    return masks


def _scores(sim, mask, *, settings=pipeline.QsmSettings(gradient_correction=False)):
    # the heads below are sampled at voxel centres (no intra-voxel dephasing): nothing for the
    # gradient correction to undo
    qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition, mask=mask, settings=settings)
    brain = sim.truth.brain_mask
    # R2 = 13 1/s: the simple phantom's own R2' relation (these tests compare masks, not R2 rules,
    # which benchmarks/bench_head.py chooses on the realistic head)
    settings = pipeline.SeparationSettings(models=("chi-separation",), r2prime_fraction=None)
    result = pipeline.separate(sim.acquisition, qsm.separation_inputs(r2_rule=settings.r2_rule),
                               settings=settings)["chi-separation"]
    return qsm, {"chi": metrics.nrmse(qsm.chi, sim.truth.chi, brain),
                 "chi_para": metrics.nrmse(result.chi_para, sim.truth.chi_para, brain),
                 "chi_dia": metrics.nrmse(result.chi_dia, sim.truth.chi_dia, brain)}


@pytest.fixture(scope="module")
def head():
    """3 mm head with noise-only skull and sinuses, calcified lesion and microbleeds."""
    # sampled at voxel centres: these tests are about masks; the simple phantom's voxel-sized air and
    # bone steps next to the brain would dephase its whole edge (the realistic head has skull between)
    return simulate_gre(head_phantom(3.0, scenario="all"), snr=100, seed=3, intravoxel_dephasing=False)


@pytest.fixture(scope="module")
def head_partial_volume():
    """The same head simulated at 1.5 mm and averaged to 3 mm: intra-voxel dephasing at every edge."""
    return simulate_gre_partial_volume(head_phantom(1.5, scenario="all"), 2, snr=100, seed=4,
                                       intravoxel_dephasing=False)


@pytest.fixture(scope="module")
def reference_scores(head, head_partial_volume):
    return {"plain": _scores(head, head.truth.brain_mask)[1],
            "partial volume": _scores(head_partial_volume, head_partial_volume.truth.brain_mask)[1]}


@pytest.mark.slow
@pytest.mark.parametrize("mask_name", ["dilated 1", "dilated 2", "dilated 3", "bet-style", "dark hole"])
def test_user_masks_give_the_true_mask_result(head, reference_scores, mask_name):
    mask = _user_masks(head)[mask_name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qsm, scores = _scores(head, mask)
    # noise-only voxels have random frequencies: they must not raise the echo-aliasing alarm nor pull
    # the field by a whole cycle (with 3 voxels the mask reaches scalp by the sinuses, where the
    # field does wrap between echoes, so the alarm may be right there)
    if mask_name in ("dilated 1", "dilated 2"):
        assert not [w for w in caught if "phase wraps" in str(w.message)]
    inside = qsm.mask & head.truth.brain_mask
    assert abs(np.median(qsm.field_total[inside] - head.truth.field_total_hz[inside])) < 1.0
    reference = reference_scores["plain"]
    for name, value in scores.items():
        assert value <= reference[name] + 5.0, (mask_name, name, value, reference[name])
    assert reference["chi"] < 60
    # the outputs stay inside the user's mask (holes enclosed by it may be filled) and cover the brain
    brain = head.truth.brain_mask
    assert not (qsm.mask & ~ndimage.binary_fill_holes(mask)).any()
    assert (qsm.mask & brain).sum() > 0.85 * brain.sum()
    assert (qsm.mask & ~brain).sum() < 0.02 * brain.sum()
    if mask_name.startswith(("dilated", "bet")):
        assert any("the given mask holds" in note and "mL" in note for note in qsm.notes)
    # every excluded voxel inside the user's mask is flagged
    quality = pipeline.quality_map(qsm)
    assert np.all(quality[qsm.excluded_mask] & 1)


@pytest.mark.slow
@pytest.mark.parametrize("mask_name", ["dilated 3", "bet-style"])
def test_user_masks_with_intra_voxel_dephasing(head_partial_volume, reference_scores, mask_name):
    # Measured chi NRMSE %, true mask / dilated 3 / BET-style: 63.7 / 69.8 / 69.0 with single-step's
    # 10 iterations, 61.8 / 65.3 / 64.7 with 30 at penalty 0.5 (before 2026-12-07). On the realistic
    # heads at 2 mm the same masks cost at most 1.9 points with either (benchmarks/RESULTS.md).
    # chi-separation with its data terms balanced by their noise follows chi more closely (the R2'
    # term weighs 0.03 here): chi_para 116.1 / 122.6 / 122.3, chi_dia 74.5 / 78.7 / 76.9 (weighted
    # alike: 118.7 / 120.7 / 119.9 and 96.9 / 100.1 / 98.9), so it gets chi's allowance.
    sim = head_partial_volume
    _, scores = _scores(sim, _user_masks(sim)[mask_name])
    reference = reference_scores["partial volume"]
    for name, value in scores.items():
        assert value <= reference[name] + 7.0, (mask_name, name, value, reference[name])


@pytest.mark.slow
def test_automatic_mask_is_no_worse_than_the_true_mask(head_partial_volume, reference_scores):
    """Default settings against the true brain mask given by hand (measured: chi -0.1, chi_para +0.8,
    chi_dia +1.2 points at 3 mm with partial volume; 2 mm and 1 mm in benchmarks/RESULTS.md)."""
    _, scores = _scores(head_partial_volume, None)
    reference = reference_scores["partial volume"]
    assert scores["chi"] <= reference["chi"] + 0.5, (scores, reference)
    for name in ("chi_para", "chi_dia"):
        assert scores[name] <= reference[name] + 2.0, (name, scores[name], reference[name])


@pytest.mark.slow
def test_without_the_reliability_step_the_test_data_show_the_failure(head):
    """The data above must be hostile: with the step switched off a dilated mask ruins chi."""
    mask = _user_masks(head)["dilated 2"]
    qsm = pipeline.reconstruct_qsm(head.magnitude, head.phase, head.acquisition, mask=mask,
                                   settings=pipeline.QsmSettings(reliability=OFF))
    assert metrics.nrmse(qsm.chi, head.truth.chi, head.truth.brain_mask) > 200


@pytest.mark.slow
def test_oblique_head_with_a_dilated_mask():
    sim = simulate_gre(head_phantom(3.0, scenario="healthy"), snr=100, seed=5,
                       b0_direction=(0.0, np.sin(np.deg2rad(30)), np.cos(np.deg2rad(30))))
    brain = sim.truth.brain_mask
    true_chi = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition, mask=brain).chi
    dilated = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition,
                                       mask=ndimage.binary_dilation(brain, iterations=2)).chi
    reference = metrics.nrmse(true_chi, sim.truth.chi, brain)
    assert metrics.nrmse(dilated, sim.truth.chi, brain) <= reference + 5.0


def test_thresholded_qsm_baseline():
    from chisep.separation.baseline import thresholded_qsm

    chi = np.array([-0.2, 0.0, 0.15], np.float64)
    para, dia = thresholded_qsm(chi)
    np.testing.assert_allclose(para, [0.0, 0.0, 0.15])
    np.testing.assert_allclose(dia, [0.2, 0.0, 0.0])
    assert para.dtype == dia.dtype == np.float32 and np.allclose(para - dia, chi)


def test_low_signal_criterion_marks_noise_only_voxels_in_noise_units():
    """First-echo magnitude below 3 noise sigma is noise only, whatever the other statistics' medians."""
    rng = np.random.default_rng(0)
    shape, tes = (20, 20, 20), np.array([0.005, 0.011, 0.017, 0.023])
    mask = np.ones(shape, bool)
    sigma = 1.0
    signal = np.full(shape, 30.0)
    signal[:, :, :4] = 0.0  # a slab of pure noise (bone) at one face
    decay = signal[..., None] * np.exp(-20.0 * tes)
    noisy = decay + sigma * (rng.standard_normal(decay.shape) + 1j * rng.standard_normal(decay.shape))
    magnitude, phase = np.abs(noisy), np.angle(noisy)
    field_noise = np.full(shape, 0.5)
    rel = reliability.field_reliability(magnitude, phase, tes, mask, field_noise_hz=field_noise, noise_sigma=sigma)
    flagged = rel.flagged_by["low_signal"]
    assert flagged[:, :, :4].mean() > 0.95 and flagged[:, :, 4:].mean() < 0.001
    assert rel.thresholds["low_signal"] == 3.0
    assert rel.excluded[:, :, :4].mean() > 0.95  # connected to the mask's outside: excluded
    off = reliability.field_reliability(magnitude, phase, tes, mask, field_noise_hz=field_noise, noise_sigma=sigma,
                            factors={"low_signal": "off"})
    assert not off.flagged_by["low_signal"].any()
    without = reliability.field_reliability(magnitude, phase, tes, mask, field_noise_hz=field_noise)
    assert not without.flagged_by["low_signal"].any() and without.thresholds["low_signal"] is None


def test_reuse_takes_the_decay_residual_of_an_earlier_pass_and_changes_nothing():
    from chisep.qsm import echoes

    mag, ph, mask, tissue, dark = _shell_volume()
    fit = echoes.fit_multi_echo_field(mag, ph, TES, mask, unwrap="laplacian")

    def judged(msk, **kwargs):
        return reliability.field_reliability(mag, ph, TES, msk, field_noise_hz=fit.field_noise_hz,
                                             field_hz=fit.field_hz, voxel_size=(2.0, 2.0, 2.0), **kwargs)

    head = judged(mask)
    fresh, reused = judged(tissue), judged(tissue, reuse=head)
    for name in fresh.statistics:
        np.testing.assert_array_equal(fresh.statistics[name], reused.statistics[name])
    np.testing.assert_array_equal(fresh.region, reused.region)
    assert fresh.thresholds == reused.thresholds
    with pytest.raises(InputError, match="reuse holds decay_residual over a mask that does not contain this one"):
        judged(mask, reuse=judged(tissue))
