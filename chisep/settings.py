"""Settings of a run: method names, QSM and separation options, the TOML config.

Plain data with validation and no numerical imports, so that the command line
can build its options (and answer ``--help``) without loading JAX. The method
names here are the keys of the stages' registries (tests check they agree).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from chisep.errors import InputError

MODEL_NAMES = ("chi-separation", "linear", "decompose")
#: Models run when none are named. DECOMPOSE is opt-in (``--models decompose``, flagged experimental)
#: until its constants are checked against the authors' code; it adds about a minute per 1 mm brain.
DEFAULT_MODELS = ("chi-separation", "linear")
EXPERIMENTAL_MODELS = {"decompose": "DECOMPOSE is experimental: its constants are not yet checked against Chen et "
                                    "al.'s full text, and it beats the thresholded QSM on the realistic heads only with "
                                    "chisep's QSM bound on its components (benchmarks/RESULTS.md)"}
UNWRAP_METHODS = ("romeo", "laplacian", "none")
FIELD_FIT_METHODS = ("nonlinear", "weighted-linear", "echo-average")
R2STAR_METHODS = ("auto", "arlo", "loglinear", "nonlinear")
BACKGROUND_METHODS = ("vsharp", "sharp", "resharp", "pdf", "lbv")
INVERSION_METHODS = ("tv", "medi", "ilsqr", "tikhonov", "tkd", "single-step")
#: inversions that take the total field (background included): no background step runs before them
TOTAL_FIELD_METHODS = ("single-step",)
REFERENCE_METHODS = ("mean", "csf")
DENOISE_METHODS = ("mppca", "off")


# ---------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class QsmSettings:
    """Method choices of the QSM reconstruction (names are closed sets, see the module constants)."""

    unwrap: str = "romeo"
    field_fit: str = "nonlinear"
    r2star: str = "auto"
    background: str = "vsharp"  # used by the two-step inversions only (not by single-step)
    #: single-step inverts the total field (no background step): chi NRMSE 27 % against V-SHARP + MEDI's
    #: 38-41 % on head A at 1 mm, axial and 30 degrees oblique (benchmarks/bench_total_field.py)
    inversion: str = "single-step"
    denoise: str = "mppca"
    mask_erode_mm: float = 0.0
    gradient_correction: bool = True  # undo macroscopic-gradient dephasing before R2* (relax)
    reference: str = "mean"
    background_options: dict = field(default_factory=dict)
    inversion_options: dict = field(default_factory=dict)
    denoise_options: dict = field(default_factory=dict)  # e.g. {"patch_radius": 2}, see chisep.denoise.mppca
    #: per criterion of :func:`chisep.qsm.reliability.field_reliability`, the factor over its
    #: median that makes a voxel unreliable (None switches a criterion off)
    reliability: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, value, valid in [
            ("unwrap", self.unwrap, UNWRAP_METHODS),
            ("field_fit", self.field_fit, FIELD_FIT_METHODS),
            ("r2star", self.r2star, R2STAR_METHODS),
            ("background", self.background, BACKGROUND_METHODS),
            ("inversion", self.inversion, INVERSION_METHODS),
            ("denoise", self.denoise, DENOISE_METHODS),
            ("reference", self.reference, REFERENCE_METHODS),
        ]:
            if value not in valid:
                raise InputError(f"qsm setting {name}={value!r} is not valid; choose one of: {', '.join(valid)}")
        unknown = set(self.denoise_options) - {"patch_radius", "stride"}
        if unknown:
            raise InputError(f"qsm setting denoise_options has unknown keys {sorted(unknown)}; "
                             "MP-PCA takes patch_radius and stride (chisep.denoise.mppca)")
        if not self.mask_erode_mm >= 0:
            raise InputError(f"mask_erode_mm must be >= 0 mm, got {self.mask_erode_mm}")
        if self.reliability:  # imported only then: the CLI builds default settings and must start fast
            from chisep.qsm.reliability import check_factors

            check_factors(self.reliability)


@dataclass(frozen=True)
class SeparationSettings:
    """Which separation models run (the first one gives the top-level chi_para/chi_dia) and their options."""

    models: tuple[str, ...] = DEFAULT_MODELS
    nominal_r2: float = 13.0
    #: R2*-only mode (no measured R2): R2' = max(R2* - nominal_r2, r2prime_fraction * R2*), i.e. R2 at
    #: most (1 - fraction) R2*. Chosen on realistic head A (benchmarks/bench_head.py, RESULTS.md): R2* minus
    #: a nominal R2 alone gives grey matter and CSF R2' 5-6 1/s too low (their R2 is below 13 1/s); a
    #: fixed fraction alone (Ji et al., NMR Biomed 2024) halves the globus pallidus' R2' (-18 1/s).
    #: None: R2* - nominal_r2 only.
    r2prime_fraction: float | None = 0.3
    chi_separation: dict = field(default_factory=dict)
    linear: dict = field(default_factory=dict)
    decompose: dict = field(default_factory=dict)

    def __post_init__(self):
        models = tuple(self.models)
        bad = [m for m in models if m not in MODEL_NAMES]
        if bad:
            raise InputError(f"unknown separation model(s) {', '.join(bad)}; valid: {', '.join(MODEL_NAMES)}")
        if len(set(models)) != len(models):
            raise InputError(f"separation models listed twice: {', '.join(models)}")
        object.__setattr__(self, "models", models)
        if not self.nominal_r2 >= 0:
            raise InputError(f"nominal_r2 must be >= 0 1/s, got {self.nominal_r2}")
        if self.r2prime_fraction in (0, False, "off", "none"):  # a TOML file cannot say None
            object.__setattr__(self, "r2prime_fraction", None)
        if self.r2prime_fraction is not None and not 0 < self.r2prime_fraction < 1:
            raise InputError(f"r2prime_fraction is the share of R2* taken as R2' and must lie in (0, 1), "
                             f"got {self.r2prime_fraction}; or None for R2* minus nominal_r2")

    @property
    def r2_rule(self) -> dict:
        """The R2*-only rule as :class:`chisep.separation.base.SeparationInputs` takes it."""
        return {"nominal_r2": self.nominal_r2, "r2prime_fraction": self.r2prime_fraction}

    def options(self, model: str) -> dict:
        """The keyword options of ``model``'s constructor (``chi_separation``, ``linear``, ``decompose``)."""
        return dict(getattr(self, model.replace("-", "_")))


