"""Files in, files out: ``chisep run``, ``chisep separate``, ``chisep simulate`` and ``chisep demo``.

Each loads through :mod:`chisep.io`, computes with :mod:`chisep.pipeline` and writes through
:mod:`chisep.outputs`; nothing is written half: every file is atomic, and an existing output is
kept unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from chisep import io, outputs, physics, signals, validate
from chisep.acquisition import Acquisition
from chisep.errors import InputError, OutputExistsError
from chisep.pipeline import QUALITY_FLAGS, Log, QsmMaps, quality_map, quiet, reconstruct_qsm, separate, stepper
from chisep.separation.base import SeparationInputs
from chisep.separation.baseline import THRESHOLDED_QSM, thresholded_qsm
from chisep.settings import DEFAULT_MODELS, PipelineSettings, SeparationSettings


def run_files(data: "io.GreData", out_dir: str | Path, *, settings: PipelineSettings = PipelineSettings(),
              mask_path: str | Path | None = None, r2_path: str | Path | None = None,
              labels_path: str | Path | None = None, label_names: Mapping[int, str] | None = None,
              bids_prefix: str | None = None, overwrite: bool = False, log: Log = quiet,
              progress_bars: bool = False) -> "RunOutput":
    """Run QSM (and the separation models in ``settings``) on loaded data and write the outputs.

    Writes the maps, ``roi_stats.csv`` (per label of ``labels_path``, or the
    whole mask), ``report.png``, ``report.html`` and, last, ``provenance.json``:
    a folder without it holds an unfinished run.

    Parameters
    ----------
    data : chisep.io.GreData
        From :func:`chisep.io.load_gre` or :func:`chisep.io.load_bids`.
    out_dir : path
        Output folder (created; an existing run is kept unless ``overwrite``).
    settings : PipelineSettings
    mask_path, r2_path, labels_path : path, optional
        A brain mask (the outer limit of the reconstruction), a measured R2 map
        (1/s), a label image for the ROI table (names from the ``.tsv`` beside it
        unless ``label_names``), all on the data's grid.
    bids_prefix : str, optional
        E.g. ``"sub-01_ses-1"``: BIDS-derivatives names (:func:`chisep.outputs.output_name`).
    overwrite : bool
    log : callable(str)
        Receives one line per step.
    progress_bars : bool
        tqdm bars for the long voxelwise steps.

    Returns
    -------
    RunOutput
        The QSM maps, the separation fits, the timings and a short summary.
    """
    from chisep import references

    t_start = time.perf_counter()
    out = io.prepare_output_dir(out_dir, overwrite=overwrite)
    acq = data.acquisition
    inputs = list(data.sources.get("magnitude_files", [])) + list(data.sources.get("phase_files", []))
    mask = r2 = None
    if mask_path is not None:
        mask, _, _ = io.load_map(mask_path, name="mask")
        mask = mask > 0.5
        inputs.append(mask_path)
    if r2_path is not None:
        r2, _, _ = io.load_map(r2_path, name="R2 map")
        inputs.append(r2_path)
    labels = None
    if labels_path is not None:
        labels, _, _ = io.load_map(labels_path, name="label map")
        if labels.shape != data.shape[:3]:
            raise InputError(f"label map {labels_path}: shape {labels.shape} differs from the data {data.shape[:3]}")
        labels = np.rint(labels).astype(np.int32)
        inputs.append(labels_path)
        if label_names is None:
            label_names = io.load_label_names(labels_path)
    log(f"chisep: {data.shape[:3]} voxels of {np.round(acq.voxel_size, 3).tolist()} mm, "
        f"{acq.n_echoes} echoes, {acq.field_strength:g} T, B0 {acq.b0_angle_deg:.1f} deg from z")
    qsm = reconstruct_qsm(data.magnitude, data.phase, acq, mask=mask, settings=settings.qsm, log=log)
    timings = dict(qsm.timings)
    sep_inputs = qsm.separation_inputs(r2=r2, r2_rule=settings.separation.r2_rule, magnitude=qsm.magnitude)
    results = separate(acq, sep_inputs, settings=settings.separation, log=log, timings=timings,
                       progress_bars=progress_bars)

    writer = outputs.MapWriter(out, acq.affine, data.header, overwrite, bids_prefix)
    if bids_prefix:
        outputs.write_derivatives_description(out)
    r2prime = sep_inputs.r2prime  # computed once, the R2' every model saw
    outputs.write_qsm_maps(writer, qsm, r2prime)
    quality = quality_map(qsm, results)
    writer.map("quality", quality, extra={"Flags": {str(k): v for k, v in QUALITY_FLAGS.items()}})
    outputs.write_separations(writer, results)
    with stepper(timings, log)("report"):
        maps = {"magnitude": data.magnitude[..., 0], "chi": qsm.chi, "r2star": qsm.r2star, "r2prime": r2prime}
        for model, result in results.items():
            maps[f"{model}:chi_para"], maps[f"{model}:chi_dia"] = result.chi_para, result.chi_dia
        if results:  # the number every model has to beat, in the same table
            maps[f"{THRESHOLDED_QSM}:chi_para"], maps[f"{THRESHOLDED_QSM}:chi_dia"] = thresholded_qsm(qsm.chi)
        report_files, roi_rows = outputs.write_report(out, maps, qsm.mask, acq.voxel_size, labels=labels,
                                                      label_names=label_names, overwrite=overwrite,
                                                      first_model=next(iter(results), None), bids_prefix=bids_prefix,
                                                      excluded=qsm.excluded_mask, affine=acq.affine,
                                                      subject=outputs.subject_name(data.sources, bids_prefix))
        writer.written += report_files
    timings["total"] = round(time.perf_counter() - t_start, 3)
    settings_record = settings.to_dict()
    cited = references.references_for(settings_record["qsm"], tuple(results))
    with stepper(timings, log)("report.html"):
        writer.written.append(outputs.write_html_report(
            out, data=data, qsm=qsm, results=results, r2prime=r2prime, quality=quality, roi_rows=roi_rows,
            timings=timings, settings=settings_record, references=cited, bids_prefix=bids_prefix,
            overwrite=overwrite))
    signals.checkpoint()  # a swallowed Ctrl-C must not mark the run finished
    io.write_provenance(out, inputs=inputs, settings=settings_record, timings=timings,
                        extra={"acquisition": acq.to_dict(), "sources": _sources_summary(data.sources),
                               "outputs": writer.written, "notes": qsm.notes, "references": cited,
                               "reliability": qsm.reliability.record() if qsm.reliability else None,
                               "models": {m: r.info for m, r in results.items()}},
                        overwrite=overwrite)
    return RunOutput(out_dir=out, qsm=qsm, separations=results, timings=timings,
                     summary=_summary(out, timings, results))


@dataclass
class RunOutput:
    out_dir: Path
    qsm: QsmMaps
    separations: dict
    timings: dict
    summary: str


def separate_files(*, chi, field_strength: float, models: Sequence[str], out_dir, local_field=None,
                   total_field=None, r2star=None, r2=None, field_noise=None, mask=None, magnitude=None, phase=None,
                   echo_times: Sequence[float] | None = None, overwrite: bool = False,
                   log: Log = quiet) -> str:
    """``chisep separate``: separation models from map files (e.g. the outputs of ``chisep qsm`` or another tool).

    Parameters
    ----------
    chi : path
        QSM map (ppm); every other map must share its grid.
    field_strength : float, T
    models : sequence of str
        Names from :data:`chisep.separation.MODELS`.
    out_dir : path
    local_field, total_field, r2star, r2, field_noise, mask : path, optional
        Local field (Hz), total field (Hz; chi-separation then fits it with the single-step inversion's
        data terms, the mask being the region whose field is reliable), R2* and measured R2 (1/s), field
        noise (Hz), brain mask (default: the voxels where chi is non-zero).
    magnitude, phase : path or paths, optional
        The multi-echo magnitude DECOMPOSE needs (with ``echo_times`` in s, or sidecars).
    overwrite : bool
    log : callable(str)

    Returns
    -------
    str
        A summary of what was written.
    """
    t0 = time.perf_counter()
    out = io.prepare_output_dir(out_dir, overwrite=overwrite)
    chi_map, affine, header = io.load_map(chi, name="chi")
    validate.check_chi_ppm(chi_map, chi_map != 0, 10.0, name=f"chi {chi}")  # 10 ppm: lesions included
    inputs = [chi]

    def load(path, name):
        if path is None:
            return None
        array, other_affine, _ = io.load_map(path, name=name)
        if array.shape != chi_map.shape or not np.allclose(other_affine, affine, atol=1e-3):
            raise InputError(f"{name} {path}: grid {array.shape} differs from chi {chi} {chi_map.shape}; "
                             "all maps must come from the same reconstruction")
        inputs.append(path)
        return array

    maps = {name: load(path, name) for name, path in
            [("local field", local_field), ("total field", total_field), ("R2*", r2star), ("R2", r2), ("field noise", field_noise),
             ("mask", mask)]}
    mask_map = maps["mask"] > 0.5 if maps["mask"] is not None else chi_map != 0
    mag = None
    tes = echo_times
    if magnitude is not None:
        data = io.load_gre(magnitude, phase if phase is not None else magnitude, echo_times=echo_times,
                           field_strength=field_strength)
        if data.shape[:3] != chi_map.shape:
            raise InputError(f"--magnitude grid {data.shape[:3]} differs from chi {chi_map.shape}")
        mag, tes = data.magnitude, data.acquisition.echo_times
        inputs += data.sources["magnitude_files"]
    # linear and chi-separation need no echo times: without a magnitude the acquisition has none
    acq = Acquisition(echo_times=tes or (), field_strength=field_strength, affine=affine)
    settings = SeparationSettings(models=tuple(models))
    timings: dict = {}
    sep_inputs = SeparationInputs(mask=mask_map, chi=chi_map, local_field_hz=maps["local field"],
                                  total_field_hz=maps["total field"], r2star=maps["R2*"], r2=maps["R2"], field_noise_hz=maps["field noise"],
                                  magnitude=mag, r2_rule=settings.r2_rule)
    results = separate(acq, sep_inputs, settings=settings, log=log, timings=timings)
    writer = outputs.MapWriter(out, affine, header, overwrite)
    outputs.write_separations(writer, results)
    timings["total"] = round(time.perf_counter() - t0, 3)
    signals.checkpoint()  # a swallowed Ctrl-C must not mark the run finished
    io.write_provenance(out, inputs=inputs, settings=dataclasses.asdict(settings), timings=timings,
                        extra={"acquisition": acq.to_dict(), "outputs": writer.written,
                               "models": {m: r.info for m, r in results.items()}}, overwrite=overwrite)
    return _summary(out, timings, results)


def _sources_summary(sources: Mapping) -> dict:
    return {k: v for k, v in sources.items() if k not in ("checksums",)}


def _summary(out: Path, timings: Mapping[str, float], results: Mapping) -> str:
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "total")
    models = ", ".join(results) if results else "none"
    return (f"done in {timings.get('total', 0):.1f} s ({steps}); separation models: {models}; "
            f"outputs in {out}")


# ---------------------------------------------------------------------------
# simulation to files
# ---------------------------------------------------------------------------

#: ground-truth maps written by :func:`simulate_dataset` -> (GroundTruth attribute, unit, description)
TRUTH_MAPS = {
    "chi": ("chi", "ppm", "true susceptibility inside the brain (chi_para - chi_dia)"),
    "chi_para": ("chi_para", "ppm", "true paramagnetic component"),
    "chi_dia": ("chi_dia", "ppm", "true diamagnetic component (magnitude)"),
    "field_total": ("field_total_hz", "Hz", "true total field"),
    "field_local": ("field_local_hz", "Hz", "true local field (sources inside the brain mask)"),
    "field_background": ("field_background_hz", "Hz", "true background field"),
    "r2star": ("r2star", "1/s", "true R2*"),
    "r2": ("r2", "1/s", "true R2"),
    "r2prime": ("r2prime", "1/s", "true R2'"),
    "labels": ("labels", "label", "phantom tissue labels (see labels.tsv)"),
    "brain_mask": ("brain_mask", "1", "intracranial mask of the phantom"),
}


PHANTOMS = ("head", "simple")


def simulate(*, resolution=2.0, snr: float | None = 100.0, field_strength: float = 3.0,
             echo_times: Sequence[float] | None = None, b0_angle_deg: float = 0.0,
             scenario: str = "healthy", seed: int = 0, integer_phase: bool = False,
             phantom: str = "head", head: str = "A"):
    """Simulated GRE data in memory.

    Parameters
    ----------
    resolution : float or 3 floats, mm
    snr : float or None
        Signal-to-noise ratio of the first echo in white matter; None: noiseless.
    field_strength : float, T
    echo_times : sequence of float, s, optional
        Default: the phantom's (head: 5-29 ms, five echoes).
    b0_angle_deg : float
        Tilt of B0 from the slice axis (oblique acquisition).
    scenario : str
        ``"healthy"``, ``"paradoxical-calcification"``, ``"microbleeds"``, ``"calcified-lesion"``, ``"all"``.
    seed : int
    integer_phase : bool
        Phase stored as scanner integers (simple phantom only).
    phantom : {"head", "simple"}
        ``"head"`` (default): the realistic whole head of :func:`chisep.sim.simulate_head`
        (simulated on a twice finer grid, with skull, scalp fat, coil bias,
        static-dephasing R2' and a measured R2 map). ``"simple"``: the label phantom
        simulated on the output grid (:func:`chisep.sim.gre.simulate_gre`), fast, for
        tests of mechanics; it flatters every method (inverse crime).
    head : {"A", "B"}
        B is the holdout head.

    Returns
    -------
    GreSimulation
        Magnitude, phase, acquisition and the ground truth.
    """
    b0 = physics.direction_from_angles(b0_angle_deg) if b0_angle_deg else None
    if phantom == "head":
        from chisep.sim.head import DEFAULT_HEAD_ECHO_TIMES, simulate_head

        if integer_phase:
            raise InputError("integer phase is only simulated with the simple phantom (--phantom simple)")
        return simulate_head(resolution, head=head, scenario=scenario, snr=snr, seed=seed,
                             field_strength=field_strength, b0_direction=b0,
                             echo_times=tuple(echo_times or DEFAULT_HEAD_ECHO_TIMES))
    if phantom != "simple":
        raise InputError(f"phantom must be one of {PHANTOMS}, got {phantom!r}")
    from chisep.sim.gre import DEFAULT_ECHO_TIMES, simulate_gre
    from chisep.sim.phantom import head_phantom

    return simulate_gre(head_phantom(resolution, scenario=scenario, seed=seed), field_strength=field_strength,
                        echo_times=tuple(echo_times or DEFAULT_ECHO_TIMES), snr=snr, seed=seed,
                        b0_direction=b0, integer_phase=integer_phase)


def simulate_dataset(out_dir: str | Path, *, subject: str = "phantom", overwrite: bool = False,
                     log: Log = quiet, truth_dir: str | Path | None = None, **simulation) -> dict:
    """Simulate a head and write it as subject ``subject`` of the BIDS dataset ``out_dir`` (created or
    added to), its ground truth in ``truth_dir`` (default ``derivatives/truth/``), every file atomically.

    Parameters
    ----------
    out_dir : path
    subject : str
        BIDS label without ``sub-``.
    overwrite : bool
    log : callable(str)
    truth_dir : path, optional
    **simulation
        The keywords of :func:`simulate`.

    Returns
    -------
    dict
        ``bids_root``, ``truth_dir``, ``run`` (the written MEGRE run), ``simulation``
        (the in-memory data) and ``r2_path`` (the measured R2 map, or None).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: expected a folder, found a file")
    truth_dir = out / "derivatives" / "truth" if truth_dir is None else Path(truth_dir)
    if (truth_dir / "provenance.json").exists() and not overwrite:
        raise OutputExistsError(f"{out} already holds a simulation; pass --overwrite or choose another --out")
    log("simulating: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in simulation.items()
                                   if v is not None and v is not False))
    with stepper({}, log)("simulation"):  # minutes at 1 mm: say it is alive
        sim = simulate(**simulation)
    run = io.write_bids_megre(out, subject, sim.magnitude, sim.phase, sim.acquisition, overwrite=overwrite,
                              extra_sidecar={"ChisepSimulation": _jsonable_settings(simulation)})
    affine = sim.acquisition.affine
    for stem, (attr, unit, description) in TRUTH_MAPS.items():
        io.save_map(truth_dir / f"{stem}.nii.gz", getattr(sim.truth, attr), affine=affine, unit=unit,
                    description=description, overwrite=overwrite)
    r2_path = None
    if sim.r2_measured is not None:
        # what a user measures with a multi-echo spin echo: a noisy R2 map, an input like the GRE
        r2_path = out / "derivatives" / "spinecho" / f"sub-{subject}_R2map.nii.gz"
        io.save_map(r2_path, sim.r2_measured, affine=affine, unit="1/s",
                    description="R2 measured by a simulated multi-echo spin echo (5 % noise); give it as --r2",
                    overwrite=overwrite)
    names = "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in sorted(sim.truth.label_names.items()))
    io.write_bytes(truth_dir / "labels.tsv", names.encode(), overwrite=overwrite)
    signals.checkpoint()  # a swallowed Ctrl-C must not mark the run finished
    io.write_provenance(truth_dir, inputs=[], settings={"subject": subject, **_jsonable_settings(simulation)},
                        timings={"simulate": round(time.perf_counter() - t0, 3)},
                        extra={"acquisition": sim.acquisition.to_dict(), "noise_sigma": sim.truth.noise_sigma,
                               "dr_para_hz_per_ppm": sim.truth.dr_para, "dr_dia_hz_per_ppm": sim.truth.dr_dia},
                        overwrite=overwrite)
    return {"bids_root": out, "truth_dir": truth_dir, "run": run, "simulation": sim, "r2_path": r2_path}


