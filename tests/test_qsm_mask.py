"""Brain masks on a synthetic head with a bias field; erosion in millimetres; phase-quality refinement."""

import numpy as np
import pytest
from scipy import ndimage

from chisep import metrics
from chisep.errors import InputError
from chisep.qsm.mask import brain_mask, erode_mask, otsu_threshold, refine_mask_by_phase_quality

VOXEL = np.array([2.0, 2.0, 2.5])
SHAPE = (64, 72, 60)


def _coords(shape=SHAPE, voxel=VOXEL):
    axes = [(np.arange(n) - n / 2 + 0.5) * h for n, h in zip(shape, voxel)]
    return np.meshgrid(*axes, indexing="ij")


def synthetic_head(*, bias_strength=0.6, noise=0.03, n_echoes=None, seed=0):
    """Ellipsoidal head: brain (with dark ventricles) inside a dark skull and a bright scalp.

    Returns (magnitude, brain) with a smooth multiplicative bias field and
    Rician noise; with ``n_echoes`` the magnitude decays over echoes (4D).
    """
    rng = np.random.default_rng(seed)
    x, y, z = _coords()
    r = np.sqrt((x / 55) ** 2 + (y / 65) ** 2 + (z / 58) ** 2)
    brain = r < 0.85
    mag = np.where(brain, 1.0, 0.0)
    mag = np.where(brain & (x**2 + y**2 + z**2 < 12**2), 0.3, mag)  # ventricles (CSF, dark at short TE here)
    mag = np.where((r > 0.92) & (r < 1.0), 0.7, mag)  # scalp, separated by dark bone
    bias = np.exp(bias_strength * (x / 55 - 0.7 * z / 58 + 0.3 * y / 65))
    signal = mag * bias
    if n_echoes is not None:
        signal = signal[..., None] * np.exp(-40.0 * 0.005 * np.arange(1, n_echoes + 1))
    noisy = np.abs(signal + noise * (rng.normal(size=signal.shape) + 1j * rng.normal(size=signal.shape)))
    return noisy.astype(np.float32), brain


def test_bias_field_is_strong():
    mag, brain = synthetic_head()
    inner = mag[brain & (mag > 0.5)]
    assert np.percentile(inner, 95) / np.percentile(inner, 5) > 1.8


@pytest.mark.parametrize("bias_correct", [True, False])
def test_brain_mask_dice_on_head_with_bias(bias_correct):
    mag, brain = synthetic_head()
    mask = brain_mask(mag, voxel_size=VOXEL, bias_correct=bias_correct)
    assert mask.dtype == bool and mask.shape == brain.shape
    assert metrics.dice(mask, brain) > 0.95


def test_brain_mask_multi_echo_uses_all_echoes():
    mag, brain = synthetic_head(n_echoes=4, noise=0.05)
    assert metrics.dice(brain_mask(mag, voxel_size=VOXEL), brain) > 0.95


def test_brain_mask_noise_free_background_of_zeros():
    mag, brain = synthetic_head(noise=0.0)
    assert metrics.dice(brain_mask(mag, voxel_size=VOXEL), brain) > 0.97


def test_brain_mask_fills_cavity_and_explicit_threshold():
    mag, brain = synthetic_head(bias_strength=0.0)
    x, y, z = _coords()
    mag[x**2 + y**2 + z**2 < 8**2] = 0.0  # dark enclosed cavity (haemorrhage)
    filled = brain_mask(mag, voxel_size=VOXEL, threshold=0.2)
    assert metrics.dice(filled, brain) > 0.97
    holes = brain_mask(mag, voxel_size=VOXEL, threshold=0.2, fill_holes=False)
    assert not holes[32, 36, 30] and filled[32, 36, 30]


def test_brain_mask_keeps_largest_component_only_when_asked():
    mag, brain = synthetic_head(bias_strength=0.0)
    scalp_and_brain = brain_mask(mag, voxel_size=VOXEL, largest_component=False)
    assert scalp_and_brain.sum() > 1.3 * brain.sum()


