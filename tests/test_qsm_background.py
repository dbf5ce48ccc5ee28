"""Tests for chisep.qsm.background: harmonic fields vanish, local fields survive.

Fields are built analytically (uniformly magnetised spheres, harmonic
polynomials) or with the discrete dipole kernel, whose background is
harmonic in the discrete sense: a continuous-kernel FFT simulation of a
voxelised air/bone step rings, and that ringing is not a background field
any method could remove.
"""

import numpy as np
import pytest
from scipy import ndimage

from chisep import physics
from chisep.errors import InputError
from chisep.metrics import nrmse
from chisep.qsm import background as bg

METHODS = tuple(bg.BACKGROUND_METHODS)
VS = (3.0, 3.0, 3.0)
B0_T = 3.0


def coords(shape, vs, centre=(0.0, 0.0, 0.0)):
    return np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * h - c for n, h, c in zip(shape, vs, centre)], indexing="ij")


def ellipsoid(shape, vs, centre, radii):
    return sum((x / r) ** 2 for x, r in zip(coords(shape, vs, centre), radii)) <= 1.0


def sphere_field_hz(shape, vs, centre, radius, chi, b0=(0, 0, 1)):
    """Analytic field of a uniformly magnetised sphere: 0 inside, chi a^3/(3 r^3)(3cos^2 - 1) outside."""
    x, y, z = coords(shape, vs, centre)
    r = np.sqrt(x**2 + y**2 + z**2)
    b = np.asarray(b0, float) / np.linalg.norm(b0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos2 = ((x * b[0] + y * b[1] + z * b[2]) / r) ** 2
        out = chi * radius**3 / (3 * r**3) * (3 * cos2 - 1)
    return physics.ppm_to_hz(np.where(r > radius, out, 0.0), B0_T).astype(np.float32)


@pytest.fixture(scope="module")
def head():
    """64^3 at 3 mm: ellipsoidal brain with nuclei and WM, skull shell and an air sinus."""
    shape = (64, 64, 64)
    brain = ellipsoid(shape, VS, (0, 0, 0), (54, 66, 51))
    chi = np.zeros(shape, np.float32)
    chi[ellipsoid(shape, VS, (20, 10, 5), (12, 12, 9))] = 0.13
    chi[ellipsoid(shape, VS, (-20, 10, 5), (12, 12, 9))] = 0.05
    chi[ellipsoid(shape, VS, (0, -25, 0), (25, 12, 15))] = -0.03
    chi[ellipsoid(shape, VS, (0, 30, 20), (9, 9, 9))] = 0.10
    skull = ellipsoid(shape, VS, (0, 0, 0), (72, 84, 69)) & ~ellipsoid(shape, VS, (0, 0, 0), (66, 78, 63))
    sinus = ellipsoid(shape, VS, (0, 45, -60), (15, 12, 8)) & ~brain
    outside = np.where(skull, -2.0, 0.0) + np.where(sinus, 9.4, 0.0)
    local = np.asarray(physics.forward_field_hz(chi * brain, B0_T, VS, kind="discrete"))
    background = np.asarray(physics.forward_field_hz(outside.astype(np.float32), B0_T, VS, kind="discrete"))
    return dict(brain=brain, local=local, total=local + background, background=background)


def test_harmonic_polynomial_is_removed_exactly(head):
    brain = head["brain"]
    x, y, z = coords(brain.shape, VS)
    field = (x * y + 0.5 * (x**2 - z**2) + 3 * z) / 100.0  # harmonic: Laplacian 0, also on the grid
    for method in METHODS:
        local, used = bg.remove_background(np.where(brain, field, 0), brain, method=method, voxel_size=VS)
        residual = local[used] - local[used].mean()
        # PDF fits discrete dipoles to a continuous harmonic: close but not exact.
        tol = 0.01 if method == "pdf" else 1e-4
        assert np.std(residual) < tol * np.std(field[used]), method


@pytest.mark.parametrize("method", ["sharp", "vsharp", "pdf", "lbv", "resharp"])
def test_outside_dipole_removed_inside_sphere_kept(method):
    """Analytic: an air-like sphere outside the mask (background) and a sphere inside (local)."""
    shape, vs = (48, 48, 48), (3.0, 3.0, 3.0)
    mask = ellipsoid(shape, vs, (0, 0, 0), (45, 45, 45))
    local = sphere_field_hz(shape, vs, (9, -6, 6), 9.0, 0.2)
    background = sphere_field_hz(shape, vs, (0, 0, -62), 10.0, 9.4)
    assert np.std(background[mask]) > 3 * np.std(local[mask])
    settings = {"sharp": {"radius_mm": 9.0}, "resharp": {"radius_mm": 9.0}}.get(method, {})
    out, used = bg.remove_background(local + background, mask, method=method, voxel_size=vs, **settings)
    # Measured: V-SHARP 4 %, SHARP 5 %, LBV 12 %, RESHARP 18 %, PDF 27 % (PDF fits part of the
    # inside sphere's dipole field, harmonic away from the sphere, with outside sources).
    bounds = {"sharp": 10.0, "vsharp": 10.0, "lbv": 20.0, "resharp": 25.0, "pdf": 35.0}
    assert nrmse(out, local, used) < bounds[method]
    # Without the local source the result is (nearly) nothing.
    empty, used0 = bg.remove_background(background, mask, method=method, voxel_size=vs, **settings)
    assert np.std(empty[used0]) < 0.15 * np.std(local[used0])


def test_synthetic_head_accuracy_and_masks(head):
    brain, local, total = head["brain"], head["local"], head["total"]
    assert np.std(head["background"][brain]) > 5 * np.std(local[brain])
    bounds = {"vsharp": 15.0, "lbv": 15.0, "pdf": 40.0, "resharp": 40.0, "sharp": 50.0}
    masks = {}
    for method in METHODS:
        out, used = bg.remove_background(total, brain, method=method, voxel_size=VS)
        assert out.dtype == np.float32 and used.dtype == bool and out.shape == brain.shape
        assert not np.any(used & ~brain), method
        assert np.all(out[~used] == 0), method
        score = nrmse(out, local, used)
        assert score < bounds[method], (method, score)
        masks[method] = used
    # PDF keeps the mask; SHARP loses a rim of its radius; V-SHARP only its smallest radius.
    assert np.array_equal(masks["pdf"], brain)
    _, sharp_mask = bg.sharp(total, brain, voxel_size=VS, radius_mm=6.0)
    vsharp_mask = masks["vsharp"]
    ball = physics.sphere_mask((5, 5, 5), VS, 6.0)
    ball = np.fft.fftshift(ball)
    assert np.array_equal(sharp_mask, ndimage.binary_erosion(brain, ball))
    assert vsharp_mask.sum() > sharp_mask.sum()
    # Smallest V-SHARP radius = one voxel: the sphere is the 6-neighbour cross.
    assert np.array_equal(vsharp_mask, ndimage.binary_erosion(brain))


def test_pdf_oblique_b0_and_anisotropic_voxels():
    shape, vs = (40, 44, 36), (3.0, 2.5, 3.5)
    b0 = physics.direction_from_angles(30.0, 40.0)
    mask = ellipsoid(shape, vs, (0, 0, 0), (42, 42, 42))
    local = sphere_field_hz(shape, vs, (6, -5, 7), 9.0, 0.2, b0)
    background = sphere_field_hz(shape, vs, (0, 0, -60), 10.0, 9.4, b0)
    out, used = bg.pdf(local + background, mask, voxel_size=vs, b0_direction=b0)
    assert nrmse(out, local, used) < 35.0  # measured 30 %
    vs_out, vs_used = bg.vsharp(local + background, mask, voxel_size=vs, b0_direction=b0)
    assert nrmse(vs_out, local, vs_used) < 15.0  # measured 7 %


def test_float64_input_and_nan_outside_mask(head):
    brain = head["brain"]
    field = np.where(brain, head["total"], np.nan).astype(np.float64)
    out, used = bg.vsharp(field, brain, voxel_size=VS)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    ref, _ = bg.vsharp(head["total"].astype(np.float32), brain, voxel_size=VS)
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_invalid_inputs(head):
    brain, total = head["brain"], head["total"]
    with pytest.raises(InputError, match="valid choices are: vsharp, sharp, resharp, pdf, lbv"):
        bg.remove_background(total, brain, method="harp")
    with pytest.raises(InputError, match="unknown setting"):
        bg.remove_background(total, brain, method="vsharp", radius_mm=5)
    with pytest.raises(InputError, match="mask is empty"):
        bg.vsharp(total, np.zeros_like(brain))
    with pytest.raises(InputError, match="does not match"):
        bg.pdf(total, brain[:-1])
    with pytest.raises(InputError, match="3D"):
        bg.sharp(total[..., None], brain[..., None])
    bad = total.copy()
    bad[32, 32, 32] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        bg.lbv(bad, brain, voxel_size=VS)
    with pytest.raises(InputError, match="voxel_size"):
        bg.vsharp(total, brain, voxel_size=(1, 1))
    with pytest.raises(InputError, match="b0_direction"):
        bg.pdf(total, brain, b0_direction=(0, 0, 0))
    # A mask thinner than the sphere: nothing survives erosion.
    thin = np.zeros_like(brain)
    thin[30:34, 20:44, 20:44] = True
    with pytest.raises(InputError, match="survives erosion"):
        bg.sharp(total, thin, voxel_size=VS, radius_mm=9.0)
    with pytest.raises(InputError, match="weights are zero"):
        bg.pdf(total, brain, voxel_size=VS, weights=np.where(brain, 0.0, 1.0))
    with pytest.raises(InputError, match="min_radius_mm"):
        bg.vsharp(total, brain, voxel_size=VS, max_radius_mm=6, min_radius_mm=9)


@pytest.fixture(scope="module")
def head_3mm():
    from chisep.sim import gre as sim
    from chisep.sim.phantom import head_phantom

    phantom = head_phantom(3.0)
    total, local = sim.simulate_fields(phantom, field_strength=B0_T)
    return phantom.brain_mask, total, local


def test_built_in_phantom_3mm(head_3mm):
    """The built-in head at 3 mm: air and bone touch the brain mask, a hard case for every method.

    Measured residual background (rms, fraction of the background's rms): PDF 1.5 %, RESHARP and
    SHARP 2.5 %, V-SHARP 4 %, LBV 6 %; local-field
    NRMSE: PDF 56 %, SHARP 70 %, V-SHARP 130 % (the continuous-kernel simulation rings at the
    air/bone boundary, which no harmonic model removes; see benchmarks/bench_qsm.py).
    """
    mask, total, local = head_3mm
    background = total - local
    for method in METHODS:
        out, used = bg.remove_background(total, mask, method=method, voxel_size=(3.0, 3.0, 3.0))
        residual = (out - local)[used]
        assert np.std(residual) < 0.1 * np.std(background[used]), method
        if method == "pdf":
            assert nrmse(out, local, used) < 70.0
