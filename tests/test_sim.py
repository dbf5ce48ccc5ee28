"""Tests of the head phantom and the GRE simulator (chisep.sim), on coarse grids."""

from __future__ import annotations

import numpy as np
import pytest

from chisep import physics
from chisep.errors import InputError
from chisep.sim import (
    SCENARIOS,
    head_phantom,
    load_tissue_table,
    oblique_affine,
    relaxometric_constants,
    resample_labels,
    simulate_gre,
    with_affine,
)

RES = 4.0  # mm: 49 x 58 x 47 voxels
TES = (0.004, 0.010, 0.016, 0.022, 0.028)

# Independent oracle: SCIENCE.md table (Ridani et al. split, T2 in ms).
EXPECTED = {
    "caudate": (0.053, 0.009, 88.0),
    "globus_pallidus": (0.144, 0.013, 64.0),
    "putamen": (0.047, 0.009, 78.0),
    "red_nucleus": (0.111, 0.011, 68.0),
    "dentate": (0.168, 0.016, 110.0),
    "substantia_nigra": (0.122, 0.011, 73.0),
    "thalamus": (0.051, 0.031, 87.0),
    "white_matter": (0.006, 0.036, 70.0),
    "grey_matter": (0.039, 0.019, 130.0),
    "csf": (0.028, 0.009, 1600.0),
}
NAMES = {
    0: "air", 1: "white_matter", 2: "grey_matter", 3: "csf", 4: "caudate", 5: "putamen",
    6: "globus_pallidus", 7: "thalamus", 8: "substantia_nigra", 9: "red_nucleus", 10: "dentate",
    11: "veins", 12: "bone", 13: "scalp", 14: "sinus_air", 15: "calcification", 16: "microbleed",
    17: "pallidal_calcification", 18: "white_matter_tracts",
    # head layers of the realistic head (chisep.sim.head); the simple phantom's scalp is label 13
    19: "dura", 20: "marrow", 21: "muscle", 22: "fat", 23: "skin", 24: "eye",
}


@pytest.fixture(scope="module")
def healthy():
    return head_phantom(RES)


@pytest.fixture(scope="module")
def sick():
    return head_phantom(RES, scenario="all")


@pytest.fixture(scope="module")
def noiseless(healthy):
    # sampled at voxel centres: the exact signal model below (intra-voxel dephasing has its own test)
    return simulate_gre(healthy, echo_times=TES, snr=None, seed=3, intravoxel_dephasing=False)


def world_of(affine, ijk):
    """World (mm) coordinates of voxel indices, (n, 3) -> (n, 3)."""
    return np.asarray(ijk, np.float64) @ affine[:3, :3].T + affine[:3, 3]


