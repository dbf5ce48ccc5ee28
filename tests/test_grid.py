"""The FFT/grid core (chisep.grid) against analytic values: kernels, stencils, adjoints, crop-and-pad, edges."""

import jax.numpy as jnp
import numpy as np
import pytest

from chisep import grid, physics
from chisep.errors import InputError


def test_dipole_half_has_the_analytic_values_and_the_rfft_layout():
    shape, vs = (8, 10, 12), (1.0, 1.5, 2.0)
    D = np.asarray(grid.dipole_half(shape, jnp.asarray(vs, jnp.float32), jnp.asarray([0.0, 0.0, 1.0])))
    assert D.shape == (8, 10, 7)  # last axis halved
    assert D[0, 0, 0] == 0.0
    assert D[0, 0, 3] == pytest.approx(-2 / 3)  # k along B0
    assert D[2, 0, 0] == pytest.approx(1 / 3) and D[0, 4, 0] == pytest.approx(1 / 3)  # k perpendicular
    # oblique k: 1/3 - cos^2 of the angle between k and B0 (frequencies in cycles/mm)
    kx, kz = 1 / (8 * 1.0), 1 / (12 * 2.0)
    assert D[1, 0, 1] == pytest.approx(1 / 3 - kz**2 / (kx**2 + kz**2), rel=1e-6)


