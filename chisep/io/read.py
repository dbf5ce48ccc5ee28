"""Reading NIfTI inputs: multi-echo GRE magnitude and phase, maps, JSON sidecars (echo times, field
strength), phase scaling to radians."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import nibabel as nib
import numpy as np

from chisep import physics, validate
from chisep.acquisition import FIELD_STRENGTH_RANGE_T, Acquisition
from chisep.errors import InputError

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
    if raw.dtype.kind == "f":
        validate.check_finite(raw, "phase", fix="replace them (e.g. by 0) before processing")
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

    # C order with the echoes last and contiguous, the layout every stage works fastest in (NIfTI
    # arrays come in Fortran order, and stacking them gives neither)
    if len(files) == 1:
        return np.ascontiguousarray(read(files[0], imgs[0], shape4))
    return np.ascontiguousarray(np.stack([read(p, img, shape4[:3]) for p, img in zip(files, imgs)], axis=-1))


def _check_finite(data: np.ndarray, role: str, files: Sequence[Path]) -> None:
    if data.dtype.kind == "f":
        validate.check_finite(data, f"{role} ({_names(files)})", fix="replace them (e.g. by 0) before processing")


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