def wrapped_difference(a, b):
    return np.abs(physics.wrap_phase(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


# ---------------------------------------------------------------------------
# phantom
# ---------------------------------------------------------------------------
def test_labels_present_with_names(healthy):
    assert healthy.labels.dtype == np.uint8
    assert healthy.labels.shape == (49, 58, 47)
    assert healthy.label_names == NAMES
    present = set(np.unique(healthy.labels).tolist())
    assert present == set(range(15)) | {18}, "healthy map: labels 0-14 and 18; scenario labels 15-17 absent"
    # deep nuclei lie where anatomy puts them (MNI mm, both hemispheres)
    for name, lo, hi in (("globus_pallidus", 12, 24), ("putamen", 19, 33), ("thalamus", 3, 19)):
        ijk = np.argwhere(healthy.labels == healthy.label_of(name))
        abs_x = np.abs(world_of(healthy.affine, ijk)[:, 0])
        assert lo <= abs_x.mean() <= hi, name


def test_tissue_values_match_table(healthy):
    table = load_tissue_table()
    for name, (para, dia, t2) in EXPECTED.items():
        assert table[name].chi_para == pytest.approx(para)
        assert table[name].chi_dia == pytest.approx(dia)
        assert table[name].r2 == pytest.approx(1000.0 / t2)
        voxels = healthy.labels == healthy.label_of(name)
        textured = table[name].texture > 0
        rel = 0.05 if textured else 1e-6  # smooth texture: the mean stays close to the table
        assert healthy.chi_para[voxels].mean() == pytest.approx(para, rel=rel), name
        assert healthy.chi_dia[voxels].mean() == pytest.approx(dia, rel=rel), name
        np.testing.assert_allclose(healthy.r2[voxels], 1000.0 / t2, rtol=1e-6)
        np.testing.assert_allclose(healthy.chi[voxels], healthy.chi_para[voxels] - healthy.chi_dia[voxels],
                                   atol=1e-7)
    assert np.all(healthy.chi_para >= 0) and np.all(healthy.chi_dia >= 0)
    # non-tissue compartments: chi relative to water, no signal
    for name, chi in (("air", 9.4), ("bone", -2.0), ("sinus_air", 9.4)):
        voxels = healthy.labels == healthy.label_of(name)
        np.testing.assert_allclose(healthy.chi[voxels], chi)
        assert np.all(healthy.m0[voxels] == 0) and np.all(healthy.chi_para[voxels] == 0)
    # myelin-rich tracts are more diamagnetic than average white matter
    tracts = healthy.labels == healthy.label_of("white_matter_tracts")
    assert healthy.chi_dia[tracts].mean() > 1.3 * healthy.chi_dia[healthy.labels == 1].mean()
    veins = healthy.chi[healthy.labels == healthy.label_of("veins")]
    assert veins.mean() == pytest.approx(0.19, abs=0.01)


def test_brain_mask_is_intracranial(healthy):
    expected = np.isin(healthy.labels, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15, 16, 17, 18])
    np.testing.assert_array_equal(healthy.brain_mask, expected)
    assert 1.2e6 < healthy.brain_mask.sum() * RES**3 < 2.2e6  # mm^3: a plausible intracranial volume


def test_texture_is_seeded(healthy):
    same = head_phantom(RES, seed=0)
    other = head_phantom(RES, seed=1)
    np.testing.assert_array_equal(same.chi_dia, healthy.chi_dia)
    np.testing.assert_array_equal(other.labels, healthy.labels)
    wm = healthy.labels == 1
    assert not np.allclose(other.chi_dia[wm], healthy.chi_dia[wm])
    variation = healthy.chi_dia[wm].std() / healthy.chi_dia[wm].mean()
    assert 0.03 < variation < 0.2


def test_paradoxical_calcification(healthy):
    ph = head_phantom(RES, scenario="paradoxical-calcification")
    changed = ph.labels != healthy.labels
    assert changed.any()
    assert np.all(healthy.labels[changed] == healthy.label_of("globus_pallidus"))
    assert np.all(ph.labels[changed] == ph.label_of("pallidal_calcification"))
    gp_healthy = healthy.labels == healthy.label_of("globus_pallidus")
    assert np.all(ph.chi_para[changed] > healthy.chi_para[gp_healthy].max())
    assert np.all(ph.chi_dia[changed] > healthy.chi_dia[gp_healthy].max())
    assert np.all(ph.chi[changed] > 0)
    # the medial part only: changed voxels are closer to the midline than the unchanged GP
    x = world_of(ph.affine, np.argwhere(changed))[:, 0]
    x_rest = world_of(ph.affine, np.argwhere(ph.labels == ph.label_of("globus_pallidus")))[:, 0]
    assert np.abs(x).mean() < np.abs(x_rest).mean()


def test_microbleeds_and_calcified_lesion(healthy, sick):
    bleeds = head_phantom(RES, scenario="microbleeds")
    lesion = head_phantom(RES, scenario="calcified-lesion")
    for ph, name, chi_sign in ((bleeds, "microbleed", 1), (lesion, "calcification", -1)):
        changed = ph.labels != healthy.labels
        assert changed.sum() >= 1
        assert np.all(healthy.brain_mask[changed]), "lesions stay inside the brain"
        assert np.all(ph.labels[changed] == ph.label_of(name))
        assert np.all(np.sign(ph.chi[changed]) == chi_sign)
    assert bleeds.chi_para[bleeds.labels == 16].min() == pytest.approx(1.0)
    assert lesion.chi[lesion.labels == 15].max() == pytest.approx(-3.0)
    # "all" combines the three scenarios
    for value in (15, 16, 17):
        assert (sick.labels == value).any()
    np.testing.assert_array_equal(sick.labels[bleeds.labels == 16], 16)


def test_resampling_keeps_geometry(healthy):
    ph = head_phantom((0.6, 0.6, 2.0))
    assert ph.labels.shape == (328, 388, 94)
    np.testing.assert_allclose(ph.voxel_size, (0.6, 0.6, 2.0))
    np.testing.assert_allclose(physics.voxel_size_from_affine(ph.affine), (0.6, 0.6, 2.0))
    # the same world point carries the same structure on both grids
    for grid in (ph, healthy):
        centroid = np.argwhere(grid.labels == grid.label_of("thalamus")).mean(axis=0)
        world = world_of(grid.affine, centroid)
        assert abs(world[0]) < 2 and -24 < world[1] < -12 and 1 < world[2] < 13
    # plurality vote: a block of one label stays that label, a 1-voxel speck disappears
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[:4] = 2
    labels[6, 6, 6] = 5
    out, affine = resample_labels(labels, np.eye(4), 2.0)
    assert out.shape == (4, 4, 4)
    assert np.all(out[:2] == 2) and np.all(out[2:] == 0)
    np.testing.assert_allclose(affine[:3, 3], 0.5)


def test_invalid_phantom_inputs():
    with pytest.raises(InputError, match="healthy.*paradoxical-calcification"):
        head_phantom(RES, scenario="tumour")
    for bad in (0.0, -1.0, (1.0, 2.0), 50.0, float("nan")):
        with pytest.raises(InputError, match="resolution"):
            head_phantom(bad)
    with pytest.raises(InputError, match="seed"):
        head_phantom(RES, seed=-1)
    assert set(SCENARIOS) == {"healthy", "paradoxical-calcification", "microbleeds", "calcified-lesion", "all"}


# ---------------------------------------------------------------------------
# GRE simulation
# ---------------------------------------------------------------------------
def test_noiseless_phase_follows_model(noiseless):
    t = noiseless.truth
    signal = t.m0 > 0
    assert noiseless.phase.dtype == np.float32 and noiseless.phase.shape == (49, 58, 47, len(TES))
    assert noiseless.phase.min() >= -np.pi and noiseless.phase.max() < np.pi
    assert np.ptp(t.phase_offset) > 1.0, "smooth phase offset spans radians"
    for e, te in enumerate(TES):
        expected = t.phase_offset + 2 * np.pi * t.field_total_hz.astype(np.float64) * te
        assert wrapped_difference(noiseless.phase[..., e], expected)[signal].max() < 2e-4


def test_noiseless_magnitude_decays_with_r2star(noiseless, healthy):
    t = noiseless.truth
    alpha, tr = np.deg2rad(15.0), 0.05
    e1 = np.exp(-tr / healthy.t1.astype(np.float64))
    steady = healthy.m0 * np.sin(alpha) * (1 - e1) / (1 - np.cos(alpha) * e1)
    dr_p, dr_d = t.dr_para, t.dr_dia
    np.testing.assert_allclose(t.r2star, healthy.r2 + dr_p * healthy.chi_para + dr_d * healthy.chi_dia, rtol=1e-5)
    np.testing.assert_allclose(t.r2prime, t.r2star - t.r2, atol=1e-4)
    mask = t.brain_mask
    logs = np.log(noiseless.magnitude[mask].astype(np.float64))  # (voxels, echoes)
    design = np.stack([np.ones(len(TES)), -np.asarray(TES)], axis=1)
    coef, *_ = np.linalg.lstsq(design, logs.T, rcond=None)
    np.testing.assert_allclose(coef[1], t.r2star[mask], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.exp(coef[0]), steady[mask], rtol=1e-4)
    assert np.all(noiseless.magnitude[healthy.m0 == 0] == 0)


def test_intravoxel_dephasing_is_the_sinc_of_the_field_gradient(healthy, noiseless):
    """A box voxel across which the field changes by g Hz: signal times sinc(g TE) per axis."""
    dephased = simulate_gre(healthy, echo_times=TES, snr=None, seed=3)
    gradients = np.stack(np.gradient(noiseless.truth.field_total_hz.astype(np.float64)))
    tissue = healthy.m0 > 0
    for e, te in enumerate(TES):
        expected = noiseless.complex_signal[..., e] * np.prod(np.sinc(gradients * te), axis=0)
        np.testing.assert_allclose(dephased.complex_signal[..., e][tissue], expected[tissue], atol=2e-4, rtol=1e-3)
    # next to air and bone the loss is large, in the brain's interior it is small
    ratio = dephased.magnitude[..., -1] / np.maximum(noiseless.magnitude[..., -1], 1e-12)
    assert np.median(ratio[healthy.brain_mask]) > 0.9 and ratio[tissue].min() < 0.5


def test_relaxometric_constants_scale_with_field():
    from chisep.separation.constants import load_model_file

    model = load_model_file("chi-separation")["relaxometric"]
    p3, d3 = relaxometric_constants(3.0)
    assert (p3, d3) == (model["dr_para_hz_per_ppm"], model["dr_dia_hz_per_ppm"])  # 137 Hz/ppm at 3 T
    p7, d7 = relaxometric_constants(7.0)
    assert p7 == pytest.approx(p3 * 7 / 3) and d7 == pytest.approx(d3 * 7 / 3)
    assert relaxometric_constants(3.0, 100.0, 50.0) == (100.0, 50.0)
    with pytest.raises(InputError, match="dr_para"):
        relaxometric_constants(3.0, -1.0, 1.0)


def test_fields_local_background_total(noiseless, healthy):
    t = noiseless.truth
    np.testing.assert_allclose(t.field_local_hz + t.field_background_hz, t.field_total_hz, atol=1e-4)
    chi_brain = np.where(healthy.brain_mask, healthy.chi, 0.0).astype(np.float32)
    local = np.asarray(physics.forward_field_hz(chi_brain, 3.0, healthy.voxel_size, pad_factor=1.5))
    np.testing.assert_allclose(t.field_local_hz, local, atol=1e-3 * np.abs(local).max())
    np.testing.assert_array_equal(t.chi, chi_brain)
    # the padding used is enough: wider padding changes the local field by < 2 %
    wide = np.asarray(physics.forward_field_hz(chi_brain, 3.0, healthy.voxel_size, pad_factor=3.0))
    mask = healthy.brain_mask
    wide = wide - (wide[mask].mean() - local[mask].mean())  # D(0) = 0: a constant is not determined
    assert np.linalg.norm((local - wide)[mask]) < 0.02 * np.linalg.norm(local[mask])
    # the total field is the field of chi referenced to air (+9.4 ppm): outside = 0; the
    # background sources go through the finite-difference kernel (harmonic on the grid)
    bg = np.asarray(physics.forward_field_hz(healthy.chi - 9.4 - chi_brain, 3.0, healthy.voxel_size,
                                             pad_factor=1.5, kind="discrete"))
    np.testing.assert_allclose(t.field_total_hz, bg + local, atol=1e-3 * np.abs(bg).max())
    # harmonic inside the brain: the discrete Laplacian of the background is negligible there
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, iterations=2)
    lap_bg = ndimage.laplace(t.field_background_hz.astype(np.float64))[inner]
    lap_local = ndimage.laplace(t.field_local_hz.astype(np.float64))[inner]
    assert np.abs(lap_bg).max() < 1e-2 * np.abs(lap_local).max()
    # background varies smoothly inside the brain (harmonic), and exceeds the local field
    assert np.abs(t.field_background_hz[mask]).max() > 5 * np.abs(t.field_local_hz[mask]).max()


