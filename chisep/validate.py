"""Input checks shared by every stage and model: one rule per kind of input.

Each public function of chisep validates its arrays here at the boundary and
then trusts them. Every check raises :class:`~chisep.errors.InputError` with a
message that names the input, says what was expected and what was found, and
how to fix it. All functions are pure (no I/O) and import only NumPy, so the
command line can use them without starting JAX.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from chisep.errors import InputError

__all__ = [
    "as_volume", "as_mask", "as_multi_echo", "as_magnitude", "as_phase", "check_finite", "check_non_negative", "check_choice",
    "check_volume_and_mask", "check_optional_map", "check_voxel_size", "check_b0_direction", "check_geometry",
    "check_positive", "check_count", "check_same_grid", "check_chi_ppm",
]


def _describe(ndims: Sequence[int]) -> str:
    return " or ".join(f"{n}D" for n in ndims)


def as_volume(value, name: str, *, shape=None, ndims: Sequence[int] = (3,), dtype=np.float32,
              hint: str = "") -> np.ndarray:
    """A real array of the given dimensionality (and spatial ``shape``), as ``dtype``.

    Parameters
    ----------
    value : array-like
    name : str
        The input's name, used in the error message.
    shape : 3 ints, optional
        Required spatial shape (the first three axes).
    ndims : ints
        Allowed numbers of dimensions (3: one volume; 4: echoes on the last axis).
    dtype : numpy dtype or None
        Output dtype; None keeps the input's.
    hint : str
        What to do about a wrong dimensionality (appended to the message).

    Examples
    --------
    >>> as_volume(np.zeros((2, 3, 4)), "chi").dtype
    dtype('float32')
    >>> as_volume(np.zeros((2, 3)), "chi")
    Traceback (most recent call last):
    ...
    chisep.errors.InputError: chi must be a 3D array (x, y, z), got shape (2, 3)
    """
    arr = np.asarray(value)
    if arr.ndim not in tuple(ndims):
        axes = "(x, y, z, echo)" if tuple(ndims) == (4,) else "(x, y, z)" if tuple(ndims) == (3,) else \
            "(x, y, z[, echo])"
        raise InputError(f"{name} must be a {_describe(ndims)} array {axes}, got shape {arr.shape}"
                         + (f"; {hint}" if hint else ""))
    if shape is not None and arr.shape[:3] != tuple(shape):
        raise InputError(f"{name} spatial shape {arr.shape[:3]} does not match the other inputs' {tuple(shape)}; "
                         "all maps must be on the same voxel grid (resample or crop them first)")
    if np.iscomplexobj(arr):
        raise InputError(f"{name} must hold real numbers, got complex values (dtype {arr.dtype}); "
                         "pass np.abs(z) for a magnitude or np.angle(z) for a phase")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(f"{name} must hold numbers, got dtype {arr.dtype}")
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def as_mask(value, shape, *, name: str = "mask", default_all: bool = False, allow_empty: bool = False) -> np.ndarray:
    """A boolean mask of spatial ``shape``; numeric masks must hold only 0 and 1.

    ``value=None`` gives a mask of ones when ``default_all`` (the stages that
    can run on the whole volume), else an error. An empty mask is an error
    unless ``allow_empty``.

    Examples
    --------
    >>> as_mask(np.ones((2, 2, 2), np.uint8), (2, 2, 2)).dtype
    dtype('bool')
    >>> as_mask(np.full((2, 2, 2), 0.4), (2, 2, 2))
    Traceback (most recent call last):
    ...
    chisep.errors.InputError: mask must be boolean or 0/1, found values such as [0.4]; threshold it first (e.g. mask > 0.5)
    """
    if value is None:
        if default_all:
            return np.ones(tuple(shape), dtype=bool)
        raise InputError(f"{name} is required (a boolean brain mask of shape {tuple(shape)})")
    m = np.asarray(value)
    if m.shape != tuple(shape):
        raise InputError(f"{name} shape {m.shape} does not match the data's spatial shape {tuple(shape)}; "
                         "resample the mask onto the data's grid")
    if m.dtype != bool:
        if not np.issubdtype(m.dtype, np.number) or np.iscomplexobj(m):
            raise InputError(f"{name} must be boolean or 0/1, got dtype {m.dtype}")
        odd = m[(m != 0) & (m != 1)]
        if odd.size:
            raise InputError(f"{name} must be boolean or 0/1, found values such as {np.unique(odd)[:5].tolist()}; "
                             "threshold it first (e.g. mask > 0.5)")
        m = m != 0
    if not allow_empty and not m.any():
        raise InputError(f"{name} is empty (no voxel is True); give a brain mask covering the tissue")
    return m


def as_multi_echo(value, name: str, *, n_echoes: int | None = None, shape=None, allow_3d: bool = False) -> np.ndarray:
    """Multi-echo data (x, y, z, echo) as float32; a 3D array becomes one echo when ``allow_3d``."""
    arr = as_volume(value, name, shape=shape, ndims=(3, 4) if allow_3d else (4,), dtype=None,
                    hint="stack the echoes on the last axis")
    if arr.ndim == 3:
        arr = arr[..., None]
    if n_echoes is not None and arr.shape[-1] != n_echoes:
        raise InputError(f"{name} has {arr.shape[-1]} echoes (last axis) but {n_echoes} echo times were given; "
                         "give one echo time per echo volume")
    return arr.astype(np.float32, copy=False)


def as_magnitude(value, name: str = "magnitude", *, shape=None, ndims: Sequence[int] = (3, 4), mask=None,
                 n_echoes: int | None = None) -> np.ndarray:
    """Magnitude images as float32: complex data are reduced to ``|z|``; NaN/inf (inside ``mask``) and
    negative values are errors (a negative "magnitude" is a real part or a phase)."""
    arr = np.asarray(value)
    if np.iscomplexobj(arr):
        arr = np.abs(arr)
    arr = as_volume(arr, name, shape=shape, ndims=ndims, hint="stack the echoes on the last axis")
    if n_echoes is not None and arr.ndim == 4 and arr.shape[-1] != n_echoes:
        raise InputError(f"{name} has {arr.shape[-1]} echoes (last axis) but {n_echoes} were expected; "
                         "give one echo time per echo volume")
    check_finite(arr, name, mask, fix="replace them by 0 or exclude those voxels with the mask")
    check_non_negative(arr, name, mask, fix="pass |S|, the magnitude images (not real parts or phase)")
    return arr


def as_phase(value, name: str = "phase") -> np.ndarray:
    """Phase in rad, one volume (x, y, z) or echoes on the last axis (x, y, z, echo), real and finite, float32."""
    phase = as_volume(value, name, ndims=(3, 4), hint="pass np.angle(z) for complex data")
    check_finite(phase, name, fix="replace them (e.g. by 0) and exclude those voxels with the mask")
    return phase


def check_finite(arr, name: str, mask=None, *, fix: str = "replace them or exclude those voxels with the mask") -> None:
    """No NaN or inf (inside ``mask`` when given; axes beyond the mask's, e.g. echoes, count per voxel)."""
    values = np.asarray(arr)
    # a float32 sum is finite only if every value is (or overflow, then the exact test below
    # decides): 13 ms instead of 45-95 ms for a 1 mm multi-echo volume, checked several times a run
    with np.errstate(over="ignore", invalid="ignore"):
        if values.size == 0 or not np.issubdtype(values.dtype, np.floating) or np.isfinite(values.sum()):
            return
    bad = ~np.isfinite(values)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if bad.ndim > mask.ndim:
            bad = bad.reshape(mask.shape + (-1,)).any(axis=-1)
        bad = bad & mask
    if bad.any():
        where = " inside the mask" if mask is not None else ""
        raise InputError(f"{name} has {int(bad.sum())} voxel(s) with NaN or inf values{where}; {fix}")


def check_non_negative(arr, name: str, mask=None, *, fix: str) -> None:
    """No negative value (inside ``mask`` when given)."""
    values = np.asarray(arr)
    if values.size == 0 or values.min() >= 0:  # a NaN minimum leads to the exact test
        return
    neg = values < 0
    if mask is not None:
        mask = np.asarray(mask, bool)
        neg = neg & mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    if neg.any():
        raise InputError(f"{name} has {int(neg.sum())} negative value(s) (min {float(values[neg].min()):.3g}); {fix}")


def check_choice(value: str, choices: Sequence[str], name: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise an error listing them."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name}={value!r} is not known; valid choices are: {', '.join(choices)}")
    return value


def check_volume_and_mask(volume, mask, *, name: str = "field_hz") -> tuple[np.ndarray, np.ndarray]:
    """A 3D real map and its brain mask: float32 map with zeros outside the mask, bool mask.

    Values outside the mask are never used, so NaNs there are tolerated;
    inside they are an error.
    """
    vol = as_volume(volume, name, dtype=None, hint="combine echoes into one field map before this step")
    msk = as_mask(mask, vol.shape)
    check_finite(vol, name, msk, fix="fix the map or remove those voxels from the mask")
    return np.where(msk, vol, 0).astype(np.float32), msk


def check_optional_map(values, shape, *, name: str) -> np.ndarray | None:
    """An optional non-negative finite map of ``shape`` as float32 (None passes through)."""
    if values is None:
        return None
    arr = as_volume(values, name, shape=shape)
    check_finite(arr, name, fix="replace them (e.g. by 0) before this step")
    check_non_negative(arr, name, fix="give a non-negative map")
    return arr


def check_voxel_size(voxel_size) -> np.ndarray:
    """Three positive finite numbers (mm), as float64; one number means isotropic voxels."""
    try:
        vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        vs = np.zeros(0)
    if vs.size == 1:
        vs = np.repeat(vs, 3)
    if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise InputError(f"voxel_size must be three positive numbers in mm, got {voxel_size!r}; "
                         "take it from the image header (Acquisition.voxel_size)")
    return vs


def check_b0_direction(b0_direction) -> np.ndarray:
    """A non-zero finite 3-vector in voxel axes, normalised to unit length."""
    from chisep import physics

    try:
        return physics.normalise_direction(b0_direction)
    except ValueError as err:
        raise InputError(f"{err}; give the B0 direction in voxel axes (see physics.b0_direction_from_affine)") \
            from None


def check_geometry(voxel_size, b0_direction) -> tuple[np.ndarray, np.ndarray]:
    """Voxel size (3 positive mm) and unit B0 direction."""
    return check_voxel_size(voxel_size), check_b0_direction(b0_direction)


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
    try:
        ok = not isinstance(value, bool) and float(value).is_integer() and int(value) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_chi_ppm(chi, mask, limit_ppm: float, *, name: str = "chi") -> None:
    """Refuse a susceptibility map whose 99th percentile of ``|chi|`` in ``mask`` exceeds ``limit_ppm``:
    brain tissue stays within about +-1 ppm, so such a map is in Hz or ppb."""
    values = np.abs(np.asarray(chi)[np.asarray(mask, bool)])
    if not values.size:
        return
    chi99 = float(np.percentile(values, 99))
    if chi99 > limit_ppm:
        raise InputError(
            f"{name}: 99th percentile of |chi| in the mask is {chi99:.3g}, expected below {limit_ppm:g} ppm for "
            "brain tissue; the map looks like it is in Hz or ppb. Convert Hz to ppm with "
            "chisep.physics.hz_to_ppm, or divide ppb by 1000")


def check_same_grid(shape_a, shape_b, name_a: str, name_b: str) -> None:
    """Two inputs on the same voxel grid (spatial shapes equal)."""
    if tuple(shape_a)[:3] != tuple(shape_b)[:3]:
        raise InputError(f"{name_a} spatial shape {tuple(shape_a)[:3]} does not match {name_b}'s "
                         f"{tuple(shape_b)[:3]}; both must be on the same voxel grid")
