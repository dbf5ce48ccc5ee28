"""Files in and out: NIfTI and BIDS inputs, output maps, JSON sidecars, provenance.

This is the only module of chisep that touches files or nibabel; every other
module works on arrays and an :class:`~chisep.acquisition.Acquisition`.

Inputs
    :func:`load_gre` reads multi-echo gradient-echo magnitude and phase from one
    4D NIfTI per part or one 3D NIfTI per echo, fills echo times and field
    strength from dcm2niix/BIDS JSON sidecars where no argument gives them, and
    rescales the phase to radians (:func:`rescale_phase`). :func:`find_megre_runs`
    and :func:`load_bids` do the same for BIDS ``*_MEGRE`` data.
Outputs
    :func:`save_map`, :func:`write_json`, :func:`write_provenance` and
    :func:`write_bids_megre` write atomically (a hidden temporary file in the
    target directory, then :func:`os.replace`), never replace an existing file
    unless ``overwrite=True``, and validate everything before writing anything.

Conventions: voxel order is kept as stored (no reorientation); the affine is
nibabel's (sform if set, else qform) and gives the voxel size and the B0
direction; echo times are in seconds; phase is in rad in [-pi, pi).
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import json
import math
import os
import platform
import re
import secrets
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence, Union

import nibabel as nib
import numpy as np

import chisep
from chisep import physics
from chisep.acquisition import FIELD_STRENGTH_RANGE_T, Acquisition
from chisep.errors import InputError, OutputExistsError

PathLike = Union[str, "os.PathLike[str]"]

#: Largest difference (mm) between two affines that still counts as the same grid.
AFFINE_TOLERANCE_MM = 1e-3
#: Echo times above this (s) are taken for milliseconds given where seconds are expected.
MAX_ECHO_TIME_S = 1.0
#: Largest disagreement (s) tolerated between the magnitude and phase sidecars' echo times.
ECHO_TIME_TOLERANCE_S = 1e-5
#: gzip level for written .nii.gz (nibabel's default: fast, nearly as small as level 9).
GZIP_LEVEL = 1

NIFTI_SUFFIXES = (".nii.gz", ".nii")


# ---------------------------------------------------------------------------
# data containers
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GreData:
    """Multi-echo GRE data as loaded from files.

    Attributes
    ----------
    magnitude : (x, y, z, e) float32 array
        Magnitude images in stored voxel order, NIfTI scaling applied.
    phase : (x, y, z, e) float32 array, rad in [-pi, pi)
        Phase images rescaled to radians and already multiplied by
        ``acquisition.phase_sign`` (chisep's convention: positive chi gives a
        positive frequency).
    acquisition : Acquisition
        Echo times (s), field strength (T), affine, voxel size, B0 direction.
    header : nibabel header
        Header of the (first) magnitude file, to write outputs on the same grid.
    sources : dict
        Where each value came from (argument or sidecar file), the detected
        phase scaling, the input files and their SHA-256 checksums.
    """

    magnitude: np.ndarray
    phase: np.ndarray
    acquisition: Acquisition
    header: Any
    sources: dict = field(default_factory=dict)

    @property
    def affine(self) -> np.ndarray:
        return self.acquisition.affine

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.magnitude.shape)

    @property
    def n_echoes(self) -> int:
        return int(self.magnitude.shape[3])


@dataclass(frozen=True)
class BidsRun:
    """One BIDS multi-echo GRE run (``*_echo-N_part-mag|phase_MEGRE.nii[.gz]``).

    Attributes
    ----------
    subject : str
        Subject label without ``sub-``.
    session : str or None
        Session label without ``ses-``.
    magnitude, phase : tuple of Path
        Per-echo files sorted by echo number.
    prefix : str
        Entities shared by the run's files, e.g. ``"sub-01_ses-1"``; the stem of
        BIDS-derivatives output names.
    echo_numbers : tuple of int
        The ``echo-`` entity of each file, sorted.
    bids_root : Path or None
        The nearest folder above the files holding ``dataset_description.json``.
    """

    subject: str
    session: str | None
    magnitude: tuple[Path, ...]
    phase: tuple[Path, ...]
    prefix: str
    echo_numbers: tuple[int, ...] = ()
    bids_root: Path | None = None


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------
def _names(paths: Sequence[Path], limit: int = 4) -> str:
    shown = [str(p) for p in paths[:limit]]
    if len(paths) > limit:
        shown.append(f"... ({len(paths) - limit} more)")
    return ", ".join(shown)


def sidecar_path(path: PathLike) -> Path:
    """The JSON sidecar of a NIfTI file: the same path with ``.json`` for ``.nii``/``.nii.gz``."""
    path = Path(path)
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)] + ".json")
    return path.with_name(path.name + ".json")


def _require_nifti_name(path: Path, role: str) -> None:
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise InputError(
            f"{role} output {path}: expected a name ending in .nii.gz or .nii, "
            f"found {path.name!r}. Fix: add the .nii.gz suffix."
        )


def file_sha256(path: PathLike, *, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 checksum (hex) of a file, read in chunks so memory stays small."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(chunk_bytes), b""):
                digest.update(chunk)
    except OSError as exc:
        raise InputError(f"cannot read {path} to compute its checksum: {exc}") from exc
    return digest.hexdigest()


def _as_file_list(value, role: str) -> list[Path]:
    if isinstance(value, (str, os.PathLike)):
        files = [Path(value)]
    elif isinstance(value, Sequence) and not isinstance(value, bytes):
        files = [Path(v) for v in value]
    else:
        raise InputError(
            f"{role}: expected a path or a list of paths (one 3D file per echo), "
            f"found {type(value).__name__}"
        )
    if not files:
        raise InputError(f"{role}: the list of files is empty; give one 4D file or one 3D file per echo")
    missing = [p for p in files if not p.exists()]
    if missing:
        raise InputError(
            f"{role} file(s) not found: {_names(missing)}. Check the path(s); relative "
            f"paths are taken from {Path.cwd()}."
        )
    folders = [p for p in files if p.is_dir()]
    if folders:
        raise InputError(
            f"{role} path(s) {_names(folders)} are folders; expected NIfTI files (.nii or .nii.gz). "
            "For a BIDS folder use load_bids (CLI: --bids)."
        )
    return files


def _open_nifti(path: Path, role: str):
    """nib.load with errors turned into InputError naming the file (data not read yet)."""
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for foreign or damaged files
        raise InputError(
            f"{role} file {path} could not be read as NIfTI ({type(exc).__name__}: {exc}). "
            "Expected a .nii or .nii.gz image; check that the file is complete and really NIfTI "
            "(convert DICOM with dcm2niix)."
        ) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(
            f"{role} file {path}: expected a single-file NIfTI image (.nii or .nii.gz), found a "
            f"{type(img).__name__}. Convert it to NIfTI (e.g. with dcm2niix or mri_convert)."
        )
    dtype = np.dtype(img.header.get_data_dtype())
    if dtype.kind not in "biuf":
        raise InputError(
            f"{role} file {path}: expected real-valued voxels, found data type {dtype}. "
            "Give magnitude and phase as separate real-valued images."
        )
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(
            f"{role} file {path}: the affine (sform/qform) is not a finite invertible matrix "
            f"(found {affine.tolist()}). Fix the header's orientation information."
        )
    return img


def _read_array(img, path: Path, role: str) -> np.ndarray:
    """Voxel data with NIfTI scl_slope/scl_inter applied; integer dtype kept when unscaled."""
    try:
        return np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip (EOFError), short file (ValueError), zlib/OS errors
        raise InputError(
            f"{role} file {path}: the voxel data could not be read ({type(exc).__name__}: {exc}). "
            f"Expected {int(np.prod(img.shape))} voxels of {img.header.get_data_dtype()}; the file is "
            "probably truncated or corrupt. Copy or convert it again."
        ) from exc


def _wrap_half_open(phase: np.ndarray) -> np.ndarray:
    """Wrap float32 phase into [-pi, pi) (float32 rounding at the edges included)."""
    pi32 = np.float32(np.pi)
    two_pi = np.float32(2 * np.pi)
    phase = np.asarray(phase, dtype=np.float32)
    out = np.mod(phase + pi32, two_pi) - pi32
    out = np.where(out >= pi32, out - two_pi, out)
    out = np.where(out < -pi32, out + two_pi, out)
    # values already in range are kept bit for bit (the mod would perturb the last digit)
    return np.where((phase >= -pi32) & (phase < pi32), phase, out).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------
# phase scaling
# ---------------------------------------------------------------------------
#: Known stored phase ranges: (low, high, label). The full circle [-pi, pi)
#: maps linearly onto [low, high). Radian ranges come first.
_RADIAN_RANGES = (
    (-np.pi, np.pi, "radians in [-pi, pi)"),
    (0.0, 2 * np.pi, "radians in [0, 2 pi)"),
)
_CODED_RANGES = (
    (0.0, 4096.0, "12-bit unsigned integer codes 0..4095 (Siemens DICOM)"),
    (-1000 * np.pi, 1000 * np.pi, "milliradians in [-1000 pi, 1000 pi) (GE/Philips-like)"),
    (-4096.0, 4096.0, "12-bit signed integer codes -4096..4095 (Siemens via dcm2niix)"),
    (0.0, 65536.0, "16-bit unsigned integer codes 0..65535"),
    (-32768.0, 32768.0, "16-bit signed integer codes -32768..32767"),
)
_RADIAN_TOLERANCE = 1e-3


def rescale_phase(raw) -> tuple[np.ndarray, str]:
    """Detect how phase values are stored and convert them to radians in [-pi, pi).

    The decision uses the minimum and maximum of the data (NIfTI scaling
    already applied):

    * float data within [-pi, pi] or [0, 2 pi] (tolerance 1e-3) are radians and
      are only wrapped;
    * otherwise the smallest known coded range holding the data is used
      (0..4095, -1000 pi..1000 pi milliradians, -4096..4095, 16-bit unsigned,
      16-bit signed), with ``phase = (raw - low) / (high - low) * 2 pi - pi``;
    * data outside all of these are mapped linearly from their own minimum and
      maximum (one level more for integer-valued data), which the description
      flags as a guess.

    Integer arrays are never taken as radians (integer radians make no sense).

    Parameters
    ----------
    raw : array_like, real
        Stored phase values, any shape.

    Returns
    -------
    phase : float32 array, same shape, rad in [-pi, pi)
    description : str
        What was detected, the data range and the conversion applied.

    Raises
    ------
    InputError
        If the data are empty, complex or hold NaN/Inf.

    Examples
    --------
    >>> phase, how = rescale_phase(np.array([-4096, 0, 2048, 4095], dtype=np.int16))
    >>> [round(float(v), 4) for v in phase], how.split(":")[0]
    ([-3.1416, 0.0, 1.5708, 3.1408], '12-bit signed integer codes -4096..4095 (Siemens via dcm2niix)')
    """
    raw = np.asarray(raw)
    if raw.dtype.kind not in "biuf":
        raise InputError(f"phase: expected real numbers, found data type {raw.dtype}")
    if raw.size == 0:
        raise InputError("phase: the array is empty")
    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
        raise InputError(
            f"phase: expected finite values, found {int(np.count_nonzero(~np.isfinite(raw)))} NaN/Inf"
        )
    lo, hi = float(raw.min()), float(raw.max())
    found = f"data range [{lo:.6g}, {hi:.6g}]"
    if raw.dtype.kind == "f":
        for low, high, label in _RADIAN_RANGES:
            if low - _RADIAN_TOLERANCE <= lo and hi <= high + _RADIAN_TOLERANCE:
                return _wrap_half_open(raw.astype(np.float32)), f"{label}: {found}; wrapped to [-pi, pi)"
    integer_valued = raw.dtype.kind in "biu" or bool(np.all(raw == np.round(raw)))
    tol = 0.5 if integer_valued else 1e-3
    fitting = [(high - low, low, high, label) for low, high, label in _CODED_RANGES
               if low - tol <= lo and hi <= high + tol]
    if fitting:
        _, low, high, label = min(fitting, key=lambda item: item[0])
        offset = f"(raw + {-low:g})" if low < 0 else (f"(raw - {low:g})" if low > 0 else "raw")
        action = f"scaled as {offset} * 2 pi / {high - low:g} - pi"
    else:
        low = lo
        high = hi + 1.0 if integer_valued else hi
        label = "unrecognised phase range"
        action = ("mapped linearly from the data minimum and maximum onto [-pi, pi) (a guess: "
                  "check the scanner's phase scaling)")
        if high <= low:
            return np.zeros(raw.shape, np.float32), f"{label}: {found}; constant phase set to 0 rad"
    scale = np.float32(2 * np.pi / (high - low))
    phase = (raw.astype(np.float32) - np.float32(low)) * scale - np.float32(np.pi)
    return _wrap_half_open(phase), f"{label}: {found}; {action}"


# ---------------------------------------------------------------------------
# sidecars, echo times, field strength
# ---------------------------------------------------------------------------
def _read_sidecar(nifti_path: Path) -> tuple[dict | None, Path]:
    path = sidecar_path(nifti_path)
    if not path.exists():
        return None, path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"JSON sidecar {path} could not be read: {exc}. Fix the JSON or remove the file "
            "and give the values as arguments."
        ) from exc
    if not isinstance(data, dict):
        raise InputError(f"JSON sidecar {path}: expected a JSON object, found {type(data).__name__}")
    return data, path


def _number_list(value, what: str, where: str) -> list[float]:
    try:
        values = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=object)).reshape(-1)]
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} ({where}): expected numbers, found {value!r}") from exc
    if not values:
        raise InputError(f"{what} ({where}): expected at least one number, found none")
    return values


def _check_echo_times(tes: list[float], n_echoes: int, where: str, files: Sequence[Path]) -> None:
    if len(tes) != n_echoes:
        hint = ""
        if n_echoes == 1 and len(files) == 1:
            hint = (" The image is 3D (a single echo); for multi-echo data give one 4D file or "
                    "one 3D file per echo.")
        raise InputError(
            f"echo times ({where}) do not match the data ({_names(files)}): expected {n_echoes} "
            f"echo time(s), one per echo, found {len(tes)}: {', '.join(f'{1000 * t:g}' for t in tes)} ms. "
            f"Fix: give {n_echoes} echo times (ms on the command line), or check that every echo's file "
            f"is listed.{hint}"
        )
    if not all(math.isfinite(t) and t > 0 for t in tes):
        raise InputError(
            f"echo times ({where}) for {_names(files)}: expected positive finite seconds, found {tes}"
        )
    if max(tes) > MAX_ECHO_TIME_S:
        raise InputError(
            f"echo times ({where}) for {_names(files)} look like milliseconds: expected seconds "
            f"(e.g. 0.005), found {tes}. Fix: divide by 1000 (the command line takes --echo-times in ms)."
        )
    if any(b <= a for a, b in zip(tes, tes[1:])):
        raise InputError(
            f"echo times ({where}) must be strictly increasing, found {tes} for files "
            f"{_names(files)}. Fix: list the per-echo files (or the echo times) in echo order."
        )


def _side_echo_times(files: Sequence[Path], sidecars, n_echoes: int):
    """Echo times of one part (magnitude or phase) from its sidecars, or None with the reason."""
    if len(files) == 1:
        data, path = sidecars[0]
        if data is None or "EchoTime" not in data:
            return None, [path]
        return _number_list(data["EchoTime"], "EchoTime", str(path)), [path]
    tes, paths, missing = [], [], []
    for data, path in sidecars:
        paths.append(path)
        if data is None or "EchoTime" not in data:
            missing.append(path)
            continue
        values = _number_list(data["EchoTime"], "EchoTime", str(path))
        if len(values) != 1:
            raise InputError(
                f"JSON sidecar {path}: expected one EchoTime (s) for a 3D per-echo file, found {values}"
            )
        tes.append(values[0])
    return (None, missing) if missing else (tes, paths)


def _resolve_echo_times(echo_times, mag_files, pha_files, mag_sidecars, pha_sidecars, n_echoes):
    if echo_times is not None:
        tes = _number_list(echo_times, "echo_times", "argument")
        _check_echo_times(tes, n_echoes, "--echo-times / echo_times argument", mag_files)
        return tes, "argument"
    mag_tes, mag_where = _side_echo_times(mag_files, mag_sidecars, n_echoes)
    pha_tes, pha_where = _side_echo_times(pha_files, pha_sidecars, n_echoes)
    if mag_tes is None and pha_tes is None:
        raise InputError(
            f"echo times missing for {_names(mag_files)}: expected an echo_times argument (seconds; "
            f"CLI: --echo-times in ms) or EchoTime (s) in the JSON sidecar(s), found no EchoTime in "
            f"{_names(mag_where + pha_where)}. Fix: pass the echo times."
        )
    if mag_tes is not None:
        _check_echo_times(mag_tes, n_echoes, f"EchoTime in {_names(mag_where)}", mag_files)
    if pha_tes is not None:
        _check_echo_times(pha_tes, n_echoes, f"EchoTime in {_names(pha_where)}", pha_files)
    if mag_tes is not None and pha_tes is not None:
        if max(abs(a - b) for a, b in zip(mag_tes, pha_tes)) > ECHO_TIME_TOLERANCE_S:
            raise InputError(
                f"echo times disagree between the magnitude sidecars ({_names(mag_where)}: {mag_tes}) "
                f"and the phase sidecars ({_names(pha_where)}: {pha_tes}). Fix: check that the files "
                "belong together, or pass echo_times explicitly."
            )
    if mag_tes is not None:
        return mag_tes, f"sidecar EchoTime: {_names(mag_where)}"
    return pha_tes, f"sidecar EchoTime: {_names(pha_where)}"


def _check_field_strength(value: float, where: str) -> float:
    lo, hi = FIELD_STRENGTH_RANGE_T
    if not (math.isfinite(value) and lo <= value <= hi):
        raise InputError(
            f"field strength ({where}): expected tesla between {lo} and {hi}, found {value!r}. "
            "Fix: give the main field in T (e.g. 3 or 7), not mT or MHz."
        )
    return value


def _resolve_field_strength(field_strength, sidecars) -> tuple[float, str]:
    if field_strength is not None:
        value = _number_list(field_strength, "field_strength", "argument")
        if len(value) != 1:
            raise InputError(f"field_strength (argument): expected one number in T, found {value}")
        return _check_field_strength(value[0], "field_strength argument"), "argument"
    for data, path in sidecars:
        if data and "MagneticFieldStrength" in data:
            value = _number_list(data["MagneticFieldStrength"], "MagneticFieldStrength", str(path))[0]
            return (_check_field_strength(value, f"MagneticFieldStrength in {path}"),
                    f"sidecar MagneticFieldStrength: {path}")
    for data, path in sidecars:
        if data and "ImagingFrequency" in data:
            mhz = _number_list(data["ImagingFrequency"], "ImagingFrequency", str(path))[0]
            value = mhz * 1e6 / physics.GAMMA_HZ_PER_T
            return (_check_field_strength(value, f"ImagingFrequency {mhz} MHz in {path}"),
                    f"sidecar ImagingFrequency / 42.577 MHz/T: {path}")
    checked = [str(p) for _, p in sidecars]
    raise InputError(
        "field strength missing: expected a field_strength argument in T (CLI: --field-strength) "
        f"or MagneticFieldStrength / ImagingFrequency in a JSON sidecar, found none in "
        f"{_names(checked)}. Fix: pass the field strength."
    )


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------
def _series_geometry(files: list[Path], imgs: list, role: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(x, y, z, e) shape and affine of one part, checked without reading voxel data."""
    if len(files) == 1:
        shape = tuple(int(n) for n in imgs[0].shape)
        if len(shape) == 3:
            shape4 = shape + (1,)
        elif len(shape) == 4:
            shape4 = shape
        else:
            kind = "2D" if len(shape) < 3 else f"{len(shape)}D"
            raise InputError(
                f"{role} file {files[0]}: expected a 3D (one echo) or 4D (x, y, z, echo) image, found "
                f"{kind} data of shape {shape}. Fix: give a 4D multi-echo file or one 3D file per echo"
                + (" (if echoes sit on the 5th axis, drop the singleton 4th axis)." if len(shape) > 4 else ".")
            )
    else:
        shapes = []
        for path, img in zip(files, imgs):
            shape = tuple(int(n) for n in img.shape)
            if len(shape) == 4 and shape[3] == 1:
                shape = shape[:3]
            if len(shape) != 3:
                raise InputError(
                    f"{role} file {path}: per-echo files must each be 3D, found shape {shape}. Fix: "
                    "give one 3D file per echo, or a single 4D file."
                )
            shapes.append(shape)
        if len(set(shapes)) > 1:
            listing = "; ".join(f"{p.name}: {s}" for p, s in zip(files, shapes))
            raise InputError(
                f"{role} per-echo files have different shapes ({listing}): expected one grid for all "
                "echoes. Fix: check that the files belong to the same acquisition."
            )
        _check_same_affine(files, imgs, f"{role} per-echo files")
        shape4 = shapes[0] + (len(files),)
    if min(shape4[:3]) < 2:
        raise InputError(
            f"{role} file(s) {_names(files)}: expected 3D volumes with at least 2 voxels along each "
            f"axis, found spatial shape {shape4[:3]} (2D or single-slice data). QSM needs a 3D volume."
        )
    return shape4, np.asarray(imgs[0].affine, dtype=np.float64)