def test_brain_mask_erosion_in_mm():
    mag, brain = synthetic_head()
    full = brain_mask(mag, voxel_size=VOXEL)
    eroded = brain_mask(mag, voxel_size=VOXEL, erode_mm=5.0)
    assert eroded.sum() < full.sum() and np.all(full[eroded])


def test_brain_mask_invalid_inputs():
    with pytest.raises(InputError, match="zero everywhere"):
        brain_mask(np.zeros((8, 8, 8)))
    with pytest.raises(InputError, match="NaN"):
        bad = np.ones((8, 8, 8))
        bad[0, 0, 0] = np.nan
        brain_mask(bad)
    with pytest.raises(InputError, match="3D"):
        brain_mask(np.ones((8, 8)))
    with pytest.raises(InputError, match=r"\(0, 1\)"):
        brain_mask(np.ones((8, 8, 8)), threshold=5.0)
    with pytest.raises(InputError, match="voxel_size"):
        brain_mask(np.ones((8, 8, 8)), voxel_size=(1, 1))
    small = np.zeros((16, 16, 16))
    small[6:10, 6:10, 6:10] = 1.0
    with pytest.raises(InputError, match="empty"):
        brain_mask(small, erode_mm=3.0, bias_correct=False)


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0, 1, 5000), rng.normal(10, 1, 5000)])
    assert 3 < otsu_threshold(values) < 7


# ---------------------------------------------------------------------------
# erosion
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("voxel", [(1.0, 1.0, 1.0), (1.0, 1.5, 2.5)])
def test_erode_mask_shrinks_sphere_by_radius(voxel):
    shape = tuple(int(np.ceil(60 / h)) for h in voxel)  # +-30 mm: the sphere fits
    x, y, z = _coords(shape, np.asarray(voxel))
    dist = np.sqrt(x**2 + y**2 + z**2)
    sphere = dist <= 24.0
    eroded = erode_mask(sphere, voxel, 6.0)
    # survivors lie about 6 mm inside (up to the grid spacing: the nearest
    # outside voxel centre may be a little further than the continuous
    # surface); every voxel 6 mm + one voxel diagonal inside survives
    assert dist[eroded].max() <= 24.0 - 6.0 + max(voxel)
    assert np.all(eroded[dist <= 24.0 - 6.0 - np.linalg.norm(voxel)])
    r_eq = (eroded.sum() * np.prod(voxel) * 3 / (4 * np.pi)) ** (1 / 3)
    assert r_eq == pytest.approx(18.0, abs=max(voxel))


def test_erode_mask_array_border_counts_as_outside_and_zero_radius_copies():
    full = np.ones((10, 10, 10), bool)
    eroded = erode_mask(full, (1, 1, 1), 2.0)
    assert eroded[2:8, 2:8, 2:8].all() and not eroded[1].any() and not eroded[:, :, 8:].any()
    same = erode_mask(full, (1, 1, 1), 0.0)
    assert same.all() and same is not full
    with pytest.raises(InputError, match="radius_mm"):
        erode_mask(full, (1, 1, 1), -1.0)


def test_erode_mask_small_ball_matches_the_distance_transform(monkeypatch):
    # small radii erode with the ball as structuring element (10x faster at 1 mm): the same voxels as
    # the distance transform, on anisotropic grids and with the array border as outside
    from chisep.qsm import mask as mask_module

    rng = np.random.default_rng(0)
    cases = []
    for _ in range(40):
        shape = tuple(int(n) for n in rng.integers(8, 20, 3))
        m = ndimage.binary_opening(rng.random(shape) > 0.3)
        vs = tuple(float(v) for v in rng.choice([0.7, 1.0, 1.5, 2.0], 3))
        cases.append((m, vs, float(rng.choice([0.5, 0.7, 1.0, 1.5, 2.0, 2.2]))))
    fast = [erode_mask(m, vs, r) for m, vs, r in cases]
    monkeypatch.setattr(mask_module, "SMALL_BALL_BOX_VOXELS", 0)  # every radius by distance transform
    for (m, vs, r), f in zip(cases, fast):
        np.testing.assert_array_equal(f, erode_mask(m, vs, r), err_msg=f"voxel size {vs}, radius {r}")
    assert sum(f.sum() for f in fast) > 0  # not all empty