def test_field_scales_with_field_strength(healthy, noiseless):
    sim7 = simulate_gre(healthy, field_strength=7.0, echo_times=TES, snr=None, seed=3)
    np.testing.assert_allclose(sim7.truth.field_local_hz, noiseless.truth.field_local_hz * 7 / 3,
                               atol=1e-3)
    assert sim7.truth.dr_para == pytest.approx(noiseless.truth.dr_para * 7 / 3)


def test_noise_level_matches_snr(healthy, noiseless):
    snr = 20.0
    noisy = simulate_gre(healthy, echo_times=TES, snr=snr, seed=3, intravoxel_dephasing=False)
    mask = healthy.brain_mask
    first = noiseless.magnitude[..., 0][mask].mean()
    assert noisy.truth.noise_sigma == pytest.approx(first / snr, rel=1e-5)
    residual = noisy.complex_signal - noiseless.complex_signal
    for part in (residual.real, residual.imag):
        assert part.std() == pytest.approx(first / snr, rel=0.1)
    # identical seeds give identical data, another seed other noise (same truth)
    again = simulate_gre(healthy, echo_times=TES, snr=snr, seed=3, intravoxel_dephasing=False)
    np.testing.assert_array_equal(again.magnitude, noisy.magnitude)
    np.testing.assert_array_equal(again.phase, noisy.phase)
    other = simulate_gre(healthy, echo_times=TES, snr=snr, seed=4)
    assert not np.array_equal(other.magnitude, noisy.magnitude)


