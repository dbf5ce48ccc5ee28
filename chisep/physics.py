"""Physical constants, unit conversions, dipole and spherical-mean kernels, forward field.

Conventions (see DESIGN.md):

* chi in ppm, fields in Hz, phase in rad, echo times in s, voxel size in mm,
  field strength in T.
* Positive chi is paramagnetic and gives a positive frequency offset.
* The dipole kernel includes the Lorentz sphere correction,
  ``D(k) = 1/3 - (k . b)^2 / |k|^2``, with ``D(0) = 0`` by default: the mean
  of a field is not determined by the data, so the mean susceptibility is not
  either (the field inside a uniformly magnetised sphere is 0).
* ``b`` is the unit B0 direction in voxel axes, so kernels honour oblique
  acquisitions; ``k`` is in cycles/mm, so they honour anisotropic voxels.

Kernels are built with NumPy (cheap, once per shape) and returned as float32
arrays in FFT (unshifted) order; algorithms move them to JAX.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

#: Proton gyromagnetic ratio over 2 pi, Hz/T (CODATA 2018: 42.577 478 518 MHz/T).
GAMMA_HZ_PER_T = 42.577478518e6

KernelKind = Literal["continuous", "discrete"]
KERNEL_KINDS = ("continuous", "discrete")


# ---------------------------------------------------------------------------
# unit conversions
# ---------------------------------------------------------------------------
def centre_frequency_hz(field_strength_t: float) -> float:
    """Proton Larmor frequency CF = gamma/2pi * B0 in Hz.

    Parameters
    ----------
    field_strength_t : float, T

    Returns
    -------
    float, Hz

    Examples
    --------
    >>> round(centre_frequency_hz(3.0) / 1e6, 4)  # MHz
    127.7324
    """
    return GAMMA_HZ_PER_T * float(field_strength_t)


def ppm_to_hz(value_ppm, field_strength_t: float):
    """Relative field (ppm of B0) to frequency offset (Hz)."""
    return value_ppm * (centre_frequency_hz(field_strength_t) * 1e-6)


def hz_to_ppm(value_hz, field_strength_t: float):
    """Frequency offset (Hz) to relative field (ppm of B0)."""
    return value_hz / (centre_frequency_hz(field_strength_t) * 1e-6)


def hz_to_rad_per_s(value_hz):
    """Frequency (Hz) to angular frequency (rad/s)."""
    return 2.0 * np.pi * value_hz


def phase_from_field(field_hz, echo_time_s: float, phase_offset_rad=0.0):
    """Phase (rad, not wrapped) accumulated at an echo time: phi0 + 2 pi f TE."""
    return phase_offset_rad + 2.0 * np.pi * field_hz * echo_time_s


def wrap_phase(phase):
    """Wrap phase into [-pi, pi), in the input's float precision (float64 for integers).

    By floor rather than ``%``: numpy's float remainder is 4x slower on float32 (0.3 s for
    a 1 mm head's five echoes), and the pipeline wraps dozens of such arrays.
    """
    p = np.asarray(phase)
    if p.dtype.kind != "f":
        p = p.astype(np.float64)
    flat = np.atleast_1d(p)
    two_pi, pi = p.dtype.type(2.0 * np.pi), p.dtype.type(np.pi)
    turns = flat + pi
    turns /= two_pi
    np.floor(turns, out=turns)
    turns *= two_pi
    out = flat - turns
    # rounding can leave a value an ulp outside the half-open interval
    out[out >= pi] -= two_pi
    out[out < -pi] += two_pi
    return out if p.ndim else out[0]


def wrap_phase_jax(phase):
    """:func:`wrap_phase` inside jit-compiled code: [-pi, pi) by floor, in the array's precision."""
    import jax.numpy as jnp  # here, not at the top: this module is imported on the command line's fast path

    return phase - (2.0 * jnp.pi) * jnp.floor((phase + jnp.pi) / (2.0 * jnp.pi))


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------
def voxel_size_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each voxel axis: column norms of the affine's linear part."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def b0_direction_from_affine(affine: np.ndarray) -> np.ndarray:
    """Unit B0 direction expressed in voxel axes.

    NIfTI world coordinates are scanner RAS+, whose z axis is the magnet bore,
    so B0 is world (0, 0, 1). Its component along voxel axis i is the world-z
    component of that axis's unit direction: row 3 of the rotation part of the
    affine (voxel scaling divided out). For an axial acquisition this is
    (0, 0, +-1); for an oblique one it is tilted accordingly.

    Parameters
    ----------
    affine : (4, 4) array
        Voxel indices -> scanner RAS+ mm (nibabel's ``img.affine``).

    Returns
    -------
    (3,) unit vector in voxel axes

    Examples
    --------
    >>> b0_direction_from_affine(np.diag([2.0, 2.0, 2.0, 1.0])).tolist()
    [0.0, 0.0, 1.0]
    """
    affine = np.asarray(affine, dtype=np.float64)
    rotation = affine[:3, :3] / voxel_size_from_affine(affine)[None, :]
    direction = rotation[2, :].copy()
    return direction / np.linalg.norm(direction)


