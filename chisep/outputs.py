"""Outputs of a run: file names (flat or BIDS derivatives), units and descriptions of every map, the writer
that puts maps, sidecars and reports on disk through :mod:`chisep.io`, and where a run's outputs go."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import numpy as np

from chisep import io, signals
from chisep.errors import InputError
from chisep.pipeline import QUALITY_FLAGS, QsmMaps
from chisep.separation.base import SeparationFit
from chisep.settings import EXPERIMENTAL_MODELS

CHI_CONVENTION = "positive chi is paramagnetic; chi referenced to the mean inside the mask"
COMPONENT_CONVENTION = ("chi_para >= 0 and chi_dia >= 0 (diamagnetic magnitude); "
                        "chi_total = chi_para - chi_dia")

#: file stem -> (unit, description, convention)
MAP_SPECS: dict[str, tuple[str, str, str | None]] = {
    "mask": ("1", "brain mask of the final maps (after background-removal erosion)", None),
    "head_mask": ("1", "mask in which the total field was estimated (the given or automatic mask, holes filled)",
                  None),
    "reconstruction_mask": ("1", "reconstruction region: head_mask minus the voxels whose field is unreliable "
                                 "(skull, air, noise); background removal worked here", None),
    "field_total": ("Hz", "total field offset from the multi-echo fit", "positive = higher frequency"),
    "field_noise": ("Hz", "standard error of the total field estimate", None),
    "noise_sigma": ("arbitrary", "noise standard deviation per channel estimated by MP-PCA denoising, in the "
                                 "units of the input magnitude", None),
    "field_local": ("Hz", "local (tissue) field after background removal", "positive = higher frequency"),
    "r2star": ("1/s", "effective transverse relaxation rate R2*", None),
    "r2prime": ("1/s", "reversible relaxation rate R2' = max(R2* - R2, 0); in the region's outermost voxel layer "
                "(quality flag 64) the neighbours' inside", None),
    "chi": ("ppm", "magnetic susceptibility (QSM)", CHI_CONVENTION),
    "chi_para": ("ppm", "paramagnetic susceptibility component", COMPONENT_CONVENTION),
    "chi_dia": ("ppm", "diamagnetic susceptibility component (magnitude)", COMPONENT_CONVENTION),
    "pool_chi_para": ("ppm", "DECOMPOSE: fitted susceptibility of the paramagnetic pool (undetermined where the "
                             "pool is empty; chi_para is the component susceptibility PCS)", None),
    "pool_chi_dia": ("ppm", "DECOMPOSE: fitted susceptibility of the diamagnetic pool, magnitude (undetermined "
                            "where the pool is empty; chi_dia is the component susceptibility DCS)", None),
    "pool_chi_para_std": ("ppm", "standard error of pool_chi_para", None),
    "pcs": ("ppm", "DECOMPOSE: paramagnetic component susceptibility PCS as published (chi_para is PCS lifted "
                   "to max(chi, 0))", None),
    "dcs": ("ppm", "DECOMPOSE: diamagnetic component susceptibility DCS as published, magnitude (chi_dia is DCS "
                   "lifted to max(-chi, 0))", None),
    "bound_active": ("1", "DECOMPOSE: where the QSM bound lifted a component: 0 none, 1 chi_para, 2 chi_dia, "
                          "3 both", None),
    "pool_chi_dia_std": ("ppm", "standard error of pool_chi_dia", None),
    "chi_para_std": ("ppm", "standard deviation (uncertainty) of chi_para", None),
    "chi_dia_std": ("ppm", "standard deviation (uncertainty) of chi_dia", None),
    "residual_field_hz": ("Hz", "chi-separation: field misfit of the fit", None),
    "residual_r2prime": ("1/s", "chi-separation: R2' misfit of the fit", None),
    "r2star_fit": ("1/s", "linear model: R2* predicted from the fitted components", None),
    "chi_fit": ("ppm", "linear model: chi predicted from the fitted components", CHI_CONVENTION),
    "c_para": ("arbitrary", "DECOMPOSE: amplitude of the paramagnetic pool (magnitude units of the input)", None),
    "c_dia": ("arbitrary", "DECOMPOSE: amplitude of the diamagnetic pool (magnitude units of the input)", None),
    "c_0": ("arbitrary", "DECOMPOSE: amplitude of the neutral pool (magnitude units of the input)", None),
    "c_para_std": ("arbitrary", "standard error of c_para", None),
    "c_dia_std": ("arbitrary", "standard error of c_dia", None),
    "c_0_std": ("arbitrary", "standard error of c_0", None),
    "r2star0": ("1/s", "DECOMPOSE: R2* of the pools without their sources", None),
    "r2star0_std": ("1/s", "standard error of r2star0", None),
    "converged": ("1", "voxelwise fit converged (1) or not (0)", None),
    "separable": ("1", "DECOMPOSE: PCS and DCS determined by the data (1: both standard errors at most "
                       "max_component_std_ppm), else 0 (quality bit 4)", None),
    "steps": ("1", "Levenberg-Marquardt steps of the voxelwise fit", None),
    "quality": ("bit flags", "per-voxel quality flags (0 = no problem found); see QUALITY_FLAGS", None),
}

#: flat name -> (desc label, BIDS suffix) of BIDS-derivatives names. Suffixes are BIDS's own where one
#: exists: qMRI maps (Chimap, R2starmap), fmap (fieldmap, Hz), derivatives (mask, dseg). R2' has none;
#: it gets R2primemap on the qMRI pattern, never R2starmap (R2' is not R2*). Any other map is a
#: processed version of the input and keeps the input's suffix, MEGRE, with a desc label.
BIDS_NAMES: dict[str, tuple[str | None, str]] = {
    "mask": ("brain", "mask"),
    "head_mask": ("head", "mask"),
    "reconstruction_mask": ("reconstruction", "mask"),
    "field_total": ("total", "fieldmap"),
    "field_noise": ("noise", "fieldmap"),
    "field_local": ("local", "fieldmap"),
    "residual_field_hz": ("residual", "fieldmap"),
    "noise_sigma": ("noiseSigma", "MEGRE"),
    "r2star": (None, "R2starmap"),
    "r2star_fit": ("fit", "R2starmap"),
    "r2star0": ("r2star0", "R2starmap"),
    "r2star0_std": ("r2star0Std", "R2starmap"),
    "r2prime": (None, "R2primemap"),
    "residual_r2prime": ("residual", "R2primemap"),
    "chi": (None, "Chimap"),
    "chi_fit": ("fit", "Chimap"),
    "chi_para": ("paramagnetic", "Chimap"),
    "chi_dia": ("diamagnetic", "Chimap"),
    "chi_para_std": ("paramagneticStd", "Chimap"),
    "chi_dia_std": ("diamagneticStd", "Chimap"),
    "pool_chi_para": ("poolParamagnetic", "Chimap"),
    "pool_chi_dia": ("poolDiamagnetic", "Chimap"),
    "pool_chi_para_std": ("poolParamagneticStd", "Chimap"),
    "pool_chi_dia_std": ("poolDiamagneticStd", "Chimap"),
    "converged": ("converged", "mask"),
    "separable": ("separable", "mask"),
    "pcs": ("pcs", "Chimap"),
    "dcs": ("dcs", "Chimap"),
    "bound_active": ("boundActive", "dseg"),
    "quality": ("quality", "dseg"),
}
#: the ROI table of a BIDS run: <prefix>_roistats.tsv with a JSON sidecar
ROI_TABLE_SUFFIX = "roistats"


def _camel(words: str) -> str:
    """BIDS labels are alphanumeric: "chi-separation" -> "chiSeparation", "pool_chi_para" -> "poolChiPara"."""
    parts = [w for w in words.replace("-", "_").split("_") if w]
    return "".join(w if i == 0 else w[:1].upper() + w[1:] for i, w in enumerate(parts))


def output_name(name: str, bids_prefix: str | None = None) -> str:
    """File stem of an output: the flat name, or a BIDS-derivatives name for BIDS input.

    Flat names: ``chi``, ``chi-separation/chi_para``, ... With ``bids_prefix``
    (e.g. ``"sub-01_ses-2"``) every map lands in one folder as
    ``<prefix>_desc-<label>_<suffix>`` (:data:`BIDS_NAMES`); a model's maps carry
    the model in the desc label (``desc-chiSeparationParamagnetic_Chimap``).

    Parameters
    ----------
    name : str
        The flat name, ``"<model>/<map>"`` for a model's map.
    bids_prefix : str, optional

    Returns
    -------
    str, without the ``.nii.gz`` extension

    Examples
    --------
    >>> output_name("chi-separation/chi_para", "sub-01")
    'sub-01_desc-chiSeparationParamagnetic_Chimap'
    >>> output_name("chi")
    'chi'
    """
    if bids_prefix is None:
        return name
    model, _, stem = name.rpartition("/")
    desc, suffix = BIDS_NAMES.get(stem, (_camel(stem), "MEGRE"))
    if model:
        desc = _camel(model) + (desc[:1].upper() + desc[1:] if desc else "")
    return f"{bids_prefix}_" + (f"desc-{desc}_" if desc else "") + suffix


#: unit of each model's residual map (the models weigh their misfits differently)
RESIDUAL_UNITS = {"chi-separation": ("ppm", "chi-separation: residual of the joint fit, sqrt((field misfit / "
                                             "(CF 1e-6))^2 + (R2' misfit / mean Dr)^2)"),
                  "linear": ("1", "linear model: weighted residual norm, in noise standard deviations"),
                  "decompose": ("arbitrary", "DECOMPOSE: RMS misfit of the complex signal over echoes "
                                             "(magnitude units of the input)")}


def _spec(name: str, model: str | None = None) -> tuple[str, str, str | None]:
    """(unit, description, convention) of an output map; every map has a real unit."""
    if name == "residual" and model in RESIDUAL_UNITS:
        return (*RESIDUAL_UNITS[model], None)
    if name not in MAP_SPECS:
        raise KeyError(f"output map {name!r} has no unit in MAP_SPECS; add it there")
    return MAP_SPECS[name]


class MapWriter:
    """Writes maps on the input grid; remembers what it wrote for the provenance."""

    def __init__(self, out_dir: Path, affine, header, overwrite: bool, bids_prefix: str | None = None):
        self.out_dir, self.affine, self.header, self.overwrite = out_dir, affine, header, overwrite
        self.bids_prefix = bids_prefix
        self.written: list[str] = []

    def map(self, rel_name: str, array, *, spec_name: str | None = None, extra: Mapping | None = None):
        model = rel_name.rpartition("/")[0] or None
        unit, description, convention = _spec(spec_name or Path(rel_name).name, model)
        array = np.asarray(array)
        if array.dtype == bool:
            array = array.astype(np.uint8)
        elif np.issubdtype(array.dtype, np.floating):
            array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        signals.checkpoint()
        path = self.out_dir / f"{output_name(rel_name, self.bids_prefix)}.nii.gz"
        io.save_map(path, array, affine=self.affine, header=self.header, unit=unit, description=description,
                    convention=convention, overwrite=self.overwrite, extra=extra)
        self.written.append(str(path.relative_to(self.out_dir)))
        return path

    def separation(self, subdir: str | None, result: SeparationFit, *, with_extras: bool):
        prefix = f"{subdir}/" if subdir else ""
        self.map(prefix + "chi_para", result.chi_para)
        self.map(prefix + "chi_dia", result.chi_dia)
        if not with_extras:
            return
        for name in ("chi_para_std", "chi_dia_std", "residual"):
            value = getattr(result, name)
            if value is not None:
                self.map(prefix + name, value, extra={"Model": subdir})
        for name, value in result.extra.items():
            self.map(prefix + name, value, extra={"Model": subdir})


def write_separations(writer: MapWriter, results: Mapping[str, SeparationFit]) -> None:
    """Each model's maps in its own name space; the first model's chi_para/chi_dia also as the run's own."""
    for i, (model, result) in enumerate(results.items()):
        if i == 0:
            writer.separation(None, result, with_extras=False)
        writer.separation(model, result, with_extras=True)