def test_oblique_affine_round_trip(healthy):
    tilt = 25.0
    affine = oblique_affine(healthy.affine, tilt)
    b0 = physics.b0_direction_from_affine(affine)
    np.testing.assert_allclose(b0, [0, np.sin(np.deg2rad(tilt)), np.cos(np.deg2rad(tilt))], atol=1e-12)
    np.testing.assert_allclose(physics.voxel_size_from_affine(affine), healthy.voxel_size)
    via_affine = simulate_gre(with_affine(healthy, affine), echo_times=TES, snr=None, phase_offset=None)
    assert via_affine.acquisition.b0_angle_deg == pytest.approx(tilt)
    # asking for the direction instead rotates the acquisition affine to agree with it
    via_direction = simulate_gre(healthy, echo_times=TES, snr=None, phase_offset=None, b0_direction=b0)
    np.testing.assert_allclose(physics.b0_direction_from_affine(via_direction.acquisition.affine), b0,
                               atol=1e-9)
    np.testing.assert_allclose(via_direction.truth.field_local_hz, via_affine.truth.field_local_hz, atol=1e-4)
    axial = simulate_gre(healthy, echo_times=TES, snr=None, phase_offset=None)
    assert not np.allclose(axial.truth.field_local_hz, via_affine.truth.field_local_hz, atol=0.1)


