"""Background field removal: total field (Hz) -> local field (Hz) inside a (possibly eroded) mask.

The total field inside the brain is the sum of a *local* field, produced by
tissue inside the mask, and a *background* field, produced by sources
outside it (air, bone, the head's shape). The background field is harmonic
inside the mask (it satisfies Laplace's equation there), which every method
here exploits in a different way.

Every method has the same signature::

    method(field_hz, mask, *, voxel_size=(1, 1, 1), b0_direction=(0, 0, 1), weights=None, **settings)
        -> (local_field_hz, eroded_mask)

and returns the mask it trusts the result in: SMV methods (SHARP, V-SHARP,
RESHARP) lose a rim of the radius they use; PDF keeps the mask; LBV loses
the one-voxel boundary on which its boundary condition is imposed.
:func:`remove_background` dispatches by name.

All heavy work is jit-compiled JAX (float32) on a grid that is the mask's
bounding box plus a margin, padded to a fast FFT size; it compiles once per
grid shape and runs unchanged on CPU or GPU. Outputs are NumPy arrays of the
input's shape with zeros outside the returned mask.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from chisep import grid as g
from chisep import validate as v
from chisep.errors import InputError
from chisep.registry import Registry

__all__ = ["sharp", "vsharp", "resharp", "pdf", "lbv", "remove_background", "BACKGROUND_METHODS"]


# ---------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------
def _prepare(field_hz, mask, voxel_size, b0_direction, weights=None, margin_mm=0.0, fraction=0.0):
    field, msk = v.check_volume_and_mask(field_hz, mask, name="field_hz")
    vs, b0 = v.check_geometry(voxel_size, b0_direction)
    field = g.fill_unweighted(field, msk, v.check_optional_map(weights, msk.shape, name="weights"))
    grid = g.Grid.around(msk, g.margin_voxels(msk, vs, margin_mm=margin_mm, fraction=fraction))
    return field, msk, vs, b0, grid


def _finish(grid, local, used_mask, method):
    local = grid.extract(np.asarray(local, dtype=np.float32))
    used = grid.extract(np.asarray(used_mask, dtype=bool))
    if not used.any():
        raise InputError(
            f"{method}: no voxel of the mask survives erosion; the mask is too small or thin for "
            "the kernel radius. Use a smaller radius or a larger mask."
        )
    return np.where(used, local, 0).astype(np.float32), used


def _normalised_weights(weights, msk) -> np.ndarray:
    """Data weights checked against the mask and scaled to mean 1 in it (uniform when None)."""
    w = v.check_optional_map(weights, msk.shape, name="weights")
    if w is None:
        return msk.astype(np.float32)
    if not np.any(w[msk] > 0):
        raise InputError("weights are zero everywhere inside the mask; give positive weights where the mask is")
    return (w / np.mean(w[msk])).astype(np.float32)


def _tsvd_inverse(C, threshold):
    return jnp.where(jnp.abs(C) > threshold, 1.0 / jnp.where(C == 0, 1.0, C), 0.0)


def _cg(apply_A, b, x0, max_iter, tol, precondition=None):
    """Preconditioned conjugate gradients for SPD ``apply_A``; stops at ||r|| <= tol*||b||."""
    precondition = precondition or (lambda r: r)
    r = b - apply_A(x0)
    z = precondition(r)
    p = z
    rz = jnp.vdot(r, z)
    b_norm = jnp.maximum(jnp.linalg.norm(b), 1e-30)

    def cond(state):
        _, r, _, _, k = state
        return (k < max_iter) & (jnp.linalg.norm(r) > tol * b_norm)

    def body(state):
        x, r, p, rz, k = state
        Ap = apply_A(p)
        alpha = rz / jnp.maximum(jnp.vdot(p, Ap), 1e-30)
        x = x + alpha * p
        r = r - alpha * Ap
        z = precondition(r)
        rz_new = jnp.vdot(r, z)
        p = z + (rz_new / jnp.maximum(rz, 1e-30)) * p
        return x, r, p, rz_new, k + 1

    x, r, _, _, k = jax.lax.while_loop(cond, body, (x0, r, p, rz, jnp.asarray(0)))
    return x, k


# ---------------------------------------------------------------------------
# SHARP and V-SHARP
# ---------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(4,))
def _vsharp_core(field, mask, radii, threshold, shape, voxel_size):
    """Multi-radius SMV high-pass, then TSVD deconvolution with the largest kernel."""
    F_field = g.rfft(field * mask)
    F_mask = g.rfft(mask)

    def step(carry, radius):
        high, done = carry
        S, count = g.sphere_half(shape, voxel_size, radius)
        inside = g.sphere_interior(F_mask, S, count, shape) & (mask > 0)
        filtered = g.irfft((1.0 - S) * F_field, shape)
        # A voxel takes the high-passed field of the largest sphere that fits in the mask.
        new = inside & ~done
        return (jnp.where(new, filtered, high), done | inside), None

    init = (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, bool))
    (high, done), _ = jax.lax.scan(step, init, radii)
    S_big, _ = g.sphere_half(shape, voxel_size, radii[0])
    local = g.irfft(_tsvd_inverse(1.0 - S_big, threshold) * g.rfft(high * done), shape)
    return local * done, done


def _radii_check(radius_mm, vs, name):
    r = v.check_positive(radius_mm, name)
    if r < vs.min() - 1e-6:
        raise InputError(f"{name}={r:g} mm is below the smallest voxel size ({vs.min():g} mm): the sphere "
                         "would be a single voxel; use at least one voxel size")
    return r


def sharp(field_hz, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0), weights=None,
          radius_mm: float = 5.0, threshold: float = 0.05):
    """SHARP: spherical-mean-value filtering and truncated deconvolution (Schweser et al. 2011).

    Inside the eroded mask, where the whole sphere of radius ``radius_mm``
    fits, the spherical mean value (SMV) of a harmonic function equals its
    centre value, so ``(delta - S) * field`` contains only the local field
    filtered by ``delta - S``. That filter is undone by a truncated (TSVD)
    inverse: ``1 / (1 - S(k))`` where ``|1 - S(k)| > threshold``, else 0.

    Parameters
    ----------
    field_hz : (nx, ny, nz) array, Hz
        Total (unwrapped) field. Values outside ``mask`` are ignored.
    mask : (nx, ny, nz) array of bool
        Brain mask.
    voxel_size : 3 floats, mm
    b0_direction : 3 floats
        Unused (SMV filtering is isotropic); accepted for a common signature.
    weights : (nx, ny, nz) array, optional
        SHARP is a filter without a data term: only voxels of zero weight count,
        as voxels without a usable field, filled from their neighbours
        (:func:`chisep.grid.harmonic_fill`) before filtering (leave unreliable
        voxels at the mask's edge out of ``mask`` instead).
    radius_mm : float, mm
        SMV sphere radius (5 mm by default).
    threshold : float
        TSVD truncation of the deconvolution kernel (0.05 by default).

    Returns
    -------
    local_field_hz : (nx, ny, nz) float32 array, Hz, zero outside ``eroded_mask``
    eroded_mask : (nx, ny, nz) bool array, the mask eroded by ``radius_mm``

    References
    ----------
    Schweser F, Deistung A, Lehr BW, Reichenbach JR. Quantitative imaging of
    intrinsic magnetic tissue properties using MRI signal phase. NeuroImage
    2011;54:2789-2807.
    """
    field, msk, vs, b0, grid = _prepare(field_hz, mask, voxel_size, b0_direction, weights, margin_mm=radius_mm)
    radius = _radii_check(radius_mm, vs, "radius_mm")
    thr = v.check_positive(threshold, "threshold")
    local, used = _vsharp_core(jnp.asarray(grid.embed(field)), jnp.asarray(grid.embed(msk)),
                               jnp.asarray([radius], jnp.float32), jnp.float32(thr), grid.shape, g.as_jax(vs))
    return _finish(grid, local, used, "sharp")


def vsharp(field_hz, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0), weights=None,
           max_radius_mm: float = 12.0, min_radius_mm: float | None = None,
           step_mm: float | None = None, threshold: float = 0.05):
    """V-SHARP: SHARP with a sphere that shrinks towards the mask boundary (Li et al. 2011).

    Radii run from ``max_radius_mm`` down to ``min_radius_mm`` in steps of
    ``step_mm``. Each voxel takes the SMV high-passed field of the largest
    sphere that fits in the mask, so the mask loses only ``min_radius_mm``
    at its edge; the result is deconvolved with the largest kernel, TSVD
    truncated at ``threshold``.

    Parameters
    ----------
    field_hz, mask, voxel_size, b0_direction, weights
        As in :func:`sharp` (only zero weights count: those voxels are filled first).
    max_radius_mm : float, mm
        Largest sphere (12 mm, the STI Suite / chi-separation toolbox default).
    min_radius_mm : float, mm, optional
        Smallest sphere; defaults to the smallest voxel size.
    step_mm : float, mm, optional
        Radius step; defaults to the smallest voxel size.
    threshold : float
        TSVD truncation (0.05).

    Returns
    -------
    local_field_hz : float32 array, Hz
    eroded_mask : bool array, the mask eroded by ``min_radius_mm``

    References
    ----------
    Li W, Wu B, Liu C. Quantitative susceptibility mapping of human brain
    reflects spatial variation in tissue composition. NeuroImage
    2011;55:1645-1656.
    """
    field, msk, vs, b0, grid = _prepare(field_hz, mask, voxel_size, b0_direction, weights, margin_mm=max_radius_mm)
    r_max = _radii_check(max_radius_mm, vs, "max_radius_mm")
    r_min = _radii_check(vs.min() if min_radius_mm is None else min_radius_mm, vs, "min_radius_mm")
    step = v.check_positive(vs.min() if step_mm is None else step_mm, "step_mm")
    if r_min > r_max:
        raise InputError(f"min_radius_mm ({r_min:g}) must not exceed max_radius_mm ({r_max:g})")
    radii = np.arange(r_max, r_min - 1e-6, -step, dtype=np.float32)
    thr = v.check_positive(threshold, "threshold")
    local, used = _vsharp_core(jnp.asarray(grid.embed(field)), jnp.asarray(grid.embed(msk)),
                               jnp.asarray(radii), jnp.float32(thr), grid.shape, g.as_jax(vs))
    return _finish(grid, local, used, "vsharp")


# ---------------------------------------------------------------------------
# RESHARP
# ---------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(7,))
def _resharp_core(field, mask, weights, radius, lam, max_iter, tol, shape, voxel_size):
    S, count = g.sphere_half(shape, voxel_size, radius)
    C = 1.0 - S
    eroded = (g.sphere_interior(g.rfft(mask), S, count, shape) & (mask > 0)).astype(jnp.float32)
    w2 = eroded * weights**2

    def apply_A(x):  # C^T W^2 M C x + lambda x  (C is real and even, so C^T = C)
        return g.conv(w2 * g.conv(x, C), C) + lam * x

    b = g.conv(w2 * g.conv(field * mask, C), C)
    x, iters = _cg(apply_A, b, jnp.zeros(shape, jnp.float32), max_iter, tol)
    return x * eroded, eroded > 0, iters


def resharp(field_hz, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0), weights=None,
            radius_mm: float = 5.0, lam: float = 1e-3, max_iter: int = 100, tol: float = 1e-4):
    """RESHARP: SHARP with Tikhonov regularisation instead of truncation (Sun & Wilman 2014).

    Solves ``min_x ||W M C (x - f)||^2 + lam ||x||^2`` by conjugate gradients,
    where ``C = delta - S`` is the SMV high-pass of radius ``radius_mm``,
    ``M`` the eroded mask, ``W`` the data weights and ``f`` the total field;
    the local field is ``x`` inside ``M``.

    Parameters
    ----------
    field_hz, mask, voxel_size, b0_direction
        As in :func:`sharp`.
    weights : (nx, ny, nz) array, optional
        Data weights (e.g. inverse field noise), normalised to mean 1 in the
        mask; uniform if None. Zero-weight voxels are filled from their
        neighbours first (see :func:`sharp`).
    radius_mm : float, mm
        SMV radius (5 mm).
    lam : float
        Tikhonov weight (dimensionless, relative to a kernel of norm ~1).
    max_iter : int
        Conjugate-gradient iteration cap (100; on the 2 mm phantom CG meets
        ``tol`` after about 70).
    tol : float
        Relative residual at which CG stops.

    Returns
    -------
    local_field_hz : float32 array, Hz
    eroded_mask : bool array, the mask eroded by ``radius_mm``

    References
    ----------
    Sun H, Wilman AH. Background field removal using spherical mean value
    filtering and Tikhonov regularization. Magn Reson Med 2014;71:1151-1157.
    """
    field, msk, vs, b0, grid = _prepare(field_hz, mask, voxel_size, b0_direction, weights, margin_mm=radius_mm)
    radius = _radii_check(radius_mm, vs, "radius_mm")
    w = _normalised_weights(weights, msk)
    local, used, _ = _resharp_core(
        jnp.asarray(grid.embed(field)), jnp.asarray(grid.embed(msk)), jnp.asarray(grid.embed(w)), jnp.float32(radius),
        jnp.float32(v.check_positive(lam, "lam")), v.check_count(max_iter, "max_iter"),
        jnp.float32(v.check_positive(tol, "tol")), grid.shape, g.as_jax(vs))
    return _finish(grid, local, used, "resharp")


# ---------------------------------------------------------------------------
# PDF
# ---------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(5,))
def _pdf_core(field, mask, weights, max_iter, tol, shape, voxel_size, b0):
    D = g.dipole_half(shape, voxel_size, b0)
    outside = 1.0 - mask
    w2 = (weights * mask) ** 2

    def apply_A(s):  # (1-M) D^T W^2 D (1-M) s; D is real and even, so D^T = D
        return outside * g.conv(w2 * g.conv(outside * s, D), D)

    b = outside * g.conv(w2 * field, D)
    source, iters = _cg(apply_A, b, jnp.zeros(shape, jnp.float32), max_iter, tol)
    background = g.conv(outside * source, D)
    return (field - background) * mask, mask > 0, iters


def pdf(field_hz, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0),
        weights=None, margin_mm: float = 15.0, max_iter: int = 100, tol: float = 1e-3):
    """PDF: projection onto dipole fields (de Rochefort et al. 2010; Liu et al. 2011).

    Fits the field inside the mask with dipoles placed only outside it,
    ``min_s ||W M (f - D (1-M) s)||^2`` (conjugate gradients on the normal
    equations, on a grid that extends ``margin_mm`` beyond the mask), and
    returns ``f - D (1-M) s`` inside the mask. Because local and background
    dipole fields are nearly orthogonal inside the mask the fit captures the
    background only. Sources farther than the margin are represented by
    equivalent sources inside it.

    Parameters
    ----------
    field_hz, mask, voxel_size
        As in :func:`sharp`.
    b0_direction : 3 floats
        B0 direction in voxel axes (the dipole kernel depends on it).
    weights : (nx, ny, nz) array, optional
        Data weights, e.g. inverse field noise; uniform inside the mask if None.
        Zero-weight voxels are filled from their neighbours first (see :func:`sharp`).
    margin_mm : float, mm
        How far around the mask background sources are modelled (15 mm).
    max_iter : int
        CG iteration cap (100).
    tol : float
        Relative residual at which CG stops (1e-3).

    Returns
    -------
    local_field_hz : float32 array, Hz
    eroded_mask : bool array, the input mask (PDF does not erode)

    References
    ----------
    Liu T, Khalidov I, de Rochefort L, et al. A novel background field
    removal method for MRI using projection onto dipole fields (PDF). NMR
    Biomed 2011;24:1129-1136.
    """
    field, msk, vs, b0, grid = _prepare(field_hz, mask, voxel_size, b0_direction, weights,
                                        margin_mm=v.check_positive(margin_mm, "margin_mm"))
    w = _normalised_weights(weights, msk)
    local, used, _ = _pdf_core(
        jnp.asarray(grid.embed(field)), jnp.asarray(grid.embed(msk)), jnp.asarray(grid.embed(w)),
        v.check_count(max_iter, "max_iter"), jnp.float32(v.check_positive(tol, "tol")),
        grid.shape, g.as_jax(vs), jnp.asarray(b0, jnp.float32))
    return _finish(grid, local, used, "pdf")


# ---------------------------------------------------------------------------
# LBV / Laplacian (HARPERELLA-style) background removal
# ---------------------------------------------------------------------------
def _neg_laplacian(x, voxel_size):
    return sum((2 * x - jnp.roll(x, 1, axis=a) - jnp.roll(x, -1, axis=a)) / voxel_size[a] ** 2 for a in range(3))


@partial(jax.jit, static_argnums=(5,))
def _lbv_core(field, mask, interior, max_iter, tol, shape, voxel_size):
    # Unknown: the local field on the interior, zero on the mask's boundary layer and outside.
    # Equation: -Lap(local) = -Lap(total) on the interior (the background is harmonic there).
    def apply_A(x):
        return interior * _neg_laplacian(interior * x, voxel_size)

    # Preconditioner: the periodic inverse Laplacian (FFT), with its zero eigenvalue lifted
    # to the smallest non-zero one so that it stays positive definite.
    lam = g.laplacian_half(shape, voxel_size)
    lam = lam.at[0, 0, 0].set(jnp.min(jnp.where(lam > 0, lam, jnp.inf)))

    def precondition(r):
        return interior * g.irfft(g.rfft(interior * r) / lam, shape)

    b = interior * _neg_laplacian(field * mask, voxel_size)
    x, iters = _cg(apply_A, b, jnp.zeros(shape, jnp.float32), max_iter, tol, precondition)
    return x * interior, interior > 0, iters


def lbv(field_hz, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0), weights=None,
        max_iter: int = 500, tol: float = 1e-4):
    """Laplacian boundary value (LBV) background removal (Zhou et al. 2014).

    The background field is harmonic inside the mask, so the Laplacian of
    the total field equals that of the local field there. Taking the local
    field to vanish on the mask's boundary (Dirichlet condition), it is the
    solution of Poisson's equation ``Lap(local) = Lap(total)`` on the mask
    interior, solved here with conjugate gradients preconditioned by an FFT
    Poisson solver. This is also how HARPERELLA (Li et al. 2015) removes the
    background once the Laplacian of the phase is known; phase unwrapping is
    not done here (give an unwrapped field).

    Parameters
    ----------
    field_hz, mask, voxel_size, b0_direction
        As in :func:`sharp` (``b0_direction`` is unused).
    weights : (nx, ny, nz) array, optional
        LBV solves Poisson's equation exactly on the interior, with the field on
        the boundary layer as its condition, so there is no data term to weight:
        only voxels of zero weight count, filled from their neighbours first
        (:func:`chisep.grid.harmonic_fill`); leave unreliable voxels at the
        mask's edge out of ``mask``.
    max_iter : int
        Preconditioned CG iteration cap (500).
    tol : float
        Relative residual at which CG stops (1e-4).

    Returns
    -------
    local_field_hz : float32 array, Hz
    eroded_mask : bool array, the mask minus its one-voxel boundary layer

    References
    ----------
    Zhou D, Liu T, Spincemaille P, Wang Y. Background field removal by
    solving the Laplacian boundary value problem. NMR Biomed 2014;27:312-319.
    Li W, Avram AV, Wu B, Xiao X, Liu C. Integrated Laplacian-based phase
    unwrapping and background phase removal for quantitative susceptibility
    mapping. NMR Biomed 2014;27:219-227.
    """
    field, msk, vs, b0, grid = _prepare(field_hz, mask, voxel_size, b0_direction, weights, margin_mm=0.0)
    padded = grid.embed(msk) > 0
    interior = padded.copy()
    for axis in range(3):  # 6-neighbour erosion: the boundary layer carries the boundary condition
        interior &= np.roll(padded, 1, axis) & np.roll(padded, -1, axis)
    local, used, _ = _lbv_core(
        jnp.asarray(grid.embed(field)), jnp.asarray(padded, jnp.float32), jnp.asarray(interior, jnp.float32),
        v.check_count(max_iter, "max_iter"), jnp.float32(v.check_positive(tol, "tol")), grid.shape, g.as_jax(vs))
    return _finish(grid, local, used, "lbv")


# ---------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------
BACKGROUND_METHODS = Registry("background method")
for _name, _func in (("vsharp", vsharp), ("sharp", sharp), ("resharp", resharp), ("pdf", pdf), ("lbv", lbv)):
    BACKGROUND_METHODS.register(_name, _func)
#: arguments every background method takes (the others are its own settings)
_SHARED = ("voxel_size", "b0_direction", "weights")


def remove_background(field_hz, mask, *, method: str = "vsharp", voxel_size=(1.0, 1.0, 1.0),
                      b0_direction=(0.0, 0.0, 1.0), weights=None, **settings):
    """Remove the background field with a named method.

    Parameters
    ----------
    field_hz : (nx, ny, nz) array, Hz
        Total unwrapped field.
    mask : (nx, ny, nz) bool array
    method : {"vsharp", "sharp", "resharp", "pdf", "lbv"}
        V-SHARP (default, as in the chi-separation toolbox), SHARP, RESHARP,
        PDF or LBV. See each function for its settings.
    voxel_size : 3 floats, mm
    b0_direction : 3 floats, unit vector in voxel axes
    weights : (nx, ny, nz) array, optional
        Data weights (inverse field noise) for the methods with a data term
        (PDF, RESHARP). Voxels of zero weight have no usable field: every method
        fills it from the neighbours (:func:`chisep.grid.harmonic_fill`) first,
        since filters and Laplacians would spread it.
    **settings
        Keyword settings of the chosen method; unknown names are an error.

    Returns
    -------
    local_field_hz : float32 array, Hz
    eroded_mask : bool array
    """
    func = BACKGROUND_METHODS.get(method)
    BACKGROUND_METHODS.check_settings(method, settings, _SHARED)
    return func(field_hz, mask, voxel_size=voxel_size, b0_direction=b0_direction, weights=weights, **settings)