def write_qsm_maps(writer: MapWriter, qsm: QsmMaps, r2prime: np.ndarray | None = None) -> None:
    writer.map("mask", qsm.mask)
    writer.map("head_mask", qsm.head_mask)
    writer.map("reconstruction_mask", qsm.reconstruction_mask)
    writer.map("field_total", qsm.field_total)
    writer.map("field_noise", qsm.field_noise)
    writer.map("field_local", qsm.field_local)
    writer.map("r2star", qsm.r2star)
    if r2prime is not None:
        writer.map("r2prime", r2prime)
    writer.map("chi", qsm.chi)
    if qsm.noise_sigma is not None:
        writer.map("noise_sigma", qsm.noise_sigma)


def write_report(out: Path, maps: Mapping[str, np.ndarray], mask: np.ndarray, voxel_size, *,
                 labels: np.ndarray | None = None, label_names: Mapping[int, str] | None = None,
                 first_model: str | None = None, overwrite: bool = False,
                 bids_prefix: str | None = None, excluded: np.ndarray | None = None,
                 affine: np.ndarray | None = None, subject: str | None = None) -> tuple[list[str], list[dict]]:
    """roi_stats.csv (every map, every label) and report.png (montage of the main maps).

    ``excluded``: voxels left out as unreliable; the figure shows them in red
    in a last row and its title gives their volume. ``affine`` orients the
    figure (L/R marks) and places its cuts through the basal ganglia
    (:func:`chisep.report.report_slices`). Returns the files written and the ROI rows.
    """
    from chisep import report

    table_name, png_name = ((f"{bids_prefix}_{ROI_TABLE_SUFFIX}.tsv", f"{bids_prefix}_report.png") if bids_prefix
                            else ("roi_stats.csv", "report.png"))
    if labels is None:
        labels, label_names = report.regions_from_mask(mask)
    rows = report.roi_statistics(maps, labels, label_names, voxel_size=voxel_size, mask=mask)
    io.write_bytes(out / table_name, report.roi_table_csv(rows, delimiter="\t" if bids_prefix else ",").encode(),
                   overwrite=overwrite)
    written = [table_name]
    if bids_prefix:  # BIDS describes a TSV's columns in a JSON beside it
        io.write_json(out / f"{bids_prefix}_{ROI_TABLE_SUFFIX}.json", report.ROI_COLUMN_DESCRIPTIONS,
                      overwrite=overwrite)
        written.append(f"{bids_prefix}_{ROI_TABLE_SUFFIX}.json")
    shown = {k: maps[k] for k in ("magnitude", "chi", "r2star") if k in maps}
    if first_model is not None:
        shown["chi_para"] = maps[f"{first_model}:chi_para"]
        shown["chi_dia"] = maps[f"{first_model}:chi_dia"]
    mask_ml = float(np.count_nonzero(mask) * np.prod(voxel_size)) / 1000.0
    title = (f"{subject}: " if subject else "") + f"chisep {first_model or 'QSM'}\nbrain mask {mask_ml:.0f} mL"
    if excluded is not None:
        excluded_ml = float(np.count_nonzero(excluded) * np.prod(voxel_size)) / 1000.0
        title += f"; excluded as unreliable field: {excluded_ml:.1f} mL"
    axcodes = report.orientation_codes(affine)
    figure = report.montage_figure(shown, mask=mask, voxel_size=voxel_size, title=title, highlight=excluded,
                                   highlight_label="excluded (unreliable field)", axcodes=axcodes,
                                   slices=report.report_slices(mask, voxel_size, axcodes))
    io.write_bytes(out / png_name, report.figure_png_bytes(figure), overwrite=overwrite)
    return written + [png_name], rows