def _check_same_affine(files: Sequence[Path], imgs: Sequence, what: str) -> None:
    reference = np.asarray(imgs[0].affine, dtype=np.float64)
    for path, img in zip(files[1:], imgs[1:]):
        diff = float(np.max(np.abs(np.asarray(img.affine, dtype=np.float64) - reference)))
        if diff > AFFINE_TOLERANCE_MM:
            raise InputError(
                f"{what} are on different grids: the affine of {path} differs from that of {files[0]} "
                f"by up to {diff:.4g} mm (tolerance {AFFINE_TOLERANCE_MM} mm). Expected the same "
                "voxel-to-world mapping. Fix: check the files belong together, or resample them."
            )


def _read_series(files: list[Path], imgs: list, role: str, shape4: tuple[int, ...], *, as_float: bool):
    def read(path, img, shape):
        data = _read_array(img, path, role).reshape(shape)
        return data.astype(np.float32, copy=False) if as_float or data.dtype.kind == "f" else data

    if len(files) == 1:
        return read(files[0], imgs[0], shape4)
    return np.stack([read(p, img, shape4[:3]) for p, img in zip(files, imgs)], axis=-1)


def _check_finite(data: np.ndarray, role: str, files: Sequence[Path]) -> None:
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InputError(
                f"{role} ({_names(files)}): expected finite values, found {bad} NaN/Inf voxel(s). "
                "Fix: replace them (e.g. by 0) before processing."
            )


