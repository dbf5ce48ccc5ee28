"""Shared plumbing of the QSM field stages: input checks, crop-and-pad grids, JAX k-space kernels.

Background removal and dipole inversion both work on a grid that is the
mask's bounding box plus a margin, zero-padded up to a size that is fast for
FFTs. Cropping makes a 1 mm brain cost what its mask needs rather than what
the field of view holds; the margin keeps periodic (FFT) convolutions from
wrapping the field of one side onto the other. Kernels are built inside
jit-compiled JAX code from the (static) grid shape, so nothing large is
built on the host and each shape compiles once.

Everything here is private: public functions in ``background`` and
``inversion`` validate at the boundary and then trust these helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.fft import next_fast_len

from chisep import physics
from chisep.errors import InputError


# ---------------------------------------------------------------------------
# boundary validation
# ---------------------------------------------------------------------------
def check_choice(value: str, choices: Sequence[str], name: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise an error listing them."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name}={value!r} is not known; valid choices are: {', '.join(choices)}")
    return value


def check_volume_and_mask(volume, mask, *, name: str = "field_hz") -> tuple[np.ndarray, np.ndarray]:
    """Validate a 3D volume and a brain mask of the same shape.

    Returns the volume as float32 with zeros outside the mask (values there
    are never used, so NaNs outside the mask are tolerated) and the mask as
    bool. Raises :class:`InputError` for a wrong dimensionality, a shape
    mismatch, an empty mask, or non-finite values inside the mask.
    """
    vol = np.asarray(volume)
    msk = np.asarray(mask)
    if vol.ndim != 3:
        raise InputError(
            f"{name} must be a 3D array (x, y, z), got shape {vol.shape}; "
            "combine echoes into one field map before this step"
        )
    if msk.shape != vol.shape:
        raise InputError(
            f"mask shape {msk.shape} does not match {name} shape {vol.shape}; "
            "resample the mask onto the field's grid"
        )
    if not (np.issubdtype(vol.dtype, np.floating) or np.issubdtype(vol.dtype, np.integer)):
        raise InputError(f"{name} must hold real numbers, got dtype {vol.dtype}")
    msk = msk.astype(bool) if msk.dtype == bool else np.asarray(msk != 0)
    if not msk.any():
        raise InputError("mask is empty (no voxel is non-zero); give a brain mask covering the tissue")
    inside = vol[msk]
    bad = ~np.isfinite(inside)
    if bad.any():
        raise InputError(
            f"{name} has {int(bad.sum())} non-finite value(s) (NaN/inf) inside the mask; "
            "fix the field map or remove those voxels from the mask"
        )
    out = np.where(msk, vol, 0).astype(np.float32)
    return out, msk


def check_optional_map(values, shape, *, name: str) -> np.ndarray | None:
    """Validate an optional non-negative finite map of a given shape (None passes through)."""
    if values is None:
        return None
    arr = np.asarray(values)
    if arr.shape != tuple(shape):
        raise InputError(f"{name} shape {arr.shape} does not match the field shape {tuple(shape)}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} holds NaN or inf values; replace them (e.g. by 0) before this step")
    if np.any(arr < 0):
        raise InputError(f"{name} must be non-negative, found a minimum of {arr.min():g}")
    return arr


def check_geometry(voxel_size, b0_direction) -> tuple[np.ndarray, np.ndarray]:
    """Validate voxel size (3 positive mm) and B0 direction (3-vector, normalised)."""
    vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise InputError(f"voxel_size must be three positive numbers in mm, got {voxel_size!r}")
    try:
        b0 = physics.normalise_direction(b0_direction)
    except ValueError as err:
        raise InputError(f"{err}; give the B0 direction in voxel axes (see b0_direction_from_affine)") from None
    return vs, b0


def check_positive(value, name: str, *, allow_zero: bool = False) -> float:
    """A finite positive (or non-negative) number, else :class:`InputError`."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(out) or out < 0 or (out == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise InputError(f"{name} must be a finite {kind} number, got {value!r}")
    return out


def check_count(value, name: str) -> int:
    """A positive integer, else :class:`InputError`."""
    if isinstance(value, bool) or not float(value).is_integer() or int(value) < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------
