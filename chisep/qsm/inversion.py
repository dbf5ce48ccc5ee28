"""Dipole inversion: local field (Hz) -> magnetic susceptibility chi (ppm).

The local field is the susceptibility convolved with the unit dipole,
``f = CF * 1e-6 * D * chi`` (:mod:`chisep.physics`). ``D(k)`` vanishes on
the cone at the magic angle, so the inversion needs regularisation; the
methods here differ in how they supply it.

Every method has the same signature::

    method(local_field_hz, mask, *, voxel_size, b0_direction, field_strength,
           weights=None, magnitude=None, **settings) -> chi_ppm

``weights`` are data weights (e.g. the inverse of the field noise, or the
magnitude); they are normalised to mean 1 inside the mask. ``magnitude``
feeds the edge prior of MEDI. :func:`invert` dispatches by name and
:func:`reference` sets the zero of the map (D(0) = 0, so the data do not
determine the mean susceptibility).

All work runs in jit-compiled JAX (float32) on the mask's bounding box
padded by ``pad_fraction`` of its extent on each side (zeros, so FFT
convolutions do not wrap around), rounded to a fast FFT size; each grid
shape compiles once. Outputs are NumPy float32 maps of the input's shape,
zero outside the mask.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from chisep import grid as g
from chisep import physics
from chisep import validate as v
from chisep.acquisition import FIELD_STRENGTH_RANGE_T
from chisep.errors import InputError
from chisep.registry import Registry
from chisep.settings import TOTAL_FIELD_METHODS

__all__ = ["tkd", "tikhonov", "tv", "medi", "ilsqr", "single_step", "single_step_alpha", "single_step_terms",
           "median_field_noise_ppm", "invert", "reference", "dipole_field_hz", "INVERSION_METHODS",
           "TOTAL_FIELD_METHODS"]

PAD_FRACTION = 0.125


# ---------------------------------------------------------------------------
# boundary
# ---------------------------------------------------------------------------
class _Problem:
    """Validated inputs on the working grid: field in ppm, mask, weights, kernels' geometry."""

    def __init__(self, local_field_hz, mask, voxel_size, b0_direction, field_strength, weights,
                 magnitude, pad_fraction, margin_mm: float = 0.0):
        field, msk = v.check_volume_and_mask(local_field_hz, mask, name="local_field_hz")
        vs, b0 = v.check_geometry(voxel_size, b0_direction)
        b0_t = v.check_positive(field_strength, "field_strength")
        lo, hi = FIELD_STRENGTH_RANGE_T
        if not lo <= b0_t <= hi:
            raise InputError(f"field_strength must be in tesla ({lo:g}-{hi:g}), got {field_strength!r}")
        frac = v.check_positive(pad_fraction, "pad_fraction", allow_zero=True)
        w = v.check_optional_map(weights, msk.shape, name="weights")
        if w is not None:
            if not np.any(w[msk] > 0):
                raise InputError("weights are zero everywhere inside the mask; the mask and the weights do "
                                 "not overlap. Give positive weights (e.g. inverse field noise) in the brain")
            w = w / np.mean(w[msk])
        self.magnitude = v.check_optional_map(magnitude, msk.shape, name="magnitude")
        self.mask = msk
        self.grid = g.Grid.around(msk, g.margin_voxels(msk, vs, margin_mm=margin_mm, fraction=frac))
        self.field = jnp.asarray(self.grid.embed(physics.hz_to_ppm(field, b0_t)))
        self.mask_j = jnp.asarray(self.grid.embed(msk))
        w_full = msk.astype(np.float32) if w is None else np.where(msk, w, 0).astype(np.float32)
        self.weights = jnp.asarray(self.grid.embed(w_full))
        self.vs = g.as_jax(vs)
        self.vs_np = vs
        self.b0 = jnp.asarray(b0, jnp.float32)

    def finish(self, chi) -> np.ndarray:
        out = self.grid.extract(np.asarray(chi, dtype=np.float32))
        return np.where(self.mask, out, 0).astype(np.float32)


def _common_doc_params() -> str:  # noqa: D401 - shared text for docstrings
    return """
    local_field_hz : (nx, ny, nz) array, Hz
        Local field (background removed). Values outside ``mask`` are ignored.
    mask : (nx, ny, nz) bool array
    voxel_size : 3 floats, mm
    b0_direction : 3 floats
        Unit B0 direction in voxel axes (oblique acquisitions are honoured).
    field_strength : float, T
    weights : (nx, ny, nz) array, optional
        Data weights (inverse field noise or magnitude), normalised to mean 1 in the mask.
    magnitude : (nx, ny, nz) array, optional
        Magnitude image (used by MEDI's edge prior; ignored elsewhere).
    pad_fraction : float
        Zero padding on each side as a fraction of the mask's extent (0.125)."""


# ---------------------------------------------------------------------------
# closed-form methods
# ---------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(3,))
def _tkd_core(field, mask, threshold, shape, voxel_size, b0):
    inverse = g.tkd_inverse(g.dipole_half(shape, voxel_size, b0), threshold)
    return g.irfft(inverse * g.rfft(field * mask), shape) * mask


