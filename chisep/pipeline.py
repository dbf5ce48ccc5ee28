"""The pipeline's computation: GRE arrays -> QSM -> source separation -> quality flags, arrays in and out.

:func:`reconstruct_qsm` chains the QSM stages (:func:`qsm_from_field` the ones after the field
fit), :func:`separate` runs the separation models by name, :func:`quality_map` says where the
results are not to be trusted. Files are :mod:`chisep.outputs` (names, units, writers) and
:mod:`chisep.workflows` (files in, files out: ``run``, ``separate``, ``demo``), which the CLI,
notebooks and the batch runner call.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from chisep import denoise as _denoise
from chisep import grid, signals, validate
from chisep.acquisition import Acquisition
from chisep.errors import InputError
from chisep.grid import fill_holes
from chisep.qsm import background as _background
from chisep.qsm import inversion as _inversion
from chisep.qsm import reliability as _reliability
from chisep.separation.base import SeparationFit, SeparationInputs
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


def quiet(_: str) -> None:
    """The default ``log``: says nothing."""


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


#: environment variable naming the compilation cache folder of the command line ("off": none)
COMPILE_CACHE_ENV = "CHISEP_COMPILE_CACHE"


def default_compilation_cache() -> Path | None:
    """The command line's JAX compilation cache: ``$CHISEP_COMPILE_CACHE`` ("off": none), else
    ``$XDG_CACHE_HOME/chisep/jax`` (``~/.cache/chisep/jax``)."""
    value = os.environ.get(COMPILE_CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chisep" / "jax"


def use_compilation_cache(path) -> None:
    """Make this process's JAX read and write compiled programs in ``path``.

    A new process otherwise compiles every stage again for each grid shape (measured at 8 mm: a
    first run 9.7 s without the cache, 5.2 s with it). Entries are keyed by the program, the XLA
    flags and the device, so runs on different machines or GPUs do not mix them up; the folder
    can be deleted at any time.
    """
    import jax

    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # the pipeline is many small programs: cache them all, not only those over 1 s
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


#: environment variable that leaves the allocator as it is in the command line ("off")
KEEP_FREED_MEMORY_ENV = "CHISEP_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make this process reuse the memory it frees instead of handing it back to the kernel.

    The stages allocate and free hundreds of volume-sized temporaries. glibc maps every block
    above 32 MB fresh from the kernel and unmaps it when freed, so each temporary pays page
    faults and the kernel's zeroing of its pages: two 1 mm reconstructions spent 23 of their 112
    CPU seconds in the kernel on a 2-core VM (benchmarks/RESULTS.md). With blocks up to 1 GB
    taken from the heap, and the heap not trimmed, freed blocks are reused. The price: the
    process keeps its peak memory until it exits (a 1 mm run: 4.4 against 3.9 GB). Called by the
    command line (a process chisep owns), never on import, nor in Dask workers, whose memory
    monitor wants freed memory returned. glibc only (``mallopt``); returns whether it took effect.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, ctypes.c_int(1 << 30))
                and mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)))


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
    of the outputs: the reconstruction region after background-removal erosion; single-step
    erodes nothing at voxels up to RIM_MAX_VOXEL_MM, one voxel layer above). ``rim_mask``: the
    output voxels in the region's outermost layer, whose R2* the separation models take from
    their neighbours.
    """

    mask: np.ndarray             # bool, brain mask of the final maps
    head_mask: np.ndarray        # bool, the mask the field was estimated in
    field_total: np.ndarray      # Hz
    field_noise: np.ndarray      # Hz, standard error of the field estimate
    field_local: np.ndarray      # Hz
    r2star: np.ndarray           # 1/s
    chi: np.ndarray              # ppm, referenced (settings.reference)
    reconstruction_mask: np.ndarray | None = None  # bool, head_mask minus unreliable voxels (default: mask)
    # bool, the output voxels in the reconstruction region's outermost layer (rim_of): their R2* is
    # partial volume, so separation_inputs hands the models their interior neighbours' (default: none)
    rim_mask: np.ndarray | None = None
    reliability: "_reliability.Reliability | None" = None
    magnitude: np.ndarray | None = None  # (x, y, z, echo), the magnitude of R2* and separation (denoised or not)
    noise_sigma: np.ndarray | None = None  # (x, y, z), MP-PCA noise level (magnitude units) when denoised
    # after a total-field inversion (single-step) the separation fits the total field as that inversion did
    # (total_field_hz of separation_inputs); after background removal, the local field
    separation_field: str = "local"
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def __post_init__(self):
        if self.reconstruction_mask is None:
            self.reconstruction_mask = np.asarray(self.mask, bool)

    @property
    def field_noise_used(self) -> np.ndarray:
        """The field noise as background removal, inversion and chi-separation use it: ``field_noise``,
        infinite (no weight) where the field of a dark source enclosed by brain is off by phase wraps
        (``reliability.off_branch``; measured up to 400 Hz next to a calcified lesion)."""
        return _field_noise_used(self.field_noise, self.reliability)

    @property
    def tissue_relaxation_mask(self) -> np.ndarray:
        """Output voxels whose R2* is the tissue's: ``mask`` minus ``rim_mask`` (partial volume with skull,
        dura and CSF). R2* accuracy is scored here; for single-step the same voxels as the outputs held
        before they took in the rim."""
        mask = np.asarray(self.mask, bool)
        return mask if self.rim_mask is None else mask & ~np.asarray(self.rim_mask, bool)

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

        # dark sources enclosed by brain: their signal is gone by the first echo, so is their R2'
        unknown = None if self.reliability is None else self.reliability.enclosed
        total = self.field_total if self.separation_field == "total" else None
        return SeparationInputs(mask=self.mask, chi=self.chi, local_field_hz=self.field_local, total_field_hz=total,
                                r2star=self.r2star, r2=r2, field_noise_hz=self.field_noise_used, magnitude=magnitude,
                                r2prime_unknown=unknown, relaxation_rim=self.rim_mask,
                                r2_rule=dict(R2_RULE_DEFAULT if r2_rule is None else r2_rule))