@dataclass(frozen=True)
class PipelineSettings:
    qsm: QsmSettings = field(default_factory=QsmSettings)
    separation: SeparationSettings = field(default_factory=SeparationSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_sources(cls, *, args=None, config_path: str | Path | None = None,
                     models: Sequence[str] | None = None) -> "PipelineSettings":
        """Settings from a TOML config (``[qsm]``, ``[separation]``), then command-line flags.

        Flags given explicitly on the command line win over the config file;
        argparse defaults do not override values from the file.
        """
        qsm: dict[str, Any] = {}
        sep: dict[str, Any] = {}
        if config_path is not None:
            config = load_config(config_path)
            qsm.update(config.get("qsm", {}))
            sep.update(config.get("separation", {}))
        if args is not None:
            defaults = QsmSettings()
            for flag, key in [("unwrap", "unwrap"), ("field_fit", "field_fit"), ("r2star_method", "r2star"),
                              ("background", "background"), ("inversion", "inversion"),
                              ("mask_erode", "mask_erode_mm"), ("reference", "reference"),
                              ("denoise", "denoise")]:
                value = getattr(args, flag, None)
                if value is not None and (key not in qsm or value != getattr(defaults, key)):
                    qsm[key] = value
        if models is not None:
            sep["models"] = tuple(models)
        try:
            return cls(qsm=QsmSettings(**qsm), separation=SeparationSettings(**sep))
        except TypeError as exc:
            raise InputError(f"configuration has an unknown setting: {exc}") from None


def load_config(path: str | Path) -> dict:
    """Read a TOML settings file with tables ``[qsm]`` and ``[separation]``."""
    path = Path(path)
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"--config {path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"--config {path}: not valid TOML ({exc})") from None
    unknown = set(config) - {"qsm", "separation"}
    if unknown:
        raise InputError(f"--config {path}: unknown table(s) {', '.join(sorted(unknown))}; "
                         "valid tables: [qsm], [separation]")
    return config