def tkd(local_field_hz, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0),
        field_strength, weights=None, magnitude=None, threshold: float = 0.19,
        pad_fraction: float = PAD_FRACTION):
    """Thresholded k-space division (TKD; Shmueli et al. 2009, Wharton et al. 2010).

    ``chi = F^-1[ F(f) / D ]`` where ``|D| > threshold``; elsewhere the
    inverse kernel is ``sign(D) / threshold`` (sign-preserving truncation),
    so the cone is damped but not zeroed. ``weights`` are not used.

    Parameters
    ----------%s
    threshold : float
        Truncation level of ``|D|`` (0.19).

    Returns
    -------
    chi_ppm : (nx, ny, nz) float32 array, ppm, zero outside the mask

    References
    ----------
    Shmueli K, de Zwart JA, van Gelderen P, et al. Magnetic susceptibility
    mapping of brain tissue in vivo using MRI phase data. Magn Reson Med
    2009;62:1510-1522.
    Wharton S, Schaefer A, Bowtell R. Susceptibility mapping in the human
    brain using threshold-based k-space division. Magn Reson Med
    2010;63:1292-1304.
    """
    p = _Problem(local_field_hz, mask, voxel_size, b0_direction, field_strength, weights, magnitude, pad_fraction)
    thr = v.check_positive(threshold, "threshold")
    return p.finish(_tkd_core(p.field, p.mask_j, jnp.float32(thr), p.grid.shape, p.vs, p.b0))


TIKHONOV_REGULARISERS = ("gradient", "identity")


@partial(jax.jit, static_argnums=(3, 4))
def _tikhonov_core(field, mask, lam, shape, regulariser, voxel_size, b0):
    D = g.dipole_half(shape, voxel_size, b0)
    R = g.gradient_half(shape, voxel_size) if regulariser == "gradient" else jnp.ones_like(D)
    denom = D * D + lam * R
    spectrum = D * g.rfft(field * mask) / jnp.where(denom == 0, 1.0, denom)
    return g.irfft(spectrum, shape) * mask


def tikhonov(local_field_hz, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0),
             field_strength, weights=None, magnitude=None, lam: float | None = None,
             regulariser: str = "gradient", pad_fraction: float = PAD_FRACTION):
    """Closed-form Tikhonov inversion: ``min ||D chi - f||^2 + lam ||R chi||^2``.

    Solved in k-space, ``chi = F^-1[ D F(f) / (D^2 + lam |R|^2) ]``, with
    ``R`` the identity or the finite-difference gradient (per mm). The data
    term is unweighted (``weights`` are ignored) and the field outside the
    mask is taken as zero; the mean (k = 0) is left at zero.

    Parameters
    ----------%s
    lam : float, optional
        Regularisation weight; defaults to 0.02 (identity, dimensionless)
        or 0.01 mm^2 (gradient), a balance between noiseless and noisy
        fields on the built-in phantom.
    regulariser : {"gradient", "identity"}

    Returns
    -------
    chi_ppm : float32 array, ppm

    References
    ----------
    Bilgic B, Chatnuntawech I, Fan AP, et al. Fast image reconstruction with
    L2-regularization. J Magn Reson Imaging 2014;40:181-191.
    """
    p = _Problem(local_field_hz, mask, voxel_size, b0_direction, field_strength, weights, magnitude, pad_fraction)
    v.check_choice(regulariser, TIKHONOV_REGULARISERS, "regulariser")
    if lam is None:
        lam = 0.01 if regulariser == "gradient" else 0.02
    lam = v.check_positive(lam, "lam")
    return p.finish(_tikhonov_core(p.field, p.mask_j, jnp.float32(lam), p.grid.shape, regulariser, p.vs, p.b0))