def normalise_direction(direction: Sequence[float], name: str = "b0_direction") -> np.ndarray:
    """Validate a 3-vector and return it with unit length."""
    vec = np.asarray(direction, dtype=np.float64).reshape(-1)
    if vec.shape != (3,) or not np.all(np.isfinite(vec)):
        raise ValueError(f"{name} must be 3 finite numbers, got {direction!r}")
    norm = np.linalg.norm(vec)
    if norm < 1e-8:
        raise ValueError(f"{name} must be a non-zero vector, got {direction!r}")
    return vec / norm


def direction_from_angles(tilt_deg: float, azimuth_deg: float = 0.0) -> np.ndarray:
    """Unit vector tilted by ``tilt_deg`` from voxel axis z towards x (rotated by azimuth about z)."""
    tilt, azim = np.deg2rad(tilt_deg), np.deg2rad(azimuth_deg)
    return np.array([np.sin(tilt) * np.cos(azim), np.sin(tilt) * np.sin(azim), np.cos(tilt)])


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------
def _validated_grid(shape, voxel_size):
    shape = tuple(int(n) for n in shape)
    voxel_size = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must have three positive entries, got {shape}")
    if voxel_size.shape != (3,) or np.any(~np.isfinite(voxel_size)) or np.any(voxel_size <= 0):
        raise ValueError(f"voxel_size must be three positive numbers in mm, got {voxel_size.tolist()}")
    return shape, voxel_size