def subject_name(sources: Mapping, bids_prefix: str | None) -> str:
    """What the report calls the data: the BIDS prefix (of the output, else of the input), else the first
    magnitude file's name."""
    if bids_prefix:
        return bids_prefix
    if (sources.get("bids") or {}).get("prefix"):
        return sources["bids"]["prefix"]
    files = sources.get("magnitude_files") or []
    return Path(files[0]).name.replace(".nii.gz", "").replace(".nii", "") if files else "data"


def write_html_report(out: Path, *, data, qsm: QsmMaps, results: Mapping[str, SeparationFit], r2prime,
                      quality, roi_rows, timings, settings: Mapping, references: Mapping[str, str],
                      bids_prefix: str | None = None, overwrite: bool = False) -> str:
    """report.html: one self-contained page with summary, mask check, maps, quality, ROI table,
    timings, ``settings`` (as recorded in provenance.json) and ``references`` (method -> citation;
    :mod:`chisep.html_report`). Returns its file name."""
    from chisep import __version__, html_report, report
    from chisep.qsm.mask import PLAUSIBLE_BRAIN_ML

    acq = data.acquisition
    vox = acq.voxel_size
    axcodes = report.orientation_codes(acq.affine)
    cuts = report.report_slices(qsm.mask, vox, axcodes)
    magnitude = data.magnitude[..., 0]
    subject = subject_name(data.sources, bids_prefix)
    voxel_ml = float(np.prod(vox)) / 1000.0

    def png(figure) -> bytes:
        return report.figure_png_bytes(figure, dpi=100)

    def montage(maps):
        return png(report.montage_figure(maps, mask=qsm.mask, voxel_size=vox, slices=cuts, axcodes=axcodes))

    volumes = {name: float(np.count_nonzero(m)) * voxel_ml for name, m in
               (("brain", qsm.mask), ("head", qsm.head_mask), ("excluded", qsm.excluded_mask))}
    mask_png = png(report.mask_figure(magnitude, qsm.mask, voxel_size=vox, head_mask=qsm.head_mask,
                                      excluded=qsm.excluded_mask, slices=cuts, axcodes=axcodes))
    low, high = PLAUSIBLE_BRAIN_ML
    mask_caption = (f"brain mask {volumes['brain']:.0f} mL (chisep warns outside {low:.0f}-{high:.0f} mL), head mask "
                    f"{volumes['head']:.0f} mL, excluded as unreliable field {volumes['excluded']:.1f} mL. "
                    "The yellow outline must follow the brain's surface, not the scalp or skull.")
    figures = [("Total and local field", montage({"field_total": qsm.field_total, "field_local": qsm.field_local}),
                "Hz; the local field after background removal, windowed +-5 Hz"),
               ("R2* and R2'", montage({"r2star": qsm.r2star, "r2prime": r2prime}),
                "1/s; R2' = R2* - R2 (measured R2, or the R2*-only rule in the settings)"),
               ("QSM", montage({"chi": qsm.chi}), "ppm, positive = paramagnetic, windowed +-0.15 ppm")]
    for model, result in results.items():
        caption = "ppm, both >= 0; chi = chi_para - chi_dia"
        if model in EXPERIMENTAL_MODELS:
            caption += f". {EXPERIMENTAL_MODELS[model]}"
        figures.append((f"{model}: chi_para and chi_dia",
                        montage({"chi_para": result.chi_para, "chi_dia": result.chi_dia}), caption))
    quality_png = png(report.quality_figure(magnitude, quality, flags=QUALITY_FLAGS, voxel_size=vox,
                                            mask=qsm.mask, slices=cuts, axcodes=axcodes))
    summary = {
        "data": subject,
        "magnitude": ", ".join(Path(f).name for f in data.sources.get("magnitude_files", [])),
        "phase": ", ".join(Path(f).name for f in data.sources.get("phase_files", [])),
        "phase scaling": data.sources.get("phase_scaling", ""),
        "grid": f"{' x '.join(map(str, data.shape[:3]))} voxels of "
                f"{' x '.join(f'{v:.3g}' for v in vox)} mm, orientation {''.join(axcodes or ('?',))}",
        "echoes": f"{acq.n_echoes}: " + ", ".join(f"{1000 * t:.3g}" for t in acq.echo_times) + " ms",
        "field strength": f"{acq.field_strength:g} T",
        "B0 direction": f"{acq.b0_angle_deg:.1f} degrees from the slice axis z",
        "brain mask": f"{volumes['brain']:.0f} mL",
        "models": ", ".join(results) or "none (QSM only)",
        "versions": ", ".join(f"{k} {v}" for k, v in io.versions().items() if k in
                              ("chisep", "python", "numpy", "scipy", "nibabel", "jax", "jax_backend")),
    }
    text = html_report.run_report(
        title=f"chisep report: {subject}", subtitle=f"chisep {__version__}, {time.strftime('%Y-%m-%d %H:%M')}",
        summary=summary, warnings=list(qsm.notes) + [EXPERIMENTAL_MODELS[m] for m in results
                                                      if m in EXPERIMENTAL_MODELS],
        mask_png=mask_png, mask_caption=mask_caption, map_figures=figures, quality_png=quality_png,
        quality_flags=[{"bit": bit, "meaning": meaning, "colour": report.QUALITY_COLOURS[bit],
                        "voxels": int(np.count_nonzero(np.asarray(quality).astype(np.int64) & bit))}
                       for bit, meaning in QUALITY_FLAGS.items()],
        roi_rows=roi_rows, timings=timings, settings=settings, references=references)
    name = f"{bids_prefix}_report.html" if bids_prefix else "report.html"
    io.write_bytes(out / name, text.encode("utf-8"), overwrite=overwrite)
    return name