# ---------------------------------------------------------------------------
# total variation by ADMM (FANSI-style), shared by TV and MEDI
# ---------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(8, 9), static_argnames=("track_residual",))
def _tv_admm_core(fields, data_w, tv_w, alpha, mu_grad, mu_data, n_iter, tol, shape, weighted, voxel_size, kernels,
                  relaxation=1.0, residual_drop=-jnp.inf, min_iter=0, track_residual=False):
    """ADMM for ``min sum_r 1/2 ||W_r (K_r x - f_r)||^2 + alpha ||G . grad x||_1``.

    ``kernels`` (r, half spectrum) are real, even k-space operators: the dipole kernel D alone
    for TV and MEDI, the high-passed dipoles (1 - S_r) D of the single-step inversion.
    Splitting (Bilgic/Milovic FANSI): z = grad x always; with ``weighted``
    also v_r = K_r x, so that the weighted data terms become voxelwise
    updates and the x-update stays a k-space division. Scaled dual
    variables s_z, s_v. Stops after ``n_iter`` iterations or when the
    relative change of x falls below ``tol``. ``relaxation`` in [1, 2) over-relaxes the
    splits (Boyd et al. 2011, sec. 3.4.3): the same minimiser in fewer iterations. With
    ``weighted`` and ``track_residual`` it also stops after the first iteration from ``min_iter``
    on whose weighted data residual ``sqrt(sum_r ||W_r (K_r x - f_r)||^2)`` fell by less than
    ``residual_drop`` (a fraction of the previous one). Tracking costs a fifth more per iteration
    at 1 mm; without it the residual is taken once, of the result. Returns x, the iteration count
    and the result's residual (0 without ``weighted``).
    """
    E2 = g.gradient_half(shape, voxel_size)
    w2 = data_w**2
    data_coef = mu_data if weighted else 1.0
    denom = data_coef * jnp.sum(kernels * kernels, axis=0) + mu_grad * E2
    denom = jnp.where(denom == 0, 1.0, denom)  # k = 0: K = E = 0, the mean stays 0
    thresh = alpha * tv_w / mu_grad
    n_terms = kernels.shape[0]
    if not weighted:
        field_rhs = sum(kernels[r] * g.rfft(fields[r]) for r in range(n_terms))

    def data_residual(Kx):
        return jnp.sqrt(jnp.sum(w2 * (Kx - fields) ** 2))

    def body(state):
        x, z, s_z, v, s_v, _, k, change, residual, _ = state
        grad_rhs = g.rfft(g.divergence_adjoint(z + s_z, voxel_size))
        if weighted:  # (data_coef = mu_data multiplies it below)
            data_rhs = sum(kernels[r] * g.rfft(v[r] + s_v[r]) for r in range(n_terms))
        else:
            data_rhs = field_rhs
        X = (data_coef * data_rhs + mu_grad * grad_rhs) / denom
        x_new = g.irfft(X, shape)
        grad_x = relaxation * jnp.stack(g.gradient(x_new, voxel_size)) + (1.0 - relaxation) * z
        u = grad_x - s_z
        z = jnp.sign(u) * jnp.maximum(jnp.abs(u) - thresh, 0.0)
        s_z = s_z + z - grad_x
        new_residual, Kx_new = jnp.float32(0.0), v
        if weighted:
            Kx_new = jnp.stack([g.irfft(kernels[r] * X, shape) for r in range(n_terms)])
            if track_residual:
                new_residual = data_residual(Kx_new)
            Kx = relaxation * Kx_new + (1.0 - relaxation) * v
            v = (w2 * fields + mu_data * (Kx - s_v)) / (w2 + mu_data)
            s_v = s_v + v - Kx
        change = jnp.linalg.norm(x_new - x) / jnp.maximum(jnp.linalg.norm(x_new), 1e-12)
        return x_new, z, s_z, v, s_v, Kx_new, k + 1, change, new_residual, residual

    def cond(state):
        k, change, residual, previous = state[6:]
        go_on = (k < n_iter) & (change > tol)
        if track_residual:
            go_on &= ~((k >= min_iter) & (previous - residual < residual_drop * previous))
        return go_on

    zeros = jnp.zeros(shape, jnp.float32)
    grad0 = jnp.zeros((3,) + shape, jnp.float32)
    inf = jnp.asarray(jnp.inf, jnp.float32)
    state = (zeros, grad0, grad0, fields, jnp.zeros_like(fields), fields, jnp.asarray(0), inf, inf, inf)
    x, *_, Kx, k, _, residual, _ = jax.lax.while_loop(cond, body, state)
    if weighted and not track_residual:  # once, of the result (K x is carried from its iteration)
        residual = data_residual(Kx)
    return x, k, residual


TV_DATA_TERMS = ("weighted", "linear")


def _run_tv(p: _Problem, tv_weights, alpha, mu_grad, mu_data, max_iter, tol, data_term):
    v.check_choice(data_term, TV_DATA_TERMS, "data_term")
    x, *_ = _tv_admm_core(
        p.field[None], p.weights[None], tv_weights, jnp.float32(v.check_positive(alpha, "alpha")),
        jnp.float32(v.check_positive(mu_grad, "mu_grad")), jnp.float32(v.check_positive(mu_data, "mu_data")),
        v.check_count(max_iter, "max_iter"), jnp.float32(v.check_positive(tol, "tol", allow_zero=True)),
        p.grid.shape, data_term == "weighted", p.vs, g.dipole_half(p.grid.shape, p.vs, p.b0)[None])
    return p.finish(x * p.mask_j)