def axis_frequencies(shape, voxel_size, *, kind: KernelKind = "continuous", half: bool = False, xp=np):
    """Spatial frequencies (cycles/mm) per axis, broadcastable, FFT order; no validation.

    The one implementation behind the NumPy kernels here and the JAX kernels
    of :mod:`chisep.grid` (``xp=jax.numpy``; ``voxel_size`` may then be a
    traced array). ``half=True`` gives the last axis of the real-FFT half
    spectrum. ``kind="discrete"`` returns sin(pi f h) / (pi h), whose square
    is the eigenvalue of the 3-point finite-difference Laplacian / (2 pi)^2.
    """
    dtype = np.float64 if xp is np else xp.float32
    axes = []
    for axis, n in enumerate(shape):
        idx = np.arange(n // 2 + 1) if (half and axis == 2) else np.fft.fftfreq(n, d=1.0 / n)
        idx = xp.asarray(idx, dtype=dtype)
        h = voxel_size[axis]
        f = xp.sin(np.pi * idx / n) / (np.pi * h) if kind == "discrete" else idx / (n * h)
        view = [1, 1, 1]
        view[axis] = idx.shape[0]
        axes.append(f.reshape(view))
    return axes


def dipole_from_frequencies(kx, ky, kz, b, xp=np):
    """``1/3 - (k.b)^2 / |k|^2`` with the k = 0 term set to 1/3 (callers set D(0))."""
    k2 = kx**2 + ky**2 + kz**2
    kb = kx * b[0] + ky * b[1] + kz * b[2]
    return 1.0 / 3.0 - kb**2 / xp.where(k2 == 0, 1.0, k2)


def signed_offsets_mm(shape, voxel_size, xp=np):
    """Distance (mm) of each voxel from voxel 0 along each axis in FFT order (0, h, ..., -h), broadcastable."""
    dtype = np.float64 if xp is np else xp.float32
    coords = []
    for axis, n in enumerate(shape):
        idx = xp.asarray(np.fft.fftfreq(n, d=1.0 / n), dtype=dtype)  # 0, 1, ..., -1
        view = [1, 1, 1]
        view[axis] = n
        coords.append((idx * voxel_size[axis]).reshape(view))
    return coords


def k_space_grid(shape, voxel_size, kind: KernelKind = "continuous") -> list[np.ndarray]:
    """Spatial frequencies (cycles/mm) along each axis, broadcastable, FFT order.

    ``kind="discrete"`` returns the frequency whose square matches the
    eigenvalue of the 3-point finite-difference Laplacian,
    sin(pi f h) / (pi h), which tends to f at low frequency.
    """
    shape, voxel_size = _validated_grid(shape, voxel_size)
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kind must be one of {KERNEL_KINDS}, got {kind!r}")
    return axis_frequencies(shape, voxel_size, kind=kind)


def dipole_kernel(
    shape,
    voxel_size=(1.0, 1.0, 1.0),
    b0_direction=(0.0, 0.0, 1.0),
    *,
    kind: KernelKind = "continuous",
    dc_value: float = 0.0,
) -> np.ndarray:
    """k-space unit dipole kernel ``D(k) = 1/3 - (k . b)^2 / |k|^2`` (float32, FFT order).

    Parameters
    ----------
    shape : 3 ints
        Grid shape (x, y, z).
    voxel_size : 3 floats, mm
    b0_direction : 3 floats
        B0 direction in voxel axes (normalised here).
    kind : {"continuous", "discrete"}
        "continuous" samples the analytic kernel; "discrete" uses the
        finite-difference spectrum (Milovic et al., MRM 2017): second
        differences for k_i^2 and central differences for k_i k_j, so its
        fields have an exactly zero discrete Laplacian inside uniform regions
        (harmonic on the grid) for any B0 direction.
    dc_value : float
        Value at k = 0 (0 by default; 1/3 is the other common choice).

    Returns
    -------
    D : (nx, ny, nz) float32 array, values in [-2/3, 1/3].

    Examples
    --------
    >>> D = dipole_kernel((8, 8, 8), (1, 1, 1), (0, 0, 1))
    >>> float(D[0, 0, 1]), float(D[1, 0, 0]), float(D[0, 0, 0])
    (-0.6666666865348816, 0.3333333432674408, 0.0)
    """
    b = normalise_direction(b0_direction)
    shape, voxel_size = _validated_grid(shape, voxel_size)
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kind must be one of {KERNEL_KINDS}, got {kind!r}")
    if kind == "discrete":
        # k_i^2 -> 3-point second difference; k_i k_j (i != j) -> product of central first
        # differences. Both are local stencils, so the field of a uniform region has a
        # zero discrete Laplacian inside it (harmonic), also for an oblique B0.
        squares = [f**2 for f in axis_frequencies(shape, voxel_size, kind="discrete")]
        central = [np.sin(2 * np.pi * f * h) / (2 * np.pi * h)
                   for f, h in zip(axis_frequencies(shape, voxel_size), voxel_size)]
        k2 = squares[0] + squares[1] + squares[2]
        kb2 = sum(b[i] ** 2 * squares[i] for i in range(3))
        for i, j in ((0, 1), (0, 2), (1, 2)):
            kb2 = kb2 + 2 * b[i] * b[j] * central[i] * central[j]
        kernel = 1.0 / 3.0 - kb2 / np.where(k2 == 0, 1.0, k2)
    else:
        kernel = dipole_from_frequencies(*axis_frequencies(shape, voxel_size), b)
    kernel[0, 0, 0] = dc_value
    return kernel.astype(np.float32)


def sphere_mask(shape, voxel_size, radius_mm: float) -> np.ndarray:
    """Boolean sphere (ellipsoid in voxels for anisotropic grids) centred on voxel 0, FFT order."""
    shape, voxel_size = _validated_grid(shape, voxel_size)
    x, y, z = signed_offsets_mm(shape, voxel_size)
    return x**2 + y**2 + z**2 <= radius_mm**2 + 1e-9


def smv_kernel(shape, voxel_size, radius_mm: float) -> np.ndarray:
    """k-space kernel of the spherical mean value (normalised sphere) of radius ``radius_mm``.

    SHARP-type methods use ``1 - S``, which removes harmonic (background) fields inside the mask.

    Parameters
    ----------
    shape : 3 ints
    voxel_size : 3 floats, mm
    radius_mm : float

    Returns
    -------
    S : float32 array, FFT order, S(0) = 1
    """
    if not radius_mm > 0:
        raise ValueError(f"radius_mm must be positive, got {radius_mm}")
    sphere = sphere_mask(shape, voxel_size, radius_mm).astype(np.float64)
    sphere /= sphere.sum()
    return np.real(np.fft.fftn(sphere)).astype(np.float32)


# ---------------------------------------------------------------------------
# forward field
# ---------------------------------------------------------------------------
def padded_shape(shape, factor: float = 2.0) -> tuple[int, int, int]:
    """Grid at least ``factor`` times larger per axis, rounded up to an even size fast for FFTs."""
    from scipy.fft import next_fast_len

    return tuple(int(next_fast_len(int(np.ceil(n * factor)), real=False)) for n in shape)


def forward_field_ppm(
    chi_ppm,
    voxel_size=(1.0, 1.0, 1.0),
    b0_direction=(0.0, 0.0, 1.0),
    *,
    pad_factor: float = 2.0,
    kind: KernelKind = "continuous",
):
    """Relative field (ppm of B0) produced by a susceptibility map (ppm).

    The map is zero-padded to ``pad_factor`` times its size so that the
    periodic FFT convolution does not wrap the field of one side onto the
    other.

    Parameters
    ----------
    chi_ppm : (x, y, z) array, ppm
    voxel_size : 3 floats, mm
    b0_direction : 3 floats, in voxel axes
    pad_factor : float
    kind : {"continuous", "discrete"}
        The dipole kernel (see :func:`dipole_kernel`).

    Returns
    -------
    JAX array of the input's shape and dtype, ppm of B0
    """
    import jax.numpy as jnp  # here, not at the top: the CLI imports this module and must start fast

    chi = jnp.asarray(chi_ppm)
    if chi.ndim != 3:
        raise ValueError(f"chi_ppm must be a 3D array, got shape {chi.shape}")
    big = padded_shape(chi.shape, pad_factor) if pad_factor > 1 else chi.shape
    kernel = jnp.asarray(dipole_kernel(big, voxel_size, b0_direction, kind=kind))
    spectrum = jnp.fft.fftn(chi, s=big)
    field = jnp.real(jnp.fft.ifftn(kernel * spectrum))
    return field[: chi.shape[0], : chi.shape[1], : chi.shape[2]].astype(chi.dtype)


def forward_field_hz(
    chi_ppm,
    field_strength_t: float,
    voxel_size=(1.0, 1.0, 1.0),
    b0_direction=(0.0, 0.0, 1.0),
    **kwargs,
):
    """Frequency offset (Hz) produced by a susceptibility map (ppm): CF * 1e-6 * (D * chi).

    Parameters
    ----------
    chi_ppm : (x, y, z) array, ppm
    field_strength_t : float, T
    voxel_size, b0_direction, **kwargs
        As in :func:`forward_field_ppm`.

    Returns
    -------
    JAX array, Hz; positive chi gives a positive frequency along B0
    """
    return ppm_to_hz(forward_field_ppm(chi_ppm, voxel_size, b0_direction, **kwargs), field_strength_t)
