"""Round trips for phase unwrapping: build a smooth phase, wrap it, unwrap it, compare."""

import numpy as np
import pytest

from chisep.errors import InputError
from chisep.physics import wrap_phase
from chisep.qsm.unwrap import (
    UNWRAP_METHODS,
    edge_quality,
    temporal_unwrap,
    unwrap,
    unwrap_laplacian,
    unwrap_romeo,
)

TWO_PI = 2 * np.pi
N = 48


def _grid(n=N):
    axis = np.arange(n, dtype=np.float64) - n / 2 + 0.5
    return np.meshgrid(axis, axis, axis, indexing="ij")


def smooth_phase(n=N, scale=1.0):
    """Ramps plus Gaussian blobs reaching about +-30 rad (neighbour steps < pi)."""
    x, y, z = _grid(n)
    truth = 0.12 * x - 0.08 * y + 0.05 * z
    for (cx, cy, cz), amp, sigma in [((10, 6, 0), 30.0, 10.0), ((-10, -10, 4), -25.0, 10.0), ((-2, 14, -10), 12.0, 7.0)]:
        truth = truth + amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return scale * truth


def irregular_mask(n=N):
    """Ellipsoid with a spherical bite and an inner cavity (non-convex, with a hole)."""
    x, y, z = _grid(n)
    m = (x / 21) ** 2 + (y / 19) ** 2 + (z / 17) ** 2 < 1
    m &= (x - 18) ** 2 + (y - 12) ** 2 + z**2 > 9**2
    m &= x**2 + (y + 4) ** 2 + z**2 > 3**2
    return m


def off_by_multiple(unwrapped, truth, mask):
    """Voxels whose error differs from the median error by a non-zero multiple of 2 pi."""
    diff = (unwrapped - truth)[mask]
    return int(np.count_nonzero(np.rint((diff - np.median(diff)) / TWO_PI)))


def assert_congruent_exact(unwrapped, truth, mask, atol=1e-3):
    diff = (unwrapped - truth)[mask]
    assert off_by_multiple(unwrapped, truth, mask) == 0
    assert np.ptp(diff) < atol
    k = np.median(diff) / TWO_PI
    assert abs(k - round(k)) < 1e-3, "global offset must be a multiple of 2 pi"


def test_phantom_phase_is_really_wrapped_and_smooth():
    truth = smooth_phase()
    assert np.ptp(truth) > 40
    assert max(np.abs(np.diff(truth, axis=a)).max() for a in range(3)) < 2.6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_romeo_exact_on_noiseless_phase(dtype):
    truth, mask = smooth_phase(), irregular_mask()
    out = unwrap_romeo(wrap_phase(truth).astype(dtype), mask)
    assert out.dtype == np.float32 and out.shape == truth.shape
    assert_congruent_exact(out, truth, mask)
    assert np.all(out[~mask] == 0)


def test_romeo_global_multiple_centres_the_mean():
    truth, mask = smooth_phase(), irregular_mask()
    out = unwrap_romeo(wrap_phase(truth), mask)
    assert -np.pi <= out[mask].mean() < np.pi


def test_romeo_with_noise_and_magnitude_has_no_2pi_errors():
    rng = np.random.default_rng(3)
    truth, mask = smooth_phase(), irregular_mask()
    noisy = wrap_phase(truth + rng.normal(0, 0.35, truth.shape))
    magnitude = np.where(mask, 1.0, 0.05) * (1 + 0.1 * rng.normal(size=truth.shape))
    out = unwrap_romeo(noisy, mask, magnitude=np.abs(magnitude))
    assert off_by_multiple(out, truth, mask) == 0


def test_romeo_separate_components_each_exact():
    truth = smooth_phase()
    x, y, z = _grid()
    mask = ((x + 10) ** 2 + y**2 + z**2 < 8**2) | ((x - 10) ** 2 + y**2 + z**2 < 8**2)
    out = unwrap_romeo(wrap_phase(truth), mask)
    for part in (mask & (x < 0), mask & (x > 0)):
        assert_congruent_exact(out, truth, part)


