"""Multi-echo gradient-echo (GRE) signal simulation from a head phantom.

Signal model per voxel and echo (spoiled steady state, static dephasing):

    S(TE) = M0 sin(a) (1 - E1) / (1 - cos(a) E1) * exp(-R2* TE) * prod_i sinc(g_i TE)
            * exp(i (phi0 + 2 pi f TE))

with E1 = exp(-TR / T1), R2* = R2 + Dr_para chi_para + Dr_dia chi_dia (the
chi-separation relation, Shin et al., NeuroImage 2021) and f the total field
offset in Hz: f = CF * 1e-6 * (D * chi), computed from the whole head
(tissue, bone, sinus air and the air around the head) with a zero-padded FFT.
The sinc factor is the signal of a box voxel across which the field changes
by g_i Hz along axis i (intra-voxel dephasing by macroscopic gradients).
Complex Gaussian noise is added with a per-channel standard deviation of
(mean brain magnitude at the first echo) / snr.

The susceptibility is referenced to the surrounding air before the forward
field (air then holds 0, so zero padding continues it exactly, and a uniform
offset makes no field because D(0) = 0). The local field is the field of the
tissue susceptibility inside the brain mask alone (chi relative to water, zero
outside), the usual ground truth of background-field removal; the background
field is the rest: total - local.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from chisep import physics
from chisep.acquisition import FIELD_STRENGTH_RANGE_T, Acquisition, check_echo_times
from chisep.errors import InputError
from chisep.sim.phantom import Phantom

DEFAULT_ECHO_TIMES = (0.004, 0.010, 0.016, 0.022, 0.028, 0.034)
PHASE_OFFSETS = ("smooth", None)
#: Integer phase scaling used by scanners that store phase as int12 in int16 (-4096..4095 ~ [-pi, pi)).
INTEGER_PHASE_MAX = 4096
# Forward-field zero padding: 1.5x keeps wrap-around of the head's far field
# below ~1 % of the local field (tests compare with 3x) at half the cost of 2x.
DEFAULT_PAD_FACTOR = 1.5


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """What the simulation was made from (all arrays on the phantom grid, (x, y, z)).

    chi, chi_para, chi_dia : ppm, inside the brain mask (0 outside); chi = chi_para - chi_dia
    field_total_hz, field_local_hz, field_background_hz : Hz; total = local + background
    r2star, r2, r2prime : 1/s; r2star = r2 + r2prime, r2prime = Dr_para chi_para + Dr_dia chi_dia
    phase_offset : rad, phi0 (echo-independent phase)
    m0 : relative proton density
    labels, label_names, brain_mask : from the phantom
    noise_sigma : per-channel noise standard deviation in signal units (0 when noiseless)
    dr_para, dr_dia : Hz/ppm used for R2'
    """

    chi: np.ndarray
    chi_para: np.ndarray
    chi_dia: np.ndarray
    field_total_hz: np.ndarray
    field_local_hz: np.ndarray
    field_background_hz: np.ndarray
    r2star: np.ndarray
    r2: np.ndarray
    r2prime: np.ndarray
    phase_offset: np.ndarray
    m0: np.ndarray
    labels: np.ndarray
    label_names: dict
    brain_mask: np.ndarray
    noise_sigma: float
    dr_para: float
    dr_dia: float


@dataclass(frozen=True, eq=False)
class GreSimulation:
    """Simulated multi-echo GRE data.

    magnitude : (x, y, z, echo) float32
    phase : (x, y, z, echo) float32 in [-pi, pi) rad, or int16 in [-4096, 4095] when
        simulated with ``integer_phase=True`` (phase = value * pi / 4096)
    acquisition : Acquisition (echo times, field strength, affine consistent with b0_direction)
    truth : GroundTruth
    r2_measured : (x, y, z) float32, 1/s, or None: a noisy spin-echo R2 map, as users
        measure it (:func:`chisep.sim.simulate_head` writes one)
    """

    magnitude: np.ndarray
    phase: np.ndarray
    acquisition: Acquisition
    truth: GroundTruth
    r2_measured: np.ndarray | None = None

    @property
    def complex_signal(self) -> np.ndarray:
        """magnitude * exp(i phase) as complex64 (integer phase rescaled to rad)."""
        phase = self.phase.astype(np.float32)
        if np.issubdtype(self.phase.dtype, np.integer):
            phase = phase * np.float32(np.pi / INTEGER_PHASE_MAX)
        return (self.magnitude * np.exp(1j * phase)).astype(np.complex64)


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------
def oblique_affine(affine, tilt_deg: float) -> np.ndarray:
    """Rotate an affine about the world x axis so that B0 is tilted by ``tilt_deg`` from voxel z.

    The world rotation R_x(tilt) is applied on the left (about the world
    origin), so for an axial affine ``b0_direction_from_affine`` of the result
    is (0, sin(tilt), cos(tilt)) in voxel axes.

    Parameters
    ----------
    affine : (4, 4) array
    tilt_deg : float, degrees

    Returns
    -------
    (4, 4) float64 array
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(f"affine must be 4x4, got shape {affine.shape}")
    if not np.isfinite(tilt_deg):
        raise InputError(f"tilt_deg must be a finite angle in degrees, got {tilt_deg!r}")
    t = np.deg2rad(float(tilt_deg))
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot @ affine