def tv(local_field_hz, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0),
       field_strength, weights=None, magnitude=None, alpha: float = 3e-4, mu_grad: float | None = None,
       mu_data: float = 1.0, max_iter: int = 30, tol: float = 0.01, data_term: str = "weighted",
       pad_fraction: float = PAD_FRACTION):
    """Total-variation inversion by ADMM, FANSI-style (Bilgic et al. 2014; Milovic et al. 2018).

    Minimises ``1/2 ||W (D chi - f)||^2 + alpha ||grad chi||_1`` (anisotropic
    TV, gradient per mm, fields in ppm). With ``data_term="weighted"`` the
    weights ``W`` are the mask times ``weights`` and the field outside the
    mask does not constrain the solution; with ``"linear"`` the data term is
    unweighted over the whole grid (cheaper: no extra splitting variable).

    Parameters
    ----------%s
    alpha : float
        TV weight (ppm field units per mm of gradient; 3e-4, tuned on the
        synthetic heads of the tests and the benchmark phantom).
    mu_grad : float, optional
        ADMM penalty of the gradient split; 100 * alpha by default (FANSI's rule).
    mu_data : float
        ADMM penalty of the data split (weighted data term only; 1).
    max_iter : int
        ADMM iteration cap (30; on the phantom 40 iterations gain about
        1 point of NRMSE for a third more time).
    tol : float
        Stop when the relative change of chi falls below this (0.01).
    data_term : {"weighted", "linear"}

    Returns
    -------
    chi_ppm : float32 array, ppm

    References
    ----------
    Bilgic B, Fan AP, Polimeni JR, et al. Fast quantitative susceptibility
    mapping with L1-regularization and automatic parameter selection. Magn
    Reson Med 2014;72:1444-1459.
    Milovic C, Bilgic B, Zhao B, Acosta-Cabronero J, Tejos C. Fast nonlinear
    susceptibility inversion with variational regularization. Magn Reson
    Med 2018;80:814-821.
    """
    p = _Problem(local_field_hz, mask, voxel_size, b0_direction, field_strength, weights, magnitude, pad_fraction)
    mu_grad = 100.0 * alpha if mu_grad is None else mu_grad
    return _run_tv(p, jnp.ones((3, 1, 1, 1), jnp.float32), alpha, mu_grad, mu_data, max_iter, tol, data_term)


def medi(local_field_hz, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0),
         field_strength, weights=None, magnitude=None, alpha: float = 3e-4, edge_fraction: float = 0.3,
         mu_grad: float | None = None, mu_data: float = 1.0, max_iter: int = 30, tol: float = 0.01,
         pad_fraction: float = PAD_FRACTION):
    """MEDI-style inversion: noise-weighted data term and magnitude-edge-weighted TV.

    Minimises ``1/2 ||W (D chi - f)||^2 + alpha ||M_G grad chi||_1`` where
    ``W`` are the data weights (pass the inverse field noise as ``weights``;
    uniform if None) and ``M_G`` is 0 on the ``edge_fraction`` strongest
    magnitude edges (:func:`chisep.grid.edge_mask`), so that anatomical edges seen in
    the magnitude are not smoothed. MEDI's original solver is Gauss-Newton
    on a nonlinear (complex exponential) data term; here the linear data
    term is solved by the same ADMM as :func:`tv`.

    Parameters
    ----------%s
    alpha : float
        TV weight (3e-4).
    edge_fraction : float
        Fraction of voxels treated as edges (0.3).
    mu_grad, mu_data, max_iter, tol
        As in :func:`tv`.

    Returns
    -------
    chi_ppm : float32 array, ppm

    Raises
    ------
    InputError
        If ``magnitude`` is None (MEDI needs it for its edge prior).

    References
    ----------
    Liu J, Liu T, de Rochefort L, et al. Morphology enabled dipole inversion
    for quantitative susceptibility mapping using structural consistency
    between the magnitude image and the susceptibility map. NeuroImage
    2012;59:2560-2568.
    """
    if magnitude is None:
        raise InputError("medi needs the magnitude image (magnitude=...) for its edge prior; "
                         "pass it or use method='tv'")
    p = _Problem(local_field_hz, mask, voxel_size, b0_direction, field_strength, weights, magnitude, pad_fraction)
    tv_w, mu_grad = _edge_prior(p, edge_fraction, alpha, mu_grad)
    return _run_tv(p, tv_w, alpha, mu_grad, mu_data, max_iter, tol, "weighted")


def _edge_prior(p: _Problem, edge_fraction, alpha, mu_grad):
    """MEDI's TV weights (0 on the magnitude's strongest edges) on the working grid, and the gradient
    split's ADMM penalty (100 alpha unless given, FANSI's rule)."""
    frac = v.check_positive(edge_fraction, "edge_fraction")
    if frac >= 1:
        raise InputError(f"edge_fraction must be below 1, got {edge_fraction!r}")
    edges = g.edge_mask(p.magnitude, p.mask, p.vs_np, edge_fraction=frac)
    tv_w = jnp.asarray(np.stack([p.grid.embed(e, fill=1.0) for e in edges]))
    return tv_w, (100.0 * alpha if mu_grad is None else mu_grad)


# ---------------------------------------------------------------------------
# single-step inversion of the total field
# ---------------------------------------------------------------------------
#: Sphere radii (mm) of the single-step data terms, largest first: each voxel takes the largest
#: sphere that fits in the region. Chosen on head A at 2 mm (benchmarks/bench_total_field.py):
#: 2 mm spheres at the rim cost 1-4 points (the rim's field is partial volume and noise),
#: 4-8-12 beat 4-12, 6-12 and 4-8-12-16.
SINGLE_STEP_RADII_MM = (12.0, 8.0, 4.0)