# crop-and-pad grid
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A working grid: a box of the input volume, zero-padded to ``shape``.

    ``lower``/``upper`` give the box in input voxel indices (may reach
    outside the input, which is then zero); ``offset`` is where the box
    starts inside the working grid.
    """

    in_shape: tuple[int, int, int]
    lower: tuple[int, int, int]
    upper: tuple[int, int, int]
    shape: tuple[int, int, int]

    @classmethod
    def around(cls, mask: np.ndarray, margin_voxels) -> "Grid":
        """Bounding box of ``mask`` grown by ``margin_voxels`` (per axis), FFT-friendly size.

        The box may extend beyond the input volume: those voxels are zero
        on the way in and dropped on the way out. Sizes are rounded up to
        even 5-smooth numbers so that real FFTs are fast.
        """
        idx = np.nonzero(mask)
        margin = np.broadcast_to(np.asarray(margin_voxels, dtype=int), (3,))
        lower = tuple(int(i.min()) - int(m) for i, m in zip(idx, margin))
        upper = tuple(int(i.max()) + 1 + int(m) for i, m in zip(idx, margin))
        shape = tuple(_fast_even(u - lo) for lo, u in zip(lower, upper))
        return cls(tuple(mask.shape), lower, upper, shape)

    def _pairs(self):
        # For each axis: the slice read from the input and where it lands in the working grid.
        src, dst = [], []
        for n, lo, up in zip(self.in_shape, self.lower, self.upper):
            a, b = max(lo, 0), min(up, n)
            src.append(slice(a, b))
            dst.append(slice(a - lo, b - lo))
        return tuple(src), tuple(dst)

    def embed(self, volume: np.ndarray) -> np.ndarray:
        """Input-shaped array -> working grid (zeros where the input has no data)."""
        src, dst = self._pairs()
        out = np.zeros(self.shape, dtype=np.float32)
        out[dst] = volume[src]
        return out

    def extract(self, volume) -> np.ndarray:
        """Working-grid array -> input-shaped numpy array (zeros outside the box)."""
        src, dst = self._pairs()
        vol = np.asarray(volume)
        out = np.zeros(self.in_shape, dtype=vol.dtype)
        out[src] = vol[dst]
        return out


def _fast_even(n: int) -> int:
    n = max(int(n), 2)
    m = int(next_fast_len(n, real=True))
    while m % 2:
        m = int(next_fast_len(m + 1, real=True))
    return m


def margin_voxels(mask: np.ndarray, voxel_size, *, margin_mm: float = 0.0, fraction: float = 0.0):
    """Per-axis margin in voxels: ``margin_mm`` and ``fraction`` of the mask extent, whichever is larger."""
    idx = np.nonzero(mask)
    extent = np.array([i.max() - i.min() + 1 for i in idx])
    vs = np.asarray(voxel_size, dtype=np.float64)
    return np.maximum(np.ceil(margin_mm / vs), np.ceil(fraction * extent)).astype(int) + 1


# ---------------------------------------------------------------------------
# k-space kernels on the half (rfft) spectrum, built inside jit
# ---------------------------------------------------------------------------
def rfft(x):
    return jnp.fft.rfftn(x)


def irfft(x, shape):
    return jnp.fft.irfftn(x, s=shape)


def conv(x, kernel_half, shape=None):
    """Periodic convolution of a real volume with a real, even k-space kernel (half spectrum)."""
    return jnp.fft.irfftn(kernel_half * jnp.fft.rfftn(x), s=x.shape if shape is None else shape)


def _freqs(shape, voxel_size, *, discrete: bool = False):
    """Frequencies (cycles/mm) on the rfft half spectrum, broadcastable (last axis halved)."""
    out = []
    for axis, n in enumerate(shape):
        h = voxel_size[axis]
        if axis == 2:
            idx = jnp.arange(n // 2 + 1, dtype=jnp.float32)
        else:
            idx = jnp.asarray(np.fft.fftfreq(n, d=1.0 / n), dtype=jnp.float32)
        f = idx / (n * h)
        if discrete:
            f = jnp.sin(jnp.pi * idx / n) / (jnp.pi * h)
        view = [1, 1, 1]
        view[axis] = f.shape[0]
        out.append(f.reshape(view))
    return out


def dipole_half(shape, voxel_size, b0):
    """Continuous dipole kernel 1/3 - (k.b)^2/|k|^2 on the half spectrum, D(0) = 0.

    Same values as :func:`chisep.physics.dipole_kernel` (sliced to the rfft
    layout); built in JAX so that large grids cost no host time.
    """
    kx, ky, kz = _freqs(shape, voxel_size)
    k2 = kx**2 + ky**2 + kz**2
    kb = kx * b0[0] + ky * b0[1] + kz * b0[2]
    kernel = 1.0 / 3.0 - kb**2 / jnp.where(k2 == 0, 1.0, k2)
    return kernel.at[0, 0, 0].set(0.0).astype(jnp.float32)


def laplacian_half(shape, voxel_size):
    """Eigenvalues of the negative 7-point finite-difference Laplacian (1/mm^2), >= 0."""
    kx, ky, kz = _freqs(shape, voxel_size, discrete=True)
    return ((2 * jnp.pi) ** 2 * (kx**2 + ky**2 + kz**2)).astype(jnp.float32)


def sphere_half(shape, voxel_size, radius_mm):
    """k-space spherical-mean-value kernel S (S(0) = 1) and the sphere's voxel count.

    Same sphere as :func:`chisep.physics.sphere_mask`; ``radius_mm`` may be
    a traced value, so one compiled function serves every radius.
    """
    coords = []
    for axis, n in enumerate(shape):
        idx = jnp.asarray(np.fft.fftfreq(n, d=1.0 / n), dtype=jnp.float32)
        view = [1, 1, 1]
        view[axis] = n
        coords.append((idx * voxel_size[axis]).reshape(view))
    r2 = coords[0] ** 2 + coords[1] ** 2 + coords[2] ** 2
    ball = (r2 <= radius_mm**2 + 1e-6).astype(jnp.float32)
    count = jnp.sum(ball)
    return jnp.real(jnp.fft.rfftn(ball)) / count, count


def gradient(x, voxel_size):
    """Forward differences (periodic) along x, y, z, per mm: shape (3, nx, ny, nz)."""
    return jnp.stack([(jnp.roll(x, -1, axis=a) - x) / voxel_size[a] for a in range(3)])


def divergence_adjoint(g, voxel_size):
    """Adjoint of :func:`gradient` (= minus the backward-difference divergence)."""
    return sum((jnp.roll(g[a], 1, axis=a) - g[a]) / voxel_size[a] for a in range(3))


def gradient_half(shape, voxel_size):
    """|E(k)|^2: k-space eigenvalues of gradient^T gradient (same as the negative Laplacian)."""
    return laplacian_half(shape, voxel_size)


def as_jax(vs: np.ndarray) -> jax.Array:
    return jnp.asarray(np.asarray(vs, dtype=np.float32))