def check_phase_sign(phase_sign) -> None:
    """+1 (chisep's convention) or -1 (the conjugate phase some vendors store)."""
    if phase_sign not in (1, -1) or isinstance(phase_sign, bool):
        raise InputError(f"phase_sign must be 1 (chisep convention) or -1 (conjugate phase), got {phase_sign!r}")


def b0_and_affine(affine, b0_direction) -> tuple[np.ndarray, np.ndarray]:
    """The simulation's B0 direction in voxel axes and the affine that says so: from the affine when
    ``b0_direction`` is None, else the affine rotated so that scanner z is ``b0_direction``."""
    affine = np.asarray(affine, dtype=np.float64)
    if b0_direction is None:
        return physics.b0_direction_from_affine(affine), affine
    try:
        b0 = physics.normalise_direction(b0_direction)
    except ValueError as exc:
        raise InputError(f"{exc}; give b0_direction as 3 numbers in voxel axes, e.g. (0, 0, 1)") from exc
    return b0, _affine_with_b0(affine, b0)


def _affine_with_b0(affine: np.ndarray, b0_direction: np.ndarray) -> np.ndarray:
    """Smallest world rotation of ``affine`` after which its B0 direction is ``b0_direction``.

    B0 is world z; the voxel vector b points along w = R_vox b in the world.
    Rotating the world by R with R w = z makes the affine's B0 direction b.
    """
    linear = affine[:3, :3] / physics.voxel_size_from_affine(affine)[None, :]
    w = linear @ b0_direction
    w /= np.linalg.norm(w)
    z = np.array([0.0, 0.0, 1.0])
    v = np.cross(w, z)
    s, c = np.linalg.norm(v), float(w @ z)
    if s < 1e-12:
        rotation = np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    else:
        vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
        rotation = np.eye(3) + vx + vx @ vx * ((1 - c) / s**2)
    out = np.eye(4)
    out[:3, :3] = rotation
    return out @ affine


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def relaxometric_constants(field_strength: float, dr_para=None, dr_dia=None) -> tuple[float, float]:
    """Dr_para, Dr_dia (Hz/ppm) at ``field_strength``: the given values, else the chi-separation model's.

    Defaults come from ``models/chi_separation.toml`` (``[relaxometric]``
    ``dr_para_hz_per_ppm`` and ``dr_dia_hz_per_ppm`` at
    ``reference_field_strength_t``, 137 Hz/ppm at 3 T; Shin et al. 2021),
    scaled linearly with B0, so that simulation and separation agree.
    """
    from chisep.separation import constants

    values = []
    model = None
    for name, given in (("dr_para", dr_para), ("dr_dia", dr_dia)):
        if given is None:
            if model is None:
                model = constants.load_model_file("chi-separation")
            source = model.get("_source", "chi_separation.toml")
            table = model.get("relaxometric", {})
            # the reference field may sit in the table or at the top of the file
            reference = constants.require_number(
                table if "reference_field_strength_t" in table else model,
                "reference_field_strength_t", source=source, positive=True)
            value = constants.require_number(table, f"{name}_hz_per_ppm", source=f"{source} [relaxometric]",
                                             minimum=0.0)
            values.append(constants.scale_with_field(value, reference, field_strength))
            continue
        if isinstance(given, bool) or not isinstance(given, (int, float, np.floating, np.integer)) or (
                not np.isfinite(given) or given < 0):
            raise InputError(f"{name} must be a non-negative number in Hz/ppm, got {given!r}")
        values.append(float(given))
    return values[0], values[1]