#: share of a magnitude's non-zero voxels that may be negative (interpolation ringing) before it is refused
MAGNITUDE_NEGATIVE_SHARE = 0.01
#: a phase image whose central 98 % of values covers less than this share of the circle in every echo
#: is not a phase image (scanner phase wraps: noise alone spans the whole circle)
PHASE_MIN_CIRCLE_SHARE = 0.25


def _check_magnitude_and_phase(mag: np.ndarray, raw_phase: np.ndarray, phase_rad: np.ndarray, scaling: str,
                               mag_files: Sequence[Path], pha_files: Sequence[Path]) -> None:
    """Refuse magnitude and phase that were mixed up, before any work is done.

    * The same data given as both (one file twice, or copies).
    * A magnitude with negative values in more than 1 % of its non-zero voxels:
      magnitude images are |S| >= 0, phase images are centred on 0; most
      likely the two inputs are swapped.
    * A multi-echo phase that covers less than a quarter of the circle in every
      echo: a scanner's phase wraps (its noise alone spans [-pi, pi), and late
      echoes wrap in tissue); a magnitude image read as phase stays in a narrow
      band of non-negative values.
    """
    both = f"--magnitude {_names(mag_files)} and --phase {_names(pha_files)}"
    if mag.shape == raw_phase.shape and np.array_equal(mag, raw_phase.astype(mag.dtype, copy=False)):
        raise InputError(f"{both} hold the same data. Fix: give the phase images (part-phase, '_ph' or "
                         "'_phase' in dcm2niix names) as --phase and the magnitude images as --magnitude.")
    nonzero = mag != 0
    negative = int(np.count_nonzero(mag < 0))
    if negative > MAGNITUDE_NEGATIVE_SHARE * max(int(np.count_nonzero(nonzero)), 1):
        raise InputError(
            f"magnitude ({_names(mag_files)}): expected values >= 0, found {negative} negative voxels "
            f"({100 * negative / max(int(nonzero.sum()), 1):.0f} % of the non-zero ones, minimum "
            f"{float(mag.min()):.4g}): this looks like a phase image. Fix: check that {both} are not swapped.")
    if phase_rad.ndim != 4 or phase_rad.shape[-1] < 2:
        return  # one short echo of a masked, smooth phase may legitimately stay in a narrow band
    shares = []
    for e in range(phase_rad.shape[-1]):
        lo, hi = np.percentile(phase_rad[..., e], [1, 99])
        shares.append((hi - lo) / (2 * np.pi))
    if max(shares) < PHASE_MIN_CIRCLE_SHARE:
        raise InputError(
            f"phase ({_names(pha_files)}): expected values that wrap around [-pi, pi) (a scanner's phase noise "
            f"alone covers the whole circle), found 98 % of the values within {100 * max(shares):.0f} % of it in "
            f"every echo ({scaling}): this looks like a magnitude image. Fix: check that {both} are the right "
            "files and not swapped; if the phase was unwrapped by another tool (in rad), run with --unwrap none.")


