"""End-to-end composition: GRE data -> QSM -> source separation -> files.

The computational functions (:func:`reconstruct_qsm`, :func:`separate`) take
arrays and return arrays; the ``*_files`` functions and :func:`simulate_dataset`
add file handling through :mod:`chisep.io`. The CLI, notebooks and the batch
runner all call these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from chisep import denoise as _denoise
from chisep import io, physics, signals, validate
from chisep.acquisition import Acquisition
from chisep.errors import InputError, OutputExistsError
from chisep.qsm import background as _background
from chisep.qsm import inversion as _inversion
from chisep.qsm import reliability as _reliability
from chisep.separation.base import SeparationFit, SeparationInputs
from chisep.separation.baseline import THRESHOLDED_QSM, thresholded_qsm
from chisep.settings import (  # noqa: F401  (re-exported: the settings are part of the pipeline's API)
    BACKGROUND_METHODS,
    DEFAULT_MODELS,
    DENOISE_METHODS,
    EXPERIMENTAL_MODELS,
    FIELD_FIT_METHODS,
    INVERSION_METHODS,
    MODEL_NAMES,
    R2STAR_METHODS,
    UNWRAP_METHODS,
    PipelineSettings,
    QsmSettings,
    SeparationSettings,
    load_config,
)

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def select_device(name: str) -> None:
    """Make JAX place new arrays on the CPU or the GPU (error if no GPU is present)."""
    import jax

    platform = {"cpu": "cpu", "gpu": "gpu"}[name]
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise InputError(f"--device {name}: JAX finds no {name.upper()} on this machine "
                         f"(available: {', '.join(sorted({d.platform for d in jax.devices()}))}); "
                         "install a CUDA build of jax or use --device cpu") from None
    jax.config.update("jax_default_device", devices[0])


# ---------------------------------------------------------------------------
# QSM reconstruction (arrays in, arrays out)
# ---------------------------------------------------------------------------
@dataclass
class QsmMaps:
    """Outputs of :func:`reconstruct_qsm` (units in the attribute names' docs).

    Masks, from the widest to the narrowest: ``head_mask`` (the given or
    automatic mask, enclosed holes filled: where the field was fitted),
    ``reconstruction_mask`` (``head_mask`` minus the voxels whose field is
    unreliable: where background removal worked) and ``mask`` (the brain mask
    of the outputs: the reconstruction region after background-removal erosion).
    """

    mask: np.ndarray             # bool, brain mask of the final maps
    head_mask: np.ndarray        # bool, the mask the field was estimated in
    field_total: np.ndarray      # Hz
    field_noise: np.ndarray      # Hz, standard error of the field estimate
    field_local: np.ndarray      # Hz
    r2star: np.ndarray           # 1/s
    chi: np.ndarray              # ppm, referenced (settings.reference)
    reconstruction_mask: np.ndarray | None = None  # bool, head_mask minus unreliable voxels (default: mask)
    reliability: "_reliability.Reliability | None" = None
    magnitude: np.ndarray | None = None  # (x, y, z, echo), the magnitude of R2* and separation (denoised or not)
    noise_sigma: np.ndarray | None = None  # (x, y, z), MP-PCA noise level (magnitude units) when denoised
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def __post_init__(self):
        if self.reconstruction_mask is None:
            self.reconstruction_mask = np.asarray(self.mask, bool)

    @property
    def excluded_mask(self) -> np.ndarray:
        """Voxels left out of reconstruction because their field is unreliable.

        Those of the mask the reliability step judged: the given mask, or for an automatic
        mask the brain (scalp, muscle and skull outside it were cut by the brain step, not
        judged unreliable).
        """
        if self.reliability is not None:
            return np.asarray(self.reliability.excluded, bool)
        return np.asarray(self.head_mask, bool) & ~np.asarray(self.reconstruction_mask, bool)

    def separation_inputs(self, *, r2: np.ndarray | None = None, r2_rule: Mapping | None = None,
                          magnitude: np.ndarray | None = None) -> SeparationInputs:
        """The :class:`SeparationInputs` of these maps: ``r2`` measured, else the R2*-only ``r2_rule``
        (:attr:`SeparationSettings.r2_rule`); ``magnitude`` (x, y, z, echo), e.g. ``self.magnitude``, for
        DECOMPOSE and chi-separation's magnitude edges."""
        from chisep.separation.base import R2_RULE_DEFAULT

        return SeparationInputs(mask=self.mask, chi=self.chi, local_field_hz=self.field_local, r2star=self.r2star,
                                r2=r2, field_noise_hz=self.field_noise, magnitude=magnitude,
                                r2_rule=dict(R2_RULE_DEFAULT if r2_rule is None else r2_rule))


#: seconds between "still running" lines of a long stage (the user sees the run is alive)
HEARTBEAT_S = 15.0


def _stepper(timings: dict, log: Log):
    """``with step(name):`` logs the step, a line every HEARTBEAT_S while it runs, its duration when it
    took more than a second, and records its wall time in ``timings``."""

    @contextlib.contextmanager
    def step(name: str):
        signals.checkpoint()
        log(f"  {name} ...")
        t0 = time.perf_counter()
        done = threading.Event()

        def heartbeat():  # JAX and NumPy release the GIL while they compute, so this thread gets to run
            while not done.wait(HEARTBEAT_S):
                log(f"  {name} ... still running ({time.perf_counter() - t0:.0f} s)")

        beat = threading.Thread(target=heartbeat, daemon=True) if log is not _quiet else None
        if beat is not None:
            beat.start()
        try:
            yield
        finally:
            done.set()
            if beat is not None:
                beat.join()
            timings[name] = round(time.perf_counter() - t0, 3)
        if timings[name] >= 1.0:
            log(f"  {name}: {timings[name]:.1f} s")
        signals.checkpoint()

    return step


def reconstruct_qsm(magnitude: np.ndarray, phase: np.ndarray, acquisition: Acquisition, *,
                    mask: np.ndarray | None = None, settings: QsmSettings = QsmSettings(),
                    log: Log = _quiet) -> QsmMaps:
    """Mask -> MP-PCA denoising of the magnitude -> unwrapping and multi-echo field fit ->
    reliability (voxels whose field is unreliable are left out) -> for an automatic mask, the brain cut
    from the head (:func:`chisep.qsm.mask.brain_region`) and field fit and reliability redone on it ->
    R2* (macroscopic-gradient dephasing undone) -> background removal -> inversion.

    Parameters
    ----------
    magnitude, phase : (x, y, z, echo) float arrays (phase in rad, chisep sign convention)
    acquisition : Acquisition
    mask : (x, y, z) bool, optional
        Replaces the automatic mask as the outer limit of the reconstruction (enclosed holes are
        filled); voxels in it whose field is unreliable are still left out (see QsmMaps).
    settings : QsmSettings
    """
    from chisep import relax
    from chisep.qsm import echoes
    from chisep.qsm import mask as _mask

    magnitude = np.asarray(magnitude, dtype=np.float32)
    phase = np.asarray(phase, dtype=np.float32)
    if magnitude.ndim == 3:
        magnitude, phase = magnitude[..., None], phase[..., None]
    if magnitude.shape != phase.shape or magnitude.shape[3] != acquisition.n_echoes:
        raise InputError(f"magnitude {magnitude.shape} and phase {phase.shape} must both be "
                         f"(x, y, z, {acquisition.n_echoes}) for {acquisition.n_echoes} echo times")
    timings: dict = {}
    notes: list = []
    step = _stepper(timings, log)
    vs = acquisition.voxel_size

    with step("mask"):
        if mask is None:
            # the head (brain, scalp, muscle, fat): the brain is cut from it once the field says
            # which voxels are bone and air (after the reliability step)
            head = _mask.brain_mask(magnitude, voxel_size=vs)
        else:
            head = validate.as_mask(mask, magnitude.shape[:3])
            if not (magnitude[head, 0] > 0).any():
                raise InputError("the given mask does not overlap the data (magnitude is zero in it)")
        # Holes inside a mask are dark tissue a threshold cut out (bleeds, calcifications, veins):
        # the strongest sources. Fill them; the reliability step decides what their field is worth.
        filled = ndimage.binary_fill_holes(head)
        n_holes = int(np.count_nonzero(filled & ~head))
        if n_holes:
            notes.append(f"mask: filled {n_holes} voxels ({n_holes * np.prod(vs) / 1000:.1f} mL) enclosed by the mask")
            log(f"  {notes[-1]}")
        head = filled
    relax_magnitude, sigma_map, sigma = magnitude, None, None
    if settings.denoise == "mppca" and acquisition.n_echoes >= 3:
        with step("denoise"):
            # the magnitude only: the field fit keeps the measured signal, relaxometry gets the denoised one
            den = _denoise.mppca(magnitude, head)
            relax_magnitude, sigma_map, sigma = den.magnitude, den.sigma, den.info["median_sigma"]
            notes.append(f"denoise: MP-PCA on the magnitude, noise sigma {sigma:.3g} (median in the mask), "
                         f"{den.info['median_signal_components']:g} signal components of {acquisition.n_echoes}")
            log(f"  {notes[-1]}")
    # noise floor for the reliability step's low_signal criterion: the local MP-PCA sigma, its median elsewhere
    floor_sigma = None if sigma_map is None else np.where(sigma_map > 0, sigma_map, sigma).astype(np.float32)
    with step("field"), warnings.catch_warnings():
        if mask is None:
            # fitted over the whole head only to find the skull; scalp fat's chemical shift wraps between
            # echoes by design: the brain's refit below is the one whose warnings count
            warnings.simplefilter("ignore")
        fit = echoes.fit_multi_echo_field(magnitude, phase, acquisition.echo_times, head,
                                          method=settings.field_fit, unwrap=settings.unwrap, voxel_size=vs,
                                          noise_sigma=sigma)
    with step("reliability"):
        rel = _reliability.field_reliability(magnitude, phase, acquisition.echo_times, head,
                                             field_noise_hz=fit.field_noise_hz, field_hz=fit.field_hz,
                                             voxel_size=vs, noise_sigma=floor_sigma,
                                             factors=settings.reliability)
        summary = rel.summary()
        notes.append(summary.replace("reliability:", "reliability over the head (to find the skull):", 1)
                     if mask is None else summary)
        log(f"  {notes[-1]}")
        share = rel.excluded.sum() / head.sum()
        if mask is not None and share > USER_MASK_UNRELIABLE_SHARE:
            notes.append(f"the given mask holds {rel.volume_ml(rel.excluded):.1f} mL ({100 * share:.1f} %) of "
                         "voxels whose field is unreliable (skull, air or noise at its edge): they were left out "
                         "of background removal, inversion and outputs; check the mask")
            log(f"  warning: {notes[-1]}")
        if mask is None:
            brain = _mask.brain_region(head, rel.excluded, voxel_size=vs, magnitude=relax_magnitude[..., 0])
            if settings.mask_erode_mm > 0:
                brain = _mask.erode_mask(brain, vs, settings.mask_erode_mm)
            # refit on the brain: unwrapping paths and echo-wrap checks through scalp fat (chemical
            # shift) leave whole-cycle errors at the brain's edge (measured: 145 voxels at 2 mm)
            fit = echoes.fit_multi_echo_field(magnitude, phase, acquisition.echo_times, brain,
                                              method=settings.field_fit, unwrap=settings.unwrap, voxel_size=vs,
                                              noise_sigma=sigma)
            # second pass on the brain alone: medians over scalp and fat are loose for the brain's edge
            rel = _reliability.field_reliability(magnitude, phase, acquisition.echo_times, brain,
                                                 field_noise_hz=fit.field_noise_hz, field_hz=fit.field_hz,
                                                 voxel_size=vs, noise_sigma=floor_sigma,
                                                 factors=settings.reliability)
            notes.append(f"brain mask: {rel.volume_ml(brain):.0f} mL of a {rel.volume_ml(head):.0f} mL head "
                         f"(scalp, muscle, bone and air cut off)")
            log(f"  {notes[-1]}")
            notes.append(rel.summary().replace("reliability:", "reliability over the brain:", 1))
            log(f"  {notes[-1]}")
        region = rel.region
        low, high = _mask.PLAUSIBLE_BRAIN_ML
        volume = rel.volume_ml(region)
        if not low <= volume <= high:
            notes.append(f"the brain mask holds {volume:.0f} mL, outside the {low:.0f}-{high:.0f} mL of a human "
                         "brain: check it in report.png (give --mask, or --mask-erode if it holds scalp)")
            log(f"  warning: {notes[-1]}")
    with step("r2star"):
        method = settings.r2star
        if method == "auto":
            method = "arlo" if (acquisition.echo_spacing is not None and acquisition.n_echoes >= 3) else "loglinear"
        if acquisition.n_echoes < 2:
            r2star = np.zeros(magnitude.shape[:3], np.float32)
            notes.append("single echo: no R2* map (zeros)")
        else:
            decay = relax_magnitude
            if settings.gradient_correction:
                # gradients from reliable neighbours only: a skull voxel's field would bend the brain edge's
                decay = relax.gradient_dephasing_correction(relax_magnitude, fit.field_hz,
                                                            acquisition.echo_times, region)
            r2star = relax.r2star_map(decay, acquisition.echo_times, head, method=method)
    local, eroded, chi = qsm_from_field(fit.field_hz, region, acquisition, field_noise_hz=fit.field_noise_hz,
                                        magnitude=magnitude[..., 0], r2star=r2star, settings=settings, step=step)
    return QsmMaps(mask=np.asarray(eroded, bool), head_mask=head, field_total=np.asarray(fit.field_hz),
                   field_noise=np.asarray(fit.field_noise_hz), field_local=np.asarray(local),
                   r2star=np.asarray(r2star), chi=np.asarray(chi), reconstruction_mask=region,
                   reliability=rel, magnitude=relax_magnitude, noise_sigma=sigma_map, timings=timings, notes=notes)


def qsm_from_field(field_hz: np.ndarray, mask: np.ndarray, acquisition: Acquisition, *,
                   field_noise_hz: np.ndarray | None = None, magnitude: np.ndarray | None = None,
                   r2star: np.ndarray | None = None, settings: QsmSettings = QsmSettings(),
                   log: Log = _quiet, step=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The QSM stages after the field fit: background removal -> dipole inversion -> reference.

    The entry point for a total field made elsewhere (a scanner's field map, MEDI's or ROMEO's
    multi-echo fit): ``settings.background``, ``settings.inversion`` and ``settings.reference``
    with their options, as :func:`reconstruct_qsm` runs them.

    Parameters
    ----------
    field_hz : (x, y, z) array, Hz
        Total (unwrapped) field, positive = higher frequency.
    mask : (x, y, z) bool array
        Region whose field is used (leave out skull, air and noise).
    acquisition : Acquisition
        Field strength, voxel size and B0 direction (``echo_times`` may be empty).
    field_noise_hz : (x, y, z) array, Hz, optional
        Standard error of the field: data weights (uniform when None).
    magnitude : (x, y, z) array, optional
        Needed by MEDI (edge prior).
    r2star : (x, y, z) array, 1/s, optional
        Needed by ``reference="csf"`` (CSF = R2* below 5 1/s).

    Returns
    -------
    field_local : (x, y, z) float32 array, Hz
    output_mask : (x, y, z) bool array, the mask after background removal's erosion
    chi : (x, y, z) float32 array, ppm, referenced, zero outside ``output_mask``
    """
    step = _stepper({}, log) if step is None else step
    vs, b0 = acquisition.voxel_size, acquisition.b0_direction
    field, region = validate.check_volume_and_mask(field_hz, mask, name="field_hz")
    noise = None if field_noise_hz is None else validate.as_volume(field_noise_hz, "field_noise_hz",
                                                                      shape=field.shape)
    if settings.reference == "csf" and r2star is None:
        raise InputError("reference='csf' finds CSF by its R2*: pass r2star, or use reference='mean'")
    with step("background"):
        weights = None if noise is None else _noise_weights(noise, region)
        local, eroded = _background.remove_background(
            field, region, method=settings.background, voxel_size=vs, b0_direction=b0, weights=weights,
            **settings.background_options)
    with step("inversion"):
        weights = None if noise is None else _noise_weights(noise, eroded)
        chi = _inversion.invert(local, eroded, method=settings.inversion, voxel_size=vs, b0_direction=b0,
                                field_strength=acquisition.field_strength, weights=weights,
                                magnitude=magnitude, **settings.inversion_options)
        csf = _csf_mask(r2star, eroded) if settings.reference == "csf" else None
        chi = _inversion.reference(chi, eroded, method=settings.reference, csf_mask=csf)
    return np.asarray(local), np.asarray(eroded, bool), np.asarray(chi)


#: share of a user's mask with an unreliable field above which the log says so
USER_MASK_UNRELIABLE_SHARE = 0.005


CSF_R2STAR_MAX = 5.0  # 1/s; CSF is the only brain compartment this slow (MEDI+0, Liu et al. MRM 2018)


def _csf_mask(r2star: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """CSF reference region: voxels of the mask with R2* below 5 1/s (ventricles)."""
    csf = mask & (r2star > 0) & (r2star < CSF_R2STAR_MAX)
    if csf.sum() < 20:
        raise InputError(f"reference='csf': only {int(csf.sum())} voxels have R2* < {CSF_R2STAR_MAX:g} 1/s "
                         "inside the mask (ventricles); use reference='mean' or give more echoes")
    return csf


def _noise_weights(field_noise: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Data weights 1/sigma, normalised to mean 1 in the mask (MEDI convention)."""
    noise = np.asarray(field_noise, dtype=np.float64)
    finite = mask & np.isfinite(noise) & (noise > 0)
    if not finite.any():
        return mask.astype(np.float32)
    floor = np.percentile(noise[finite], 1)
    w = np.where(finite, 1.0 / np.maximum(noise, floor), 0.0)
    return (w / w[finite].mean()).astype(np.float32)


# ---------------------------------------------------------------------------
# source separation (arrays in, arrays out)
# ---------------------------------------------------------------------------
class _ProgressBar:
    """A tqdm bar on stderr fed by ``update(done, total)`` callbacks (a no-op when disabled)."""

    def __init__(self, label: str, *, enabled: bool):
        self.label, self.enabled, self.bar = label, enabled, None

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"  {self.label}", unit="vox", unit_scale=True, leave=False)
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def separate(acquisition: Acquisition, inputs: SeparationInputs, *,
             settings: SeparationSettings = SeparationSettings(), log: Log = _quiet, timings: dict | None = None,
             progress_bars: bool = False) -> dict[str, SeparationFit]:
    """Run the separation models of ``settings`` on ``inputs``, by name from the model registry.

    Each model states the inputs it needs (chi-separation: the local field and
    R2'; linear: R2* and chi; DECOMPOSE: the multi-echo magnitude and chi); a
    missing one is reported before any model runs.
    """
    from chisep.separation import MODELS

    timings = {} if timings is None else timings
    step = _stepper(timings, log)
    for name in settings.models:
        inputs.require(MODELS.get(name).requires, name)
    if inputs.r2_source is not None:
        log(f"  R2 for R2': {inputs.r2_source}")
    results: dict[str, SeparationFit] = {}
    for name in settings.models:
        if name in EXPERIMENTAL_MODELS:
            log(f"warning: {EXPERIMENTAL_MODELS[name]}")
        model = MODELS.build(name, acquisition, **settings.options(name))
        with step(f"separation:{name}"), _ProgressBar(f"{name} voxels",
                                                        enabled=progress_bars and name == "decompose") as bar:
            results[name] = model.fit(inputs, progress=bar.update)
    return results


# ---------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------
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
    "r2prime": ("1/s", "reversible relaxation rate R2' = max(R2* - R2, 0)", None),
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

#: bits of the ``quality`` map written by :func:`run_files` (a voxel may carry several)
QUALITY_FLAGS = {
    1: "total field unreliable (chisep.qsm.reliability criteria): excluded from background removal, "
       "inversion and the brain mask of the outputs",
    2: "R2* estimate clipped to the plausible range (relax.R2STAR_RANGE)",
    4: "a separation model's fit did not converge here, or (DECOMPOSE) its components are not determined by "
       "the data (standard error above max_component_std_ppm of models/decompose.toml)",
    8: "a map held NaN or Inf here before writing (written as 0)",
    16: "total field unreliable but enclosed by brain (a dark source such as a bleed or calcification): "
        "kept, down-weighted by its field noise",
}


def quality_map(qsm: "QsmMaps", separations: Mapping[str, SeparationFit] | None = None) -> np.ndarray:
    """Per-voxel bit flags (uint8, see :data:`QUALITY_FLAGS`) inside the head mask, 0 outside.

    The head mask (the given or automatic mask) is covered, not just the
    brain mask of the outputs, so that every voxel left out as unreliable is
    flagged. Voxels where a fit failed are flagged rather than trusted: the
    written maps hold 0 where they were non-finite, and this map says where
    that happened.
    """
    from chisep import relax

    head = np.asarray(qsm.head_mask, bool)
    mask = np.asarray(qsm.mask, bool)
    flags = np.zeros(head.shape, np.uint8)
    flags[qsm.excluded_mask | (head & ~np.isfinite(qsm.field_total))] |= 1
    if qsm.reliability is not None:
        flags[qsm.reliability.enclosed & head] |= 16
    lo, hi = relax.R2STAR_RANGE
    r2s = np.asarray(qsm.r2star)
    if r2s.any():  # single echo: no R2* at all (all zeros), which is not clipping
        flags[head & ((r2s <= lo) | (r2s >= hi))] |= 2
    arrays = [qsm.field_total, qsm.field_local, qsm.r2star, qsm.chi]
    for result in (separations or {}).values():
        # a model that says where its outputs are determined (DECOMPOSE: "separable") is taken at
        # that word; the others at their solver's convergence
        fitted = result.extra.get("separable", result.extra.get("converged"))
        if fitted is not None:
            flags[mask & (np.asarray(fitted) == 0)] |= 4
        arrays += [result.chi_para, result.chi_dia]
    for array in arrays:
        flags[mask & ~np.isfinite(np.asarray(array))] |= 8
    return flags * head


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


class _Writer:
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


def write_qsm_maps(writer: _Writer, qsm: QsmMaps, r2prime: np.ndarray | None = None) -> None:
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


def run_files(data: "io.GreData", out_dir: str | Path, *, settings: PipelineSettings = PipelineSettings(),
              mask_path: str | Path | None = None, r2_path: str | Path | None = None,
              labels_path: str | Path | None = None, label_names: Mapping[int, str] | None = None,
              bids_prefix: str | None = None, overwrite: bool = False, log: Log = _quiet,
              progress_bars: bool = False) -> "RunOutput":
    """Run QSM (and the separation models in ``settings``) on loaded data and write the outputs.

    Writes the maps, ``roi_stats.csv`` (per label of ``labels_path``, or the
    whole mask), ``report.png`` and, last, ``provenance.json``: a folder
    without it holds an unfinished run. With ``bids_prefix`` (e.g.
    ``"sub-01_ses-1"``) maps get BIDS-derivatives names (see :func:`output_name`).
    Returns the maps and a short summary.
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

    writer = _Writer(out, acq.affine, data.header, overwrite, bids_prefix)
    if bids_prefix:
        write_derivatives_description(out)
    r2prime = sep_inputs.r2prime  # computed once, the R2' every model saw
    write_qsm_maps(writer, qsm, r2prime)
    quality = quality_map(qsm, results)
    writer.map("quality", quality, extra={"Flags": {str(k): v for k, v in QUALITY_FLAGS.items()}})
    for i, (model, result) in enumerate(results.items()):
        if i == 0:
            writer.separation(None, result, with_extras=False)
        writer.separation(model, result, with_extras=True)
    with _stepper(timings, log)("report"):
        maps = {"magnitude": data.magnitude[..., 0], "chi": qsm.chi, "r2star": qsm.r2star, "r2prime": r2prime}
        for model, result in results.items():
            maps[f"{model}:chi_para"], maps[f"{model}:chi_dia"] = result.chi_para, result.chi_dia
        if results:  # the number every model has to beat, in the same table
            maps[f"{THRESHOLDED_QSM}:chi_para"], maps[f"{THRESHOLDED_QSM}:chi_dia"] = thresholded_qsm(qsm.chi)
        report_files, roi_rows = write_report(out, maps, qsm.mask, acq.voxel_size, labels=labels,
                                              label_names=label_names, overwrite=overwrite,
                                              first_model=next(iter(results), None), bids_prefix=bids_prefix,
                                              excluded=qsm.excluded_mask, affine=acq.affine,
                                              subject=_subject_name(data.sources, bids_prefix))
        writer.written += report_files
    timings["total"] = round(time.perf_counter() - t_start, 3)
    settings_record = settings.to_dict()
    cited = references.references_for(settings_record["qsm"], tuple(results))
    with _stepper(timings, log)("report.html"):
        writer.written.append(write_html_report(
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


def _subject_name(sources: Mapping, bids_prefix: str | None) -> str:
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
    subject = _subject_name(data.sources, bids_prefix)
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
        "versions": ", ".join(f"{k} {v}" for k, v in io._versions().items() if k in
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


def separate_files(*, chi, field_strength: float, models: Sequence[str], out_dir, local_field=None,
                   r2star=None, r2=None, field_noise=None, mask=None, magnitude=None, phase=None,
                   echo_times: Sequence[float] | None = None, overwrite: bool = False,
                   log: Log = _quiet) -> str:
    """``chisep separate``: separation models from map files (e.g. the outputs of ``chisep qsm``).

    All maps must share the grid of ``chi``. The mask defaults to the voxels
    where chi is non-zero. DECOMPOSE needs the multi-echo magnitude (and echo
    times from ``echo_times`` or its sidecars).
    """
    t0 = time.perf_counter()
    out = io.prepare_output_dir(out_dir, overwrite=overwrite)
    chi_map, affine, header = io.load_map(chi, name="chi")
    _check_chi_unit(chi_map, chi)
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
            [("local field", local_field), ("R2*", r2star), ("R2", r2), ("field noise", field_noise),
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
                                  r2star=maps["R2*"], r2=maps["R2"], field_noise_hz=maps["field noise"],
                                  magnitude=mag, r2_rule=settings.r2_rule)
    results = separate(acq, sep_inputs, settings=settings, log=log, timings=timings)
    writer = _Writer(out, affine, header, overwrite)
    for i, (model, result) in enumerate(results.items()):
        if i == 0:
            writer.separation(None, result, with_extras=False)
        writer.separation(model, result, with_extras=True)
    timings["total"] = round(time.perf_counter() - t0, 3)
    signals.checkpoint()  # a swallowed Ctrl-C must not mark the run finished
    io.write_provenance(out, inputs=inputs, settings=dataclasses.asdict(settings), timings=timings,
                        extra={"acquisition": acq.to_dict(), "outputs": writer.written,
                               "models": {m: r.info for m, r in results.items()}}, overwrite=overwrite)
    return _summary(out, timings, results)


def _check_chi_unit(chi: np.ndarray, path) -> None:
    """Refuse chi maps in Hz or ppb: brain susceptibility stays within a few ppm."""
    inside = np.abs(chi[chi != 0])
    if inside.size and np.percentile(inside, 99) > 10:
        raise InputError(f"chi {path}: 99% of |values| reach {np.percentile(inside, 99):.3g}, expected ppm "
                         "(brain tissue within about +-1 ppm); the map looks like Hz or ppb. Convert it to ppm")


def bids_output_dir(sources: Mapping, out_dir: str | Path | None) -> tuple[Path, str | None]:
    """Output folder and BIDS prefix for loaded data.

    BIDS input without ``out_dir`` goes to ``<root>/derivatives/chisep/sub-X[/ses-Y]/anat``;
    with ``out_dir`` the BIDS names go there. Non-BIDS input needs ``out_dir``.
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

    ``phantom="head"`` (default): the realistic whole head of
    :func:`chisep.sim.simulate_head` (simulated on a twice finer grid, with skull,
    scalp fat, coil bias, static-dephasing R2' and a measured R2 map; ``head``
    "A" or the holdout "B"). ``phantom="simple"``: the label phantom simulated on
    the output grid (:func:`chisep.sim.gre.simulate_gre`), fast and coarse-friendly,
    for tests of mechanics; it flatters every method (inverse crime).
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
                     log: Log = _quiet, **simulation) -> dict:
    """Simulate the phantom and write a BIDS dataset plus ground truth under derivatives/truth/."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: expected a folder, found a file")
    truth_dir = out / "derivatives" / "truth"
    if (truth_dir / "provenance.json").exists() and not overwrite:
        raise OutputExistsError(f"{out} already holds a simulation; pass --overwrite or choose another --out")
    log("simulating: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in simulation.items()
                                   if v is not None and v is not False))
    with _stepper({}, log)("simulation"):  # minutes at 1 mm: say it is alive
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
         models: Sequence[str] = DEFAULT_MODELS, overwrite: bool = False, log: Log = _quiet,
         phantom: str = "head", head: str = "A") -> str:
    """Simulate the phantom, run the whole pipeline with every model, score it against the truth.

    Writes ``bids/`` (the simulated dataset and its truth), ``run/`` (the
    outputs of :func:`run_files`), ``accuracy.md`` and ``comparison.png``;
    returns the accuracy table as text.
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
    data = io.load_bids(out / "bids")
    run = run_files(data, out / "run", settings=PipelineSettings(separation=SeparationSettings(models=tuple(models))),
                    labels_path=sim["truth_dir"] / "labels.nii.gz", label_names=truth.label_names,
                    r2_path=sim["r2_path"],
                    overwrite=overwrite, log=log, progress_bars=log is not _quiet)
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
