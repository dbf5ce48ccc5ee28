"""Writing outputs atomically: maps with JSON sidecars, JSON, bytes, output folders, provenance."""

from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import math
import os
import platform
import secrets
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import nibabel as nib
import numpy as np

import chisep
from chisep.errors import InputError, OutputExistsError
from chisep.io.read import GZIP_LEVEL, PathLike, _require_nifti_name, file_sha256, sidecar_path


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


def write_bytes(path: PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write raw bytes (a PNG figure, CSV text encoded as UTF-8) atomically."""
    path = Path(path)
    _check_target(path, overwrite)
    _make_dir(path.parent)
    _atomic_write(path, lambda f: f.write(data))
    return path


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


def versions() -> dict:
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
    software = versions()
    doc = {
        "software": "chisep",
        "chisep_version": chisep.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": software,
        "platform": {"system": platform.platform(), "machine": platform.machine(),
                     "python_implementation": platform.python_implementation()},
        "inputs": records,
        "settings": dict(settings),
        "timings_s": dict(timings),
    }
    doc.update(dict(extra or {}))
    return write_json(out_dir / "provenance.json", doc, overwrite=overwrite)
