"""One interface for every susceptibility source-separation model.

In the spirit of dipy's Model/Fit: a model is built from the acquisition and
its settings, ``model.fit(inputs)`` takes one :class:`SeparationInputs` (the
maps of one head on one grid) and returns a :class:`SeparationFit` with the
maps, their uncertainty and ``predict()``, the observations the fitted
components imply. Models register under their name in :data:`MODELS`, so the
pipeline, the command line and any new model plug in the same way::

    model = MODELS.build("chi-separation", acquisition, lam=1e-3)
    fit = model.fit(SeparationInputs(mask=brain, chi=chi, local_field_hz=f, r2star=r2s, r2=r2))
    fit.chi_para, fit.chi_dia, fit.chi_para_std, fit.predict()["r2prime"]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Mapping

import numpy as np

from chisep import grid, relax
from chisep import validate as v
from chisep.acquisition import Acquisition
from chisep.errors import InputError
from chisep.registry import Registry

__all__ = ["SeparationInputs", "SeparationFit", "SeparationModel", "MODELS", "R2_RULE_DEFAULT"]

#: R2*-only mode (no measured R2): R2 = min(nominal_r2, (1 - r2prime_fraction) R2*), chosen on realistic
#: head A (benchmarks/bench_head.py, RESULTS.md "R2' and the R2*-only rule").
R2_RULE_DEFAULT = {"nominal_r2": 13.0, "r2prime_fraction": 0.3}


def r2_from_rule(r2star, *, nominal_r2: float = 13.0, r2prime_fraction: float | None = 0.3):
    """R2 (1/s) without a measured map: ``nominal_r2``, capped at (1 - r2prime_fraction) R2* when a fraction is set.

    A nominal R2 alone leaves grey matter and CSF R2' 5-6 1/s too low (their R2 is below 13 1/s);
    a fixed fraction alone (Ji et al., NMR Biomed 2024) halves the globus pallidus' R2'.

    Parameters
    ----------
    r2star : array, 1/s
    nominal_r2 : float, 1/s
    r2prime_fraction : float in (0, 1) or None
        R2' is at least this share of R2*; None: R2 = ``nominal_r2`` everywhere.

    Returns
    -------
    r2 : float32 array, 1/s
    source : str
        Where the R2 came from (for logs and provenance).

    Examples
    --------
    >>> r2, source = r2_from_rule(np.array([10.0, 40.0]))
    >>> r2.tolist(), source
    ([7.0, 13.0], 'R2*-only: R2 = min(13 1/s, 0.7 R2*)')
    """
    nominal = np.full(np.shape(r2star), nominal_r2, np.float32)
    if r2prime_fraction is None:
        return nominal, f"R2*-only: R2 = {nominal_r2:g} 1/s"
    cap = (1.0 - r2prime_fraction) * np.asarray(r2star, np.float32)
    return np.minimum(nominal, cap).astype(np.float32), (
        f"R2*-only: R2 = min({nominal_r2:g} 1/s, {1 - r2prime_fraction:g} R2*)")


@dataclass(frozen=True)
class SeparationInputs:
    """The maps of one head that separation models fit, all on one voxel grid.

    Every map is optional except the mask; a model names what it needs in
    ``requires`` and refuses inputs without it. R2' is computed here once,
    from ``r2prime`` if given, else R2* minus R2 (measured, or by the
    R2*-only rule ``r2_rule`` when ``r2`` is None).

    Parameters
    ----------
    mask : (x, y, z) bool array
        Voxels to separate; every output is 0 outside.
    chi : (x, y, z) array, ppm, optional
        QSM map (positive paramagnetic), e.g. from :func:`chisep.qsm.inversion.invert`.
    local_field_hz : (x, y, z) array, Hz, optional
        Background-removed field.
    total_field_hz : (x, y, z) array, Hz, optional
        Total field, background included (``QsmMaps.field_total`` after a total-field inversion):
        chi-separation then fits it with the single-step inversion's data terms instead of the local
        field (:mod:`chisep.separation.chi_separation`).
    r2star : (x, y, z) array, 1/s, optional
    r2 : (x, y, z) array, 1/s, optional
        Measured R2 (1/T2 from a spin-echo map).
    r2prime : (x, y, z) array, 1/s, optional
        R2' given directly (then ``r2star``/``r2`` are not used for it).
    field_noise_hz : (x, y, z) array, Hz, optional
        Standard error of the field (weights and uncertainty).
    magnitude : (x, y, z, echo) array, optional
        Multi-echo magnitude (DECOMPOSE's data; chi-separation's edge prior).
    csf_mask : (x, y, z) bool array, optional
        CSF voxels, whose components chi-separation pulls to their mean.
    r2prime_unknown : (x, y, z) bool array, optional
        Voxels whose R2' cannot be measured: dark sources (calcifications, bleeds) whose
        signal is gone by the first echo, so that R2* comes out near 0 where the truth is
        hundreds of 1/s (e.g. ``QsmMaps.reliability.enclosed``). Models give their R2' no
        weight: chi-separation splits them by the field and its prior, the linear model
        by the sign of chi.
    relaxation_rim : (x, y, z) bool array, optional
        Voxels of the mask whose R2* (and measured R2) are partial volume with what lies outside
        the brain, e.g. ``QsmMaps.rim_mask``, the reconstruction region's outermost voxel layer:
        skull and dura shorten T2* there, CSF lengthens it. Their R2*, R2 and R2' are replaced by the
        Gaussian-weighted mean (sigma one voxel) of the nearest other voxels of the mask
        (:func:`chisep.grid.fill_from_neighbours`) before any model sees them; their chi and field
        are kept.
    r2_rule : dict
        ``nominal_r2`` (1/s) and ``r2prime_fraction`` of :func:`r2_from_rule`.

    Attributes
    ----------
    r2prime : (x, y, z) float32 array, 1/s, or None
        The R2' every model sees (given, or made here).
    r2 : the R2 used (measured, or from the rule); r2_source : str
        Where R2' came from ("measured", "R2*-only: ...", "R2' given").

    Examples
    --------
    >>> mask = np.ones((2, 2, 2), bool)
    >>> inputs = SeparationInputs(mask=mask, r2star=np.full((2, 2, 2), 30.0), r2=np.full((2, 2, 2), 12.0))
    >>> float(inputs.r2prime[0, 0, 0]), inputs.r2_source
    (18.0, 'measured')
    """

    mask: np.ndarray
    chi: np.ndarray | None = None
    local_field_hz: np.ndarray | None = None
    total_field_hz: np.ndarray | None = None
    r2star: np.ndarray | None = None
    r2: np.ndarray | None = None
    r2prime: np.ndarray | None = None
    field_noise_hz: np.ndarray | None = None
    magnitude: np.ndarray | None = None
    csf_mask: np.ndarray | None = None
    r2prime_unknown: np.ndarray | None = None
    relaxation_rim: np.ndarray | None = None
    r2_rule: Mapping = field(default_factory=lambda: dict(R2_RULE_DEFAULT))
    r2_source: str | None = field(default=None, init=False)

    def __post_init__(self):
        mask = np.asarray(self.mask)
        shape = mask.shape
        if mask.ndim != 3:
            raise InputError(f"mask must be a 3D array (x, y, z), got shape {shape}")
        mask = v.as_mask(mask, shape)
        object.__setattr__(self, "mask", mask)
        for name, fix in (("chi", "fix the QSM map or exclude those voxels from the mask"),
                          ("local_field_hz", "remove them from the mask or fill them"),
                          ("total_field_hz", "remove them from the mask or fill them"),
                          ("r2star", "fix the R2* fit or the mask"), ("r2", "fix the R2 map or the mask"),
                          ("r2prime", "R2' = max(R2* - R2, 0) must be finite in the mask")):
            value = getattr(self, name)
            if value is not None:
                arr = v.as_volume(value, name, shape=shape)
                v.check_finite(arr, name, mask, fix=fix)
                object.__setattr__(self, name, arr)
        if self.magnitude is not None:
            mag = v.as_multi_echo(self.magnitude, "magnitude", shape=shape, allow_3d=True)
            v.check_finite(mag, "magnitude", mask)
            v.check_non_negative(mag, "magnitude", mask, fix="pass |S|, the magnitude images")
            object.__setattr__(self, "magnitude", mag)
        if self.field_noise_hz is not None:
            noise = np.broadcast_to(np.asarray(self.field_noise_hz, np.float32), shape) \
                if np.ndim(self.field_noise_hz) == 0 else v.as_volume(self.field_noise_hz, "field_noise_hz",
                                                                      shape=shape)
            if np.any(np.isnan(noise[mask])) or np.any(noise[mask] < 0):
                raise InputError("field_noise_hz must be >= 0 Hz inside the mask (inf allowed for unusable "
                                 "voxels); found NaN or negative values")
            object.__setattr__(self, "field_noise_hz", noise)
        if self.csf_mask is not None:
            csf = v.as_mask(self.csf_mask, shape, name="csf_mask", allow_empty=True)
            object.__setattr__(self, "csf_mask", csf & mask)
        if self.r2prime_unknown is not None:
            unknown = v.as_mask(self.r2prime_unknown, shape, name="r2prime_unknown", allow_empty=True)
            object.__setattr__(self, "r2prime_unknown", unknown & mask)
        for name in ("r2star", "r2"):
            value = getattr(self, name)
            if value is not None:
                v.check_non_negative(value, name, mask, fix="relaxation rates are >= 0 1/s (R2 = 1000 / T2[ms])")
        if self.relaxation_rim is not None:
            rim = v.as_mask(self.relaxation_rim, shape, name="relaxation_rim", allow_empty=True) & mask
            object.__setattr__(self, "relaxation_rim", rim)
            # neighbours whose R2' is itself unknown (a dark source's R2* reads ~0) are not copied
            known = mask & ~rim if self.r2prime_unknown is None else mask & ~rim & ~self.r2prime_unknown
            for name in ("r2star", "r2", "r2prime"):
                value = getattr(self, name)
                if value is not None and rim.any():
                    object.__setattr__(self, name, grid.fill_from_neighbours(value, known, rim))
        if self.r2prime is not None:
            v.check_non_negative(self.r2prime, "r2prime", mask,
                                 fix="R2' is a non-negative rate: use R2' = max(R2* - R2, 0)")
            object.__setattr__(self, "r2_source", "R2' given")
        elif self.r2star is not None:
            if self.r2 is None:
                r2, source = r2_from_rule(self.r2star, **dict(self.r2_rule))
                object.__setattr__(self, "r2", r2)
                object.__setattr__(self, "r2_source", source)
            else:
                object.__setattr__(self, "r2_source", "measured")
            object.__setattr__(self, "r2prime", relax.r2prime_map(self.r2star, self.r2, mask=mask)[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.mask.shape

    @property
    def r2_from_rule(self) -> bool:
        """R2' was formed with the R2*-only rule's R2, not a measured one."""
        return self.r2_source is not None and self.r2_source.startswith("R2*-only")

    def require(self, names, model: str) -> None:
        """Raise an error naming every input ``model`` needs that is missing (a tuple in ``names``: any one
        of its inputs will do)."""
        def flag(n):
            return f"--{n.replace('_hz', '').replace('_', '-')} FILE"

        missing = [n for n in names if all(getattr(self, a) is None for a in (n if isinstance(n, tuple) else (n,)))]
        if missing:
            needs = " and ".join(" or ".join(n) if isinstance(n, tuple) else n for n in missing)
            flags = " and ".join(" or ".join(map(flag, n)) if isinstance(n, tuple) else flag(n) for n in missing)
            raise InputError(f"model {model} needs {needs} (on the command line: {flags})")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass
class SeparationFit:
    """Maps produced by a separation model, their uncertainty, and the model's prediction.

    Attributes
    ----------
    chi_para : ndarray
        Paramagnetic susceptibility, ppm, >= 0, shape of the input volume.
    chi_dia : ndarray
        Diamagnetic susceptibility as a non-negative magnitude, ppm
        (chi_total = chi_para - chi_dia).
    chi_para_std, chi_dia_std : ndarray or None
        Standard deviation (uncertainty) of chi_para / chi_dia, ppm.
    residual : ndarray or None
        Per-voxel model residual (model-specific units, documented in ``info``).
    extra : dict[str, ndarray]
        Further named maps (e.g. ``"r2star0"``, ``"c_para"``, their ``*_std``).
    info : dict
        Settings, constants used (with their sources), units and notes.
    model : SeparationModel or None
        The model that produced this fit (used by :meth:`predict`).
    """

    chi_para: np.ndarray
    chi_dia: np.ndarray
    chi_para_std: np.ndarray | None = None
    chi_dia_std: np.ndarray | None = None
    residual: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    model: "SeparationModel | None" = field(default=None, repr=False)
    inputs: "SeparationInputs | None" = field(default=None, repr=False)

    @property
    def chi_total(self) -> np.ndarray:
        """Total susceptibility implied by the two sources, ppm (chi_para - chi_dia)."""
        return np.asarray(self.chi_para) - np.asarray(self.chi_dia)

    def maps(self) -> dict[str, np.ndarray]:
        """All maps by name (chi_para, chi_dia, ``*_std``, residual, then ``extra``), Nones skipped."""
        out = {"chi_para": self.chi_para, "chi_dia": self.chi_dia}
        for name in ("chi_para_std", "chi_dia_std", "residual"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out.update(self.extra)
        return out

    def predict(self) -> dict[str, np.ndarray]:
        """The observations the fitted components imply, by input name (e.g. ``local_field_hz``, ``r2prime``)."""
        if self.model is None:
            raise InputError("this fit has no model attached; build it with a SeparationModel's fit()")
        return self.model.predict(self)


class SeparationModel(ABC):
    """Base of the separation models: built from the acquisition and settings, ``fit(inputs) -> SeparationFit``.

    Subclasses set ``name`` (the registry key), ``requires`` (the
    :class:`SeparationInputs` fields they need) and implement ``_fit`` and
    ``predict``.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, acquisition: Acquisition):
        if not isinstance(acquisition, Acquisition):
            raise InputError(f"{type(self).__name__} needs a chisep.acquisition.Acquisition (field strength, "
                             f"geometry, echo times), got {type(acquisition).__name__}; e.g. "
                             "Acquisition(echo_times=(), field_strength=3.0, voxel_size=(1, 1, 1))")
        self.acquisition = acquisition

    @property
    def field_strength(self) -> float:
        return self.acquisition.field_strength

    def fit(self, inputs: SeparationInputs, *, progress: Callable[[int, int], None] | None = None) -> SeparationFit:
        """Separate chi_para and chi_dia from ``inputs`` (see the model's class docstring for what it uses)."""
        if not isinstance(inputs, SeparationInputs):
            raise InputError(f"{self.name}.fit takes a SeparationInputs, got {type(inputs).__name__}")
        inputs.require(self.requires, self.name)
        result = self._fit(inputs, progress=progress)
        result.model, result.inputs = self, inputs
        result.info.setdefault("model", self.name)
        if inputs.r2_source is not None and {"r2prime", "r2star"} & set(self.requires):
            result.info.setdefault("r2_source", inputs.r2_source)
        return result

    @abstractmethod
    def _fit(self, inputs: SeparationInputs, *, progress=None) -> SeparationFit:
        ...

    @abstractmethod
    def predict(self, fit: SeparationFit) -> dict[str, np.ndarray]:
        """Forward model: the observations implied by ``fit``'s maps, by input name."""


#: every separation model, by name (``MODELS.build(name, acquisition, **settings)``)
MODELS: Registry = Registry("separation model")