#: seconds between "still running" lines of a long stage (the user sees the run is alive)
HEARTBEAT_S = 15.0


def stepper(timings: dict, log: Log):
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

        beat = threading.Thread(target=heartbeat, daemon=True) if log is not quiet else None
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
                    log: Log = quiet) -> QsmMaps:
    """Mask -> MP-PCA denoising of the magnitude -> unwrapping and multi-echo field fit ->
    reliability (voxels whose field is unreliable are left out) -> for an automatic mask, the brain cut
    from the head (:func:`chisep.qsm.mask.brain_region`; one voxel layer more at voxels up to
    BRAIN_MARGIN_MAX_VOXEL_MM) and field fit and reliability redone on it ->
    R2* (macroscopic-gradient dephasing undone) -> background removal -> inversion.

    Parameters
    ----------
    magnitude, phase : (x, y, z, echo) float arrays (phase in rad, chisep sign convention)
    acquisition : Acquisition
    mask : (x, y, z) bool, optional
        Replaces the automatic mask as the outer limit of the reconstruction (enclosed holes are
        filled); voxels in it whose field is unreliable are still left out (see QsmMaps).
    settings : QsmSettings
    log : callable(str)
        Receives one line per step (and a heartbeat during long ones).

    Returns
    -------
    QsmMaps
        Masks, total and local field, field noise, R2*, chi, the reliability record, timings and notes;
        :meth:`QsmMaps.separation_inputs` hands them to the separation models.
    """
    from chisep import relax
    from chisep.qsm import echoes
    from chisep.qsm import mask as _mask

    # C order, echoes last and contiguous: NIfTI volumes stacked by echo come in another layout, and
    # every masked gather and filter below then strides through memory (2.5 s more at 1 mm)
    magnitude = np.ascontiguousarray(magnitude, dtype=np.float32)
    phase = np.ascontiguousarray(phase, dtype=np.float32)
    if magnitude.ndim == 3:
        magnitude, phase = magnitude[..., None], phase[..., None]
    if magnitude.shape != phase.shape or magnitude.shape[3] != acquisition.n_echoes:
        raise InputError(f"magnitude {magnitude.shape} and phase {phase.shape} must both be "
                         f"(x, y, z, {acquisition.n_echoes}) for {acquisition.n_echoes} echo times")
    timings: dict = {}
    notes: list = []
    step = stepper(timings, log)
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
        filled = fill_holes(head)
        n_holes = int(np.count_nonzero(filled & ~head))
        if n_holes:
            notes.append(f"mask: filled {n_holes} voxels ({n_holes * np.prod(vs) / 1000:.1f} mL) enclosed by the mask")
            log(f"  {notes[-1]}")
        head = filled
        denoising = settings.denoise == "mppca" and acquisition.n_echoes >= 3
    relax_magnitude, sigma_map, sigma = magnitude, None, None
    # the deeper half of the mask, for a head the brain: the medians of the noise sigma and of the head
    # pass's echo spread. A distance transform (one core, 0.9 s at 1 mm): only when one of them is needed,
    # and beside MP-PCA (1.5 of 2 cores)
    with ThreadPoolExecutor(max_workers=1) as beside:
        core_job = beside.submit(_reliability.mask_core, head) if denoising or mask is None else None
        if denoising:
            with step("denoise"):
                # the magnitude only: the field fit keeps the measured signal, relaxometry gets the denoised one
                den = _denoise.mppca(magnitude, head, **settings.denoise_options)
                relax_magnitude, sigma_map = den.magnitude, den.sigma
                # The field's absolute noise (and the uncertainty maps) take one sigma: the median over the
                # mask's core. Over a whole head, scalp fat's beating echoes and the skull's partial volume
                # look like noise to MP-PCA: at SNR 100 the head's median was 1.9x the true sigma, the
                # brain's within 2 % (benchmarks/RESULTS.md).
                sigma = float(np.median(sigma_map[core_job.result()]))
                notes.append(f"denoise: MP-PCA on the magnitude, noise sigma {sigma:.3g} (median in the mask's "
                             f"core), {den.info['median_signal_components']:g} signal components of "
                             f"{acquisition.n_echoes}")
                log(f"  {notes[-1]}")
        core = None if core_job is None else core_job.result()
    # noise floor for the reliability step's low_signal criterion: the local MP-PCA sigma, its median elsewhere
    floor_sigma = None if sigma_map is None else np.where(sigma_map > 0, sigma_map, sigma).astype(np.float32)
    with step("field"), warnings.catch_warnings():
        if mask is None:
            # fitted over the whole head only to find the skull; scalp fat's chemical shift wraps between
            # echoes by design: the brain's refit below is the one whose warnings count
            warnings.simplefilter("ignore")
        # The automatic mask's pass over the whole head only finds the skull, by reliability criteria that
        # do not change when the field is off by whole cycles between echoes (k / dTE, equally spaced
        # echoes): neither spatial unwrapping nor the echo-wrap correction (6.6 s of scalp fat at 1 mm)
        # is needed for it. The brain's refit below does both.
        # Nor the nonlinear fit: the criteria take the field only for its branch and its noise from the
        # magnitudes; the weighted-linear fit leaves the brain region the same (at most 41 of ~240 k voxels
        # differ at 2 mm, Dice equal to 4 decimals in seven echo-time / SNR cases of both heads and on the
        # 5 mm phantom) in a quarter of the time.
        head_pass = mask is None and acquisition.echo_spacing is not None and settings.unwrap != "none"
        fit = echoes.fit_multi_echo_field(magnitude, phase, acquisition.echo_times, head,
                                          method="weighted-linear" if head_pass else settings.field_fit,
                                          voxel_size=vs, noise_sigma=sigma,
                                          unwrap=echoes.TEMPORAL_ONLY if head_pass else settings.unwrap,
                                          fix_echo_wraps=not head_pass)
    with step("reliability"):
        # An automatic head mask is a third scalp and fat. Fat's multi-peak signal makes the frequencies
        # between echoes differ, by amounts that depend on the echo times: over the whole head, the median
        # echo spread (and so its threshold) rises and the skull stops separating brain from scalp
        # (echoes at 4, 9, ..., 29 ms: chi NRMSE 167 / 274 % on the two heads). Its median comes from
        # the head's core, the brain. The other criteria keep the whole head: at coarse voxels the
        # brain's edge is partial volume that the core's median would cut (benchmarks/bench_mask.py).
        rel = _reliability.field_reliability(magnitude, phase, acquisition.echo_times, head,
                                             field_noise_hz=fit.field_noise_hz, field_hz=fit.field_hz,
                                             voxel_size=vs, noise_sigma=floor_sigma,
                                             factors=settings.reliability,
                                             reference_masks={"echo_spread": core} if mask is None else None,
                                             # that pass's field is right only up to whole cycles between
                                             # neighbours: no branch checks
                                             field_unwrapped=not head_pass)
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
        with step("brain mask"):
            brain = _mask.brain_region(head, rel.excluded, voxel_size=vs, magnitude=relax_magnitude[..., 0])
            if float(np.max(vs)) <= BRAIN_MARGIN_MAX_VOXEL_MM:
                # one voxel layer more within the head: the brain's own pass below judges it (see the constant)
                brain = grid.dilate_within(brain, head)
            if settings.mask_erode_mm > 0:
                brain = _mask.erode_mask(brain, vs, settings.mask_erode_mm)
        with step("field (brain)"):
            # refit on the brain: unwrapping paths and echo-wrap checks through scalp fat (chemical
            # shift) leave whole-cycle errors at the brain's edge (measured: 145 voxels at 2 mm)
            fit = echoes.fit_multi_echo_field(magnitude, phase, acquisition.echo_times, brain,
                                              method=settings.field_fit, unwrap=settings.unwrap, voxel_size=vs,
                                              noise_sigma=sigma)
        with step("reliability (brain)"):
            # second pass on the brain alone: medians over scalp and fat are loose for the brain's edge
            rel = _reliability.field_reliability(magnitude, phase, acquisition.echo_times, brain,
                                                 field_noise_hz=fit.field_noise_hz, field_hz=fit.field_hz,
                                                 voxel_size=vs, noise_sigma=floor_sigma,
                                                 factors=settings.reliability, reuse=rel)
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
    def r2star_map() -> np.ndarray:
        method = settings.r2star
        if method == "auto":
            method = "arlo" if (acquisition.echo_spacing is not None and acquisition.n_echoes >= 3) else "loglinear"
        decay = relax_magnitude
        if settings.gradient_correction:
            # gradients from reliable neighbours only: a skull voxel's field would bend the brain edge's
            decay = relax.gradient_dephasing_correction(relax_magnitude, fit.field_hz, acquisition.echo_times, region)
        return relax.r2star_map(decay, acquisition.echo_times, head, method=method)

    def chi_maps(r2star_or_none):
        return qsm_from_field(fit.field_hz, region, acquisition,
                              field_noise_hz=_field_noise_used(fit.field_noise_hz, rel),
                              magnitude=magnitude[..., 0], r2star=r2star_or_none, settings=settings, log=log,
                              timings=timings, notes=notes)

    if acquisition.n_echoes < 2:
        r2star = np.zeros(magnitude.shape[:3], np.float32)
        notes.append("single echo: no R2* map (zeros)")
        local, eroded, chi = chi_maps(r2star)
    elif settings.reference == "csf":  # the reference needs R2* (CSF), so it comes first
        with step("r2star"):
            r2star = r2star_map()
        local, eroded, chi = chi_maps(r2star)
    else:
        # R2* and its gradient correction (mostly NumPy on one core, 1.5-2 s at 1 mm) beside the inversion
        # (JAX, 1.4 of 2 cores): it hides behind it; "r2star" times what is left of it once the inversion is done
        with ThreadPoolExecutor(max_workers=1) as beside:
            r2star_job = beside.submit(r2star_map)
            local, eroded, chi = chi_maps(None)
            with step("r2star"):
                r2star = r2star_job.result()
    return QsmMaps(mask=np.asarray(eroded, bool), head_mask=head, field_total=np.asarray(fit.field_hz),
                   field_noise=np.asarray(fit.field_noise_hz), field_local=np.asarray(local),
                   r2star=np.asarray(r2star), chi=np.asarray(chi), reconstruction_mask=region,
                   rim_mask=rim_of(region, eroded),
                   reliability=rel, magnitude=relax_magnitude, noise_sigma=sigma_map,
                   separation_field=separation_field(settings.inversion, region, eroded),
                   timings=timings, notes=notes)