def load_gre(
    magnitude: PathLike | Sequence[PathLike],
    phase: PathLike | Sequence[PathLike],
    *,
    echo_times: Sequence[float] | None = None,
    field_strength: float | None = None,
    phase_sign: int = 1,
    b0_direction: Sequence[float] | None = None,
    phase_unwrapped: bool = False,
) -> GreData:
    """Load multi-echo GRE magnitude and phase from NIfTI files.

    Parameters
    ----------
    magnitude, phase : path or list of paths
        One 4D NIfTI (x, y, z, echo), one 3D NIfTI (single echo), or one 3D
        NIfTI per echo in echo order. Magnitude and phase may use either form.
    echo_times : sequence of float, s, optional
        Overrides the sidecars' ``EchoTime`` (s; a list for a 4D file).
    field_strength : float, T, optional
        Overrides the sidecars' ``MagneticFieldStrength`` (or ``ImagingFrequency``
        in MHz divided by 42.577 MHz/T).
    phase_sign : {1, -1}
        Multiplies the stored phase to reach chisep's convention.
    b0_direction : (3,) float, optional
        B0 direction in voxel axes; by default computed from the affine.

    Returns
    -------
    GreData

    Raises
    ------
    InputError
        Missing, unreadable or truncated files; magnitude and phase on different
        grids; echo times missing, not one per echo, not increasing or in ms;
        field strength missing or outside 0.1-20 T; NaN/Inf voxels; all-zero
        magnitude; data that are not 3D or 4D.

    Notes
    -----
    The sidecar of ``x.nii.gz`` is ``x.json``. Magnitude sidecars are read
    first; when both parts have echo times they must agree. Voxel order is
    kept as stored.
    """
    if phase_sign not in (1, -1) or isinstance(phase_sign, bool):
        raise InputError(f"phase_sign: expected +1 or -1, found {phase_sign!r}")
    mag_files = _as_file_list(magnitude, "magnitude")
    pha_files = _as_file_list(phase, "phase")
    mag_imgs = [_open_nifti(p, "magnitude") for p in mag_files]
    pha_imgs = [_open_nifti(p, "phase") for p in pha_files]

    mag_shape, affine = _series_geometry(mag_files, mag_imgs, "magnitude")
    pha_shape, _ = _series_geometry(pha_files, pha_imgs, "phase")
    if mag_shape != pha_shape:
        raise InputError(
            f"magnitude ({_names(mag_files)}) and phase ({_names(pha_files)}) differ in shape: "
            f"expected the same (x, y, z, echo) shape, found {mag_shape} and {pha_shape}. "
            "Fix: check that the files belong to the same acquisition."
        )
    _check_same_affine([mag_files[0], pha_files[0]], [mag_imgs[0], pha_imgs[0]],
                       "magnitude and phase")
    n_echoes = mag_shape[3]

    mag_sidecars = [_read_sidecar(p) for p in mag_files]
    pha_sidecars = [_read_sidecar(p) for p in pha_files]
    tes, te_source = _resolve_echo_times(echo_times, mag_files, pha_files, mag_sidecars,
                                         pha_sidecars, n_echoes)
    b0, b0_source = _resolve_field_strength(field_strength, mag_sidecars + pha_sidecars)
    if b0_direction is not None:
        try:
            b0_direction = physics.normalise_direction(b0_direction)
        except ValueError as exc:
            raise InputError(f"b0_direction (argument): {exc}; expected a 3-vector in voxel axes") from exc

    mag = _read_series(mag_files, mag_imgs, "magnitude", mag_shape, as_float=True)
    _check_finite(mag, "magnitude", mag_files)
    if not np.any(mag):
        raise InputError(
            f"magnitude ({_names(mag_files)}): expected a non-zero image, found all voxels 0. "
            "Fix: check that the right file was given (and that magnitude and phase are not swapped)."
        )
    raw_phase = _read_series(pha_files, pha_imgs, "phase", pha_shape, as_float=not phase_unwrapped)
    _check_finite(raw_phase, "phase", pha_files)
    if phase_unwrapped:
        phase_rad, scaling = (phase_sign * raw_phase).astype(np.float32), "unwrapped phase in rad, read as it is"
    else:
        phase_rad, scaling = rescale_phase(raw_phase)
        _check_magnitude_and_phase(mag, raw_phase, phase_rad, scaling, mag_files, pha_files)
        if phase_sign == -1:
            phase_rad = _wrap_half_open(-phase_rad)
    del raw_phase

    try:
        acquisition = Acquisition(echo_times=tuple(tes), field_strength=b0, affine=affine,
                                  b0_direction=b0_direction, phase_sign=phase_sign)
    except ValueError as exc:  # validated above; kept so no other exception type escapes
        raise InputError(f"acquisition from {_names(mag_files)}: {exc}") from exc

    sources = {
        "magnitude_files": [str(p) for p in mag_files],
        "phase_files": [str(p) for p in pha_files],
        "echo_times": te_source,
        "field_strength": b0_source,
        "b0_direction": "argument" if b0_direction is not None else "affine",
        "phase_sign": phase_sign,
        "phase_scaling": scaling,
        "checksums": {str(p): file_sha256(p) for p in mag_files + pha_files},
    }
    return GreData(magnitude=mag, phase=phase_rad, acquisition=acquisition,
                   header=mag_imgs[0].header.copy(), sources=sources)


