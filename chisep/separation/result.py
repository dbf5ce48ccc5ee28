"""Result container shared by the separation models (linear, chi-separation, DECOMPOSE-QSM)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SeparationResult:
    """Maps produced by a susceptibility source-separation model.

    Attributes
    ----------
    chi_para : ndarray
        Paramagnetic susceptibility, ppm, >= 0, shape of the input volume.
    chi_dia : ndarray
        Diamagnetic susceptibility as a non-negative magnitude, ppm
        (chi_total = chi_para - chi_dia).
    chi_para_std, chi_dia_std : ndarray or None
        Standard deviation (uncertainty) of chi_para / chi_dia, ppm; None when
        the model cannot provide one.
    residual : ndarray or None
        Per-voxel model residual (model-specific units, documented in ``info``).
    extra : dict[str, ndarray]
        Further named maps (e.g. ``"r2star0"``, ``"c_para"``, their ``*_std``).
    info : dict
        Settings, constants used (with their sources), units and notes.
    """

    chi_para: np.ndarray
    chi_dia: np.ndarray
    chi_para_std: np.ndarray | None = None
    chi_dia_std: np.ndarray | None = None
    residual: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def chi_total(self) -> np.ndarray:
        """Total susceptibility implied by the two sources, ppm (chi_para - chi_dia)."""
        return np.asarray(self.chi_para) - np.asarray(self.chi_dia)

    def maps(self) -> dict[str, np.ndarray]:
        """All maps by name (chi_para, chi_dia, *_std, residual, then ``extra``), Nones skipped."""
        out = {"chi_para": self.chi_para, "chi_dia": self.chi_dia}
        for name in ("chi_para_std", "chi_dia_std", "residual"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out.update(self.extra)
        return out