#: The TV weight that fits the data's noise: alpha = ALPHA_PER_NOISE_PPM * (median field noise in ppm of B0),
#: at least ALPHA_FLOOR (:func:`single_step_alpha`). With one fixed alpha (MEDI's 3e-4) the best weight
#: moved with the SNR: on head A at 2 mm the best alpha for the whole brain was 7e-5 to 1e-4 at SNR 100
#: (field noise 0.10 Hz) and 3e-4 to 4.5e-4 at SNR 30 (0.36 Hz), about proportional to the noise. The
#: floor: at high SNR what is left is model error, not noise, and it sits next to the brain's surface
#: (partial volume with CSF and bone): at 1 mm and SNR 100, alpha 9e-5 gave the best whole brain but the
#: 5 mm next to the surface lost 6-9 points against 3e-4; 1.5e-4 keeps most of the gain (whole brain
#: 1.0 / 4.3 points better on heads A / B) for 3-5 points there. Checked on the holdout head B
#: (benchmarks/RESULTS.md, session 11).
ALPHA_PER_NOISE_PPM = 0.11
ALPHA_FLOOR = 1.5e-4


def single_step_alpha(field_noise_hz, mask, *, field_strength: float) -> float:
    """The TV weight of :func:`single_step` for a field noise map: proportional to its median in ``mask``.

    ``field_noise_hz`` is the standard error of the total field (Hz), e.g.
    ``FieldFit.field_noise_hz``; voxels where it is not finite are not counted. Returns
    ``max(ALPHA_PER_NOISE_PPM * noise_ppm, ALPHA_FLOOR)``, or ALPHA_FLOOR when no voxel of
    ``mask`` has a finite noise.

    >>> round(single_step_alpha(np.full((2, 2, 2), 0.36), np.ones((2, 2, 2), bool), field_strength=3.0), 6)
    0.00031
    """
    noise_ppm = median_field_noise_ppm(field_noise_hz, mask, field_strength=field_strength)
    if noise_ppm is None:
        return ALPHA_FLOOR
    return float(max(ALPHA_PER_NOISE_PPM * noise_ppm, ALPHA_FLOOR))


def median_field_noise_ppm(field_noise_hz, mask, *, field_strength: float) -> float | None:
    """Median of the finite field noise (Hz) in ``mask``, in ppm; None when no voxel has one. The scale
    that the TV weights of single-step and of chi-separation from the total field follow.

    >>> round(median_field_noise_ppm(np.full((2, 2, 2), 0.36), np.ones((2, 2, 2), bool), field_strength=3.0), 7)
    0.0028184
    """
    noise = np.asarray(field_noise_hz, dtype=np.float64)[np.asarray(mask, bool)]
    noise = noise[np.isfinite(noise)]
    if noise.size == 0:
        return None
    return float(physics.hz_to_ppm(float(np.median(noise)), v.check_positive(field_strength, "field_strength")))


@partial(jax.jit, static_argnums=(3,))
def single_step_terms(field, mask, radii, shape, voxel_size, b0):
    """Per radius r (largest first): the high-passed dipole (1 - S_r) D, the high-passed field
    (1 - S_r) f and the band of voxels whose largest sphere inside the mask has radius r: the data
    terms of :func:`single_step` and of chi-separation from the total field (jitted; ``shape`` is
    the padded grid's, which needs a margin of the largest radius around the mask)."""
    D = g.dipole_half(shape, voxel_size, b0)
    mask_spectrum = g.rfft(mask)
    field_spectrum = g.rfft(field * mask)

    def one(taken, radius):
        S, count = g.sphere_half(shape, voxel_size, radius)
        inside = g.sphere_interior(mask_spectrum, S, count, shape)
        band = inside & ~taken
        # outside its band a term has no data (zero weight, and zero as the ADMM's start)
        return taken | inside, ((1.0 - S) * D, jnp.where(band, g.irfft((1.0 - S) * field_spectrum, shape), 0.0), band)

    _, (kernels, fields, bands) = jax.lax.scan(one, jnp.zeros(shape, bool), radii)
    return kernels, fields, bands