# ---------------------------------------------------------------------------
# phase-quality refinement
# ---------------------------------------------------------------------------
def test_refine_mask_removes_noisy_rim_and_keeps_interior():
    rng = np.random.default_rng(2)
    shape = (40, 40, 40)
    x, y, z = _coords(shape, np.ones(3))
    r = np.sqrt(x**2 + y**2 + z**2)
    brain = r < 14
    loose = r < 18  # a mask that leaks 4 voxels into the background
    phase = np.where(brain, 0.2 * x + 0.1 * y, rng.uniform(-np.pi, np.pi, shape))
    vein = (np.abs(x) < 2) & (np.abs(y) < 2) & (np.abs(z) < 2)
    phase[vein] = rng.uniform(-np.pi, np.pi, int(vein.sum()))  # noisy spot inside
    phase = np.angle(np.exp(1j * phase))
    refined = refine_mask_by_phase_quality(loose, phase, threshold=0.75)
    assert np.all(loose[refined])
    assert refined[vein].all(), "enclosed low-quality voxels stay (holes are filled)"
    assert metrics.dice(refined, brain) > 0.93
    assert metrics.dice(loose, brain) < 0.7
    with pytest.raises(InputError, match="spatial shape"):
        refine_mask_by_phase_quality(loose, phase[:-1], threshold=0.75)
    with pytest.raises(InputError, match="threshold"):
        refine_mask_by_phase_quality(loose, phase, threshold=1.5)


def test_brain_mask_on_head_phantom():
    from chisep.sim.gre import simulate_gre
    from chisep.sim.phantom import head_phantom

    sim = simulate_gre(head_phantom(4.0), snr=50.0, seed=2)
    mask = brain_mask(sim.magnitude, voxel_size=sim.acquisition.voxel_size)
    assert metrics.dice(mask, sim.truth.brain_mask) > 0.95


def test_brain_region_cuts_scalp_joined_by_a_bridge_through_the_skull():
    """Brain sphere, unreliable skull shell, scalp shell; a 2-voxel bridge of 'reliable' bone joins them."""
    from chisep.qsm.mask import brain_region

    x, y, z = np.meshgrid(*[np.arange(60) - 29.5] * 3, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    brain = r < 18
    skull = (r >= 18) & (r < 21)
    head = r < 26
    bridge = skull & (np.abs(y) < 1.5) & (np.abs(z) < 1.5) & (x > 0)
    unreliable = skull & ~bridge
    out = brain_region(head, unreliable, voxel_size=(1.0, 1.0, 1.0), opening_mm=3.0)
    assert metrics.dice(out, brain) > 0.98
    assert not (out & (r > 21)).any()  # no scalp
    # without the opening, the scalp comes along through the bridge
    candidates = head & ~unreliable
    assert metrics.dice(candidates, brain) < 0.7
    # a volume too small for the opening: the largest reliable component is returned
    tiny = brain_region(r < 2.5, np.zeros_like(brain), voxel_size=(1.0, 1.0, 1.0), opening_mm=4.0)
    assert tiny.sum() == (r < 2.5).sum()
    with pytest.raises(InputError, match="reliable"):
        brain_region(head, head, voxel_size=(1.0, 1.0, 1.0))


def test_bias_field_upsampling_is_scipys_linear_zoom():
    """The bias estimate goes back to the full grid as ndimage.zoom(order=1, grid_mode=True) would."""
    from scipy import ndimage

    from chisep.qsm.mask import _resize_linear

    rng = np.random.default_rng(1)
    for small_shape, shape in [((9, 11, 8), (45, 50, 38)), ((1, 5, 3), (4, 20, 3)), ((7, 7, 7), (7, 7, 7))]:
        small = rng.random(small_shape)
        zoomed = ndimage.zoom(small, [n / m for n, m in zip(shape, small_shape)], order=1, mode="nearest",
                              grid_mode=True)
        np.testing.assert_allclose(_resize_linear(small, shape), zoomed, atol=1e-6)
