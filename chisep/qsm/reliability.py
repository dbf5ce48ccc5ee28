"""Which voxels of a mask carry a usable field: the reconstruction region of every later stage.

Cortical bone, air and sinuses give gradient-echo signal at the noise level,
so their phase is noise and their fitted field is off by tens to hundreds of
Hz, while the brain's local field is about 1 Hz. One such voxel inside the
region that background removal works on spreads its error over the whole
brain (SHARP-type filters and the deconvolution that follows carry it far).
Masks from thresholds or BET routinely reach a voxel or two into skull, so
the field itself has to say which voxels to trust.

A voxel is *unreliable* when any of three per-voxel statistics of the
multi-echo fit stands out from its median over the mask, or when its echo
spread stands out from the spread its own noise would give:

- ``field_noise``: the standard error of the fitted field (Hz), large where
  the magnitude is at the noise level (noise-only bone, air);
- ``echo_spread``: the magnitude-weighted spread (Hz) of the frequencies
  between consecutive echoes, ``angle(S_e+1 conj(S_e)) / (2 pi dTE_e)``: one
  field makes them all equal, so a spread means the phase is not linear in
  TE (intra-voxel dephasing where bone, scalp or air share a voxel with
  tissue; its field is then biased rather than noisy);
- ``decay_residual``: the relative residual of a mono-exponential fit to the
  magnitude (partial volume of compartments that decay at different rates);
- ``echo_spread_over_noise`` (when the magnitude's noise sigma is known): the
  echo spread in units of the spread that noise alone gives the voxel
  (:func:`echo_spread_noise_hz`). The medians above follow the noise: at SNR
  30 the brain's echo spread is noise, 10x its median (17 Hz) lies above the
  systematic spread of partial-volume bone (10-18 Hz at 3 T), and the automatic
  mask leaked through the skull into muscle and fat (chi NRMSE 229 %). Measured
  against its own noise, that bone stands out at any SNR.

This follows SEPIA's exclusion of voxels with a large relative fit residual
from background removal and QSMxT's reliability masking (Stewart et al., MRM
2022;87:1289); the thresholds were chosen by measurement on simulated heads
with noise-only skull and intra-voxel dephasing (benchmarks/bench_reliability.py).

Unreliable voxels enclosed by reliable tissue (bleeds, calcifications, large
veins: dark because their strong susceptibility dephases the signal) are the
strongest sources in the brain and must not be cut out of chi. Their field
still holds the information that shapes them (the field inside a uniformly
magnetised sphere is zero, the dipole pattern starts at its surface), and
left out with zero weight their susceptibility gets smeared over the gap by
the prior (measured: chi NRMSE 37 -> 85 % on a phantom with a calcified
lesion and microbleeds). So they stay in the reconstruction region, and the
inversion down-weights them by their field noise, as MEDI does. Only
unreliable voxels connected to the outside of the mask (skull, sinus, air,
scalp partial volume) are excluded.

At the mask's edge a voxel holding fat or bone can pass every statistic and
still carry a field a whole wrap between echoes away from its neighbours'
(marrow with echoes that keep fat nearly in phase: 190-210 Hz off at 4, 9,
..., 29 ms). When the field is spatially unwrapped, such voxels in the mask's
outer 4 mm (``edge_off_branch``, :func:`edge_off_branch`) are unreliable too:
on head B at 2 mm, SNR 30, they took chi NRMSE from 55.8 to 42.0 %.

The noise weight is not enough where a dark source's dephased signal put its
fitted field on the wrong phase branch (hundreds of Hz off): even a weight of
a few per cent lets such a value dominate the data term, and background
removal, a filter, spreads it into the neighbours (measured on a realistic head
with B0 30 degrees oblique: chi NRMSE 77 % with the noise weights alone, 43 %
without those voxels' field; benchmarks/bench_head.py --tilt-axis y). Those voxels
(``off_branch``: further than half a wrap from the harmonic bridge of their
reliable neighbours) keep their place in the region but their field is not
used: the pipeline gives them no weight, and background removal fills their
field from the neighbours (:func:`chisep.grid.harmonic_fill`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from chisep import validate
from chisep.errors import InputError
from chisep.fit import map_rows, weighted_line
from chisep.grid import bounding_box, distance_within, fill_holes, harmonic_fill
from chisep.physics import wrap_phase_jax

#: factor over the median in the mask above which a statistic marks a voxel unreliable; for
#: ``low_signal`` the first-echo magnitude in units of the noise sigma below which a voxel is
#: noise only (Rayleigh noise: 99 % of noise-only voxels lie below 3 sigma). Median-relative
#: factors alone are SNR-dependent: at SNR 30 noise-only bone has only 12x the brain's echo
#: spread, and most of it passed (benchmarks/bench_head.py --snr 30). ``echo_spread_over_noise`` is in
#: units of the voxel's own noise spread too: in brain (noise only) its 99.99th percentile was 2.8.
#: ``edge_off_branch`` (:func:`edge_off_branch`) flags edge voxels more than 1 / factor of a wrap between
#: echoes from the brain's field just inside them: 2, half a wrap, where the nearest branch changes.
DEFAULT_FACTORS = {"low_signal": 3.0, "field_noise": 10.0, "echo_spread": 10.0, "decay_residual": 10.0,
                   "echo_spread_over_noise": 4.0, "edge_off_branch": 2.0}
#: the criteria whose factor is in noise units (absolute), not a multiple of the median in the mask
NOISE_UNIT_CRITERIA = ("low_signal", "echo_spread_over_noise")
#: the criteria whose factor multiplies their median in the mask (or in ``reference_masks``)
MEDIAN_CRITERIA = ("field_noise", "echo_spread", "decay_residual")
CRITERIA = tuple(DEFAULT_FACTORS)
#: an enclosed unreliable voxel whose field is further than this fraction of a wrap between echoes
#: (1 / echo spacing) from the harmonic bridge of its reliable neighbours is on the wrong branch.
#: Half a wrap is where the nearest branch changes. Chosen on head A at 2 mm with B0 30 degrees
#: oblique (chi NRMSE 76.6 % with the noise weights alone): 0.25 -> 44.9 %, 0.5 -> 42.9 %,
#: 0.75 -> 43.7 %, 1.0 -> 46.0 %, every enclosed voxel unused 49.0 %.
BRANCH_TOLERANCE = 0.5


@dataclass(frozen=True)
class Reliability:
    """Result of :func:`field_reliability` (all maps (x, y, z) bool on the input grid).

    Attributes
    ----------
    region : the reconstruction region: the mask minus the excluded voxels
    excluded : unreliable voxels connected to the outside of the mask (skull, air, noise):
        left out of background removal and of everything after it
    enclosed : unreliable voxels enclosed by reliable ones (dark sources inside the brain):
        kept in ``region``, down-weighted by their field noise
    off_branch : the enclosed voxels whose field departs from the harmonic bridge over them
        (:func:`chisep.grid.harmonic_fill` from the reliable neighbours) by more than
        :data:`BRANCH_TOLERANCE` of a wrap between echoes: their field is taken to be on the
        wrong phase branch and is not used (the pipeline gives it no weight)
    flagged_by : dict criterion -> bool map of the voxels that criterion flagged
    statistics : dict criterion -> float32 map (0 outside the mask)
    thresholds : dict criterion -> threshold used (Hz for field_noise, echo_spread and
        edge_off_branch, relative for decay_residual, noise units for low_signal and
        echo_spread_over_noise), None when the criterion was off or could not rank voxels
    voxel_volume_ml : float, mL per voxel
    """

    region: np.ndarray
    excluded: np.ndarray
    enclosed: np.ndarray
    off_branch: np.ndarray
    flagged_by: dict
    statistics: dict
    thresholds: dict
    voxel_volume_ml: float
    info: dict = field(default_factory=dict)

    def volume_ml(self, voxels: np.ndarray) -> float:
        return float(np.count_nonzero(voxels)) * self.voxel_volume_ml

    def excluded_ml_by_criterion(self) -> dict[str, float]:
        """mL of the excluded voxels that each criterion flagged (a voxel may count for several)."""
        return {name: self.volume_ml(sel & self.excluded) for name, sel in self.flagged_by.items()}

    def record(self) -> dict:
        """What was done, for the provenance: volumes (mL), factors, thresholds, voxel counts."""
        return {"excluded_ml": round(self.volume_ml(self.excluded), 3),
                "enclosed_kept_ml": round(self.volume_ml(self.enclosed), 3),
                "enclosed_off_branch_ml": round(self.volume_ml(self.off_branch), 3),
                "excluded_ml_by_criterion": {k: round(v, 3) for k, v in self.excluded_ml_by_criterion().items()},
                **self.info}

    def summary(self) -> str:
        """One line for the log: the volume excluded and why."""
        if not (self.excluded.any() or self.enclosed.any()):
            return "reliability: every voxel of the mask has a usable field"
        excluded = self.excluded
        parts = ", ".join(f"{name} {ml:.1f}" for name, ml in self.excluded_ml_by_criterion().items() if ml > 0)
        mask_ml = self.volume_ml(self.region | excluded)
        off_branch = (f", {self.volume_ml(self.off_branch):.2f} mL of them with a field off by phase wraps "
                      "(not used)") if self.off_branch.any() else ""
        return (f"reliability: excluded {self.volume_ml(excluded):.1f} mL of the {mask_ml:.0f} mL mask as "
                f"unreliable (mL by criterion: {parts or 'none'}); kept {self.volume_ml(self.enclosed):.1f} mL of "
                f"unreliable voxels enclosed by brain (dark sources), down-weighted by their field noise{off_branch}")


def echo_spread_hz(magnitude: np.ndarray, phase: np.ndarray, echo_times: np.ndarray,
                   field_hz: np.ndarray | None = None) -> np.ndarray:
    """Magnitude-weighted standard deviation (Hz) of the consecutive-echo frequencies, per voxel.

    Parameters
    ----------
    magnitude, phase : (n, echo) arrays (phase in rad, wrapped or not)
    echo_times : (echo,) s
    field_hz : (n,) array, Hz, optional
        The fitted field. Each pair's frequency is taken on the branch nearest
        to it, so that a field beyond +-1/(2 dTE) (wrapping between echoes,
        long or unequal echo spacings) is not mistaken for a spread.

    Returns
    -------
    (n,) float64, 0 for fewer than 3 echoes (one pair has no spread)
    """
    if magnitude.shape[-1] < 3:
        return np.zeros(magnitude.shape[:-1])
    reference = np.zeros(magnitude.shape[:-1], np.float32) if field_hz is None else field_hz
    dte = np.diff(np.asarray(echo_times, np.float64)).astype(np.float32)
    # float32 is ample: the statistic is compared with ten times its median
    return map_rows(_echo_spread_rows, (magnitude, phase, reference), args=(jnp.asarray(dte),)).astype(np.float64)


@jax.jit
def _echo_spread_rows(mag, ph, reference, dte):
    # Each pair's phase change relative to the fitted field's, wrapped to [-pi, pi): the angle of
    # s[e+1] conj(s[e]) exp(-i turn), in real arithmetic
    delta = wrap_phase_jax(ph[:, 1:] - ph[:, :-1] - (2.0 * jnp.pi) * reference[:, None] * dte)
    freq = delta / ((2.0 * jnp.pi) * dte)  # relative to the fitted field (a spread ignores it)
    w = mag[:, 1:] * mag[:, :-1]
    w_sum = jnp.maximum(w.sum(-1), 1e-30)
    mean = (w * freq).sum(-1) / w_sum
    return jnp.sqrt((w * (freq - mean[:, None]) ** 2).sum(-1) / w_sum)


def echo_spread_noise_hz(magnitude: np.ndarray, echo_times: np.ndarray, noise_sigma) -> np.ndarray:
    """The echo spread (Hz) that noise alone gives a voxel: the scale :func:`echo_spread_hz` has on noise.

    Complex noise of per-channel SD sigma puts a phase noise of about sigma / m on an
    echo of magnitude m (m >> sigma), so the frequency of the pair (e, e+1) has the
    variance ``v_e = sigma^2 (1 / m_e^2 + 1 / m_e+1^2) / (2 pi dTE_e)^2``. This returns
    ``sqrt(sum_e w_e v_e / sum_e w_e)`` with the spread's weights ``w_e = m_e m_e+1``. On
    noise only, the spread divided by it has a median near 0.9 (correlated pairs and the
    weighted mean's lost degree of freedom); it is a scale, not an expectation.

    Parameters
    ----------
    magnitude : (n, echo) array
    echo_times : (echo,) s
    noise_sigma : float or (n,) array, per-channel noise SD in the magnitude's units

    Returns
    -------
    (n,) float64; inf where an echo's magnitude is zero, 0 for fewer than 3 echoes
    """
    if magnitude.shape[-1] < 3:
        return np.zeros(magnitude.shape[:-1])
    # float32: a scale compared with a factor of 4 (float64 NumPy took 1.7 s over a 1 mm head)
    per_pair = (1.0 / (2.0 * np.pi * np.diff(np.asarray(echo_times, np.float64))) ** 2).astype(np.float32)
    sigma = np.broadcast_to(np.asarray(noise_sigma, np.float32), magnitude.shape[:-1])
    return map_rows(_echo_spread_noise_rows, (magnitude, sigma), args=(jnp.asarray(per_pair),)).astype(np.float64)


@jax.jit
def _echo_spread_noise_rows(m, sigma, per_pair):
    early, late = m[:, :-1], m[:, 1:]
    # w_e v_e without dividing by m^2: sigma^2 (m_e+1 / m_e + m_e / m_e+1) / (2 pi dTE)^2
    ratio = late / early
    wv = ((ratio + 1.0 / ratio) * per_pair).sum(-1)
    scale = jnp.sqrt(wv / (early * late).sum(-1)) * sigma
    # a zero magnitude makes a ratio 0 or inf (or nan): no finite scale
    return jnp.where(jnp.isfinite(scale), scale, jnp.inf)


def decay_residual(magnitude: np.ndarray, echo_times: np.ndarray) -> np.ndarray:
    """Relative residual of a mono-exponential fit to the magnitude, ``||m - fit|| / ||m||``.

    The fit is a log-linear least squares weighted by m^2 (the noise variance of
    log m is sigma^2 / m^2), as :func:`chisep.relax.loglinear_fit`, here in float32
    on each voxel's magnitudes scaled to a maximum of 1 and echo times centred on
    their mean, so that the normal equations stay well conditioned (float64 took
    1.5 s per pass at 1 mm). Returns 0 for fewer than 3 echoes (two points fit
    exactly) and 1 where the magnitude is all zero.
    """
    if magnitude.shape[-1] < 3:
        return np.zeros(magnitude.shape[:-1])
    t = np.asarray(echo_times, np.float64)
    t = ((t - t.mean()) / max(float(np.ptp(t)), 1e-30)).astype(np.float32)
    return map_rows(_decay_residual_rows, (magnitude,), args=(jnp.asarray(t),)).astype(np.float64)


@jax.jit
def _decay_residual_rows(m, t):
    peak = m.max(-1, keepdims=True)
    s = m / jnp.where(peak > 0, peak, 1.0)
    # zeros get a tiny floor: with weights s^2 they then carry no weight
    s_floored = jnp.maximum(s, 1e-18)
    y = jnp.log(s_floored)
    intercept, slope, _, _ = weighted_line(s_floored * s_floored, y, t)
    slope = jnp.where(jnp.isfinite(slope), slope, 0.0)
    intercept = jnp.where(jnp.isfinite(intercept), intercept, 0.0)
    fit = jnp.exp(jnp.minimum(intercept[:, None] + slope[:, None] * t, 80.0))
    energy = (s * s).sum(-1)
    residual = jnp.sqrt(((s - fit) ** 2).sum(-1) / energy)
    return jnp.where(energy > 0, residual, 1.0)


#: depth (mm) of the mask's outer band that :func:`edge_off_branch` checks, and the number of times it
#: peels: at 2 mm one round took all 273 off-branch voxels of the leak case (head B, SNR 30, echoes
#: 4-29 ms, seed 11); at 3 mm (head B, SNR 30, seed 0) rounds 2 to 4 took 110 more behind the first 446
#: (chi NRMSE 97.1 -> 62.3 %).
EDGE_DEPTH_MM = 4.0
EDGE_ROUNDS = 4


def edge_off_branch(field_hz, mask, trusted, *, voxel_size=(1.0, 1.0, 1.0), tolerance_hz: float,
                    depth_mm: float = EDGE_DEPTH_MM, rounds: int = EDGE_ROUNDS) -> np.ndarray:
    """Voxels of the mask's outer band whose field is on another branch than the brain's inside it.

    The band is the voxels within ``depth_mm`` of the mask's outside. Each is compared with the
    field of the ``trusted`` voxels deeper than the band around it, extrapolated by a plane fitted
    with Gaussian weights (SD ``depth_mm / 2``: mostly the nearest ones, up to twice ``depth_mm``
    away; a band voxel without such neighbours is not judged). More than ``tolerance_hz`` apart
    (half a wrap between echoes in the pipeline), its field is taken to be on the wrong branch.
    The background field changes by 10-20 Hz/mm next to sinuses, which the plane follows; a wrong
    branch is off by a whole wrap (1 / echo spacing, 100-300 Hz). Once those voxels are out, the
    band moves inwards and the check repeats, up to ``rounds`` times. A patch on the wrong branch
    much thicker than the band is found only in part: its deeper voxels count in the reference.
    Compact sources inside the brain (calcifications, bleeds) have fields of hundreds of Hz next
    to them; they are not in the band (see :func:`field_reliability`'s ``off_branch`` for them).

    Parameters
    ----------
    field_hz : (x, y, z) array, Hz, spatially unwrapped
    mask, trusted : (x, y, z) bool; ``trusted`` (voxels with a reliable field) within ``mask``
    voxel_size : 3 floats, mm
    tolerance_hz, depth_mm : float
    rounds : int

    Returns
    -------
    (x, y, z) bool, the voxels of ``mask`` taken to be on the wrong branch
    """
    msk = np.asarray(mask, dtype=bool)
    flagged = np.zeros_like(msk)
    if not msk.any():
        return flagged
    vs = np.asarray(voxel_size, dtype=np.float64)
    inside = msk.copy()
    field = np.asarray(field_hz, np.float32)
    trust = np.asarray(trusted, dtype=bool)
    # first round on the mask's box (its one-voxel rim holds the outside nearest to any voxel)
    box, near_new = bounding_box(msk, margin=1), None
    for _ in range(rounds):
        new = _off_branch_in_band(field[box], inside[box], trust[box], vs, tolerance_hz, depth_mm)
        if near_new is not None:  # near the last round's voxels: only there can the verdict change
            new &= near_new
        if not new.any():
            break
        new_full = np.zeros_like(msk)
        new_full[box] = new
        flagged |= new_full
        inside &= ~new_full
        # the next round: voxels within 3 depths of these can change (their band or their deeper
        # neighbours moved); their depth and reference need 3 more depths of correct context
        reach = int(np.max(np.ceil(3.0 * depth_mm / vs)))
        box = bounding_box(new_full, margin=2 * reach + 1)
        near_new = np.isfinite(distance_within(~new_full[box], vs, 3.0 * depth_mm, border_outside=False))
    return flagged


def _off_branch_in_band(field, inside, trusted, vs, tolerance_hz, depth_mm):
    """One round of :func:`edge_off_branch` on a box around ``inside``."""
    band = inside & np.isfinite(distance_within(inside, vs, depth_mm, border_outside=False))
    deeper = inside & trusted & ~band
    if not (band.any() and deeper.any()):
        return np.zeros_like(inside)
    reference, judged = _linear_extrapolation(field, deeper, band, vs, sigma_mm=0.5 * depth_mm)
    return judged & (np.abs(field - reference) > tolerance_hz)


def _linear_extrapolation(field, known, wanted, vs, *, sigma_mm):
    """At each ``wanted`` voxel, the value of a plane fitted to the ``known`` voxels' field around it.

    First-order normalised convolution (Knutsson and Westin, CVPR 1993): weighted least squares of
    ``f(q) = a + g . (q - p)`` over the known voxels q, with Gaussian weights of SD ``sigma_mm`` in
    ``q - p`` (truncated at 4 SD); ``a`` is the value at p. A plane, not a mean: next to sinuses the
    background changes by 10-20 Hz/mm, and a mean of the field 4-8 mm deeper missed it by over 100 Hz
    (9 voxels of cortex flagged on head A at 1 mm). The separable moments cost 28 one-dimensional
    passes. Returns the extrapolated field and the wanted voxels with enough known neighbours.
    """
    radius = [int(np.ceil(4.0 * sigma_mm / v)) for v in vs]
    kernels = []  # per axis: the Gaussian times displacement^0, ^1, ^2 (mm)
    for axis in range(3):
        u = np.arange(-radius[axis], radius[axis] + 1) * vs[axis]
        g = np.exp(-0.5 * (u / sigma_mm) ** 2)
        kernels.append([(g * u**power).astype(np.float32) for power in range(3)])

    def moments(image, orders):
        """{(a, b, c): sum_q w (dx^a dy^b dz^c) image(q)} for the orders given, sharing passes."""
        out, along_x, along_xy = {}, {}, {}
        for a, b, c in orders:
            if a not in along_x:
                along_x[a] = ndimage.correlate1d(image, kernels[0][a], axis=0, mode="constant")
            if (a, b) not in along_xy:
                along_xy[a, b] = ndimage.correlate1d(along_x[a], kernels[1][b], axis=1, mode="constant")
            out[a, b, c] = ndimage.correlate1d(along_xy[a, b], kernels[2][c], axis=2, mode="constant")[wanted]
        return out

    basis = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1))
    second = [tuple(np.add(i, j)) for n, i in enumerate(basis) for j in basis[n:]]
    known32 = known.astype(np.float32)
    # three chains of 9-10 passes on two threads (scipy's filters release the GIL): 0.9 -> 0.6 s at 1 mm
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(moments, known32, [o for o in second if o[0] == 0]),
                pool.submit(moments, known32, [o for o in second if o[0] > 0]),
                pool.submit(moments, np.where(known, field, np.float32(0.0)).astype(np.float32), basis)]
        weight_moments = {**jobs[0].result(), **jobs[1].result()}
        field_moments = jobs[2].result()
    total = weight_moments[0, 0, 0]
    judged = total > 1e-3  # known voxels within reach (one known voxel 3.7 SD away weighs 1e-3)
    n = int(np.count_nonzero(wanted))
    normal = np.empty((n, 4, 4), np.float64)
    for i, bi in enumerate(basis):
        for j, bj in enumerate(basis):
            normal[:, i, j] = weight_moments[tuple(np.add(bi, bj))]
    # a small ridge on the slope: where the known voxels do not fix it (a thin layer), the plane
    # tends to the weighted mean rather than to noise
    ridge = 1e-3 * sigma_mm**2 * np.maximum(total, 1e-30)
    for k in range(1, 4):
        normal[:, k, k] += ridge
    rhs = np.stack([field_moments[b] for b in basis], axis=-1).astype(np.float64)
    at = tuple(index[judged] for index in np.nonzero(wanted))
    reference = np.zeros(field.shape, np.float32)
    reference[at] = np.linalg.solve(normal[judged], rhs[judged][..., None])[:, 0, 0]
    judged_map = np.zeros(field.shape, bool)
    judged_map[at] = True
    return reference, judged_map


def mask_core(mask, fraction: float = 0.5) -> np.ndarray:
    """The ``fraction`` of the mask's voxels farthest from its edge (for a head mask: brain, not scalp)."""
    msk = np.asarray(mask, dtype=bool)
    if not msk.any():
        return msk.copy()
    # on the mask's box with a one-voxel rim: the nearest outside voxel is always within it
    box = bounding_box(msk, margin=1)
    depth = ndimage.distance_transform_edt(msk[box])
    core = np.zeros_like(msk)
    core[box] = msk[box] & (depth >= np.quantile(depth[msk[box]], 1.0 - fraction))
    return core


def _reused(earlier: "Reliability", name: str, mask: np.ndarray) -> np.ndarray:
    """``earlier.statistics[name]`` on ``mask``, which must lie within the earlier mask."""
    earlier_mask = earlier.region | earlier.excluded
    if earlier_mask.shape != mask.shape or (mask & ~earlier_mask).any():
        raise InputError(f"field_reliability: reuse holds {name} over a mask that does not contain this one; "
                         "pass the result of a call over a larger mask of the same data, or none")
    return earlier.statistics[name][mask].astype(np.float64)


def check_factors(factors: dict | None) -> dict:
    """The factors per criterion: the defaults updated by ``factors`` (None or "off" = criterion off)."""
    chosen = dict(DEFAULT_FACTORS)
    for name, value in (factors or {}).items():
        if name not in DEFAULT_FACTORS:
            raise InputError(f"unknown reliability criterion {name!r}; choose from {', '.join(CRITERIA)}")
        if value == "off":
            value = None
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1):
            unit = ("in noise units" if name in NOISE_UNIT_CRITERIA else "times the median in the mask"
                    if name in MEDIAN_CRITERIA else "1 / factor of a wrap between echoes")
            raise InputError(f"reliability factor {name}={value!r} must be a number > 1 ({unit}), "
                             "or None / \"off\" to switch the criterion off")
        chosen[name] = value
    return chosen


def field_reliability(magnitude, phase, echo_times, mask, *, field_noise_hz, field_hz=None,
                      voxel_size=(1.0, 1.0, 1.0), factors: dict | None = None,
                      noise_sigma=None, reference_masks: dict | None = None,
                      field_unwrapped: bool = True, reuse: "Reliability | None" = None) -> Reliability:
    """Split a mask into voxels with a reliable field and the rest.

    Parameters
    ----------
    magnitude, phase : (x, y, z, echo) arrays; phase in rad (wrapped is fine)
    echo_times : sequence of float, s
    mask : (x, y, z) bool, the voxels the field was fitted in
    field_noise_hz : (x, y, z) array, Hz, the field's standard error (e.g. ``FieldFit.field_noise_hz``);
        non-finite values are unreliable
    field_hz : (x, y, z) array, Hz, optional
        The fitted total field (``FieldFit.field_hz``): the echo-pair frequencies are
        taken on its branch (needed when the phase wraps between echoes)
    voxel_size : 3 floats, mm (for volumes in mL)
    noise_sigma : float or (x, y, z) array, optional
        Per-channel noise SD of the magnitude (e.g. MP-PCA's); enables ``low_signal``
        (a voxel whose first-echo magnitude is below ``factor`` sigma is noise only) and
        ``echo_spread_over_noise`` (a voxel whose echo spread is more than ``factor`` times
        the spread its noise gives, :func:`echo_spread_noise_hz`, is not one field).
    reference_masks : dict, optional
        Per criterion (``field_noise``, ``echo_spread``, ``decay_residual``), the voxels whose
        median sets its threshold (default: the whole mask). For a head mask's ``echo_spread``
        pass its brain-like core (:func:`mask_core`): the multi-peak signal of scalp fat makes
        the frequencies between echoes differ by an amount that depends on the echo times.
    field_unwrapped : bool
        Whether ``field_hz`` is spatially unwrapped (neighbours on one branch). Only then are
        the branch checks made (``off_branch``, and ``edge_off_branch`` in ``flagged_by``:
        :func:`edge_off_branch`); a field unwrapped in time alone is right only up to whole
        wraps between echoes from voxel to voxel.
    reuse : Reliability, optional
        The result of an earlier call on the same magnitude over a mask holding this one (the
        automatic mask's pass over the head): its decay residual, which depends on the magnitude
        alone, is taken instead of computed again (0.6 s at 1 mm).
    factors : dict, optional
        Per criterion (``low_signal``, ``field_noise``, ``echo_spread``, ``decay_residual``,
        ``echo_spread_over_noise``, ``edge_off_branch``), the factor over its median in the mask
        (in noise units for :data:`NOISE_UNIT_CRITERIA`; ``edge_off_branch``: 1 / factor of a
        wrap between echoes) beyond which a voxel is unreliable;
        ``None``, ``"off"`` or ``inf`` switches a criterion off. Defaults: :data:`DEFAULT_FACTORS`.

    Returns
    -------
    Reliability

    Raises
    ------
    InputError
        Unknown criterion, a factor not above 1, shape mismatch, empty mask, or
        a mask in which every voxel would be unreliable.
    """
    chosen = check_factors(factors)
    msk = np.asarray(mask, dtype=bool)
    mag = np.asarray(magnitude, dtype=np.float32)
    ph = np.asarray(phase, dtype=np.float32)
    if mag.ndim == 3:
        mag, ph = mag[..., None], ph[..., None]
    noise = np.asarray(field_noise_hz, dtype=np.float64)
    field = np.zeros(msk.shape) if field_hz is None else np.asarray(field_hz, dtype=np.float64)
    if mag.shape != ph.shape or mag.shape[:3] != msk.shape or noise.shape != msk.shape or field.shape != msk.shape:
        raise InputError(f"field_reliability: magnitude {mag.shape}, phase {ph.shape}, mask {msk.shape}, "
                         f"field_noise_hz {noise.shape} and field_hz {field.shape} must share the (x, y, z) grid")
    if not msk.any():
        raise InputError("field_reliability: the mask is empty; pass the mask the field was fitted in")
    tes = np.asarray(echo_times, dtype=np.float64)

    rows = mag[msk]  # (voxel, echo), gathered once for every statistic
    spread = echo_spread_hz(rows, ph[msk], tes, field[msk])
    if noise_sigma is not None:
        sigma = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float64), msk.shape)[msk]
        snr = np.where(sigma > 0, rows[:, 0] / np.where(sigma > 0, sigma, 1.0), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            spread_noise = echo_spread_noise_hz(rows, tes, sigma)
            # 0 where the noise scale is unknown or infinite (no signal: low_signal's voxels)
            over_noise = np.where((spread_noise > 0) & np.isfinite(spread_noise), spread / spread_noise, 0.0)
    else:
        snr = np.full(int(msk.sum()), np.inf)
        over_noise = np.zeros(int(msk.sum()))
    values = {
        "low_signal": snr,
        "field_noise": np.where(np.isfinite(noise[msk]), noise[msk], np.inf),
        "echo_spread": spread,
        "decay_residual": (decay_residual(rows, tes) if reuse is None
                           else _reused(reuse, "decay_residual", msk)),
        "echo_spread_over_noise": over_noise,
    }
    flagged, statistics, thresholds = {}, {}, {}
    # the voxels whose median sets the thresholds (narrowed below to voxels with signal)
    reference = np.ones(int(msk.sum()), bool)
    restricted = {}
    for name, ref in (reference_masks or {}).items():
        if name not in MEDIAN_CRITERIA:
            raise InputError(f"reference_masks: unknown criterion {name!r}; choose from field_noise, "
                             "echo_spread, decay_residual")
        restricted[name] = validate.as_mask(ref, msk.shape, name=f"reference_masks[{name!r}]")[msk]
        if not restricted[name].any():
            raise InputError(f"field_reliability: reference_masks[{name!r}] has no voxel inside the mask")
    for name, v in values.items():  # low_signal and field_noise first: they narrow the medians' reference
        stat = np.zeros(msk.shape, np.float32)
        stat[msk] = np.where(np.isfinite(v), v, np.finfo(np.float32).max)
        statistics[name] = stat
        factor = chosen[name]
        if name in NOISE_UNIT_CRITERIA:  # absolute levels in noise units, not multiples of the median
            usable = factor is not None and np.isfinite(factor) and noise_sigma is not None
            usable = usable and (name == "low_signal" or tes.size >= 3)
            thresholds[name] = float(factor) if usable else None
            if thresholds[name] is None:
                sel = np.zeros(v.shape, bool)
            else:  # low_signal: too little signal; echo_spread_over_noise: too much spread for the noise
                sel = v < factor if name == "low_signal" else v > factor
            flag = np.zeros(msk.shape, bool)
            flag[msk] = sel
            flagged[name] = flag
            if name == "low_signal" and (reference & ~sel).any():
                reference = reference & ~sel
            continue
        used = reference & restricted[name] if name in restricted else reference
        if not used.any():  # the given reference is all noise: its own median is all there is
            used = restricted[name]
        finite = v[np.isfinite(v) & used]
        if factor is None or not np.isfinite(factor) or finite.size == 0 or not np.median(finite) > 0:
            # a statistic that is zero at the median (too few echoes, noiseless data) cannot rank voxels
            sel = ~np.isfinite(v) if name == "field_noise" else np.zeros(v.shape, bool)
            thresholds[name] = None
        else:
            thresholds[name] = float(factor * np.median(finite))
            sel = ~(v <= thresholds[name])
        flag = np.zeros(msk.shape, bool)
        flag[msk] = sel
        flagged[name] = flag
        if name == "field_noise" and not (sel | ~reference).all():
            # A mask reaching far into noise-only skull or air would lift the medians of the
            # other statistics and loosen their thresholds: take them over the voxels with signal.
            reference = reference & ~sel
    unreliable = np.logical_or.reduce(list(flagged.values())) & msk
    vs = validate.check_voxel_size(voxel_size)
    # both branch checks (at the edge and for enclosed voxels) need a spatially unwrapped field and a
    # wrap to measure it in: 1 / the shortest echo spacing
    branch_checks = field_hz is not None and field_unwrapped and tes.size >= 2
    echo_spacing = float(np.min(np.diff(np.sort(tes)))) if branch_checks else None
    edge_factor = chosen["edge_off_branch"]
    flagged["edge_off_branch"] = np.zeros(msk.shape, bool)
    thresholds["edge_off_branch"] = None
    if branch_checks and not unreliable.all() and edge_factor is not None and np.isfinite(edge_factor):
        # A voxel at the mask's edge with fat or bone in it can pass every statistic and still sit a
        # whole wrap off its neighbours (echoes whose spacing keeps fat nearly in phase: marrow
        # 190-210 Hz off at 4, 9, ..., 29 ms); background removal spreads it over the brain.
        # The edge is that of the reliable voxels with their holes filled: unreliable voxels at the
        # mask's edge (skull) go anyway, enclosed ones (dark sources) must not make an inner surface.
        trusted = msk & ~unreliable
        thresholds["edge_off_branch"] = 1.0 / (edge_factor * echo_spacing)
        flagged["edge_off_branch"] = edge_off_branch(field, fill_holes(trusted), trusted,
                                                     voxel_size=vs, tolerance_hz=thresholds["edge_off_branch"])
        unreliable = unreliable | flagged["edge_off_branch"]
    reliable = msk & ~unreliable
    if not reliable.any():
        raise InputError("every voxel of the mask has an unreliable field (noise-level magnitude or a phase "
                         "that is not linear in TE); check that magnitude and phase belong together and "
                         "that the mask covers the head")
    enclosed = unreliable & fill_holes(reliable)
    excluded = unreliable & ~enclosed
    off_branch = np.zeros(msk.shape, bool)
    if branch_checks and enclosed.any():
        # The phase fixes the field only up to whole wraps between echoes; a dark source's dephased
        # signal often lands on the wrong branch (measured: 100-400 Hz off next to a calcified
        # lesion with B0 30 degrees oblique). The background field is harmonic and a compact
        # source's own field is small inside it, so the reliable neighbours' harmonic bridge is
        # the nearest plausible branch; more than half a wrap from it, the fitted value is wrong.
        bridge = harmonic_fill(field, reliable, enclosed)
        off_branch = enclosed & (np.abs(field - bridge) > BRANCH_TOLERANCE / echo_spacing)
    info = {"factors": dict(chosen), "thresholds": thresholds,
            "excluded_voxels": int(excluded.sum()), "enclosed_voxels": int(enclosed.sum())}
    return Reliability(region=msk & ~excluded, excluded=excluded, enclosed=enclosed, off_branch=off_branch,
                       flagged_by=flagged,
                       statistics=statistics, thresholds=thresholds, voxel_volume_ml=float(np.prod(vs)) / 1000.0,
                       info=info)


__all__ = ["CRITERIA", "DEFAULT_FACTORS", "MEDIAN_CRITERIA", "NOISE_UNIT_CRITERIA", "Reliability", "check_factors",
           "decay_residual", "edge_off_branch", "echo_spread_hz", "echo_spread_noise_hz", "field_reliability"]