def test_integer_phase(healthy, noiseless):
    sim = simulate_gre(healthy, echo_times=TES, snr=None, seed=3, integer_phase=True, intravoxel_dephasing=False)
    assert sim.phase.dtype == np.int16
    assert sim.phase.min() >= -4096 and sim.phase.max() <= 4095
    as_rad = sim.phase.astype(np.float64) * np.pi / 4096
    assert wrapped_difference(as_rad, noiseless.phase).max() <= np.pi / 4096 + 1e-5
    np.testing.assert_array_equal(sim.magnitude, noiseless.magnitude)


def test_phase_sign_conjugates_stored_phase(healthy, noiseless):
    flipped = simulate_gre(healthy, echo_times=TES, snr=None, seed=3, phase_sign=-1, intravoxel_dephasing=False)
    assert flipped.acquisition.phase_sign == -1
    assert flipped.phase.min() >= -np.pi and flipped.phase.max() < np.pi
    restored = flipped.acquisition.phase_sign * flipped.phase.astype(np.float64)
    assert wrapped_difference(restored, noiseless.phase).max() < 1e-5
    np.testing.assert_array_equal(flipped.truth.field_total_hz, noiseless.truth.field_total_hz)
    with pytest.raises(InputError, match="phase_sign"):
        simulate_gre(healthy, phase_sign=2)


def test_invalid_simulation_inputs(healthy):
    for snr in (0.0, -5.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="snr"):
            simulate_gre(healthy, snr=snr)
    with pytest.raises(InputError, match="milliseconds"):
        simulate_gre(healthy, echo_times=(4.0, 10.0))
    with pytest.raises(InputError, match="increasing"):
        simulate_gre(healthy, echo_times=(0.01, 0.004))
    with pytest.raises(InputError, match="repetition_time"):
        simulate_gre(healthy, echo_times=TES, repetition_time=0.02)
    with pytest.raises(InputError, match="field_strength"):
        simulate_gre(healthy, field_strength=0.0)
    with pytest.raises(InputError, match="phase_offset"):
        simulate_gre(healthy, phase_offset="random")
    with pytest.raises(InputError, match="b0_direction"):
        simulate_gre(healthy, b0_direction=(0, 0, 0))
    with pytest.raises(InputError, match="Phantom"):
        simulate_gre(np.zeros((4, 4, 4)))