def bids_output_dir(sources: Mapping, out_dir: str | Path | None) -> tuple[Path, str | None]:
    """Output folder and BIDS prefix for loaded data.

    BIDS input without ``out_dir`` goes to ``<root>/derivatives/chisep/sub-X[/ses-Y]/anat``;
    with ``out_dir`` the BIDS names go there. Non-BIDS input needs ``out_dir``.

    Parameters
    ----------
    sources : dict
        ``GreData.sources`` (``"bids"`` set by :func:`chisep.io.load_bids`).
    out_dir : path, optional

    Returns
    -------
    folder : Path
    bids_prefix : str or None
    """
    bids = sources.get("bids")
    if bids is None:
        if out_dir is None:
            raise InputError("--out DIR is required unless the input is a BIDS dataset")
        return Path(out_dir), None
    if out_dir is not None:
        return Path(out_dir), bids["prefix"]
    if not bids.get("root"):
        raise InputError("the BIDS input has no dataset_description.json above it, so derivatives/ has no "
                         "home; pass --out DIR")
    sub = Path(bids["root"]) / "derivatives" / "chisep" / f"sub-{bids['subject']}"
    if bids.get("session"):
        sub = sub / f"ses-{bids['session']}"
    return sub / "anat", bids["prefix"]


def write_derivatives_description(out: Path) -> Path | None:
    """dataset_description.json of the derivatives folder holding ``out`` (BIDS runs), unless one exists.

    The derivatives root is ``out`` without its trailing ``sub-*/ses-*/anat`` folders
    (``derivatives/chisep/`` by default; ``--out DIR`` itself otherwise).

    Parameters
    ----------
    out : path
        A run's output folder.

    Returns
    -------
    Path of the file written, or None when one was there already.
    """
    from chisep import __version__

    root = Path(out)
    while root.name.startswith(("sub-", "ses-")) or root.name == "anat":
        root = root.parent
    path = root / "dataset_description.json"
    if path.exists():  # never replace a description, ours from an earlier run or another tool's
        return None
    return io.write_json(path, {"Name": "chisep derivatives: QSM and susceptibility source separation",
                                "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                                "GeneratedBy": [{"Name": "chisep", "Version": __version__}]})
