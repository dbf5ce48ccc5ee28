"""Robustness matrix at 5 mm: each acquisition variant against the standard case, with ground truth.

The cases are defined once in :mod:`chisep.robustness` (``benchmarks/bench_robustness.py``
runs them at full size). Here every case is simulated once at 5 mm and run with
fast settings (PDF background removal, which works at coarse voxels, and
Tikhonov inversion). Bounds are stated relative to the standard case (3 T,
6 echoes, SNR 100): at 5 mm the standard chi correlates with the truth at
about 0.43, the total field is within 0.06 Hz (median), R2* within 2.5 %.
Measured values at 5 mm are noted next to each bound.
"""

import math

import numpy as np
import pytest

from chisep import robustness

pytestmark = pytest.mark.slow  # the whole acquisition matrix, simulated and reconstructed

RESOLUTION = 5.0
CASES = {c.name: c for c in robustness.CASES}

# case -> (chi correlation may drop by at most, field: median error Hz at most,
#          fraction of mask voxels > 5 Hz off at most, R2* median relative error at most)
# measured at 5 mm in brackets: (chi corr, median Hz, wrong %, R2* %)
BOUNDS = {
    # the whole-cycle correction from phi0 (qsm.echoes) lifted the standard case from 0.43 to 0.53;
    # cases where it is blind (TE1 a multiple of dTE, uneven spacing) or that it does not
    # reach keep their earlier absolute floor, hence larger drops below
    "standard": (0.0, 0.1, 0.005, 0.04),          # (0.53, 0.054, 0.0, 2.2)
    "1.5T": (0.2, 0.1, 0.005, 0.05),              # (0.31, 0.052, 0.07, 2.6): half the field per ppm
    # 7 T with 6 ms spacing: |f| dTE > 0.5 in a quarter of the mask. About 2 % of the mask
    # (next to the sinuses, 5 mm voxels) gets a 1/dTE error; chisep warns (known gap)
    "7T": (0.3, 0.1, 0.04, 0.04),                 # (0.23, 0.067, 2.3, 1.6)
    # the wrong voxels sit at the brain edge next to the sinuses, where the true field itself
    # changes by more than half a wrap between 5 mm neighbours; a shorter spacing removes them
    "7T-short-TE": (0.05, 0.2, 0.005, 0.05),      # (0.43, 0.12, 0.07, 3.1), no warning
    "oblique15": (0.2, 0.1, 0.005, 0.04),         # (0.34, 0.056, 0.07, 2.2)
    "oblique30": (0.35, 0.1, 0.005, 0.04),        # (0.27, 0.055, 0.07, 2.2)
    "anisotropic": (0.3, 0.1, 0.01, 0.04),        # (0.24, 0.056, 0.26, 2.2): 5x5x7.5 mm
    "slab": (0.1, 0.1, 0.005, 0.04),              # (0.45, 0.054, 0.02, 2.2)
    "2-echoes": (0.25, 0.3, 0.03, 0.08),          # (0.28, 0.14, 1.35, 5.3): dTE 12 ms wraps
    "4-echoes": (0.25, 0.15, 0.01, 0.05),         # (0.28, 0.074, 0.32, 3.1)
    "8-echoes": (0.25, 0.1, 0.005, 0.04),         # (0.37, 0.052, 0.07, 2.1): TE1 = dTE, correction blind
    "uneven-TE": (0.25, 0.1, 0.005, 0.04),        # (0.37, 0.058, 0.07, 2.2): uneven, correction blind
    # with intra-voxel dephasing (2026-12-06) the edge loses signal: corr 0.41 -> 0.25, and 3.4 % of
    # the mask (dephased edge voxels at SNR 20) has field noise above the 5 Hz "wrong" mark
    "snr20": (0.22, 0.5, 0.05, 0.15),             # (0.25, ..., 3.4, ...)
    "snr1000": (0.05, 0.02, 0.005, 0.01),   # (0.43, 0.005, 0.07, 0.2)
    "haemorrhage": (0.0, 0.1, 0.005, 0.04),       # (0.78, ...): a strong source raises the correlation
    "calcification": (0.0, 0.1, 0.005, 0.04),     # (0.64, ...)
    "integer-phase": (0.02, 0.1, 0.005, 0.04),    # (0.43, ...)
    "flipped-sign": (0.02, 0.1, 0.005, 0.04),     # (0.43, ...)
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Each case simulated and reconstructed once (about a minute for the whole matrix)."""
    work = tmp_path_factory.mktemp("robustness")
    out = {}
    for name, case in CASES.items():
        prepared = robustness.prepare(case, RESOLUTION, workdir=work)
        out[name] = robustness.run_case(prepared, robustness.fast_settings())
    return out


def test_every_case_is_listed_with_a_bound_or_its_own_test():
    assert set(CASES) == set(BOUNDS) | {"single-echo", "flipped-sign-ignored"}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_case_within_bounds_of_standard(results, name):
    r, std = results[name], results["standard"]
    drop, field_median, wrong, r2s = BOUNDS[name]
    assert r["chi_corr"] >= std["chi_corr"] - drop, (name, r["chi_corr"], std["chi_corr"])
    assert r["field_median_err_hz"] <= field_median, (name, r["field_median_err_hz"])
    assert r["field_wrong_fraction"] <= wrong, (name, r["field_wrong_fraction"])
    assert r["r2star_median_rel_err"] <= r2s, (name, r["r2star_median_rel_err"])


def test_standard_case_is_accurate(results):
    std = results["standard"]
    assert std["chi_corr"] > 0.35 and std["field_median_err_hz"] < 0.1 and std["warnings"] == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_nan_or_inf_inside_the_mask(results, name):
    r = results[name]
    assert r["nonfinite_in_mask"] and not any(r["nonfinite_in_mask"].values()), r["nonfinite_in_mask"]
    for key, value in r["maps"].items():
        assert np.isfinite(value).all(), key  # outside the mask too


def test_phase_wraps_between_echoes_are_announced(results):
    assert any("wraps between consecutive echoes" in w for w in results["7T"]["warnings"])
    assert not any("wraps" in w for w in results["standard"]["warnings"] + results["7T-short-TE"]["warnings"])
    # the field is still right almost everywhere: Dr and the field scale with B0
    assert results["7T"]["field_median_err_hz"] < 0.1


def test_single_echo_runs_with_a_warning_and_no_r2star(results):
    r = results["single-echo"]
    assert any("single echo" in w for w in r["warnings"]), r["warnings"]
    assert any("no R2*" in n for n in r["notes"])
    assert not r["qsm"].r2star.any() and math.isnan(r["r2star_median_rel_err"])
    assert "chi_para" not in r["maps"]  # the separation models need R2*
    # phi0 cannot be separated from the field with one echo; its smooth part goes with the background,
    # the rest costs accuracy: measured 0.25 against the standard 0.44 at 5 mm
    assert 0.15 < r["chi_corr"] < results["standard"]["chi_corr"]


def test_wrong_phase_sign_is_a_documented_failure_mode(results):
    wrong, right = results["flipped-sign-ignored"], results["flipped-sign"]
    assert wrong["chi_corr"] < -0.3 and right["chi_corr"] > 0.35
    assert abs(wrong["chi_corr"] + right["chi_corr"]) < 0.05


@pytest.mark.parametrize("name, tolerance", [("haemorrhage", 0.35), ("calcification", 0.35)])
def test_strong_sources_keep_sign_and_most_of_their_magnitude(results, name, tolerance):
    r = results[name]
    est, true = r["lesion_mean_chi"], r["lesion_true_chi"]
    assert np.sign(est) == np.sign(true)
    assert abs(est - true) <= tolerance * abs(true), (est, true)  # 0.81/1.00 and -2.37/-3.00 at 5 mm


def test_integer_phase_through_the_loader_matches_float_phase(results):
    r, std = results["integer-phase"], results["standard"]
    assert abs(r["chi_corr"] - std["chi_corr"]) < 0.01
    # 4096 levels per pi: quantisation adds about 0.4 mrad per echo, far below the noise
    assert abs(r["field_median_err_hz"] - std["field_median_err_hz"]) < 0.01


def test_quality_map_flags_failed_voxels_instead_of_trusting_them():
    from chisep import pipeline
    from chisep.separation.base import SeparationFit

    shape = (6, 5, 4)
    mask = np.zeros(shape, bool)
    mask[1:5, 1:4, 1:3] = True
    ones = np.ones(shape, np.float32)
    noise, field, r2s, chi = 0.1 * ones, ones.copy(), 20 * ones, 0.01 * ones
    noise[1, 1, 1] = 5.0          # 50x the median: unreliable field, excluded by the reliability step
    reliable = mask.copy()
    reliable[1, 1, 1] = False
    field[2, 1, 1] = np.nan       # failed fit
    r2s[3, 1, 1] = 1000.0         # at the upper R2* limit
    chi[4, 1, 1] = np.inf
    converged = np.ones(shape, np.uint8)
    converged[1, 2, 1] = 0
    qsm = pipeline.QsmMaps(mask=mask & reliable, head_mask=mask, field_total=field, field_noise=noise,
                           field_local=ones, r2star=r2s, chi=chi, reconstruction_mask=reliable)
    sep = {"decompose": SeparationFit(chi_para=ones, chi_dia=ones, extra={"converged": converged})}
    q = pipeline.quality_map(qsm, sep)
    assert q.dtype == np.uint8 and not q[~mask].any()
    assert q[1, 1, 1] == 1 and q[2, 1, 1] == 1 | 8 and q[3, 1, 1] == 2 and q[4, 1, 1] == 8 and q[1, 2, 1] == 4
    assert np.count_nonzero(q) == 5
    assert set(pipeline.QUALITY_FLAGS) == {1, 2, 4, 8, 16, 32, 64}
    # a dark source enclosed by brain (16), one voxel of it with a field off by phase wraps (16 | 32)
    from chisep.qsm.reliability import Reliability

    enclosed, off_branch = np.zeros(shape, bool), np.zeros(shape, bool)
    enclosed[2:4, 2, 2] = True
    off_branch[3, 2, 2] = True
    qsm.reliability = Reliability(region=reliable, excluded=mask & ~reliable, enclosed=enclosed,
                                  off_branch=off_branch, flagged_by={}, statistics={}, thresholds={},
                                  voxel_volume_ml=0.001)
    q = pipeline.quality_map(qsm, sep)
    assert q[2, 2, 2] == 16 and q[3, 2, 2] == 16 | 32
    assert np.isinf(qsm.field_noise_used[3, 2, 2]) and np.isfinite(qsm.field_noise_used[2, 2, 2])


@pytest.mark.parametrize("name", ["standard", "7T", "single-echo", "snr20"])
def test_quality_map_of_matrix_cases_is_mostly_clean(results, name):
    from chisep import pipeline

    r = results[name]
    q = pipeline.quality_map(r["qsm"])
    assert not (q & 8).any()  # every map finite
    # 64 marks the region's outermost layer (R2* borrowed from inside), a property of the mask, not a fault
    rim = np.zeros(q.shape, bool) if r["qsm"].rim_mask is None else r["qsm"].rim_mask
    assert np.array_equal((q & 64) != 0, rim & r["qsm"].head_mask)
    problems = q & ~np.uint8(64)
    assert np.mean(problems[r["qsm"].mask] != 0) < 0.05, np.bincount(problems[r["qsm"].mask])