# ---------------------------------------------------------------------------
# BIDS
# ---------------------------------------------------------------------------
_BIDS_MEGRE = re.compile(r"^(sub-[A-Za-z0-9]+(?:_[A-Za-z]+-[A-Za-z0-9]+)*)_MEGRE\.nii(?:\.gz)?$")
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_SKIPPED_DIRS = {"derivatives", "sourcedata", "code"}


def bids_label(value: str, entity: str) -> str:
    """A BIDS entity label without its prefix (``sub-01`` -> ``01``), checked to be alphanumeric."""
    label = str(value)
    if label.startswith(f"{entity}-"):
        label = label[len(entity) + 1:]
    if not _LABEL.match(label):
        raise InputError(f"{entity} label: expected letters and digits only, found {value!r}")
    return label


def _find_bids_root(start: Path) -> Path | None:
    for folder in [start, *start.parents]:
        if (folder / "dataset_description.json").is_file():
            return folder
    return None


def find_megre_runs(path: PathLike, subject: str | None = None) -> list[BidsRun]:
    """Find BIDS multi-echo GRE runs under a BIDS root, a subject folder or an anat folder.

    Parameters
    ----------
    path : path
        Folder to search (``derivatives``, ``sourcedata``, ``code`` and hidden
        folders are skipped).
    subject : str, optional
        Keep one subject (``"01"`` or ``"sub-01"``).

    Returns
    -------
    list of BidsRun
        Sorted by subject, session and prefix; files sorted by echo number.

    Raises
    ------
    InputError
        The folder does not exist, holds no ``*_echo-N_part-mag|phase_MEGRE``
        files, the subject is absent, or a run lacks the phase (magnitude) of
        some echo.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(
            f"BIDS path {root}: expected a BIDS root, a subject folder or an anat folder, found "
            + ("a file." if root.exists() else "nothing (it does not exist).")
        )
    wanted = bids_label(subject, "sub") if subject is not None else None
    groups: dict[str, dict] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        for name in names:
            match = _BIDS_MEGRE.match(name)
            if not match:
                continue
            entities = [tuple(part.split("-", 1)) for part in match.group(1).split("_")]
            keys = dict(entities)
            if "echo" not in keys or keys.get("part") not in ("mag", "phase") or not keys["echo"].isdigit():
                continue
            prefix = "_".join(f"{k}-{v}" for k, v in entities if k not in ("echo", "part"))
            group = groups.setdefault(prefix, {"sub": keys["sub"], "ses": keys.get("ses"),
                                               "mag": {}, "phase": {}})
            slot = group[keys["part"]]
            echo = int(keys["echo"])
            if echo in slot:
                raise InputError(
                    f"BIDS run {prefix}: two files for echo {echo} part-{keys['part']} "
                    f"({slot[echo]} and {Path(folder) / name}). Fix: keep one of them."
                )
            slot[echo] = Path(folder) / name
    if not groups:
        raise InputError(
            f"BIDS path {root}: expected files named sub-<label>[_ses-<label>]_echo-<N>_part-mag_MEGRE"
            ".nii[.gz] and ..._part-phase_MEGRE.nii[.gz], found none. Fix: point to the BIDS root, a "
            "subject folder or its anat folder, or give the files directly."
        )
    subjects = sorted({g["sub"] for g in groups.values()})
    if wanted is not None and wanted not in subjects:
        raise InputError(
            f"BIDS path {root}: subject {wanted!r} not found; subjects with MEGRE data: "
            f"{', '.join(subjects)}"
        )
    runs = []
    for prefix, group in sorted(groups.items()):
        if wanted is not None and group["sub"] != wanted:
            continue
        mags, phases = group["mag"], group["phase"]
        if set(mags) != set(phases):
            raise InputError(
                f"BIDS run {prefix}: magnitude echoes {sorted(mags)} and phase echoes {sorted(phases)} "
                "differ. Expected a part-mag and a part-phase file for every echo. Fix: add the "
                "missing files or remove the extra ones."
            )
        echoes = tuple(sorted(mags))
        first = mags[echoes[0]]
        runs.append(BidsRun(
            subject=group["sub"], session=group["ses"],
            magnitude=tuple(mags[e] for e in echoes), phase=tuple(phases[e] for e in echoes),
            prefix=prefix, echo_numbers=echoes, bids_root=_find_bids_root(first.parent),
        ))
    runs.sort(key=lambda r: (r.subject, r.session or "", r.prefix))
    return runs


def load_bids(
    path: PathLike,
    subject: str | None = None,
    *,
    session: str | None = None,
    echo_times: Sequence[float] | None = None,
    field_strength: float | None = None,
    phase_sign: int = 1,
    b0_direction: Sequence[float] | None = None,
    phase_unwrapped: bool = False,
) -> GreData:
    """Load one BIDS multi-echo GRE run (see :func:`find_megre_runs` and :func:`load_gre`).

    Keyword overrides take priority over the sidecars, as in :func:`load_gre`.
    ``sources["bids"]`` records the subject, session, prefix and BIDS root.

    Raises
    ------
    InputError
        Several subjects (or several runs of the chosen subject) and no choice
        made: the message lists them.
    """
    runs = find_megre_runs(path, subject)
    subjects = sorted({r.subject for r in runs})
    if len(subjects) > 1:
        raise InputError(
            f"BIDS path {path} holds MEGRE data of several subjects ({', '.join(subjects)}): expected "
            "one. Fix: choose one with subject=... (CLI: --subject), or use `chisep batch`."
        )
    if session is not None:
        label = bids_label(session, "ses")
        chosen = [r for r in runs if r.session == label]
        if not chosen:
            raise InputError(
                f"BIDS path {path}: session {label!r} not found; sessions: "
                f"{', '.join(sorted({str(r.session) for r in runs}))}"
            )
        runs = chosen
    if len(runs) > 1:
        raise InputError(
            f"BIDS path {path} holds several MEGRE runs ({', '.join(r.prefix for r in runs)}): expected "
            "one. Fix: choose a session, point to one run's folder, or give the files to load_gre."
        )
    run = runs[0]
    data = load_gre(list(run.magnitude), list(run.phase), echo_times=echo_times,
                    field_strength=field_strength, phase_sign=phase_sign, b0_direction=b0_direction,
                    phase_unwrapped=phase_unwrapped)
    sources = dict(data.sources)
    sources["bids"] = {"subject": run.subject, "session": run.session, "prefix": run.prefix,
                       "root": str(run.bids_root) if run.bids_root else None}
    return replace(data, sources=sources)


def _bids_image_dtype(array: np.ndarray, role: str) -> np.dtype:
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise InputError(f"{role}: expected finite values, found NaN/Inf")
        return np.dtype(np.float32)
    if array.dtype.kind in "iu":
        return array.dtype
    raise InputError(f"{role}: expected a real float or integer array, found {array.dtype}")


def write_bids_megre(
    root: PathLike,
    subject: str,
    magnitude,
    phase,
    acquisition: Acquisition,
    *,
    session: str | None = None,
    overwrite: bool = False,
    extra_sidecar: Mapping[str, Any] | None = None,
) -> BidsRun:
    """Write multi-echo GRE data as a BIDS ``MEGRE`` run (one 3D file per echo and part).

    Parameters
    ----------
    root : path
        BIDS root, created if needed; ``dataset_description.json`` is written
        when absent (an existing one is left alone).
    subject : str
        Label, with or without ``sub-``.
    magnitude, phase : (x, y, z, e) or (x, y, z) arrays
        Phase as float radians, or integer codes (e.g. int16 -4096..4095) written
        with their own dtype. Float data are written as float32.
    acquisition : Acquisition
        Echo times, field strength and affine.
    session : str, optional
    overwrite : bool
        Replace existing files of this run.
    extra_sidecar : mapping, optional
        Additional sidecar keys (both parts).

    Returns
    -------
    BidsRun describing the written files.

    Sidecars hold ``EchoTime`` (s), ``EchoNumber``, ``MagneticFieldStrength``
    (T), ``ImagingFrequency`` (MHz) and, for phase, ``Units``.
    """
    if not isinstance(acquisition, Acquisition):
        raise InputError(f"acquisition: expected an Acquisition, found {type(acquisition).__name__}")
    sub = bids_label(subject, "sub")
    ses = bids_label(session, "ses") if session is not None else None
    arrays = {}
    for role, value in (("magnitude", magnitude), ("phase", phase)):
        array = np.asarray(value)
        if array.ndim == 3:
            array = array[..., None]
        if array.ndim != 4:
            raise InputError(f"{role}: expected a (x, y, z, echo) array, found shape {array.shape}")
        arrays[role] = (array, _bids_image_dtype(array, role))
    if arrays["magnitude"][0].shape != arrays["phase"][0].shape:
        raise InputError(
            f"magnitude and phase: expected the same shape, found {arrays['magnitude'][0].shape} "
            f"and {arrays['phase'][0].shape}"
        )
    n_echoes = arrays["magnitude"][0].shape[3]
    if n_echoes != acquisition.n_echoes:
        raise InputError(
            f"write_bids_megre: the arrays hold {n_echoes} echo(es) but the acquisition lists "
            f"{acquisition.n_echoes} echo times {list(acquisition.echo_times)}"
        )
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise InputError(f"BIDS root {root}: expected a folder, found a file")
    prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    cf_mhz = acquisition.centre_frequency / 1e6
    plan = []  # (nifti path, array, dtype, sidecar text)
    for part, role in (("mag", "magnitude"), ("phase", "phase")):
        array, dtype = arrays[role]
        for echo in range(n_echoes):
            meta = {
                "EchoTime": acquisition.echo_times[echo],
                "EchoNumber": echo + 1,
                "MagneticFieldStrength": acquisition.field_strength,
                "ImagingFrequency": cf_mhz,
            }
            if part == "phase":
                meta["Units"] = "rad" if dtype.kind == "f" else "arbitrary"
            meta.update(dict(extra_sidecar or {}))
            name = anat / f"{prefix}_echo-{echo + 1}_part-{part}_MEGRE.nii.gz"
            plan.append((name, array[..., echo], dtype, _json_text(meta, str(sidecar_path(name)))))
    for name, *_ in plan:
        _check_target(name, overwrite)
        _check_target(sidecar_path(name), overwrite)
    _make_dir(anat)
    description = root / "dataset_description.json"
    if not description.exists():
        write_json(description, {
            "Name": "chisep multi-echo GRE data",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "GeneratedBy": [{"Name": "chisep", "Version": chisep.__version__}],
        }, overwrite=False)
    for name, volume, dtype, text in plan:
        img = _nifti_image(volume.astype(dtype, copy=False), acquisition.affine, None)
        _atomic_write(name, _nifti_writer(img, name))
        _atomic_write(sidecar_path(name), lambda f, t=text: f.write(t.encode("utf-8")))
    files = [p for p, *_ in plan]
    return BidsRun(subject=sub, session=ses, magnitude=tuple(files[:n_echoes]),
                   phase=tuple(files[n_echoes:]), prefix=prefix,
                   echo_numbers=tuple(range(1, n_echoes + 1)), bids_root=root)


# ---------------------------------------------------------------------------
# writing: atomic files, maps, JSON, provenance
# ---------------------------------------------------------------------------
def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise InputError(f"output {path}: expected a file path, found a folder. Fix: choose another name.")
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"output {path} already exists; pass --overwrite (overwrite=True in Python) to replace it, "
            "or choose another output folder."
        )


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise InputError(f"output folder {path} cannot be created: a file is in the way ({exc}).") from exc
    except OSError as exc:
        raise InputError(f"output folder {path} cannot be created: {exc}. Fix: choose a writable location.") from exc


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a hidden temporary file in the same folder, then os.replace.

    Readers never see a half-written file, and a crash leaves the previous
    version (or nothing) under the final name; the temporary file is removed on
    any failure.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _nifti_image(array: np.ndarray, affine: np.ndarray, header):
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = image_class(array, affine, header=header)
    img.set_data_dtype(array.dtype)
    hdr = img.header
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"] = 0
    hdr["cal_max"] = 0
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_sform(affine, code=1)  # scanner coordinates, as the input files state
    try:
        hdr.set_qform(affine, code=1)
    except Exception:  # a sheared affine has no quaternion form; the sform keeps it exactly
        hdr.set_qform(None, code=0)
    return img


def _nifti_writer(img, path: Path) -> Callable[[BinaryIO], None]:
    def write(f: BinaryIO) -> None:
        data = img.to_bytes()
        if path.name.endswith(".gz"):
            # mtime=0 and no name in the gzip header: identical maps give identical files
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=GZIP_LEVEL, mtime=0) as gz:
                gz.write(data)
        else:
            f.write(data)

    return write


def _jsonable(obj, where: str):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [_jsonable(v, f"{where}[]") for v in items]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None  # JSON has no NaN/Inf
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict(), where)
    raise InputError(f"{where}: a {type(obj).__name__} cannot be written to JSON; convert it to "
                     "numbers, strings, lists or dicts")


def _json_text(obj, where: str) -> str:
    return json.dumps(_jsonable(obj, where), indent=2, allow_nan=False) + "\n"


def write_json(path: PathLike, obj: Any, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON, atomically (numpy values converted, NaN written as null).

    Raises
    ------
    OutputExistsError
        The file exists and ``overwrite`` is False.
    InputError
        ``obj`` holds something JSON cannot represent.
    """
    path = Path(path)
    text = _json_text(obj, path.name)
    _check_target(path, overwrite)
    _make_dir(path.parent)
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