def qsm_from_field(field_hz: np.ndarray, mask: np.ndarray, acquisition: Acquisition, *,
                   field_noise_hz: np.ndarray | None = None, magnitude: np.ndarray | None = None,
                   r2star: np.ndarray | None = None, settings: QsmSettings = QsmSettings(),
                   log: Log = quiet, timings: dict | None = None,
                   notes: list | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
        Standard error of the field: data weights (uniform when None). Where it is infinite
        (or NaN) the field is not used: no weight in the inversion, and background removal
        fills it from the neighbours (:func:`chisep.grid.harmonic_fill`).
    magnitude : (x, y, z) array, optional
        Needed by MEDI (edge prior).
    r2star : (x, y, z) array, 1/s, optional
        Needed by ``reference="csf"`` (CSF = R2* below 5 1/s).
    settings : QsmSettings
    log : callable(str)
    timings : dict, optional
        Receives the seconds of each stage.
    notes : list, optional
        Receives what was chosen from the data (the provenance's notes), e.g. single-step's TV weight.

    Returns
    -------
    field_local : (x, y, z) float32 array, Hz
    output_mask : (x, y, z) bool array, the mask after background removal's erosion
    chi : (x, y, z) float32 array, ppm, referenced, zero outside ``output_mask``
    """
    step = stepper({} if timings is None else timings, log)
    vs, b0 = acquisition.voxel_size, acquisition.b0_direction
    field, region = validate.check_volume_and_mask(field_hz, mask, name="field_hz")
    noise = None if field_noise_hz is None else validate.as_volume(field_noise_hz, "field_noise_hz",
                                                                      shape=field.shape)
    if settings.reference == "csf" and r2star is None:
        raise InputError("reference='csf' finds CSF by its R2*: pass r2star, or use reference='mean'")
    if settings.inversion in _inversion.TOTAL_FIELD_METHODS:
        if settings.background != QsmSettings().background or settings.background_options:
            log(f"  warning: background removal ({settings.background}) is not used: the {settings.inversion} "
                "inversion takes the total field; for background removal + MEDI give --inversion medi "
                "(config: inversion = \"medi\")")
        return _single_step_qsm(field, region, acquisition, noise, magnitude, r2star, settings, step, log,
                                [] if notes is None else notes)
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


def _single_step_qsm(field, region, acquisition, noise, magnitude, r2star, settings, step, log, notes):
    """qsm_from_field for an inversion of the total field: no background step. The local field handed
    on (to chi-separation) is the field of chi in the output mask, D chi: the field the brain's own
    sources make, harmonic part included, which no background removal can give. The TV weight follows
    the field noise (:func:`chisep.qsm.inversion.single_step_alpha`) unless the settings give one."""
    vs = acquisition.voxel_size
    options = dict(settings.inversion_options)
    if noise is not None and "alpha" not in options:
        options["alpha"] = _inversion.single_step_alpha(noise, region, field_strength=acquisition.field_strength)
        notes.append(f"{settings.inversion}: TV weight alpha {options['alpha']:.3g} from the field noise "
                     f"(median {np.median(noise[region & np.isfinite(noise)]):.3g} Hz)")
        log(f"  {notes[-1]}")
    with step("inversion"):
        weights = None if noise is None else _noise_weights(noise, region)
        info: dict = {}
        chi = _inversion.invert(field, region, method=settings.inversion, voxel_size=vs,
                                b0_direction=acquisition.b0_direction, field_strength=acquisition.field_strength,
                                weights=weights, magnitude=magnitude, info=info, **options)
        if info:
            notes.append(f"{settings.inversion}: {info['iterations']} iterations, weighted data residual "
                         f"{info['residual']:.3g} Hz")
            log(f"  {notes[-1]}")
        output = _single_step_output(region, vs)
        csf = _csf_mask(r2star, output) if settings.reference == "csf" else None
        chi = _inversion.reference(chi, output, method=settings.reference, csf_mask=csf)
        local = _inversion.dipole_field_hz(chi, output, voxel_size=vs, b0_direction=acquisition.b0_direction,
                                           field_strength=acquisition.field_strength)
    return local, output, np.asarray(chi)


#: Largest voxel dimension (mm) at which the automatic mask's brain grows by one voxel layer (within the head)
#: before the brain's field refit and reliability pass. The pass over the whole head that finds the skull
#: (medians over scalp and fat, a field unwrapped along the echoes only) cuts part of the subarachnoid CSF
#: next to the skull; the brain's own pass keeps the voxels of that layer whose field is reliable. On the
#: realistic heads at 1 mm (SNR 100) the region grew by 23-28 k voxels, all but the missed CSF's partial
#: volume judged reliable: chi NRMSE 21.7 -> 21.5 % (A) and 26.1 -> 25.7 % (B), chi-separation chi_para 33.2
#: -> 32.7 and 36.9 -> 36.0 %, Dice unchanged (0.989); at SNR 30 (B) chi 32.8 -> 31.7 %, Dice 0.991 -> 0.993.
#: At 1.5 mm neutral (chi within 0.05 points); at 2 mm a voxel beyond the edge is mostly bone and dura and
#: chi lost 0.2-1.6 points (benchmarks/RESULTS.md, session 21).
BRAIN_MARGIN_MAX_VOXEL_MM = 1.5

#: Largest voxel dimension (mm) at which single-step's outputs keep the region's outermost voxel layer.
#: That layer is brain too (cortex and CSF next to the skull); left out, the scores over the brain count it
#: as zero. With it (its R2* taken from inside, :func:`rim_of`), on heads A / B at SNR 100: chi NRMSE 23.0 ->
#: 21.7 and 26.9 -> 26.1 % at 1 mm, 34.5 -> 31.7 and 35.6 -> 34.1 % at 2 mm (SNR 30: 39.4 -> 38.6, 45.7 ->
#: 45.3), the layer's chi correlating 0.7-0.8 with the truth. At 3 mm a voxel of that layer is a third
#: skull, dura and marrow: its chi correlates 0.2 with the truth, and chi NRMSE went 56-62 -> 76-86 %.
#: (benchmarks/RESULTS.md, session 19.)
RIM_MAX_VOXEL_MM = 2.0


def _single_step_output(region: np.ndarray, voxel_size) -> np.ndarray:
    """Single-step's output mask: the whole region at voxels up to RIM_MAX_VOXEL_MM, else the region
    without its outermost voxel layer (a coarse voxel there is partly skull)."""
    from chisep.qsm.mask import erode_mask

    region = np.asarray(region, bool)
    if float(np.max(voxel_size)) <= RIM_MAX_VOXEL_MM:
        return region
    inner = erode_mask(region, voxel_size, float(np.min(voxel_size)))
    return inner if inner.any() else region


def separation_field(inversion: str, region: np.ndarray, output: np.ndarray) -> str:
    """The field chi-separation fits (QsmMaps.separation_field): "total" after a total-field inversion
    whose outputs hold the whole reconstruction region, else "local".

    From the total field the data terms are the single-step inversion's. Where the outputs leave out the
    region's outermost layer (voxels above RIM_MAX_VOXEL_MM), that layer's field would have no term
    and the next layers' spheres shrink: on the realistic heads at 3 mm the total field tied or lost
    (chi_para / chi_dia 85.0 / 44.0 -> 85.5 / 45.1 % on head A, measured R2), where up to 2 mm it won
    in every case (benchmarks/RESULTS.md, session 21)."""
    if inversion in _inversion.TOTAL_FIELD_METHODS and np.array_equal(np.asarray(region, bool),
                                                                      np.asarray(output, bool)):
        return "total"
    return "local"


def rim_of(region: np.ndarray, output: np.ndarray) -> np.ndarray:
    """The output voxels in the region's outermost voxel layer (a face neighbour outside the region,
    along any axis, anisotropic voxels or not): their R2* and R2 are partial volume with skull, dura
    and CSF. Empty when background removal has eroded the outputs (V-SHARP's smallest sphere takes
    that layer)."""
    from chisep.qsm.mask import erode_mask

    region = np.asarray(region, bool)
    # unit voxels and a one-voxel radius: the 6-neighbour erosion whatever the voxel size
    return np.asarray(output, bool) & region & ~erode_mask(region, (1.0, 1.0, 1.0), 1.0)


def _field_noise_used(field_noise: np.ndarray, rel: "_reliability.Reliability | None") -> np.ndarray:
    """Field noise, infinite where the field is on the wrong phase branch (see QsmMaps.field_noise_used)."""
    noise = np.asarray(field_noise, np.float32)
    return noise if rel is None else np.where(rel.off_branch, np.float32(np.inf), noise)


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
             settings: SeparationSettings = SeparationSettings(), log: Log = quiet, timings: dict | None = None,
             progress_bars: bool = False) -> dict[str, SeparationFit]:
    """Run the separation models of ``settings`` on ``inputs``, by name from the model registry.

    Each model states the inputs it needs (chi-separation: the local field and
    R2'; linear: R2* and chi; DECOMPOSE: the multi-echo magnitude and chi); a
    missing one is reported before any model runs.

    Parameters
    ----------
    acquisition : Acquisition
    inputs : SeparationInputs
        E.g. :meth:`QsmMaps.separation_inputs`.
    settings : SeparationSettings
        The models (the first is the run's headline chi_para / chi_dia) and their options.
    log : callable(str)
    timings : dict, optional
        Receives the seconds per model.
    progress_bars : bool

    Returns
    -------
    dict
        Model name -> :class:`~chisep.separation.base.SeparationFit`.
    """
    from chisep.separation import MODELS

    timings = {} if timings is None else timings
    step = stepper(timings, log)
    for name in settings.models:
        inputs.require(MODELS.get(name).requires, name)
    if inputs.r2_source is not None:
        log(f"  R2 for R2': {inputs.r2_source}")
    results: dict[str, SeparationFit] = {}
    for name in settings.models:
        if name in EXPERIMENTAL_MODELS:
            log(f"warning: {EXPERIMENTAL_MODELS[name]}")
        model = MODELS.build(name, acquisition, **settings.options(name))
        # a bar appears only for a model that reports progress (DECOMPOSE's voxel fits)
        with step(f"separation:{name}"), _ProgressBar(f"{name} voxels", enabled=progress_bars) as bar:
            results[name] = model.fit(inputs, progress=bar.update)
        info = results[name].info
        if "r2prime_term_weight" in info:
            log(f"  {name}: R2' term weighted {info['r2prime_term_weight']:.3g} against the field term (R2' noise "
                f"{info['r2prime_noise_used']:.3g} 1/s, field noise {info['field_noise_hz_used']:.3g} Hz)")
    return results


# ---------------------------------------------------------------------------
# quality flags
# ---------------------------------------------------------------------------
#: bits of the ``quality`` map written by :func:`run_files` (a voxel may carry several)
QUALITY_FLAGS = {
    1: "total field unreliable (chisep.qsm.reliability criteria): excluded from background removal, "
       "inversion and the brain mask of the outputs",
    2: "R2* estimate clipped to the plausible range (relax.R2STAR_RANGE)",
    4: "a separation model's fit did not converge here, or (DECOMPOSE) its components are not determined by "
       "the data (standard error above max_component_std_ppm of models/decompose.toml)",
    8: "a map held NaN or Inf here before writing (written as 0)",
    16: "total field unreliable but enclosed by brain (a dark source such as a bleed or calcification): "
        "kept, down-weighted by its field noise; its R2' is not measurable, so separation models give it no "
        "weight (chi-separation splits chi there by the field and its prior, the linear model by chi's sign)",
    32: "total field of such an enclosed dark source off by phase wraps (more than half a wrap between echoes "
        "from the harmonic bridge of its neighbours): not used (no weight in background removal, inversion "
        "and chi-separation); chi there comes from the neighbours' field",
    64: "outermost voxel layer of the reconstruction region: chi is the inversion's, but R2* is partial volume "
        "with skull, dura and CSF, so separation models take R2*, R2 and R2' from the neighbours inside "
        "(written R2' included; the written R2* is this voxel's own)",
}


def quality_map(qsm: "QsmMaps", separations: Mapping[str, SeparationFit] | None = None) -> np.ndarray:
    """Per-voxel bit flags (uint8, see :data:`QUALITY_FLAGS`) inside the head mask, 0 outside.

    The head mask (the given or automatic mask) is covered, not just the
    brain mask of the outputs, so that every voxel left out as unreliable is
    flagged. Voxels where a fit failed are flagged rather than trusted: the
    written maps hold 0 where they were non-finite, and this map says where
    that happened.

    Parameters
    ----------
    qsm : QsmMaps
    separations : dict, optional
        Model name -> SeparationFit.

    Returns
    -------
    (x, y, z) uint8 array
    """
    from chisep import relax

    head = np.asarray(qsm.head_mask, bool)
    mask = np.asarray(qsm.mask, bool)
    flags = np.zeros(head.shape, np.uint8)
    flags[qsm.excluded_mask | (head & ~np.isfinite(qsm.field_total))] |= 1
    if qsm.reliability is not None:
        flags[qsm.reliability.enclosed & head] |= 16
        flags[qsm.reliability.off_branch & head] |= 32
    if qsm.rim_mask is not None:
        flags[np.asarray(qsm.rim_mask, bool) & head] |= 64
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
