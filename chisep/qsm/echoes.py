"""Total field from multi-echo GRE phase: unwrap, then fit phi(TE) = phi0 + 2 pi f TE.

:func:`fit_multi_echo_field` returns a :class:`FieldFit` with the total field
(Hz), the phase offset (rad), the per-voxel standard error of the field (Hz,
the data weights of later stages) and the unwrapped phase.

Noise model: complex Gaussian noise of standard deviation sigma per real
channel gives, at high SNR, a phase error of standard deviation sigma / m_e
at echo e (m_e = magnitude). All three estimators are (locally) linear in the
phases, so their standard errors follow from sigma and the magnitudes; sigma
is pooled over the mask from the fit residuals (robustly: the median of the
per-voxel residual variances, corrected to the mean of a chi-square) unless
``noise_sigma`` is given.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from chisep import validate
from chisep.acquisition import check_echo_times
from chisep.errors import InputError
from chisep.fit import map_rows, weighted_line
from chisep.grid import bounding_box
from chisep.physics import wrap_phase, wrap_phase_jax
from chisep.qsm.unwrap import UNWRAP_METHODS, unwrap_temporal_only
from chisep.qsm.unwrap import unwrap as unwrap_phase

FieldMethod = Literal["nonlinear", "weighted-linear", "echo-average"]
FIELD_METHODS = ("nonlinear", "weighted-linear", "echo-average")
#: ``unwrap`` value for a fit whose field is only needed up to whole cycles between echoes
TEMPORAL_ONLY = "temporal-only"

#: Fraction of mask voxels whose phase may wrap between consecutive echoes
#: (|f| * dTE > 0.5) above which a warning is raised.
ALIASING_WARN_FRACTION = 0.05

#: Voxels whose field noise exceeds this factor times the median are not counted for that warning
#: (nor for the global cycle count, see ``_centre_whole_cycles``).
ALIASING_NOISE_FACTOR = 10.0

_TWO_PI = 2.0 * np.pi


@dataclass(frozen=True)
class FieldFit:
    """Result of :func:`fit_multi_echo_field`.

    Attributes
    ----------
    field_hz : (x, y, z) float32, Hz
        Total field (frequency offset); 0 outside the mask.
    phase_offset : (x, y, z) float32, rad
        Phase at TE = 0 (transmit/receive phase); 0 for single-echo data.
    field_noise_hz : (x, y, z) float32, Hz
        Standard error of ``field_hz`` per voxel (0 outside the mask). Use
        ``1 / field_noise_hz`` (normalised) as data weights downstream.
    unwrapped_phase : (x, y, z, echo) float32, rad
        Phase unwrapped in space and time (0 outside the mask); built when asked for (a 4D copy:
        ~1 s and 170 MB at 1 mm with 5 echoes, which the pipeline does not need).
    mask : (x, y, z) bool
    method : str
    info : dict
        ``noise_sigma`` (magnitude units), ``noise_source``, ``unwrap``,
        ``aliased_fraction`` (voxels with ``|f| * max dTE > 0.5``), warnings.
    """

    field_hz: np.ndarray
    phase_offset: np.ndarray
    field_noise_hz: np.ndarray
    mask: np.ndarray
    method: str
    info: dict = field(default_factory=dict)
    unwrapped: np.ndarray | None = field(default=None, repr=False, compare=False)  # the unwrapper's output

    @property
    def unwrapped_phase(self) -> np.ndarray:
        return np.where(self.mask[..., None], self.unwrapped, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
def _validate(magnitude, phase, echo_times, mask):
    ph = validate.as_phase(phase)
    if ph.ndim == 3:
        ph = ph[..., None]
    mag = np.asarray(magnitude)
    mag = mag[..., None] if mag.ndim == 3 else mag
    if mag.shape != ph.shape:
        raise InputError(f"magnitude {np.shape(magnitude)} and phase {np.shape(phase)} must have the same shape; "
                         "check that both hold the same echoes on the same grid")
    mag = validate.as_magnitude(mag, ndims=(4,))
    tes = check_echo_times(echo_times, ph.shape[-1])
    msk = validate.as_mask(mask, ph.shape[:3], default_all=True)
    return mag, ph, tes, msk


# ---------------------------------------------------------------------------
# estimators (voxels x echoes arrays)
# ---------------------------------------------------------------------------
def _wls_sums(w, tes):
    sw = w.sum(-1)
    st = (w * tes).sum(-1)
    stt = (w * tes**2).sum(-1)
    det = sw * stt - st**2
    return sw, st, stt, det


def _robust_sigma2(rss: np.ndarray, dof: int) -> float:
    """Pooled noise variance from per-voxel residual sums of squares (chi-square, ``dof``)."""
    ratio = rss / dof
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size == 0:
        return float("nan")
    # median of chi2_k / k is ~ (1 - 2 / (9k))^3 (Wilson-Hilferty); the median
    # ignores the few voxels with unwrapping errors or flow artefacts
    return float(np.median(ratio) / (1.0 - 2.0 / (9.0 * dof)) ** 3)


def _background_sigma(mag_rss: np.ndarray, mask: np.ndarray, n_echoes: int) -> float | None:
    """Noise sigma from background magnitude (Rayleigh: E[M^2] = 2 sigma^2 per echo)."""
    background = ~mask & (mag_rss > 0)
    if background.sum() < 100:
        return None
    return float(np.sqrt(np.mean(mag_rss[background] ** 2) / (2.0 * n_echoes)))


#: Gauss-Newton steps of the complex fit. From the weighted-linear start on the unwrapped phase
#: most voxels are at the optimum after one; measured on the realistic head A at 2 mm (244 k brain
#: voxels), 8 steps end within 0.03 Hz of 40 steps in 99.9 % of them (185 voxels, all dark or
#: dephased, move by more than 0.1 Hz), at 0.03 s per step and 244 k voxels on 2 cores.
PHASOR_STEPS = 8
#: a voxel stops stepping once a step moves its field by at most this (Hz, a hundredth of the field
#: noise at SNR 100): on the 1 mm head after 3-4 steps, the later ones changed it by at most 2e-4 Hz
PHASOR_TOL_HZ = 1e-3
#: a block of voxels leaves its stepping loop once at most this share of it still steps (noise-only
#: voxels at the mask's edge, which would keep the whole block stepping to the cap); those go on in
#: small blocks of :data:`PHASOR_RESUME_BLOCK` (1 mm brain: 1.15 -> 0.7 s)
PHASOR_LEAVE_SHARE = 1.0 / 1024
PHASOR_RESUME_BLOCK = 8192


@partial(jax.jit, static_argnums=(5, 7))
def _phasor_steps(phase, weight, tes, phi0, field_hz, n_steps, budget, leave):
    """Per row, Gauss-Newton steps on sum_e w_e |exp(i phase_e) - exp(i (phi0 + 2 pi f TE_e))|^2.

    The residual's Jacobian in (phi0, 2 pi f) is (1, TE_e) times a unit phasor, so the
    Gauss-Newton normal matrix is the weighted-linear one and constant; each step regresses
    sin(phase_e - theta_e) on (1, 2 pi TE_e). A step that does not lower the loss is halved,
    and not taken if that does not lower it either. A row steps until a step moves its field by
    at most :data:`PHASOR_TOL_HZ` or it has taken ``budget`` (per row) steps; the loop ends after
    ``n_steps`` or once at most ``leave`` rows still step. Returns (phi0, f, residual sum of
    squares, still stepping, steps left of the budget).
    """
    two_pi_t = (2.0 * jnp.pi) * tes
    sw, st, stt = weight.sum(-1), (weight * two_pi_t).sum(-1), (weight * two_pi_t**2).sum(-1)
    det = jnp.where(sw * stt - st**2 > 0, sw * stt - st**2, jnp.inf)

    def rss(p0, f):  # |exp(ia) - exp(ib)|^2 = 2 (1 - cos(a - b))
        return 2.0 * (weight * (1.0 - jnp.cos(phase - p0[:, None] - f[:, None] * two_pi_t))).sum(-1)

    def step(carry):
        k, p0, f, current, active, left = carry
        s = jnp.sin(phase - p0[:, None] - f[:, None] * two_pi_t)
        sy, sty = (weight * s).sum(-1), (weight * s * two_pi_t).sum(-1)
        d_p0, d_f = (stt * sy - st * sty) / det, (sw * sty - st * sy) / det
        full = rss(p0 + d_p0, f + d_f)
        half = rss(p0 + 0.5 * d_p0, f + 0.5 * d_f)
        scale = jnp.where(active, jnp.where(full <= current, 1.0, jnp.where(half < current, 0.5, 0.0)), 0.0)
        current = jnp.where(active, jnp.minimum(current, jnp.minimum(full, half)), current)
        left = left - active.astype(left.dtype)
        active = active & (jnp.abs(scale * d_f) > PHASOR_TOL_HZ) & (left > 0)
        return k + 1, p0 + scale * d_p0, f + scale * d_f, current, active, left

    def stepping(carry):
        return (carry[0] < n_steps) & (jnp.sum(carry[4]) > leave)

    left = jnp.asarray(budget, jnp.int32)
    start = (jnp.asarray(0), phi0, field_hz, rss(phi0, field_hz), left > 0, left)
    _, phi0, field_hz, loss, active, left = jax.lax.while_loop(stepping, step, start)
    return phi0, field_hz, loss, active, left


def _phasor_gauss_newton(phase, weight, tes, phi0, field_hz, n_steps):
    """:func:`_phasor_steps` with every row to its end (at most ``n_steps`` steps): (phi0, f, rss)."""
    budget = jnp.full(phase.shape[:1], n_steps, jnp.int32)
    return _phasor_steps(phase, weight, tes, phi0, field_hz, n_steps, budget, 0)[:3]


def _echo_weights(m):
    """Weights m_e^2 scaled to a peak of 1 per row, and the peak; all-zero rows (signal voids) get
    equal weights (and so a finite but huge standard error)."""
    peak = m.max(-1)
    w = jnp.where(peak[:, None] > 0, jnp.maximum(m / jnp.where(peak > 0, peak, 1.0)[:, None], 1e-18) ** 2, 1.0)
    return w, peak


@partial(jax.jit, static_argnums=(4,))
def _field_rows(u, phase, m, tes, nonlinear):
    """One voxel per row: the weighted-linear fit of the unwrapped phase ``u`` (weights m_e^2), and
    for ``nonlinear`` the complex fit's Gauss-Newton steps from it on the wrapped ``phase``.

    Returns (phi0, f (Hz), standard error of f per unit sigma, weighted residual sum of squares), and
    for ``nonlinear`` also which rows still step and their steps left (see :data:`PHASOR_LEAVE_SHARE`;
    :func:`_field_rows_resume` takes them on). float32 with echo times centred on their mean and
    weights scaled to a peak of 1 (undone on the standard error and the residual), so that the
    normal equations stay well conditioned; the float64 NumPy version took 1.3 s per pass over a
    1 mm head.
    """
    w, peak = _echo_weights(m)
    t_mean = tes.mean()
    tc = tes - t_mean
    at_mean, omega, sw, det = weighted_line(w, u, tc)
    phi0 = at_mean - omega * t_mean
    sd_f = jnp.sqrt(jnp.maximum(sw / det, 0.0)) / (2.0 * jnp.pi) / jnp.maximum(peak, 1e-30)
    if not nonlinear:
        rss = (w * (u - at_mean[:, None] - omega[:, None] * tc) ** 2).sum(-1) * peak * peak
        return phi0, omega / (2.0 * jnp.pi), sd_f, rss
    ok = jnp.isfinite(phi0) & jnp.isfinite(omega)
    start_phi0 = jnp.where(ok, wrap_phase_jax(phi0), 0.0)
    start_f = jnp.where(ok, omega / (2.0 * jnp.pi), 0.0)
    budget = jnp.full(u.shape[:1], PHASOR_STEPS, jnp.int32)
    leave = int(u.shape[0] * PHASOR_LEAVE_SHARE)
    phi0, f, rss, active, left = _phasor_steps(phase, w, tes, start_phi0, start_f, PHASOR_STEPS, budget, leave)
    return phi0, f, sd_f, rss * peak * peak, active.astype(jnp.float32), left.astype(jnp.float32)


@jax.jit
def _field_rows_resume(phase, m, phi0, f, left, tes):
    """The rows :func:`_field_rows` left stepping, to their end: (phi0, f, residual sum of squares)."""
    w, peak = _echo_weights(m)
    phi0, f, rss, _, _ = _phasor_steps(phase, w, tes, phi0, f, PHASOR_STEPS, left, 0)
    return phi0, f, rss * peak * peak


def fit_multi_echo_field(
    magnitude,
    phase,
    echo_times: Sequence[float],
    mask=None,
    *,
    method: FieldMethod = "nonlinear",
    unwrap: str = "romeo",
    voxel_size=(1.0, 1.0, 1.0),
    noise_sigma: float | None = None,
    fix_echo_wraps: bool = True,
) -> FieldFit:
    """Total field (Hz), phase offset and field noise from multi-echo GRE.

    Model: ``S_e = m_e exp(i (phi0 + 2 pi f TE_e))``.

    Parameters
    ----------
    magnitude, phase : (x, y, z, echo) arrays (or 3D for one echo)
        Phase in rad (wrapped or not), chisep's sign convention.
    echo_times : sequence of float, s
    mask : (x, y, z) bool array, optional
        Voxels to fit (all when None; a brain mask is strongly advised).
    method : {"nonlinear", "weighted-linear", "echo-average"}
        ``"nonlinear"``: complex least squares, ``sum_e |S_e - m_e exp(i theta_e)|^2``
        (MEDI's ``Fit_ppm_complex`` with the measured magnitude), by
        :data:`PHASOR_STEPS` Gauss-Newton steps per voxel in one jit-compiled
        pass, started from the weighted-linear fit. It works on the wrapped
        phase, so a wrong 2 pi multiple in one echo does not bias it.
        ``"weighted-linear"``: weighted least squares on the unwrapped phase
        with weights m_e^2 (phase noise variance ~ sigma^2 / m_e^2).
        ``"echo-average"``: per-echo frequencies ``(U_e - phi0) / (2 pi TE_e)``
        (phi0 from the weighted-linear fit) averaged with weights
        ``TE_e m_e``, i.e. ``TE exp(-TE / T2*)`` with the measured decay
        (Wu et al. 2012; the chi-separation toolbox's default).
    unwrap : {"romeo", "laplacian", "none", "temporal-only"}
        Spatial/temporal unwrapping (see :mod:`chisep.qsm.unwrap`); "none" when ``phase``
        was unwrapped elsewhere (ROMEO, another toolbox): it is fitted as given.
        "temporal-only" (:func:`chisep.qsm.unwrap.unwrap_temporal_only`): no spatial
        unwrapping, so the field is right only up to whole cycles between echoes; for
        uses that need no more (the automatic mask's pass over the head), never for QSM.
    voxel_size : 3 floats, mm
    noise_sigma : float, optional
        Known noise standard deviation of the complex signal per real channel
        (magnitude units). Default: estimated from the fit residuals (needs
        >= 3 echoes), else from the background magnitude outside the mask.
    fix_echo_wraps : bool
        Correct patches whose field is off by whole cycles between echoes (k / dTE) by
        the smoothness of the phase offset (default). Off only for a fit whose field is
        used modulo 1 / dTE, e.g. to find the skull from the field's reliability, whose
        criteria do not change under such shifts: in a head, scalp fat's chemical shift
        makes this step the slowest part of the fit.

    Returns
    -------
    FieldFit

    Raises
    ------
    InputError
        NaN/inf in phase or magnitude, shape or echo-count mismatch, invalid
        echo times, empty mask, unknown method.

    Warns
    -----
    UserWarning
        Single echo: the phase offset cannot be separated from the field and
        is assumed 0 (``f = U / (2 pi TE)``). Also when the phase wraps between
        consecutive echoes (``|f| dTE > 0.5``) in more than
        ``ALIASING_WARN_FRACTION`` of the mask: then only spatial unwrapping
        of the echo difference resolves the field; check for unwrapping
        errors, or acquire with shorter echo spacing.

    References
    ----------
    Liu T, Wisnieff C, Lou M, et al. Nonlinear formulation of the magnetic
    field to source relationship for robust quantitative susceptibility
    mapping. Magn Reson Med 2013;69:467-476.
    Wu B, Li W, Avram AV, Gho SM, Liu C. Fast and tissue-optimized mapping of
    magnetic susceptibility and T2* with multi-echo and multi-shot spirals.
    NeuroImage 2012;59:297-305.
    """
    validate.check_choice(method, FIELD_METHODS, "field-fit method")
    if unwrap != TEMPORAL_ONLY:
        UNWRAP_METHODS.get(unwrap)
    mag, ph, tes, msk = _validate(magnitude, phase, echo_times, mask)
    n_echoes = tes.size
    info: dict = {"unwrap": unwrap, "warnings": []}

    if unwrap == TEMPORAL_ONLY:
        u4 = unwrap_temporal_only(ph, tes, msk)
    else:
        u4 = unwrap_phase(ph, msk, method=unwrap, voxel_size=voxel_size, magnitude=mag, echo_times=tes)
    if n_echoes == 1:
        u, m = u4[msk].astype(np.float64), mag[msk].astype(np.float64)
        message = (
            "single echo: the phase offset cannot be separated from the field and is assumed 0 "
            "(f = phase / (2 pi TE)); acquire >= 2 echoes or remove the offset first"
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        info["warnings"].append(message)
        f = u[:, 0] / (_TWO_PI * tes[0])
        phi0 = np.zeros_like(f)
        sigma, source = _sigma_without_residuals(noise_sigma, mag, msk, n_echoes, info)
        with np.errstate(divide="ignore"):
            noise = sigma / (np.maximum(m[:, 0], 1e-30) * _TWO_PI * tes[0])
        info.update(noise_sigma=sigma, noise_source=source, aliased_fraction=0.0)
        return _result(msk, f, phi0, noise, u4, method, info)

    dof = n_echoes - 2
    nonlinear = method == "nonlinear"
    unwrapped = u4[msk]
    tes32 = jnp.asarray(tes, jnp.float32)
    phase_rows, mag_rows = (ph[msk] if nonlinear else unwrapped), mag[msk]
    phi0, f, coef_sd, rss, *stepping = map_rows(_field_rows, (unwrapped, phase_rows, mag_rows),
                                                args=(tes32, nonlinear))
    if stepping and (rows := np.flatnonzero(stepping[0])).size:
        # fixed-size blocks (one compilation), the last padded
        size = max(rows.size, PHASOR_RESUME_BLOCK)
        resumed = map_rows(_field_rows_resume, [np.resize(a[rows], (size,) + a.shape[1:]) for a in
                                                (phase_rows, mag_rows, phi0, f, stepping[1])],
                           args=(tes32,), block=PHASOR_RESUME_BLOCK)
        phi0[rows], f[rows], rss[rows] = (a[: rows.size] for a in resumed)
    phi0, f, coef_sd, rss = (values.astype(np.float64) for values in (phi0, f, coef_sd, rss))
    if method == "echo-average":
        m = mag[msk].astype(np.float64)
        f, coef_var = _echo_average(unwrapped.astype(np.float64), m, tes, phi0, np.maximum(m, 1e-30) ** 2)
        coef_sd = np.sqrt(np.maximum(coef_var, 0.0))

    if fix_echo_wraps:
        f, phi0, n_fixed = _correct_echo_wraps(f, phi0, msk, tes)
        info["wrap_corrected_voxels"] = n_fixed

    if noise_sigma is not None:
        sigma, source = float(noise_sigma), "given"
    elif dof > 0:
        sigma, source = float(np.sqrt(_robust_sigma2(rss, dof))), "residuals"
    else:
        sigma, source = _sigma_without_residuals(None, mag, msk, n_echoes, info)
    noise = sigma * coef_sd
    # counted where the field is measured at all: noise-only voxels (skull, air in a wide mask)
    # have random frequencies and would raise false alarms and pull the global cycle count
    measured = np.isfinite(noise) & (noise <= ALIASING_NOISE_FACTOR * np.median(noise[np.isfinite(noise)]))
    f, phi0, cycles = _centre_whole_cycles(f, phi0, tes, measured)
    info["global_cycle_shift"] = cycles

    max_dte = float(np.max(np.diff(tes)))
    aliased = float(np.mean(np.abs(f[measured]) * max_dte > 0.5)) if measured.any() else 0.0
    if aliased > ALIASING_WARN_FRACTION:
        message = (
            f"the phase wraps between consecutive echoes (|f| * dTE > 0.5, dTE = {max_dte * 1e3:.2f} ms) "
            f"in {100 * aliased:.1f}% of the mask; the field then rests on spatial unwrapping of the "
            "echo difference: check the field map for 2 pi errors or use a shorter echo spacing"
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        info["warnings"].append(message)
    info.update(noise_sigma=sigma, noise_source=source, aliased_fraction=aliased)
    return _result(msk, f, phi0, noise, u4, method, info)


def _echo_average(u, m, tes, phi0, w):
    """Weighted echo average of per-echo frequencies and its variance per unit sigma^2."""
    m = np.maximum(m, 1e-30)  # zero magnitude: equal weights and (huge) finite noise
    weights = tes * m
    weights = weights / weights.sum(-1, keepdims=True)
    per_echo = (u - phi0[:, None]) / (_TWO_PI * tes)
    f = (weights * per_echo).sum(-1)
    # f is linear in the phases, f = sum_k c_k U_k, through the per-echo terms
    # and through phi0 = sum_k b_k U_k (WLS intercept); var = sigma^2 sum c_k^2 / m_k^2
    sw, st, stt, det = _wls_sums(w, tes)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = w * (stt[:, None] - st[:, None] * tes) / det[:, None]
    c = weights / (_TWO_PI * tes) - b * (weights / (_TWO_PI * tes)).sum(-1, keepdims=True)
    coef_var = (c**2 / m**2).sum(-1)
    return f, coef_var


def _sigma_without_residuals(noise_sigma, mag, mask, n_echoes, info):
    if noise_sigma is not None:
        return float(noise_sigma), "given"
    # only here: the float64 root-sum-of-squares of a whole 1 mm head costs ~0.5 s
    mag_rss = np.sqrt(np.sum(mag.astype(np.float64) ** 2, axis=-1))
    sigma = _background_sigma(mag_rss, mask, n_echoes)
    if sigma is not None:
        return sigma, "background"
    message = (
        "cannot estimate the noise level (no residual degrees of freedom and no background "
        "outside the mask); field_noise_hz is relative (sigma = 1); pass noise_sigma for absolute values"
    )
    warnings.warn(message, UserWarning, stacklevel=3)
    info["warnings"].append(message)
    return 1.0, "relative"


def _centre_whole_cycles(f, phi0, tes, measured):
    """Shift the whole field by k / dTE so that its median over ``measured`` voxels lies within +-1/(2 dTE).

    With equally spaced echoes, f + k/dTE and phi0 - 2 pi k TE1/dTE fit every
    echo equally well, so the data cannot fix the global cycle count; spatial
    unwrapping picks it from wherever it starts, and in a mask that reaches
    noise-only skull that can be one cycle off for the whole brain (166.7 Hz
    at dTE 6 ms). The scanner sets its centre frequency on the imaged tissue,
    so the median field is near 0: that decides. Unequal spacing breaks the
    ambiguity, and then nothing is changed. Returns (f, phi0, k).
    """
    spacing = np.diff(tes)
    if spacing.size == 0 or np.ptp(spacing) > 0.01 * spacing.mean() or not measured.any():
        return f, phi0, 0
    dte = float(spacing.mean())
    k = int(np.round(np.median(f[measured]) * dte))
    if k == 0:
        return f, phi0, 0
    return f - k / dte, phi0 + _TWO_PI * k * tes[0] / dte, -k


def _correct_echo_wraps(f, phi0, msk, tes, *, window: int = 7, rounds: int = 10):
    """Fix whole-cycle field errors (f off by k / dTE) using the smoothness of the phase offset.

    Where the phase wraps between echoes (steep fields by the sinuses, 7 T),
    spatial unwrapping of the echo difference can leave a patch whose field
    is off by k / dTE; every echo still fits, so the field alone cannot show
    it. The phase at the first echo is unchanged by such an error, so the
    fitted offset phi0 moves by -2 pi k TE1 / dTE, while the true phi0 is
    smooth in space (coil phase). A voxel whose phi0 disagrees with its
    neighbourhood's circular mean by more than 1 rad, and agrees within
    0.5 rad after a 1/dTE correction, is corrected (when TE1/dTE is near
    1/2 both directions move phi0 alike and the neighbours' field picks
    the direction); rounds grow the
    correction into larger patches. Blind (returns unchanged) when TE1 is a
    multiple of dTE or the echoes are not equally spaced.
    """
    from scipy import ndimage

    spacing = np.diff(tes)
    if spacing.size == 0 or np.ptp(spacing) > 0.01 * spacing.mean():
        return f, phi0, 0
    dte = float(spacing.mean())
    shift = _TWO_PI * tes[0] / dte  # phi0 change for a +1/dTE field error
    if abs(wrap_phase(shift)) < 1.0:
        return f, phi0, 0
    # work in the mask's bounding box (plus the window), in float32: the phases are compared
    # with 0.5-1 rad margins, and the field is corrected by whole multiples of 1/dTE in float64
    box = bounding_box(msk, margin=window)
    inside = msk[box]
    p_map = np.zeros(inside.shape, np.float32)
    p_map[inside] = wrap_phase(phi0)
    k_map = np.zeros(inside.shape, np.int32)  # whole cycles added to the field so far
    weight = ndimage.uniform_filter(inside.astype(np.float32), window)
    shift32 = np.float32(wrap_phase(shift))
    near_half = abs(wrap_phase(2 * shift)) <= 1.0
    if near_half:
        f_map = np.zeros(inside.shape, np.float32)
        f_map[inside] = f
    # the first round judges every voxel; a later one only those within the window of the last round's
    # fixes (the others see the same neighbourhood as before), on the box around them
    sub = tuple(slice(0, n) for n in inside.shape)
    near = None
    for _ in range(rounds):
        p_sub, in_sub = p_map[sub], inside[sub]
        ref = np.arctan2(ndimage.uniform_filter(np.where(in_sub, np.sin(p_sub), 0), window),
                         ndimage.uniform_filter(np.where(in_sub, np.cos(p_sub), 0), window))
        misfit = p_sub - ref
        current = np.abs(wrap_phase(misfit))
        up = np.abs(wrap_phase(misfit - shift32))  # phi0 misfit after f += 1/dTE
        down = np.abs(wrap_phase(misfit + shift32))  # after f -= 1/dTE
        if not near_half:
            k = np.where(up < down, 1, -1).astype(np.int32)
        else:  # TE1/dTE near 1/2: both directions move phi0 alike, the neighbours' field decides
            f_sub = f_map[sub]
            f_ref = ndimage.uniform_filter(np.where(in_sub, f_sub, 0), window) / np.maximum(weight[sub], 1e-12)
            k = np.where(f_sub > f_ref, -1, 1).astype(np.int32)
        candidate = np.where(k > 0, up, down)
        fix = in_sub & (weight[sub] > 0.3) & (current > 1.0) & (candidate < 0.5)
        if near is not None:
            fix &= near
        if not fix.any():
            break
        k_map[sub][fix] += k[fix]
        p_sub[fix] = wrap_phase(p_sub[fix] - k[fix] * shift32)  # p_sub is a view of p_map
        if near_half:
            f_map[sub][fix] += k[fix] / np.float32(dte)
        fixed = np.zeros(inside.shape, bool)
        fixed[sub] = fix
        sub = bounding_box(fixed, margin=window)
        near = ndimage.maximum_filter(fixed[sub], window)
    cycles = k_map[inside].astype(np.float64)
    return f + cycles / dte, phi0 - cycles * shift, int(np.count_nonzero(cycles))


def _result(msk, f, phi0, noise, u4, method, info) -> FieldFit:
    def to_map(values):
        out = np.zeros(msk.shape, dtype=np.float32)
        out[msk] = values
        return out

    return FieldFit(
        field_hz=to_map(f),
        phase_offset=to_map(wrap_phase(phi0)),
        field_noise_hz=to_map(noise),
        mask=msk,
        method=method,
        info=info,
        unwrapped=u4,
    )


__all__ = ["FIELD_METHODS", "FieldFit", "fit_multi_echo_field"]