def load_label_names(path: PathLike) -> dict[int, str] | None:
    """Names of labels (BIDS dseg style TSV: ``index<TAB>name``).

    ``path`` is the TSV itself, or a label image whose same-named ``.tsv``
    beside it is read; None when that TSV does not exist.
    """
    path = Path(path)
    if path.suffix == ".tsv":
        tsv = path
    else:
        tsv = path.with_name(path.name.removesuffix(".gz").removesuffix(".nii") + ".tsv")
        if not tsv.exists():
            return None
    names: dict[int, str] = {}
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t") if lines else []
    if header[:2] != ["index", "name"]:
        raise InputError(f"{tsv}: expected a header 'index<TAB>name', found {lines[0] if lines else 'nothing'!r}")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            names[int(fields[0])] = fields[1]
        except (ValueError, IndexError):
            raise InputError(f"{tsv} line {number}: expected 'index<TAB>name', found {line!r}") from None
    return names


def read_json_or_none(path: PathLike) -> dict | None:
    """A JSON object from a file, or None if it is missing, unreadable or not an object."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def read_csv_rows(path: PathLike) -> list[dict[str, str]]:
    """Rows of a CSV or (``.tsv``) TSV file with a header (e.g. roi_stats.csv) as dicts of strings."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t" if str(path).endswith(".tsv") else ","))


