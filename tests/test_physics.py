"""Physics core against analytic solutions: sphere, cylinder, kernel symmetries."""

import numpy as np
import pytest

from chisep import physics


def _coords(shape, voxel_size, centre=None):
    centre = np.array([(n - 1) / 2 for n in shape]) if centre is None else np.asarray(centre)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return [(g - c) * h for g, c, h in zip(grids, centre, voxel_size)]


def _supersampled_sphere(shape, voxel_size, radius, oversample=4):
    """Partial-volume sphere: fraction of each voxel inside the sphere (limits staircase error)."""
    frac = np.zeros(shape)
    offsets = (np.arange(oversample) + 0.5) / oversample - 0.5
    for ox in offsets:
        for oy in offsets:
            for oz in offsets:
                x, y, z = _coords(shape, voxel_size)
                r2 = (x + ox * voxel_size[0]) ** 2 + (y + oy * voxel_size[1]) ** 2 + (z + oz * voxel_size[2]) ** 2
                frac += r2 <= radius**2
    return frac / oversample**3


def test_constants_and_conversions():
    assert physics.centre_frequency_hz(3.0) == pytest.approx(127.73e6, rel=1e-3)
    assert physics.ppm_to_hz(1.0, 3.0) == pytest.approx(127.73, rel=1e-3)
    assert physics.hz_to_ppm(physics.ppm_to_hz(0.37, 7.0), 7.0) == pytest.approx(0.37)
    assert physics.phase_from_field(10.0, 0.01) == pytest.approx(2 * np.pi * 0.1)
    wrapped = physics.wrap_phase(np.array([np.pi, -np.pi, 3 * np.pi + 0.1, -0.2]))
    assert np.all(wrapped >= -np.pi) and np.all(wrapped < np.pi)
    np.testing.assert_allclose(wrapped, [-np.pi, -np.pi, -np.pi + 0.1, -0.2], atol=1e-12)
    # float32 stays float32, in the half-open interval, and equal to the phase modulo 2 pi
    phase = np.random.default_rng(0).normal(0.0, 40.0, 200_000).astype(np.float32)
    phase[:4] = [np.pi, -np.pi, 3 * np.pi, np.float32(np.pi) * 5]
    wrapped = physics.wrap_phase(phase)
    assert wrapped.dtype == np.float32 and wrapped.shape == phase.shape
    assert np.all(wrapped >= -np.float32(np.pi)) and np.all(wrapped < np.float32(np.pi))
    turns = (phase.astype(np.float64) - wrapped) / (2 * np.pi)
    np.testing.assert_allclose(turns, np.round(turns), atol=1e-5)
    assert physics.wrap_phase(7.0) == pytest.approx(7.0 - 2 * np.pi) and np.ndim(physics.wrap_phase(7.0)) == 0