def test_dipole_half_is_the_numpy_kernel_for_an_oblique_b0():
    shape, vs, b0 = (6, 8, 10), (1.0, 1.2, 0.8), physics.direction_from_angles(30, 40)
    full = physics.dipole_kernel(shape, vs, b0)
    half = np.asarray(grid.dipole_half(shape, jnp.asarray(vs, jnp.float32), jnp.asarray(b0, jnp.float32)))
    # the Nyquist plane of the halved axis is +N/2 there and -N/2 in the full FFT order: for an
    # oblique B0 the kernel differs there (neither is "right"; the plane has no symmetric partner)
    np.testing.assert_allclose(half[:, :, :-1], full[:, :, : shape[2] // 2], atol=1e-6)


def test_laplacian_half_is_the_spectrum_of_the_seven_point_stencil():
    shape, vs = (8, 6, 10), (1.0, 2.0, 0.5)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    stencil = sum((2 * x - np.roll(x, 1, a) - np.roll(x, -1, a)) / vs[a] ** 2 for a in range(3))
    via_fft = np.asarray(grid.conv(jnp.asarray(x), grid.laplacian_half(shape, jnp.asarray(vs, jnp.float32))))
    np.testing.assert_allclose(via_fft, stencil, atol=1e-4)


def test_divergence_adjoint_is_the_adjoint_of_gradient():
    rng = np.random.default_rng(1)
    vs = jnp.asarray([1.0, 0.7, 1.3])
    x = jnp.asarray(rng.standard_normal((5, 6, 7)), jnp.float32)
    g = tuple(jnp.asarray(rng.standard_normal((5, 6, 7)), jnp.float32) for _ in range(3))
    lhs = sum(float(jnp.sum(a * b)) for a, b in zip(grid.gradient(x, vs), g))
    rhs = float(jnp.sum(x * grid.divergence_adjoint(g, vs)))
    assert lhs == pytest.approx(rhs, rel=1e-4)
    # and gradient^T gradient is the Laplacian whose spectrum gradient_half gives
    gtg = grid.divergence_adjoint(grid.gradient(x, vs), vs)
    np.testing.assert_allclose(np.asarray(gtg), np.asarray(grid.conv(x, grid.gradient_half(x.shape, vs))), atol=1e-4)


def test_sphere_half_counts_the_voxels_of_the_numpy_sphere():
    shape, vs = (16, 16, 16), (1.0, 1.0, 2.0)
    S, count = grid.sphere_half(shape, jnp.asarray(vs, jnp.float32), 3.0)
    assert int(count) == int(physics.sphere_mask(shape, vs, 3.0).sum())
    assert float(S[0, 0, 0]) == pytest.approx(1.0)
    np.testing.assert_allclose(np.asarray(S), physics.smv_kernel(shape, vs, 3.0)[:, :, :9], atol=1e-5)


def test_grid_around_a_mask_round_trips_and_pads_to_fast_even_sizes():
    mask = np.zeros((30, 20, 25), bool)
    mask[2:12, 5:19, 20:25] = True  # touches the far z face: the box reaches outside the volume
    work = grid.Grid.around(mask, grid.margin_voxels(mask, (1, 1, 1), margin_mm=3))
    assert all(n % 2 == 0 and n >= m + 2 * 4 for n, m in zip(work.shape, (10, 14, 5)))
    volume = np.random.default_rng(2).standard_normal(mask.shape).astype(np.float32)
    embedded = work.embed(volume)
    assert embedded.shape == work.shape
    back = work.extract(embedded)
    box = grid.bounding_box(mask)
    np.testing.assert_array_equal(back[box], volume[box])
    assert work.embed(np.zeros(mask.shape), fill=1.0).max() == 1.0  # beyond the input: the fill


def test_tkd_inverse_keeps_the_sign_and_bounds_the_gain():
    D = jnp.asarray([-0.5, -0.01, 0.0, 0.01, 0.3])
    np.testing.assert_allclose(np.asarray(grid.tkd_inverse(D, 0.1)), [-2.0, -10.0, 0.0, 10.0, 1 / 0.3], rtol=1e-6)


def test_edge_mask_marks_the_strongest_pooled_gradients():
    # a step along y (20 x 20 x 20, periodic): the y-gradient at the step is the only edge
    mag = np.zeros((20, 20, 20), np.float32)
    mag[:, :10] = 1.0
    edges = grid.edge_mask(mag, np.ones_like(mag, bool), (1, 1, 1), edge_fraction=0.3)
    assert edges.shape == (3, 20, 20, 20)
    assert np.all(edges[1][:, 9] == 0) and np.all(edges[1][:, 19] == 0)
    assert np.all(edges[0] == 1) and np.all(edges[2] == 1)
    assert int((edges == 0).sum()) == 2 * 400
    # a cube in a mask: the jump between x = 3 and 4 is an edge, flat parts are not
    mask = np.zeros((10, 10, 10), bool)
    mask[2:8, 2:8, 2:8] = True
    image = np.zeros((10, 10, 10), np.float32)
    image[4:] = 1.0
    edges = grid.edge_mask(image, mask, (1, 1, 1), edge_fraction=0.1)
    assert np.all(edges[0, 3, 2:8, 2:8] == 0)
    assert np.all(edges[:, 5, 2:7, 2:7] == 1)
    # a constant image has no edge, whatever the fraction
    assert np.all(grid.edge_mask(np.ones_like(image), mask, (1, 1, 1), edge_fraction=0.3)[:, 2:7, 2:7, 2:7] == 1)
    # anisotropic voxels: the gradient is per mm, so the same jump over a longer voxel is weaker
    step = np.zeros((12, 12, 12), np.float32)
    step[6:] = 1.0
    step[:, 6:] += 1.0
    edges = grid.edge_mask(step, np.ones_like(step, bool), (1.0, 4.0, 1.0), edge_fraction=0.01)
    assert np.all(edges[0, 5] == 0) and np.all(edges[1] == 1)


def test_fill_holes_on_the_box_equals_scipy_on_the_volume():
    """Hollow shells (one touching the volume's border, whose hole then opens to the outside), noise
    blobs and an empty mask: the bounding-box version fills exactly what scipy fills."""
    from scipy import ndimage

    from chisep.grid import fill_holes

    rng = np.random.default_rng(4)
    x, y, z = np.indices((30, 32, 28))
    inner = (x - 12) ** 2 + (y - 14) ** 2 + (z - 13) ** 2
    shell = (inner < 64) & (inner > 16)
    at_border = ((x - 3) ** 2 + (y - 14) ** 2 + (z - 13) ** 2 < 64) & ((x - 3) ** 2 + (y - 14) ** 2 + (z - 13) ** 2 > 16)
    blobs = ndimage.binary_opening(rng.random((30, 32, 28)) > 0.45)
    for mask in (shell, at_border, shell | at_border, blobs, np.zeros((30, 32, 28), bool)):
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    assert fill_holes(shell).sum() > shell.sum()  # the hole is filled
    assert (fill_holes(at_border) & ~at_border).sum() < (fill_holes(shell) & ~shell).sum()


def test_distance_within_a_radius_equals_the_exact_distance_transform():
    """grid.distance_within against scipy's exact transform: random masks, anisotropic voxels, radii from a
    fraction of a voxel to several, thin arrays, and either convention at the array's border."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(60):
        shape = tuple(int(n) for n in rng.integers(1, 20, 3))
        vs, radius = rng.uniform(0.5, 2.5, 3), float(rng.uniform(0.3, 6.0))
        inside = rng.random(shape) > rng.uniform(0.05, 0.6)
        for border_outside in (True, False):
            if not border_outside and inside.all():
                continue  # no outside voxel at all: scipy's transform is undefined there
            exact = ndimage.distance_transform_edt(np.pad(inside, 1, constant_values=not border_outside),
                                                   sampling=vs)[1:-1, 1:-1, 1:-1]
            expected = np.where(exact <= radius + 1e-6, exact, np.inf)
            got = grid.distance_within(inside, vs, radius, border_outside=border_outside)
            np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
            np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], atol=1e-5)


def test_fill_from_neighbours_takes_the_nearest_known_voxels():
    from scipy import ndimage

    from chisep.errors import InputError

    # a ramp inside a ball, junk (bone-like R2*) in its outermost layer
    x, y, z = np.meshgrid(*[np.arange(24.0)] * 3, indexing="ij")
    ball = (x - 11.5) ** 2 + (y - 11.5) ** 2 + (z - 11.5) ** 2 < 9.5**2
    rim = ball & ~ndimage.binary_erosion(ball)
    inner = ball & ~rim
    ramp = (10.0 + 0.5 * x).astype(np.float32)
    lone = np.zeros_like(ball)
    lone[0, 0, 0] = True  # no known voxel within reach: keeps its value
    values = np.where(rim | lone, 300.0, ramp).astype(np.float32)
    filled = grid.fill_from_neighbours(values, inner, rim | lone)
    assert np.array_equal(filled[~rim], values[~rim])  # only the unknown voxels change
    # each rim voxel gets its neighbours' values: within a voxel's step of the ramp (0.5 per voxel)
    assert np.abs(filled[rim] - ramp[rim]).max() < 1.0
    assert filled[0, 0, 0] == 300.0
    # the same with a wider kernel: still a mean of the ramp near the voxel, not of the junk
    assert np.abs(grid.fill_from_neighbours(values, inner, rim, sigma_voxels=2.0)[rim] - ramp[rim]).max() < 2.0
    with pytest.raises(InputError, match="disjoint"):
        grid.fill_from_neighbours(values, ball, rim)
    assert np.array_equal(grid.fill_from_neighbours(values, np.zeros_like(ball), rim), values)


def test_bilateral_within_averages_noise_and_keeps_steps():
    """Noise within the expected error is averaged (by the neighbourhood's weights), a step far beyond it
    is kept, excluded voxels neither change nor lend their values, and the mask's edge is not pulled to 0."""
    rng = np.random.default_rng(0)
    shape = (30, 30, 30)
    known = np.zeros(shape, bool)
    known[3:27, 3:27, 3:27] = True
    known[15, 15, 15] = False  # e.g. a dark source whose R2' reads 0
    step = np.where(np.arange(30)[:, None, None] >= 15, 40.0, 10.0) * np.ones(shape)
    noise = 0.3 * rng.standard_normal(shape)
    values = np.where(known, step + noise, 0.0).astype(np.float32)
    values[15, 15, 15] = 500.0
    sigma = 0.75
    out = grid.bilateral_within(values, known, sigma_voxels=sigma, range_sigma=2.0)
    offsets = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
    w = np.exp(-(offsets**2).sum(axis=1) / (2 * sigma**2))
    flat = np.zeros(shape, bool)
    flat[5:12, 5:25, 5:25] = True  # inside one side of the step, away from the excluded voxel
    # noise of 0.3 against a range of 2: weights near their spatial values, the std drops by about
    # sqrt(sum w^2) / sum w (the range term takes a little off the averaging: measured ratio 1.06)
    expected = 0.3 * np.sqrt(np.sum(w**2)) / np.sum(w)
    assert expected < np.std(out[flat]) < 1.15 * expected
    assert np.mean(out[flat]) == pytest.approx(10.0, abs=0.02)
    # the step (30 against a range of 2) is kept: next to it each side keeps its level
    assert np.abs(out[14, 5:25, 5:25] - 10.0).max() < 1.5 and np.abs(out[15, 5:14, 5:25] - 40.0).max() < 1.5
    # the excluded voxel keeps its value and lends nothing; outside the known voxels nothing changes
    assert out[15, 15, 15] == 500.0 and abs(out[15, 15, 16] - 40.0) < 1.5
    assert np.array_equal(out[~known], values[~known])
    # at the known edge the mean is the tissue's, not diluted by the zeros outside
    assert np.mean(out[3, 5:25, 5:25]) == pytest.approx(10.0, abs=0.05)
    # a range map works as a number does, and a zero range is refused with the fix named
    same = grid.bilateral_within(values, known, sigma_voxels=sigma, range_sigma=np.full(shape, 2.0, np.float32))
    np.testing.assert_allclose(same, out, rtol=1e-6)
    with pytest.raises(InputError, match="range_sigma"):
        grid.bilateral_within(values, known, sigma_voxels=sigma, range_sigma=0.0)