def single_step(total_field_hz, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0),
                field_strength, weights=None, magnitude=None, radii_mm=SINGLE_STEP_RADII_MM,
                alpha: float = 3e-4, edge_fraction: float = 0.3, mu_grad: float | None = None,
                mu_data: float = 0.1, max_iter: int = 10, tol: float = 0.01, relaxation: float = 1.6,
                residual_drop: float | None = None, min_iter: int = 5, pad_fraction: float = 0.0,
                info: dict | None = None):
    """Single-step inversion of the total field: background removal and inversion in one problem.

    Minimises ``sum_r 1/2 ||W_r (1 - S_r) (D chi - f)||^2 + alpha ||M_G grad chi||_1``: the
    data term of Chatnuntawech et al. (SMV-constrained single-step QSM) with V-SHARP's
    variable radius and MEDI's noise weights and magnitude-edge prior. ``S_r`` is the
    spherical mean over radius r; ``(1 - S_r)`` removes every field that is harmonic in the
    sphere, so the background (sources outside ``mask``) drops out of the data, and ``W_r`` is
    the weight on the band of voxels whose largest sphere inside ``mask`` has radius r.

    Why not two steps: background removal also takes out the part of the brain's own field
    that is harmonic inside the brain (the field of sources near its surface), and the
    inversion that follows then fits a field that no susceptibility inside the mask can
    make. Here the model is filtered the same way as the data, so the true chi fits
    exactly; the prior decides only what the filter left unseen (measured on the realistic
    heads: benchmarks/RESULTS.md). chi is reconstructed over the whole mask, without erosion.

    Parameters
    ----------
    total_field_hz : (nx, ny, nz) array, Hz
        Total field (background included), e.g. ``FieldFit.field_hz``. Values outside
        ``mask`` are ignored; voxels with zero weight are filled harmonically from their
        neighbours first (their field is not used).
    mask, voxel_size, b0_direction, field_strength, weights, magnitude
        As in :func:`medi` (``magnitude`` is required: MEDI's edge prior).
    pad_fraction : float
        Zero padding beyond the margin of the largest sphere radius that the grid always has (0).
        The field that circular convolution wraps in from the grid's far side comes from
        sources outside the mask, so it is harmonic in every sphere of the data term and the
        (1 - S_r) filters take it out: at 1 mm MEDI's padding of 0.125 changed chi NRMSE by
        0.02-0.04 points on both heads and cost a quarter of the run time.
    radii_mm : sequence of float, mm
        Sphere radii of the data terms (:data:`SINGLE_STEP_RADII_MM`); voxels where not
        even the smallest fits carry no data (chi there comes from its field elsewhere
        and the prior).
    alpha : float
        TV weight (MEDI's 3e-4 when called directly; the pipeline takes :func:`single_step_alpha`
        of the field noise unless the settings give one).
    edge_fraction, mu_grad
        As in :func:`medi`.
    mu_data, relaxation, max_iter, tol
        ADMM's data penalty (0.1), over-relaxation (1.6), iteration cap (10) and relative-change
        stop (0.01). Each iteration costs 2 + 2 x (number of radii) FFTs, twice MEDI's with three
        radii. The result is an early-stopped iterate, not the minimiser, and better than it on
        the realistic heads: run to convergence the problem scores 0.5-6 points worse whole-brain
        at every TV weight tried, and with penalty 0.1 the best iterate was the 7th to 9th on both
        heads at 1 and 2 mm, SNR 30 and 100, axial and 30 degrees oblique
        (benchmarks/bench_single_step_stop.py, bench_single_step_convergence.py). So ``max_iter``
        regularises too; change it together with ``alpha``. A piecewise-constant phantom is TV's
        best case and wants more (``max_iter=30, mu_data=0.5``, the defaults until 2026-12-07).
    residual_drop, min_iter
        Stop once the data term has levelled off: after the first iteration from ``min_iter`` (5)
        on whose weighted data residual ``sqrt(sum_r ||W_r (1 - S_r)(D chi - f)||^2)`` fell by
        less than ``residual_drop`` times the previous one (None: off). Off by default: at SNR 30
        the residual levels off by the 5th-6th iteration, before the best iterate (9th at 1 mm), and
        a fixed count did better on every realistic case (benchmarks/RESULTS.md).
    info : dict, optional
        Receives ``iterations`` (run) and ``residual`` (the weighted data residual of the result,
        Hz).

    Returns
    -------
    chi_ppm : float32 array, ppm, zero outside the mask (not referenced)

    References
    ----------
    Chatnuntawech I, McDaniel P, Cauley SF, et al. Single-step quantitative susceptibility
    mapping with variational penalties. NMR Biomed 2017;30:e3570.
    Li W, Wu B, Liu C. Quantitative susceptibility mapping of human brain reflects spatial
    variation in tissue composition. NeuroImage 2011;55:1645-1656 (V-SHARP).
    Liu J, Liu T, de Rochefort L, et al. Morphology enabled dipole inversion (MEDI).
    NeuroImage 2012;59:2560-2568.
    """
    if magnitude is None:
        raise InputError("single-step needs the magnitude image (magnitude=...) for its edge prior")
    radii = sorted({float(v.check_positive(r, "radii_mm")) for r in np.atleast_1d(radii_mm)}, reverse=True)
    if not radii:
        raise InputError("radii_mm must name at least one sphere radius in mm")
    field, msk = v.check_volume_and_mask(total_field_hz, mask, name="total_field_hz")
    field = g.fill_unweighted(field, msk, v.check_optional_map(weights, msk.shape, name="weights"))
    p = _Problem(field, msk, voxel_size, b0_direction, field_strength, weights, magnitude, pad_fraction,
                 margin_mm=radii[0])
    kernels, fields, bands = single_step_terms(p.field, p.mask_j.astype(jnp.float32),
                                               jnp.asarray(radii, jnp.float32), p.grid.shape, p.vs, p.b0)
    # the edge prior (NumPy) while JAX still computes the data terms: the check below waits for them
    tv_w, mu_grad = _edge_prior(p, edge_fraction, alpha, mu_grad)
    if not bool(jnp.any(bands)):
        raise InputError(f"single-step: no sphere of radius {radii[-1]:g} mm fits in the mask; give a smaller "
                         "radius (radii_mm) or a larger mask")
    drop = -np.inf if residual_drop is None else v.check_positive(residual_drop, "residual_drop", allow_zero=True)
    x, iterations, residual = _tv_admm_core(
        fields, jnp.where(bands, p.weights[None], 0.0), tv_w, jnp.float32(v.check_positive(alpha, "alpha")),
        jnp.float32(v.check_positive(mu_grad, "mu_grad")), jnp.float32(v.check_positive(mu_data, "mu_data")),
        v.check_count(max_iter, "max_iter"), jnp.float32(v.check_positive(tol, "tol", allow_zero=True)),
        p.grid.shape, True, p.vs, kernels, jnp.float32(relaxation), jnp.float32(drop),
        v.check_count(min_iter, "min_iter"), track_residual=residual_drop is not None)
    if info is not None:
        info.update(iterations=int(iterations), residual=float(residual))
    return p.finish(x * p.mask_j)