def _jsonable_settings(settings: Mapping) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------
def demo(out_dir: str | Path = "chisep-demo", *, resolution=2.0, scenario: str = "all", snr: float = 100.0,
         models: Sequence[str] = DEFAULT_MODELS, overwrite: bool = False, log: Log = quiet,
         phantom: str = "head", head: str = "A") -> str:
    """Simulate a head, run the whole pipeline with ``models``, score it against the truth.

    Writes ``bids/`` (the simulated dataset and its truth), ``run/`` (the
    outputs of :func:`run_files`), ``accuracy.md`` and ``comparison.png``.

    Parameters
    ----------
    out_dir : path
    resolution, scenario, snr, phantom, head
        As in :func:`simulate`.
    models : sequence of str
        Separation models (default: chi-separation and linear).
    overwrite : bool
    log : callable(str)

    Returns
    -------
    str
        The accuracy table for the terminal and where the rest is.
    """
    from chisep import report

    t0 = time.perf_counter()
    out = io.prepare_output_dir(out_dir, overwrite=overwrite)
    for name in ("accuracy.md", "comparison.png"):
        if (out / name).exists() and not overwrite:
            raise OutputExistsError(f"{out / name} exists; pass --overwrite or choose another --out")
    what = f"the realistic head {head}" if phantom == "head" else "the simple phantom"
    log(f"1/3 simulating {what} at {resolution} mm (scenario {scenario!r}, SNR {snr:g})")
    sim = simulate_dataset(out / "bids", resolution=resolution, scenario=scenario, snr=snr,
                           overwrite=overwrite, log=log, phantom=phantom, head=head)
    truth = sim["simulation"].truth
    log("2/3 running QSM and source separation")
    # read back on purpose: the demo takes the user's path, files in and files out (phase scaling,
    # sidecars, NIfTI round trip), so its scores include what loading does
    data = io.load_bids(out / "bids")
    run = run_files(data, out / "run", settings=PipelineSettings(separation=SeparationSettings(models=tuple(models))),
                    labels_path=sim["truth_dir"] / "labels.nii.gz", label_names=truth.label_names,
                    r2_path=sim["r2_path"],
                    overwrite=overwrite, log=log, progress_bars=log is not quiet)
    log("3/3 scoring against the ground truth")
    mask = run.qsm.mask & truth.brain_mask
    true_maps = {"chi": truth.chi, "chi_para": truth.chi_para, "chi_dia": truth.chi_dia}
    baseline_para, baseline_dia = thresholded_qsm(run.qsm.chi)
    estimates = {"qsm": {"chi": run.qsm.chi}, THRESHOLDED_QSM: {"chi_para": baseline_para, "chi_dia": baseline_dia}}
    for model, result in run.separations.items():
        estimates[model] = {"chi": result.chi_para - result.chi_dia, "chi_para": result.chi_para,
                            "chi_dia": result.chi_dia}
    rows = report.accuracy_table(true_maps, estimates, mask=mask, labels=truth.labels,
                                 label_names=truth.label_names)
    table = report.format_table(rows, digits=3)
    figure = report.comparison_figure(true_maps, estimates, mask=mask, voxel_size=data.acquisition.voxel_size,
                                      labels=truth.labels, label_names=truth.label_names,
                                      title="chisep demo: truth, estimates, errors")
    io.write_bytes(out / "comparison.png", report.figure_png_bytes(figure), overwrite=overwrite)
    text = (f"# chisep demo: accuracy against the phantom's ground truth\n\n"
            f"NRMSE in % (demeaned in the mask); ROI columns are mean ppm; the `truth` rows are the true values.\n\n"
            f"{table}\n")
    io.write_bytes(out / "accuracy.md", text.encode(), overwrite=overwrite)
    return (f"{_terminal_accuracy(rows)}\nall regions: {out / 'accuracy.md'}\n"
            f"demo finished in {time.perf_counter() - t0:.0f} s; open {run.out_dir / 'report.html'} in a browser "
            f"(figures: {out / 'comparison.png'}, {run.out_dir / 'report.png'})")


#: regions of the demo's terminal table and their column labels (the full table goes to accuracy.md)
TERMINAL_REGIONS = {"globus_pallidus": "GP", "caudate": "caudate", "white_matter": "WM"}


def _terminal_accuracy(rows: Sequence[Mapping]) -> str:
    """The accuracy table cut to fit 100 columns: NRMSE, ROI slope and three region means, with units."""
    from chisep import report

    compact = []
    for row in rows:
        line = {"model": row["model"], "map": row["map"], "NRMSE %": row["nrmse"], "ROI slope": row["roi_slope"]}
        for region, label in TERMINAL_REGIONS.items():
            if region in row:
                line[f"{label} ppm"] = row[region]
        compact.append(line)
    return ("accuracy against the ground truth (NRMSE in % after demeaning in the brain mask; region means in ppm;"
            "\nthe truth rows hold the true means; thresholded-qsm is the baseline to beat)\n"
            + report.format_table(compact, digits=3))