def _smooth_phase_offset(shape, seed: int) -> np.ndarray:
    """Smooth phase offset phi0 (rad): a random low-order polynomial, like a coil-combined phase.

    Spans a few radians across the field of view, so that it wraps.
    """
    rng = np.random.default_rng([seed, 1])
    x, y, z = np.meshgrid(*[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape],
                          indexing="ij", sparse=True)
    terms = [np.ones_like(x), x, y, z, x * y, y * z, x * z, x**2 - 1 / 3, y**2 - 1 / 3, z**2 - 1 / 3]
    coefs = rng.uniform(-1.0, 1.0, len(terms)) * np.array([np.pi] + [1.5] * 3 + [1.0] * 6)
    phi0 = sum(float(c) * t for c, t in zip(coefs, terms))
    return np.broadcast_to(phi0, shape).astype(np.float32)


def _check_snr(snr) -> None:
    if snr is not None and (isinstance(snr, bool) or not np.isfinite(snr) or snr <= 0):
        raise InputError(f"snr must be a positive number (or None for noiseless data), got {snr!r}")


def _validated_settings(phantom, field_strength, echo_times, repetition_time, flip_angle_deg,
                        snr, seed, phase_offset, pad_factor):
    if phantom is not None and not isinstance(phantom, Phantom):
        raise InputError(f"phantom must be a chisep.sim.Phantom (see head_phantom()), got {type(phantom).__name__}")
    lo, hi = FIELD_STRENGTH_RANGE_T
    if isinstance(field_strength, bool) or not np.isfinite(field_strength) or not lo <= field_strength <= hi:
        raise InputError(f"field_strength must be between {lo} and {hi} T, got {field_strength!r}")
    tes = check_echo_times(echo_times)
    if not (np.isfinite(repetition_time) and repetition_time > tes.max()):
        raise InputError(
            f"repetition_time must be in seconds and longer than the last echo time "
            f"({tes.max()} s), got {repetition_time!r}"
        )
    if not (np.isfinite(flip_angle_deg) and 0 < flip_angle_deg <= 180):
        raise InputError(f"flip_angle_deg must be in (0, 180] degrees, got {flip_angle_deg!r}")
    _check_snr(snr)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if phase_offset not in PHASE_OFFSETS:
        raise InputError(f"phase_offset must be one of {PHASE_OFFSETS}, got {phase_offset!r}")
    if not (np.isfinite(pad_factor) and pad_factor >= 1.0):
        raise InputError(f"pad_factor must be >= 1 (1 = no zero padding), got {pad_factor!r}")
    return tuple(float(t) for t in tes)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("big",))
def _fields_rfft(chi_background, chi_brain, kernel_background, kernel_local, big):
    """Fields (ppm) of the background sources and the brain on a zero-padded grid (half spectra)."""
    n = chi_brain.shape

    def convolve(chi, kernel_half):
        spectrum = jnp.fft.rfftn(chi, s=big)
        field = jnp.fft.irfftn(kernel_half * spectrum, s=big)
        return field[: n[0], : n[1], : n[2]]

    return convolve(chi_background, kernel_background), convolve(chi_brain, kernel_local)


