"""The robustness matrix: acquisition variants simulated with ground truth, reconstructed and scored.

Each :class:`Case` changes one thing against the standard acquisition (3 T, six echoes 4-34 ms,
SNR 100, axial, whole head): field strength, obliquity, anisotropic voxels, a slab, echo count
and spacing, SNR, a haemorrhage or a calcification, integer phase and its sign read through the
NIfTI loader. :func:`prepare` simulates a case (the simple phantom, or the realistic head),
:func:`run_case` reconstructs it and scores the field, R2* and chi against the truth.
``tests/test_robustness.py`` asserts bounds on the matrix at 5 mm; ``benchmarks/bench_robustness.py``
prints it at any resolution.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chisep import io, physics, pipeline
from chisep.acquisition import Acquisition
from chisep.sim.gre import simulate_gre
from chisep.sim.phantom import head_phantom

STANDARD_TES = (0.004, 0.010, 0.016, 0.022, 0.028, 0.034)


@dataclass(frozen=True)
class Case:
    """One cell of the matrix: simulation settings plus how the data reach the pipeline."""

    name: str
    field_strength: float = 3.0
    echo_times: tuple = STANDARD_TES
    snr: float | None = 100.0
    b0_tilt_deg: float = 0.0
    anisotropic: bool = False       # voxel size (r, r, 1.5 r) instead of r (bench: --anisotropic)
    slab_fraction: float = 1.0      # keep this central fraction of the z slices
    lesion: str | None = None       # "haemorrhage" (chi_para 1 ppm) or "calcification" (chi_dia 3 ppm)
    integer_phase: bool = False     # phase stored as int -4096..4095, read back through the loader
    phase_sign: int = 1             # sign of the simulated phase (vendor convention)
    load_phase_sign: int | None = None  # sign given to the loader (default: the right one)
    note: str = ""


CASES = (
    Case("standard"),
    Case("1.5T", field_strength=1.5, note="Dr and fields scale with B0"),
    Case("7T", field_strength=7.0, note="phase wraps between echoes (|f| dTE > 0.5)"),
    Case("7T-short-TE", field_strength=7.0, echo_times=tuple(0.003 + 0.0025 * i for i in range(6)),
         note="the remedy chisep's warning suggests: 2.5 ms spacing"),
    Case("oblique15", b0_tilt_deg=15.0),
    Case("oblique30", b0_tilt_deg=30.0),
    Case("anisotropic", anisotropic=True),
    Case("slab", slab_fraction=0.5, note="central half of the z slices"),
    Case("single-echo", echo_times=(0.020,), note="no R2* (zeros) and a note"),
    Case("2-echoes", echo_times=(0.008, 0.020)),
    Case("4-echoes", echo_times=(0.004, 0.012, 0.020, 0.028)),
    Case("8-echoes", echo_times=tuple(0.004 + 0.004 * i for i in range(8))),
    Case("uneven-TE", echo_times=(0.003, 0.007, 0.014, 0.025, 0.033)),
    Case("snr20", snr=20.0),
    Case("snr1000", snr=1000.0),
    Case("haemorrhage", lesion="haemorrhage", note="sphere r 12 mm, chi_para 1 ppm"),
    Case("calcification", lesion="calcification", note="sphere r 8 mm, chi_dia 3 ppm"),
    Case("integer-phase", integer_phase=True, note="int16 phase through NIfTI and the loader"),
    Case("flipped-sign", phase_sign=-1, load_phase_sign=-1, note="conjugate phase, loaded with --phase-sign -1"),
    Case("flipped-sign-ignored", phase_sign=-1, load_phase_sign=1,
         note="failure mode: the wrong sign gives chi negatively correlated with the truth"),
)
CASE_NAMES = tuple(c.name for c in CASES)


@dataclass
class Prepared:
    """Data as the pipeline sees them, and the truth on the same grid."""

    case: Case
    magnitude: np.ndarray
    phase: np.ndarray
    acquisition: Acquisition
    truth: dict            # name -> array: chi, field_total, r2star, brain_mask, lesion
    sources: dict = field(default_factory=dict)


def _lesion_phantom(ph, kind: str):
    """Add a sphere of haemorrhage or dense calcification in the right frontal white matter."""
    centre_mm, radius, para, dia = {"haemorrhage": ((25.0, 10.0, 25.0), 12.0, 1.0, 0.0),
                                    "calcification": ((25.0, 10.0, 25.0), 8.0, 0.0, 3.0)}[kind]
    ijk = np.indices(ph.shape).reshape(3, -1).T
    world = ijk @ ph.affine[:3, :3].T + ph.affine[:3, 3]
    inside = (np.linalg.norm(world - np.asarray(centre_mm), axis=1) <= radius).reshape(ph.shape) & ph.brain_mask
    chi_para = np.where(inside, para, ph.chi_para).astype(np.float32)
    chi_dia = np.where(inside, dia, ph.chi_dia).astype(np.float32)
    chi = np.where(inside, para - dia, ph.chi).astype(np.float32)
    return dataclasses.replace(ph, chi_para=chi_para, chi_dia=chi_dia, chi=chi), inside


#: realistic-head scenarios standing in for the simple phantom's lesion spheres
HEAD_SCENARIOS = {"haemorrhage": ("microbleeds", ("microbleed",)),
                  "calcification": ("calcified-lesion", ("calcification",))}


def _simulate_realistic(case: Case, res, seed: int, b0, head: str):
    """The case on the realistic head (chisep.sim.simulate_head); integer phase quantised afterwards."""
    from chisep.sim import simulate_head
    from chisep.sim.gre import INTEGER_PHASE_MAX

    scenario, lesion_labels = HEAD_SCENARIOS.get(case.lesion, ("healthy", ()))
    sim = simulate_head(res, head=head, scenario=scenario, field_strength=case.field_strength,
                        echo_times=case.echo_times, snr=case.snr, seed=seed, b0_direction=b0,
                        phase_sign=case.phase_sign)
    names = sim.truth.label_names
    lesion = np.isin(sim.truth.labels, [k for k, v in names.items() if v in lesion_labels]) & sim.truth.brain_mask
    phase = sim.phase
    if case.integer_phase:
        scaled = np.round(phase * (INTEGER_PHASE_MAX / np.pi)).astype(np.int32)
        phase = np.where(scaled >= INTEGER_PHASE_MAX, scaled - 2 * INTEGER_PHASE_MAX, scaled).astype(np.int16)
    return dataclasses.replace(sim, phase=phase), lesion


def prepare(case: Case, resolution: float, *, seed: int = 0, anisotropic=None, workdir: Path | None = None,
            phantom: str = "simple", head: str = "A") -> Prepared:
    """Simulate one case at ``resolution`` mm (isotropic, or ``anisotropic`` (a, b, c) mm).

    ``phantom="head"`` uses the realistic head (``head`` "A" or "B"); lesion cases
    then use its microbleed and calcified-lesion scenarios.
    """
    if case.anisotropic:
        res = tuple(anisotropic) if anisotropic is not None else (resolution, resolution, 1.5 * resolution)
    else:
        res = resolution
    b0 = physics.direction_from_angles(case.b0_tilt_deg) if case.b0_tilt_deg else None
    if phantom == "head":
        sim, lesion = _simulate_realistic(case, res, seed, b0, head)
    else:
        ph = head_phantom(res, scenario="healthy", seed=seed)
        lesion = np.zeros(ph.shape, bool)
        if case.lesion:
            ph, lesion = _lesion_phantom(ph, case.lesion)
        sim = simulate_gre(ph, field_strength=case.field_strength, echo_times=case.echo_times, snr=case.snr,
                           seed=seed, b0_direction=b0, integer_phase=case.integer_phase,
                           phase_sign=case.phase_sign)
    truth = {"chi": sim.truth.chi, "field_total": sim.truth.field_total_hz, "r2star": sim.truth.r2star,
             "brain_mask": sim.truth.brain_mask, "lesion": lesion}
    mag, pha, acq = sim.magnitude, sim.phase, sim.acquisition
    if case.slab_fraction < 1:
        nz = mag.shape[2]
        keep = max(4, int(round(nz * case.slab_fraction)))
        z0 = (nz - keep) // 2
        sl = np.s_[:, :, z0:z0 + keep]
        mag, pha = mag[sl], pha[sl]
        truth = {k: v[sl] for k, v in truth.items()}
        affine = acq.affine.copy()
        affine[:3, 3] += affine[:3, 2] * z0
        acq = Acquisition(echo_times=acq.echo_times, field_strength=acq.field_strength, affine=affine,
                          b0_direction=acq.b0_direction)
    sources = {}
    if case.integer_phase or case.load_phase_sign is not None:
        # through files and the loader, as scanner data arrive
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            io.write_bids_megre(tmp, "case", mag, pha, acq)
            data = io.load_bids(tmp, phase_sign=case.load_phase_sign or 1)
            mag, pha, acq, sources = data.magnitude, data.phase, data.acquisition, dict(data.sources)
    return Prepared(case, np.asarray(mag, np.float32), np.asarray(pha), acq, truth, sources)


def fast_settings() -> pipeline.QsmSettings:
    """PDF (robust at coarse voxels, where a spherical-mean kernel is one voxel wide) + Tikhonov."""
    return pipeline.QsmSettings(background="pdf", inversion="tikhonov")


def run_case(prep: Prepared, settings: pipeline.QsmSettings | None = None, *, separation: bool = True) -> dict:
    """QSM (and the linear separation) of one prepared case; metrics against the truth."""
    settings = settings or fast_settings()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qsm = pipeline.reconstruct_qsm(prep.magnitude, prep.phase, prep.acquisition, settings=settings)
        maps = {"field_total": qsm.field_total, "field_noise": qsm.field_noise, "field_local": qsm.field_local,
                "r2star": qsm.r2star, "chi": qsm.chi}
        if separation and prep.acquisition.n_echoes >= 2:
            sep = pipeline.separate(prep.acquisition, qsm.separation_inputs(),
                                    settings=pipeline.SeparationSettings(models=("linear",)))
            maps["chi_para"], maps["chi_dia"] = sep["linear"].chi_para, sep["linear"].chi_dia
    seconds = time.perf_counter() - t0
    t = prep.truth
    m = qsm.mask & t["brain_mask"]
    field_err = np.abs(qsm.field_total[m] - t["field_total"][m])
    result = {
        "case": prep.case.name,
        "shape": prep.magnitude.shape[:3],
        "mask_voxels": int(m.sum()),
        "field_median_err_hz": float(np.median(field_err)),
        # a 2 pi error between echoes is 1/dTE Hz (> 29 Hz for dTE < 34 ms); 5 Hz separates them from noise
        "field_wrong_fraction": float(np.mean(field_err > 5.0)),
        "r2star_median_rel_err": (float(np.median(np.abs(qsm.r2star[m] / t["r2star"][m] - 1)))
                                  if prep.acquisition.n_echoes >= 2 else float("nan")),
        "chi_corr": float(np.corrcoef(qsm.chi[m], t["chi"][m])[0, 1]),
        "nonfinite_in_mask": {k: int((~np.isfinite(v[qsm.mask])).sum()) for k, v in maps.items()},
        "warnings": [str(w.message) for w in caught],
        "notes": list(qsm.notes),
        "seconds": seconds,
        "qsm": qsm,
        "maps": maps,
    }
    lesion = t["lesion"] & qsm.mask
    if lesion.any():
        result["lesion_mean_chi"] = float(qsm.chi[lesion].mean())
        result["lesion_true_chi"] = float(t["chi"][lesion].mean())
    return result