@partial(jax.jit, static_argnums=(1,))
def _dipole_field_core(chi, shape, voxel_size, b0):
    return g.conv(chi, g.dipole_half(shape, voxel_size, b0))


def dipole_field_hz(chi_ppm, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0), field_strength,
                    pad_fraction: float = PAD_FRACTION) -> np.ndarray:
    """The field (Hz) of ``chi_ppm`` inside ``mask``, on the inversions' padded grid: the forward model they
    fit (single-step's D chi, handed to chi-separation as its local field). 0.3 s at 1 mm, where
    :func:`chisep.physics.forward_field_hz`'s doubled grid takes 6-11 s; they differ by 1.6 % in the mask."""
    chi, msk = v.check_volume_and_mask(chi_ppm, mask, name="chi_ppm")
    vs, b0 = v.check_geometry(voxel_size, b0_direction)
    grid = g.Grid.around(msk, g.margin_voxels(msk, vs, fraction=pad_fraction))
    field = _dipole_field_core(jnp.asarray(grid.embed(np.where(msk, chi, 0).astype(np.float32))), grid.shape,
                               g.as_jax(vs), jnp.asarray(b0, jnp.float32))
    out = physics.ppm_to_hz(grid.extract(np.asarray(field)), v.check_positive(field_strength, "field_strength"))
    return np.where(msk, out, 0).astype(np.float32)


# ---------------------------------------------------------------------------
# LSQR (the first stage of iLSQR)
# ---------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(4,))
def _lsqr_core(field, w, n_iter, tol, shape, voxel_size, b0):
    """Paige-Saunders LSQR on ``min ||W (D x - f)||`` with early stopping.

    Stops after ``n_iter`` iterations or when either of LSQR's standard
    tests falls below ``tol``: ``||r|| / ||b||`` or ``||A^T r|| / (||A|| ||r||)``.
    """
    D = g.dipole_half(shape, voxel_size, b0)

    def A(x):
        return w * g.conv(x, D)

    def At(y):
        return g.conv(w * y, D)

    b = w * field
    beta = jnp.linalg.norm(b)
    u = b / jnp.maximum(beta, 1e-30)
    v = At(u)
    alpha = jnp.linalg.norm(v)
    v = v / jnp.maximum(alpha, 1e-30)
    state = dict(x=jnp.zeros(shape, jnp.float32), u=u, v=v, w=v, alpha=alpha, phibar=beta, rhobar=alpha,
                 anorm2=jnp.float32(0.0), k=jnp.asarray(0), test=jnp.float32(jnp.inf))

    def body(s):
        u = A(s["v"]) - s["alpha"] * s["u"]
        beta = jnp.linalg.norm(u)
        u = u / jnp.maximum(beta, 1e-30)
        v = At(u) - beta * s["v"]
        alpha = jnp.linalg.norm(v)
        v = v / jnp.maximum(alpha, 1e-30)
        rho = jnp.sqrt(s["rhobar"] ** 2 + beta**2)
        c, sn = s["rhobar"] / rho, beta / rho
        theta = sn * alpha
        rhobar = -c * alpha
        phi = c * s["phibar"]
        phibar = sn * s["phibar"]
        x = s["x"] + (phi / rho) * s["w"]
        w_dir = v - (theta / rho) * s["w"]
        anorm2 = s["anorm2"] + s["alpha"] ** 2 + beta**2
        # ||A^T r|| = phibar * alpha * |c|; ||r|| = phibar.
        test = alpha * jnp.abs(c) / jnp.sqrt(jnp.maximum(anorm2, 1e-30))
        return dict(x=x, u=u, v=v, w=w_dir, alpha=alpha, phibar=phibar, rhobar=rhobar, anorm2=anorm2,
                    k=s["k"] + 1, test=test)

    def cond(s):
        return (s["k"] < n_iter) & (s["test"] > tol) & (s["phibar"] > tol * beta)

    out = jax.lax.while_loop(cond, body, state)
    return out["x"], out["k"]