@pytest.mark.parametrize("voxel_size", [(1.0, 1.0, 1.0), (1.0, 1.0, 1.5)])
def test_sphere_field_matches_analytic(voxel_size):
    shape = (64, 64, 64)
    radius = 8.0  # mm
    chi = 0.5  # ppm
    sphere = _supersampled_sphere(shape, voxel_size, radius) * chi
    field = np.asarray(physics.forward_field_ppm(sphere.astype(np.float32), voxel_size))
    x, y, z = _coords(shape, voxel_size)
    r = np.sqrt(x**2 + y**2 + z**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos2 = z**2 / r**2
        analytic = chi * radius**3 / (3 * r**3) * (3 * cos2 - 1)
    peak = chi * 2 / 3  # field at the pole, the largest outside value
    outside = (r > 1.5 * radius) & (r < 3 * radius)
    err_out = np.abs(field[outside] - analytic[outside]).max() / peak
    assert err_out < 0.01, f"outside error {err_out:.4f} of peak"
    inside = r < 0.6 * radius
    # Lorentz-corrected field inside a uniformly magnetised sphere is zero
    assert np.abs(field[inside]).max() / peak < 0.01


def test_sphere_field_in_hz_scales_with_field_strength():
    shape = (32, 32, 32)
    sphere = _supersampled_sphere(shape, (1, 1, 1), 5.0).astype(np.float32)
    f3 = np.asarray(physics.forward_field_hz(sphere, 3.0))
    f7 = np.asarray(physics.forward_field_hz(sphere, 7.0))
    np.testing.assert_allclose(f7, f3 * 7 / 3, rtol=1e-4, atol=1e-5)
    ppm = np.asarray(physics.forward_field_ppm(sphere))
    np.testing.assert_allclose(f3, physics.ppm_to_hz(ppm, 3.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tilt_deg", [0.0, 30.0, 90.0])
def test_infinite_cylinder_at_angle(tilt_deg):
    """Cylinder along voxel z, B0 tilted by theta in the x-z plane.

    Inside (Lorentz-corrected): chi/6 * (3cos^2 theta - 1).
    Outside: chi/2 * sin^2 theta * (a/rho)^2 * cos(2 phi), phi from the projection of B0
    on the transverse plane (here x).
    """
    n, nz = 128, 4
    radius = 10.0
    chi = 1.0
    theta = np.deg2rad(tilt_deg)
    b0 = (np.sin(theta), 0.0, np.cos(theta))
    x, y, _ = _coords((n, n, nz), (1, 1, 1), centre=((n - 1) / 2, (n - 1) / 2, 0))
    frac = np.zeros((n, n, nz))
    offs = (np.arange(4) + 0.5) / 4 - 0.5
    for ox in offs:
        for oy in offs:
            frac += (x + ox) ** 2 + (y + oy) ** 2 <= radius**2
    cyl = (frac / 16 * chi).astype(np.float32)
    # periodic along z makes the cylinder infinite; pad in-plane only through a big grid
    kernel = physics.dipole_kernel(cyl.shape, (1, 1, 1), b0)
    field = np.real(np.fft.ifftn(kernel * np.fft.fftn(cyl)))
    rho = np.sqrt(x**2 + y**2)
    phi = np.arctan2(y, x)
    inside_val = chi / 6 * (3 * np.cos(theta) ** 2 - 1)
    outside = chi / 2 * np.sin(theta) ** 2 * (radius / np.maximum(rho, 1e-9)) ** 2 * np.cos(2 * phi)
    scale = chi / 3
    inner = rho < 0.6 * radius
    ring = (rho > 1.5 * radius) & (rho < 2.5 * radius)
    # the in-plane box is periodic too: its mean image field shifts both regions slightly
    assert np.abs(field[inner] - inside_val).max() / scale < 0.02
    assert np.abs(field[ring] - outside[ring]).max() / scale < 0.02


def test_kernel_symmetry_magic_angle_and_range():
    shape, vs = (25, 21, 17), (1.0, 1.2, 2.0)  # odd: no ambiguous Nyquist plane
    b0 = physics.normalise_direction((0.2, -0.1, 1.0))
    d = physics.dipole_kernel(shape, vs, b0)
    assert d.dtype == np.float32
    assert d[0, 0, 0] == 0.0
    assert d.min() >= -2 / 3 - 1e-6 and d.max() <= 1 / 3 + 1e-6
    # D(k) = D(-k): real kernel for a real field
    flipped = np.roll(np.flip(d, axis=(0, 1, 2)), shift=(1, 1, 1), axis=(0, 1, 2))
    np.testing.assert_allclose(d, flipped, atol=1e-6)
    # chisep's kernel at k parallel to B0 is -2/3, perpendicular 1/3, at the magic angle 0: on an
    # 8^3 grid with voxels (1, 1, sqrt 2) mm, k = (1/8, 0, 1/(8 sqrt 2)) cycles/mm makes
    # tan(angle to z) = sqrt 2, i.e. cos^2 = 1/3
    magic = physics.dipole_kernel((8, 8, 8), (1.0, 1.0, np.sqrt(2.0)), (0, 0, 1))
    assert magic[1, 0, 1] == pytest.approx(0.0, abs=1e-6)
    assert magic[0, 0, 1] == pytest.approx(-2 / 3) and magic[0, 1, 0] == pytest.approx(1 / 3)
    # and the same k with B0 tilted onto it is parallel: -2/3
    tilted = physics.dipole_kernel((8, 8, 8), (1.0, 1.0, np.sqrt(2.0)), (np.sqrt(2 / 3), 0, np.sqrt(1 / 3)))
    assert tilted[1, 0, 1] == pytest.approx(-2 / 3, abs=1e-6)
    axial = physics.dipole_kernel((8, 8, 8), (1, 1, 1))
    assert axial[0, 0, 1] == pytest.approx(-2 / 3)
    assert axial[1, 0, 0] == pytest.approx(1 / 3)
    assert physics.dipole_kernel((8, 8, 8), dc_value=1 / 3)[0, 0, 0] == pytest.approx(1 / 3)


def test_discrete_kernel_tends_to_continuous_at_low_frequency():
    shape = (64, 64, 64)
    dc = physics.dipole_kernel(shape, kind="continuous")
    dd = physics.dipole_kernel(shape, kind="discrete")
    low = (slice(0, 4), slice(0, 4), slice(0, 4))
    assert np.abs(dc[low] - dd[low]).max() < 0.02
    assert np.abs(dc - dd).max() > 0.05  # they do differ near Nyquist


@pytest.mark.parametrize("b0", [(0, 0, 1), (0.342, 0.0, 0.94), (0.3, -0.4, 0.87)])
def test_discrete_kernel_field_is_harmonic_inside_uniform_regions(b0):
    """Background fields must be harmonic where there are no sources, for any B0 direction."""
    from scipy import ndimage

    voxel_size = (1.0, 1.0, 1.5)
    chi = np.zeros((40, 40, 40), np.float32)
    chi[8:32, 10:30, 12:28] = 1.0  # a uniform block: no sources inside it
    chi[16:24, 18:22, 18:22] = 0.0  # a hole (a ventricle, say): its edges are sources
    inner = ndimage.binary_erosion(chi > 0, iterations=2)

    def laplacian(field):  # the 3-point Laplacian in mm^-2
        return sum((np.roll(field, 1, a) - 2 * field + np.roll(field, -1, a)) / h**2
                   for a, h in enumerate(voxel_size))

    discrete = np.asarray(physics.forward_field_ppm(chi, voxel_size, b0, kind="discrete"), np.float64)
    continuous = np.asarray(physics.forward_field_ppm(chi, voxel_size, b0), np.float64)
    assert np.abs(laplacian(discrete)[inner]).max() < 1e-4
    assert np.abs(laplacian(continuous)[inner]).max() > 1e-3  # the sampled kernel rings at the edges


def test_rotating_volume_agrees_with_rotating_b0():
    """Field of chi with B0 along x equals the field of chi transposed x<->z with B0 along z."""
    rng = np.random.default_rng(0)
    chi = np.zeros((32, 32, 32), np.float32)
    chi[10:20, 12:18, 8:24] = rng.uniform(-0.1, 0.2)
    chi[5:9, 20:26, 14:18] = 0.3
    f_x = np.asarray(physics.forward_field_ppm(chi, (1, 1, 1), (1, 0, 0)))
    f_z = np.asarray(physics.forward_field_ppm(np.transpose(chi, (2, 1, 0)), (1, 1, 1), (0, 0, 1)))
    np.testing.assert_allclose(f_x, np.transpose(f_z, (2, 1, 0)), atol=1e-5)


def test_b0_direction_from_affine_oblique_and_anisotropic():
    assert np.allclose(physics.b0_direction_from_affine(np.diag([2.0, 2.0, 3.0, 1.0])), [0, 0, 1])
    tilt = np.deg2rad(20.0)
    rot_x = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    affine = np.eye(4)
    affine[:3, :3] = rot_x @ np.diag([0.6, 0.6, 2.0])
    b0 = physics.b0_direction_from_affine(affine)
    assert np.degrees(np.arccos(abs(b0[2]))) == pytest.approx(20.0)
    np.testing.assert_allclose(physics.voxel_size_from_affine(affine), [0.6, 0.6, 2.0])
    assert np.linalg.norm(b0) == pytest.approx(1.0)


def test_smv_kernel_properties():
    s = physics.smv_kernel((32, 32, 32), (1, 1, 1), 4.0)
    assert s[0, 0, 0] == pytest.approx(1.0, abs=1e-6)
    assert np.abs(s).max() <= 1.0 + 1e-5
    # spherical mean of a harmonic function equals its centre value: 1 - S removes it
    x, y, z = _coords((32, 32, 32), (1, 1, 1))
    harmonic = (x**2 - z**2).astype(np.float64)
    smv = np.real(np.fft.ifftn(s * np.fft.fftn(harmonic)))
    interior = (np.abs(x) < 8) & (np.abs(y) < 8) & (np.abs(z) < 8)
    # the discrete sphere is not perfectly round; compare to the function's spread
    assert np.abs(smv - harmonic)[interior].max() < 0.05 * np.abs(harmonic[interior]).max()
    aniso = physics.sphere_mask((16, 16, 16), (1, 1, 2), 4.0)
    assert aniso[4, 0, 0] and aniso[0, 0, 2] and not aniso[0, 0, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shape=(8, 8)), "three"),
        (dict(shape=(8, 8, 8), voxel_size=(1, 0, 1)), "voxel_size"),
        (dict(shape=(8, 8, 8), b0_direction=(0, 0, 0)), "non-zero"),
        (dict(shape=(8, 8, 8), kind="exact"), "kind"),
    ],
)
def test_kernel_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        physics.dipole_kernel(**kwargs)


def test_forward_field_rejects_non_3d():
    with pytest.raises(ValueError, match="3D"):
        physics.forward_field_ppm(np.zeros((4, 4)))