def test_romeo_tiny_masks():
    truth = smooth_phase(8)
    one = np.zeros(truth.shape, bool)
    one[3, 3, 3] = True
    out = unwrap_romeo(wrap_phase(truth), one)
    assert out[3, 3, 3] == pytest.approx(wrap_phase(truth)[3, 3, 3], abs=1e-6)


def test_laplacian_close_to_truth_in_smooth_case():
    truth, mask = smooth_phase(), irregular_mask()
    out = unwrap_laplacian(wrap_phase(truth), mask, voxel_size=(1, 1, 1))
    diff = (out - truth)[mask]
    diff -= diff.mean()
    assert np.sqrt(np.mean(diff**2)) < 1e-2


def test_laplacian_anisotropic_voxels():
    truth, mask = smooth_phase(), irregular_mask()
    out = unwrap_laplacian(wrap_phase(truth), mask, voxel_size=(1.0, 1.0, 2.5))
    diff = (out - truth)[mask]
    assert np.ptp(diff) < 0.05


def test_laplacian_one_shot_is_off_by_smooth_non_2pi_amounts():
    """The documented limitation: the box solution is not congruent with the wrapped phase."""
    truth, mask = smooth_phase(), irregular_mask()
    out = unwrap_laplacian(wrap_phase(truth), mask, max_iter=0)
    diff = (out - truth)[mask]
    assert np.std(diff) > 0.1
    frac = np.abs(diff / TWO_PI - np.rint(diff / TWO_PI))
    assert np.mean(frac > 0.05) > 0.5


def test_edge_quality_perfect_for_constant_and_lower_for_noise():
    rng = np.random.default_rng(0)
    flat = np.zeros((6, 7, 8))
    for w, shape in zip(edge_quality(flat), [(5, 7, 8), (6, 6, 8), (6, 7, 7)]):
        assert w.shape == shape and np.allclose(w, 1.0)
    noise = rng.uniform(-np.pi, np.pi, (16, 16, 16))
    assert max(float(w.mean()) for w in edge_quality(noise)) < 0.3
    magnitude = np.ones((6, 7, 8))
    magnitude[3] = 0.5
    w = edge_quality(flat, magnitude)[0]
    assert np.allclose(w[2], 0.25) and np.allclose(w[0], 1.0)


# ---------------------------------------------------------------------------
# multi-echo
# ---------------------------------------------------------------------------
TES = np.array([4.0, 9.0, 14.0, 19.0, 24.0]) * 1e-3


def multi_echo(n=N, field_scale=1.0, offset=True):
    x, y, z = _grid(n)
    # field in Hz: up to ~200 Hz, so |f| * dTE exceeds 0.5 in places
    field = field_scale * smooth_phase(n) / (TWO_PI * 0.024)
    phi0 = (1.2 * np.sin(x / 9.0) + 0.6 * np.cos(y / 7.0)) if offset else np.zeros_like(x)
    truth = phi0[..., None] + TWO_PI * field[..., None] * TES
    return truth, field


def test_multi_echo_fields_exceed_echo_spacing_limit():
    truth, field = multi_echo()
    mask = irregular_mask()
    assert np.mean(np.abs(field[mask]) * 5e-3 > 0.5) > 0.02


@pytest.mark.parametrize("individual", [False, True])
def test_romeo_multi_echo_exact_with_offset_and_large_field(individual):
    truth, _ = multi_echo()
    mask = irregular_mask()
    magnitude = np.exp(-30 * TES) * np.ones(truth.shape)
    out = unwrap_romeo(wrap_phase(truth), mask, magnitude=magnitude, echo_times=TES,
                       individual=individual)
    diff = (out - truth)[mask]
    # one common 2 pi multiple for all echoes and voxels
    assert np.ptp(diff) < 1e-3
    assert abs(np.median(diff) / TWO_PI - round(np.median(diff) / TWO_PI)) < 1e-3


@pytest.mark.parametrize("template", [0, 2, 4])
def test_romeo_multi_echo_any_template(template):
    truth, _ = multi_echo(32, field_scale=0.5)
    mask = np.ones(truth.shape[:3], bool)
    out = unwrap_romeo(wrap_phase(truth), mask, echo_times=TES, template_echo=template)
    diff = out - truth
    assert np.ptp(diff) < 1e-3


