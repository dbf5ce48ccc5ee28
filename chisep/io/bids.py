"""BIDS: finding and loading ``*_MEGRE`` runs, writing a multi-echo GRE dataset."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import chisep
from chisep import validate
from chisep.acquisition import Acquisition
from chisep.errors import InputError
from chisep.io.read import BidsRun, GreData, PathLike, load_gre, sidecar_path
from chisep.io.write import _atomic_write, _check_target, _json_text, _make_dir, _nifti_image, _nifti_writer, write_json

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

    Parameters
    ----------
    path : path
        The BIDS root, a subject's or session's folder, or an ``anat`` folder.
    subject, session : str, optional
        Labels without ``sub-`` / ``ses-``; needed when the path holds several.
    echo_times, field_strength, phase_sign, b0_direction, phase_unwrapped
        As in :func:`load_gre`.

    Returns
    -------
    GreData

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
        validate.check_finite(array, role, fix="replace them before writing the dataset")
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