def ilsqr(local_field_hz, mask, *, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0),
          field_strength, weights=None, magnitude=None, max_iter: int = 10, tol: float = 0.01,
          pad_fraction: float = PAD_FRACTION):
    """Weighted LSQR with early stopping: the first stage of iLSQR (Li et al. 2015).

    Runs the Paige-Saunders LSQR algorithm on ``min ||W (D chi - f)||``
    (``W`` = mask times ``weights``) from zero and stops early (``tol`` on
    LSQR's residual tests, or ``max_iter``); early stopping is the
    regularisation, so noisy fields call for few iterations.

    This is *not* the full iLSQR: the published method continues with a
    fast-QSM estimate and a second LSQR that estimates and subtracts
    streaking artefacts in the ill-conditioned cone, and weights the data
    by the field's Laplacian; chisep does neither, so expect more streaking
    than the STI Suite's iLSQR.

    Parameters
    ----------%s
    max_iter : int
        LSQR iteration cap (10; on noisy data the error grows again beyond ~10).
    tol : float
        LSQR stopping tolerance (0.01, as iLSQR's first stage).

    Returns
    -------
    chi_ppm : float32 array, ppm

    References
    ----------
    Li W, Wang N, Yu F, et al. A method for estimating and removing streaking
    artifacts in quantitative susceptibility mapping. NeuroImage
    2015;108:111-122.
    Paige CC, Saunders MA. LSQR: an algorithm for sparse linear equations and
    sparse least squares. ACM Trans Math Softw 1982;8:43-71.
    """
    p = _Problem(local_field_hz, mask, voxel_size, b0_direction, field_strength, weights, magnitude, pad_fraction)
    x, _ = _lsqr_core(p.field, p.weights, v.check_count(max_iter, "max_iter"),
                      jnp.float32(v.check_positive(tol, "tol", allow_zero=True)), p.grid.shape, p.vs, p.b0)
    return p.finish(x * p.mask_j)


for _f in (tkd, tikhonov, tv, medi, ilsqr):
    _f.__doc__ = _f.__doc__ % _common_doc_params()


# ---------------------------------------------------------------------------
# dispatcher and referencing
# ---------------------------------------------------------------------------
INVERSION_METHODS = Registry("inversion method")
for _name, _func in (("tv", tv), ("medi", medi), ("ilsqr", ilsqr), ("tikhonov", tikhonov), ("tkd", tkd),
                     ("single-step", single_step)):
    INVERSION_METHODS.register(_name, _func)

# not settings: the call's inputs, and ``info`` (an output) for the methods that report
_SIGNATURE_NAMES = ("voxel_size", "b0_direction", "field_strength", "weights", "magnitude", "info")


def invert(local_field_hz, mask, *, method: str = "tv", voxel_size=(1.0, 1.0, 1.0),
           b0_direction=(0.0, 0.0, 1.0), field_strength, weights=None, magnitude=None, info: dict | None = None,
           **settings):
    """Dipole inversion with a named method.

    Parameters
    ----------
    local_field_hz, mask, voxel_size, b0_direction, field_strength, weights, magnitude
        See :func:`tv`.
    method : {"tv", "medi", "ilsqr", "tikhonov", "tkd", "single-step"}
    info : dict, optional
        Receives what the method reports about its run (single-step: ``iterations``, ``residual``);
        left empty by the others.
    **settings
        Keyword settings of the chosen method; unknown names are an error.

    Returns
    -------
    chi_ppm : (nx, ny, nz) float32 array, ppm, zero outside the mask (not referenced;
        see :func:`reference`).
    """
    func = INVERSION_METHODS.get(method)
    INVERSION_METHODS.check_settings(method, settings, _SIGNATURE_NAMES)
    if info is not None and "info" in INVERSION_METHODS.settings_of(method):
        settings = dict(settings, info=info)
    return func(local_field_hz, mask, voxel_size=voxel_size, b0_direction=b0_direction,
                field_strength=field_strength, weights=weights, magnitude=magnitude, **settings)


REFERENCE_METHODS = ("mean", "csf")


def reference(chi, mask, *, method: str = "mean", csf_mask=None) -> np.ndarray:
    """Set the zero of a susceptibility map: subtract the mean over the mask or over CSF.

    Parameters
    ----------
    chi : (nx, ny, nz) array, ppm
    mask : (nx, ny, nz) bool array
    method : {"mean", "csf"}
        "mean": the mean inside ``mask`` becomes 0; "csf": the mean inside
        ``csf_mask`` (e.g. the lateral ventricles) becomes 0.
    csf_mask : (nx, ny, nz) bool array, required for ``method="csf"``

    Returns
    -------
    chi_ppm : float32 array, zero outside ``mask``
    """
    v.check_choice(method, REFERENCE_METHODS, "method")
    values, msk = v.check_volume_and_mask(chi, mask, name="chi")
    if method == "mean":
        region = msk
    else:
        if csf_mask is None:
            raise InputError("method='csf' needs csf_mask (a boolean map of the CSF reference region)")
        region = np.asarray(csf_mask).astype(bool)
        if region.shape != msk.shape:
            raise InputError(f"csf_mask shape {region.shape} does not match chi shape {msk.shape}")
        region &= msk
        if not region.any():
            raise InputError("csf_mask does not overlap the mask; give a CSF region inside the brain mask")
    return np.where(msk, values - values[region].mean(), 0).astype(np.float32)