def image_shape(path: PathLike, role: str = "image") -> tuple[int, ...]:
    """Shape of a NIfTI image from its header alone (no voxel data read)."""
    return tuple(_open_nifti(Path(path), role).shape)


def write_bytes(path: PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write raw bytes (a PNG figure, CSV text encoded as UTF-8) atomically."""
    path = Path(path)
    _check_target(path, overwrite)
    _make_dir(path.parent)
    _atomic_write(path, lambda f: f.write(data))
    return path


def load_map(path: PathLike, *, name: str = "map", allow_nonfinite: bool = False):
    """Read a 3D map (chi, field, R2*, mask ...) from NIfTI.

    Parameters
    ----------
    path : path
        .nii or .nii.gz; a 4D file with one volume is accepted as 3D.
    name : str
        Used in error messages (e.g. ``"local field"``).
    allow_nonfinite : bool
        Accept NaN/Inf voxels (refused by default with a message).

    Returns
    -------
    array : (x, y, z) float32, NIfTI scaling applied, stored voxel order
    affine : (4, 4) float64
    header : nibabel header
    """
    path = _as_file_list(path, name)[0]
    img = _open_nifti(path, name)
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{name} file {path}: expected a 3D image, found shape {tuple(img.shape)}. "
                         "Fix: give a 3D map (one volume).")
    data = _read_array(img, path, name).reshape(shape).astype(np.float32, copy=False)
    if not allow_nonfinite:
        _check_finite(data, name, [path])
    return data, np.asarray(img.affine, dtype=np.float64), img.header.copy()


def save_map(
    path: PathLike,
    array,
    *,
    affine,
    header=None,
    unit: str,
    description: str,
    convention: str | None = None,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a 3D/4D map as NIfTI plus a JSON sidecar, atomically.

    Parameters
    ----------
    path : path ending in .nii.gz or .nii
    array : (x, y, z) or (x, y, z, n) array
        Float data are written as float32; bool and integer data (masks, labels)
        as uint8 when they fit in 0..255, else int32.
    affine : (4, 4) array
        Voxel-to-world matrix (usually the input's).
    header : nibabel header, optional
        Template header (e.g. ``GreData.header``); shape and dtype are updated.
    unit, description, convention : str
        Written to the sidecar as ``Units`` (the BIDS key), ``Description``, ``Convention``.
    overwrite : bool
        Replace an existing map (and sidecar).
    extra : mapping, optional
        More sidecar keys.

    Returns
    -------
    Path of the NIfTI file. The sidecar also records ``ChisepVersion``.

    Raises
    ------
    OutputExistsError
        The NIfTI or its sidecar exists and ``overwrite`` is False.
    InputError
        Bad array, affine, name or sidecar content; nothing is written then.
    """
    path = Path(path)
    _require_nifti_name(path, description or "map")
    array = np.asarray(array)
    if array.ndim not in (3, 4) or min(array.shape) < 1:
        raise InputError(f"map {path}: expected a 3D or 4D array, found shape {array.shape}")
    if array.dtype.kind == "b":
        out = array.astype(np.uint8)
    elif array.dtype.kind in "iu":
        small = array.size == 0 or (array.min() >= 0 and array.max() <= 255)
        out = array.astype(np.uint8 if small else np.int32)
    elif array.dtype.kind == "f":
        out = array.astype(np.float32, copy=False)
    else:
        raise InputError(f"map {path}: expected real numbers, found data type {array.dtype}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(f"map {path}: expected a finite 4x4 affine, found shape {affine.shape}")
    if header is not None and not isinstance(header, nib.Nifti1Header):
        raise InputError(f"map {path}: expected a NIfTI header, found {type(header).__name__}")
    meta = {"Units": unit, "Description": description}
    if convention is not None:
        meta["Convention"] = convention
    meta["ChisepVersion"] = chisep.__version__
    meta.update(dict(extra or {}))
    side = sidecar_path(path)
    text = _json_text(meta, str(side))
    _check_target(path, overwrite)
    _check_target(side, overwrite)
    img = _nifti_image(out, affine, header)
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    _make_dir(path.parent)
    _atomic_write(path, _nifti_writer(img, path))
    _atomic_write(side, lambda f: f.write(text.encode("utf-8")))
    return path


def prepare_output_dir(path: PathLike, *, overwrite: bool = False) -> Path:
    """Create (if needed) and check an output folder before any work starts.

    Raises
    ------
    InputError
        ``path`` is an existing file, cannot be created or is not writable.
    OutputExistsError
        The folder already holds a finished run (``provenance.json``) and
        ``overwrite`` is False: fail now rather than after the computation.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output folder {path}: expected a folder, found an existing file. "
                         "Fix: choose another --out path.")
    _make_dir(path)
    probe = path / f".chisep-write-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise InputError(f"output folder {path} is not writable ({exc}). Fix: choose a folder you "
                         "can write to, or change its permissions.") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"output folder {path} is not writable. Fix: choose a folder you can write to.")
    if not overwrite and (path / "provenance.json").exists():
        raise OutputExistsError(
            f"output folder {path} already holds the results of a run (provenance.json); pass "
            "--overwrite (overwrite=True) to replace them, or choose another folder."
        )
    return path


def _versions() -> dict:
    import scipy

    versions = {
        "chisep": chisep.__version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "nibabel": nib.__version__,
    }
    try:
        import jax

        versions["jax"] = jax.__version__
        versions["jax_backend"] = jax.default_backend()
        versions["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception as exc:  # provenance must not fail because an accelerator is misconfigured
        versions.setdefault("jax", None)
        versions["jax_error"] = f"{type(exc).__name__}: {exc}"
    return versions


def write_provenance(
    out_dir: PathLike,
    *,
    inputs: Sequence[PathLike],
    settings: Mapping[str, Any],
    timings: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``provenance.json``: versions, platform, UTC time, inputs with checksums, settings, timings.

    Parameters
    ----------
    out_dir : path
        Output folder (created if needed).
    inputs : sequence of paths
        Input files; each is recorded with its absolute path, size and SHA-256.
    settings : mapping
        Every setting of the run (JSON-serialisable; numpy values are converted).
    timings : mapping of str to float
        Wall time per step, s.
    extra : mapping, optional
        More top-level keys.
    overwrite : bool

    Returns
    -------
    Path of ``provenance.json``.
    """
    out_dir = Path(out_dir)
    records = []
    for item in inputs:
        p = Path(item)
        if not p.is_file():
            raise InputError(f"provenance input {p}: expected an existing file, found none")
        records.append({"path": str(p.resolve()), "size_bytes": p.stat().st_size, "sha256": file_sha256(p)})
    versions = _versions()
    doc = {
        "software": "chisep",
        "chisep_version": chisep.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "platform": {"system": platform.platform(), "machine": platform.machine(),
                     "python_implementation": platform.python_implementation()},
        "inputs": records,
        "settings": dict(settings),
        "timings_s": dict(timings),
    }
    doc.update(dict(extra or {}))
    return write_json(out_dir / "provenance.json", doc, overwrite=overwrite)