def simulate_fields(phantom: Phantom, *, field_strength: float = 3.0, b0_direction=None,
                    pad_factor: float = DEFAULT_PAD_FACTOR) -> tuple[np.ndarray, np.ndarray]:
    """Total and local field (Hz, float32) of a phantom; background = total - local.

    The local field is :func:`chisep.physics.forward_field_hz` of the brain's
    susceptibility (continuous kernel, D(0) = 0, zero padding); the background
    (air, bone, scalp) uses the finite-difference kernel so that it is
    harmonic inside the brain on the grid. Computed with real FFTs.

    Parameters
    ----------
    phantom : Phantom
    field_strength : float, T
    b0_direction : 3 floats in voxel axes, optional (default: from ``phantom.affine``)
    pad_factor : float
        Zero padding of the FFT grid per axis (>= 1).

    Returns
    -------
    total, local : (x, y, z) float32 arrays, Hz
    """
    b0 = physics.b0_direction_from_affine(phantom.affine) if b0_direction is None else (
        physics.normalise_direction(b0_direction))
    air = phantom.tissues["air"].chi if "air" in phantom.tissues else float(phantom.chi.flat[0])
    chi_rel = (phantom.chi - np.float32(air)).astype(np.float32)
    chi_brain = np.where(phantom.brain_mask, phantom.chi, 0.0).astype(np.float32)
    big = physics.padded_shape(phantom.shape, pad_factor) if pad_factor > 1 else phantom.shape
    # rfft keeps the non-negative frequencies of the last axis: the first n//2 + 1 FFT-order entries
    half = slice(0, big[2] // 2 + 1)
    # The background sources (air, bone, and the brain's own offset from air) use the
    # finite-difference kernel: its field is exactly (discretely) harmonic inside the brain,
    # as a real background field is; the continuous kernel would ring at the voxelised
    # air/bone edges and leave non-harmonic residue that no background removal can take out.
    kernel_background = physics.dipole_kernel(big, phantom.voxel_size, b0, kind="discrete")[:, :, half]
    kernel_local = physics.dipole_kernel(big, phantom.voxel_size, b0)[:, :, half]
    background, local = _fields_rfft(jnp.asarray(chi_rel - chi_brain), jnp.asarray(chi_brain),
                                     jnp.asarray(kernel_background), jnp.asarray(kernel_local), big)
    scale = np.float32(physics.ppm_to_hz(1.0, field_strength))
    local = np.asarray(local) * scale
    return np.asarray(background) * scale + local, local


def _field_gradients(field: np.ndarray) -> np.ndarray:
    """Central differences of the field (Hz per voxel) along x, y, z; (3, x, y, z) float32."""
    return np.stack([np.gradient(field, axis=a) for a in range(3)]).astype(np.float32)


@partial(jax.jit, static_argnames=("integer_phase",))
def _echo(steady, r2star, phi0, field, gradients, te, sigma, sign, noise_re, noise_im, integer_phase):
    """Magnitude and wrapped phase of one echo (fused on the whole volume).

    A box voxel integrates exp(i 2 pi f TE) over a field that varies across it by
    ``gradients`` (Hz per voxel): the signal is multiplied by prod sinc(g TE)
    (intra-voxel dephasing, what chisep.relax.gradient_dephasing_correction undoes).
    """
    dephasing = jnp.prod(jnp.sinc(gradients * te), axis=0)
    amplitude = steady * jnp.exp(-r2star * te) * dephasing
    angle = sign * (phi0 + (2 * jnp.pi) * te * field)
    re = amplitude * jnp.cos(angle) + sigma * noise_re
    im = amplitude * jnp.sin(angle) + sigma * noise_im
    phase = jnp.arctan2(im, re)  # [-pi, pi]
    if integer_phase:
        scaled = jnp.round(phase * (INTEGER_PHASE_MAX / jnp.pi)).astype(jnp.int32)
        scaled = jnp.where(scaled >= INTEGER_PHASE_MAX, scaled - 2 * INTEGER_PHASE_MAX, scaled)
        return jnp.hypot(re, im), scaled.astype(jnp.int16)
    return jnp.hypot(re, im), jnp.where(phase >= jnp.pi, phase - 2 * jnp.pi, phase)


def simulate_gre(
    phantom: Phantom,
    *,
    field_strength: float = 3.0,
    echo_times=DEFAULT_ECHO_TIMES,
    repetition_time: float = 0.05,
    flip_angle_deg: float = 15.0,
    snr: float | None = 100.0,
    seed: int = 0,
    b0_direction=None,
    dr_para: float | None = None,
    dr_dia: float | None = None,
    phase_offset: str | None = "smooth",
    integer_phase: bool = False,
    phase_sign: int = 1,
    pad_factor: float = DEFAULT_PAD_FACTOR,
    intravoxel_dephasing: bool = True,
) -> GreSimulation:
    """Simulate multi-echo GRE magnitude and phase of a head phantom.

    Parameters
    ----------
    phantom : Phantom
        From :func:`chisep.sim.head_phantom`.
    field_strength : float, T
        Tissue properties are 3 T values; chi does not depend on B0, fields
        and Dr scale with it.
    echo_times : sequence of float, s
        Strictly increasing (default 4 to 34 ms, 6 echoes, spacing 6 ms).
    repetition_time : float, s
    flip_angle_deg : float, degrees
    snr : float or None
        Mean brain magnitude at the first echo divided by the per-channel
        noise standard deviation; None gives noiseless data.
    seed : int
        Seeds the noise and the smooth phase offset (independent streams).
    b0_direction : 3 floats in voxel axes, optional
        Default: from the phantom's affine ((0, 0, 1) for the MNI grid). When
        given, the returned acquisition's affine is the phantom's rotated by the
        smallest world rotation that makes the two agree, so files written from
        it carry the oblique geometry.
    dr_para, dr_dia : float, Hz/ppm, optional
        Relaxometric constants; default from models/chi_separation.toml scaled
        to ``field_strength`` (137 Hz/ppm at 3 T).
    phase_offset : {"smooth", None}
        "smooth": a seeded low-order polynomial phi0 spanning a few radians;
        None: phi0 = 0.
    integer_phase : bool
        Store phase as int16 in [-4096, 4095] (phase = value * pi / 4096), as
        some scanners do.
    phase_sign : {1, -1}
        -1 stores the conjugate phase, as vendors with the opposite
        convention do; ``acquisition.phase_sign`` then says -1 (multiply the
        stored phase by it to get chisep's convention). Truth maps are always
        in chisep's convention.
    pad_factor : float
        Zero padding of the forward-field FFT (1.5 by default).
    intravoxel_dephasing : bool
        Multiply by the sinc of the field gradient across each (box) voxel, as a
        scanner voxel does (default); False samples the signal at voxel centres.

    Returns
    -------
    GreSimulation
        magnitude, phase (x, y, z, echo), acquisition and ground truth.
        With the default ``phase_sign=1`` the phase follows chisep's
        convention (positive chi, positive frequency).

    Raises
    ------
    InputError
        On invalid settings (each message names the setting and the fix).

    Examples
    --------
    >>> from chisep.sim import head_phantom, simulate_gre
    >>> sim = simulate_gre(head_phantom(4.0), snr=50, seed=1)
    >>> sim.magnitude.shape
    (49, 58, 47, 6)
    """
    tes = _validated_settings(phantom, field_strength, echo_times, repetition_time, flip_angle_deg,
                              snr, seed, phase_offset, pad_factor)
    check_phase_sign(phase_sign)
    b0, affine = b0_and_affine(phantom.affine, b0_direction)
    field_strength = float(field_strength)
    dr_p, dr_d = relaxometric_constants(field_strength, dr_para, dr_dia)

    total, local = simulate_fields(phantom, field_strength=field_strength, b0_direction=b0,
                                   pad_factor=pad_factor)
    r2prime = (dr_p * phantom.chi_para + dr_d * phantom.chi_dia).astype(np.float32)
    r2star = (phantom.r2 + r2prime).astype(np.float32)
    phi0 = (_smooth_phase_offset(phantom.shape, int(seed)) if phase_offset == "smooth"
            else np.zeros(phantom.shape, np.float32))

    alpha = np.deg2rad(float(flip_angle_deg))
    e1 = np.exp(-float(repetition_time) / phantom.t1)
    steady = (phantom.m0 * np.sin(alpha) * (1 - e1) / (1 - np.cos(alpha) * e1)).astype(np.float32)
    gradients = _field_gradients(total) if intravoxel_dephasing else np.zeros((3,) + phantom.shape, np.float32)
    noise_sigma = 0.0
    if snr is not None:
        dephasing = np.abs(np.prod(np.sinc(gradients[:, phantom.brain_mask] * tes[0]), axis=0))
        first_echo = steady[phantom.brain_mask] * np.exp(-r2star[phantom.brain_mask] * tes[0]) * dephasing
        noise_sigma = float(first_echo.mean()) / float(snr)
    rng = np.random.default_rng([int(seed), 2])

    shape = phantom.shape + (len(tes),)
    magnitude = np.empty(shape, np.float32)
    phase = np.empty(shape, np.int16 if integer_phase else np.float32)
    args = [jnp.asarray(a) for a in (steady, r2star, phi0, total, gradients)]
    zeros = jnp.zeros(phantom.shape, jnp.float32)
    for e, te in enumerate(tes):  # loop over echoes (a handful), vectorised over voxels
        if noise_sigma > 0:
            noise = [jnp.asarray(rng.standard_normal(phantom.shape, dtype=np.float32)) for _ in range(2)]
        else:
            noise = [zeros, zeros]
        mag, ph = _echo(*args, np.float32(te), np.float32(noise_sigma), np.float32(phase_sign), *noise,
                        integer_phase=bool(integer_phase))
        magnitude[..., e] = np.asarray(mag)
        phase[..., e] = np.asarray(ph)

    acquisition = Acquisition(echo_times=tes, field_strength=field_strength, affine=affine,
                              b0_direction=b0, phase_sign=int(phase_sign))
    mask = phantom.brain_mask
    truth = GroundTruth(
        chi=np.where(mask, phantom.chi, 0).astype(np.float32),
        chi_para=np.where(mask, phantom.chi_para, 0).astype(np.float32),
        chi_dia=np.where(mask, phantom.chi_dia, 0).astype(np.float32),
        field_total_hz=total,
        field_local_hz=local,
        field_background_hz=(total - local).astype(np.float32),
        r2star=r2star,
        r2=phantom.r2.astype(np.float32),
        r2prime=r2prime,
        phase_offset=phi0,
        m0=phantom.m0.astype(np.float32),
        labels=phantom.labels,
        label_names=dict(phantom.label_names),
        brain_mask=mask,
        noise_sigma=noise_sigma,
        dr_para=dr_p,
        dr_dia=dr_d,
    )
    return GreSimulation(magnitude=magnitude, phase=phase, acquisition=acquisition, truth=truth)


def with_affine(phantom: Phantom, affine) -> Phantom:
    """The same phantom with another affine (e.g. from :func:`oblique_affine`); voxel size must match."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.allclose(physics.voxel_size_from_affine(affine), phantom.voxel_size):
        raise InputError("affine must be 4x4 with the phantom's voxel size; rotate it, do not rescale it")
    return replace(phantom, affine=affine)


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over non-overlapping factor^3 blocks of the first three axes (trailing partial blocks dropped)."""
    n = [s // factor for s in volume.shape[:3]]
    cropped = volume[: n[0] * factor, : n[1] * factor, : n[2] * factor]
    shape = (n[0], factor, n[1], factor, n[2], factor) + volume.shape[3:]
    return cropped.reshape(shape).mean(axis=(1, 3, 5))


def simulate_gre_partial_volume(phantom: Phantom, factor: int = 2, *, snr: float | None = 100.0, seed: int = 0,
                                **settings) -> GreSimulation:
    """GRE data on a grid ``factor`` times coarser than ``phantom``: the complex signal is averaged.

    A scanner voxel integrates the complex signal of everything inside it, so
    a voxel that holds brain and bone, or a field that varies inside the voxel
    (next to sinuses and veins), gives a magnitude that is not mono-exponential
    and a phase that is not linear in TE (intra-voxel dephasing). Simulating on
    the fine grid and averaging the noiseless complex signal over blocks of
    ``factor``^3 voxels reproduces that, and avoids the inverse crime of
    simulating on the grid the reconstruction inverts (QSM challenge 2.0,
    Marques et al. 2021). Noise is added on the coarse grid, with the same SNR
    definition as :func:`simulate_gre`.

    The ground truth is the fine-grid average (chi, chi_para, chi_dia inside the
    brain, fields, relaxation rates); the coarse brain mask holds the voxels that
    are at least half brain; labels are a plurality vote
    (:func:`chisep.sim.phantom.resample_labels`). ``truth.r2star`` is the mean of
    the fine R2* values, not the decay rate of the averaged signal, which is not
    mono-exponential.

    Parameters
    ----------
    phantom : Phantom, on the fine grid (e.g. ``head_phantom(1.0)`` for 2 mm data)
    factor : int >= 2
    snr, seed : as in :func:`simulate_gre` (applied on the coarse grid)
    **settings : other keywords of :func:`simulate_gre` (field_strength, echo_times, b0_direction, ...)

    Returns
    -------
    GreSimulation on the coarse grid, whose affine has voxel size ``factor`` times the phantom's.
    """
    from chisep.sim.phantom import resample_labels

    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 2:
        raise InputError(f"factor must be an integer >= 2 (fine voxels per coarse voxel and axis), got {factor!r}")
    if settings.get("integer_phase"):
        raise InputError("integer_phase is not supported with partial-volume simulation; store the phase yourself")
    _check_snr(snr)
    fine = simulate_gre(phantom, snr=None, seed=seed, **settings)
    sign = fine.acquisition.phase_sign
    n_echoes = fine.magnitude.shape[3]
    coarse_shape = tuple(s // factor for s in phantom.shape)
    signal = np.empty(coarse_shape + (n_echoes,), np.complex64)
    for e in range(n_echoes):
        signal[..., e] = _block_mean(fine.magnitude[..., e] * np.exp(1j * fine.phase[..., e]), factor)

    t = fine.truth
    brain_fraction = _block_mean(t.brain_mask.astype(np.float32), factor)
    brain = brain_fraction >= 0.5
    noise_sigma = 0.0
    if snr is not None:
        noise_sigma = float(np.abs(signal[..., 0])[brain].mean()) / float(snr)
        rng = np.random.default_rng([int(seed), 3])
        signal += noise_sigma * (rng.standard_normal(signal.shape, dtype=np.float32)
                                 + 1j * rng.standard_normal(signal.shape, dtype=np.float32))

    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = 0.5 * factor - 0.5  # coarse voxel 0 centre in fine index units
    affine = fine.acquisition.affine @ scale
    labels, _ = resample_labels(t.labels, phantom.affine, phantom.voxel_size * factor)
    labels = labels[: coarse_shape[0], : coarse_shape[1], : coarse_shape[2]]

    def mean(array, inside_brain=False):
        return np.where(brain, _block_mean(array, factor), 0).astype(np.float32) if inside_brain else (
            _block_mean(array, factor).astype(np.float32))

    acquisition = Acquisition(echo_times=fine.acquisition.echo_times, field_strength=fine.acquisition.field_strength,
                              affine=affine, b0_direction=fine.acquisition.b0_direction, phase_sign=sign)
    chi_para, chi_dia = mean(t.chi_para, True), mean(t.chi_dia, True)
    truth = replace(
        t, chi=(chi_para - chi_dia).astype(np.float32), chi_para=chi_para, chi_dia=chi_dia,
        field_total_hz=mean(t.field_total_hz), field_local_hz=mean(t.field_local_hz),
        field_background_hz=mean(t.field_background_hz), r2star=mean(t.r2star), r2=mean(t.r2),
        r2prime=mean(t.r2prime), phase_offset=np.angle(_block_mean(np.exp(1j * t.phase_offset), factor)).astype(
            np.float32), m0=mean(t.m0), labels=labels, brain_mask=brain, noise_sigma=noise_sigma)
    return GreSimulation(magnitude=np.abs(signal).astype(np.float32), phase=np.angle(signal).astype(np.float32),
                         acquisition=acquisition, truth=truth)