def test_romeo_multi_echo_auto_template_avoids_a_noisy_echo():
    truth, _ = multi_echo(32, field_scale=0.5)
    rng = np.random.default_rng(7)
    wrapped = wrap_phase(truth)
    wrapped[..., 0] = rng.uniform(-np.pi, np.pi, truth.shape[:3])  # a corrupted first echo
    out = unwrap_romeo(wrapped, echo_times=TES)
    diff = (out - truth)[..., 1:]
    assert np.ptp(diff) < 1e-3


def test_temporal_unwrap_repairs_per_echo_jumps():
    truth, _ = multi_echo(16, field_scale=0.2)
    rng = np.random.default_rng(5)
    # spatially unwrapped echoes with a wrong global multiple and local jumps
    broken = truth.copy()
    broken[..., 2] += TWO_PI * 3
    jumps = rng.random(truth.shape[:3]) < 0.05
    broken[..., 4] += np.where(jumps, -TWO_PI, 0.0)
    fixed = temporal_unwrap(broken, TES)
    assert np.ptp(fixed - truth) < 1e-3


def test_dispatcher_runs_each_method_and_rejects_unknown():
    truth, mask = smooth_phase(24), np.ones((24, 24, 24), bool)
    for method in ("romeo", "laplacian"):
        out = unwrap(wrap_phase(truth), mask, method=method)
        diff = out - truth
        assert np.ptp(diff - np.median(diff)) < 0.05
    # "none": the phase was unwrapped elsewhere and passes as it is, wrapped or not
    np.testing.assert_array_equal(unwrap(truth, mask, method="none"), truth.astype(np.float32))
    assert set(UNWRAP_METHODS) == {"romeo", "laplacian", "none"}
    with pytest.raises(InputError, match="romeo"):
        unwrap(wrap_phase(truth), mask, method="goldstein")


def test_laplacian_multi_echo_unwraps_each_echo():
    truth, _ = multi_echo(24, field_scale=0.3)
    out = unwrap_laplacian(wrap_phase(truth))
    assert out.shape == truth.shape
    for e in range(TES.size):
        assert np.ptp(out[..., e] - truth[..., e]) < 0.05


# ---------------------------------------------------------------------------
# invalid inputs
# ---------------------------------------------------------------------------
def test_invalid_inputs_give_clear_errors():
    phase = np.zeros((8, 8, 8))
    with pytest.raises(InputError, match="NaN"):
        bad = phase.copy()
        bad[1, 1, 1] = np.nan
        unwrap_romeo(bad)
    with pytest.raises(InputError, match="mask"):
        unwrap_romeo(phase, np.ones((8, 8, 7), bool))
    with pytest.raises(InputError, match="empty"):
        unwrap_romeo(phase, np.zeros((8, 8, 8), bool))
    with pytest.raises(InputError, match="3D or 4D"):
        unwrap_romeo(np.zeros((8, 8)))
    with pytest.raises(InputError, match="complex"):
        unwrap_romeo(np.exp(1j * phase))
    with pytest.raises(InputError, match="magnitude"):
        unwrap_romeo(phase, magnitude=np.ones((8, 8, 9)))
    with pytest.raises(InputError, match="voxel_size"):
        unwrap_laplacian(phase, voxel_size=(1, 0, 1))
    four = np.zeros((8, 8, 8, 3))
    with pytest.raises(InputError, match="echo_times"):
        unwrap_romeo(four)
    with pytest.raises(InputError, match="one echo time"):
        unwrap_romeo(four, echo_times=[0.004, 0.008])
    with pytest.raises(InputError, match="increasing"):
        unwrap_romeo(four, echo_times=[0.004, 0.012, 0.008])
    with pytest.raises(InputError, match="milliseconds"):
        unwrap_romeo(four, echo_times=[4, 8, 12])
    with pytest.raises(InputError, match="template_echo"):
        unwrap_romeo(four, echo_times=[0.004, 0.008, 0.012], template_echo=3)
    with pytest.raises(InputError, match="4D"):
        temporal_unwrap(phase, [0.004])
